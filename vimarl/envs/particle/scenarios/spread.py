"""Cooperative navigation, as mpe2 `simple_spread_v3` (MPE `simple_spread`, ENV_SPECS §2.1).

N agents (size 0.15, colliding) must cover N landmarks while avoiding each other. Agent i's
reward mixes the team term and its own collisions as mpe2 does:
r_i = (1 - local_ratio) * (-sum_l min_a |p_a - l|) + local_ratio * (-#{a != i : |p_a - p_i| < 0.3}).
Observation: [v_i, p_i, landmarks - p_i, other agents - p_i, others' messages (always 0: the
agents are silent)], 4 + 2N + 4(N - 1) values. The team reward sum_i r_i is what the trainer
reports as the episode return.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vimarl.envs.particle.base import AgentGroup, ParticleConfig, ParticleEnv
from vimarl.envs.particle.geometry import pairwise_distance, without_self
from vimarl.envs.particle.world import PhysicsOptions, World

AGENT_SIZE = 0.15
MESSAGE_DIM = 2


@dataclass
class SpreadConfig(ParticleConfig):
    n_agents: int = 3
    """Agents, and as many landmarks (mpe2's N)."""
    local_ratio: float = 0.5
    """Weight of an agent's own collision penalty against the shared coverage term (mpe2 default)."""

    def __post_init__(self):
        if self.n_agents < 1:
            raise ValueError(f"n_agents must be at least 1, got {self.n_agents}")
        if not 0.0 <= self.local_ratio <= 1.0:
            raise ValueError(f"local_ratio must be in [0, 1], got {self.local_ratio}")


class Spread(ParticleEnv):
    Config = SpreadConfig

    def make_world(self) -> World:
        n = self.config.n_agents
        return World(self.num_envs, size=[AGENT_SIZE] * n + [0.05] * n, movable=[True] * n + [False] * n,
                     collide=[True] * n + [False] * n, n_agents=n,
                     options=PhysicsOptions(integration=self.config.integration), device=self.device)

    def make_groups(self) -> list[AgentGroup]:
        n = self.config.n_agents
        return [AgentGroup("agents", 0, n, obs_dim=4 + 2 * n + 4 * (n - 1))]

    def reset_entities(self, env_ids: Tensor, episode_ids: Tensor) -> Tensor:
        return self.uniform(env_ids, episode_ids, (2 * self.config.n_agents, 2), -1.0, 1.0)

    def rewards(self) -> dict[str, Tensor]:
        n, position = self.config.n_agents, self.world.position
        agents, landmarks = position[:, :n], position[:, n:]
        coverage = -pairwise_distance(landmarks, agents).min(-1).values.sum(-1, keepdim=True)  # [B, 1]
        distance = pairwise_distance(agents, agents)
        colliding = (distance < 2 * AGENT_SIZE) & ~torch.eye(n, dtype=torch.bool, device=self.device)
        collisions = -colliding.sum(-1).float()
        ratio = self.config.local_ratio
        return {"agents": (1 - ratio) * coverage + ratio * collisions}

    def observations(self) -> dict[str, Tensor]:
        n, world = self.config.n_agents, self.world
        own = world.position[:, :n]
        to_landmarks = world.position[:, n:].unsqueeze(1) - own.unsqueeze(2)  # [B, N, L, 2]
        to_others = without_self(own.unsqueeze(1) - own.unsqueeze(2))  # [B, N, N - 1, 2]
        messages = torch.zeros(self.num_envs, n, MESSAGE_DIM * (n - 1), device=self.device)
        obs = torch.cat([world.velocity[:, :n], own, to_landmarks.flatten(2), to_others.flatten(2), messages], -1)
        return {"agents": obs}
