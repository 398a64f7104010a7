"""Physical deception, as mpe2 `simple_adversary_v3` (MPE `simple_adversary`, ENV_SPECS §2.4).

One adversary (agent 0) and G good agents (mpe2's N, default 2), all size 0.15; G landmarks of
size 0.08. Nothing collides. Reset: agents and landmarks U[-1, 1]^2, and one landmark, the goal,
drawn uniformly per episode. The good agents know the goal; the adversary does not.

Rewards (mpe2's shaped rewards; d_i = |p_i - goal|, Euclidean, not squared):
- adversary: r = -d_adversary;
- every good agent: r = -min_{good g} d_g + d_adversary.
Observation of the adversary: [landmarks - p, other agents - p (world order)], 4G values.
Observation of good agent i: [goal - p_i, landmarks - p_i, other agents - p_i], 2 + 4G values.
No velocities and no absolute positions (8 and 10 by default). The global state appends the
goal's one-hot to ParticleEnv's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vimarl.envs.particle.base import AgentGroup, ParticleConfig, ParticleEnv
from vimarl.envs.particle.geometry import without_self
from vimarl.envs.particle.world import PhysicsOptions, World

GOAL_STREAM = 1
"""rng stream of the goal draw (stream 0 draws the positions)."""


class GoalLandmarkEnv(ParticleEnv):
    """A particle scenario with one goal landmark per episode (mpe2 `np_random.integers(L)`).

    `goal [B]` indexes the landmarks (the entities after the agents); it is simulation state,
    saved in checkpoints and given to centralised critics as a one-hot in the global state.
    """

    state_fields = (*ParticleEnv.state_fields, "goal")

    def __init__(self, config: ParticleConfig, num_envs: int, seed: int = 0, device="cpu"):
        super().__init__(config, num_envs, seed, device)
        self.goal = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self.state_dim += self.n_landmarks

    @property
    def n_landmarks(self) -> int:
        return self.world.position.shape[1] - self.world.n_agents

    def _reset_envs(self, env_mask: Tensor) -> None:
        super()._reset_envs(env_mask)
        env_ids = self.env_ids[env_mask]
        draw = self.uniform(env_ids, self.episode_index[env_ids], (), 0.0, self.n_landmarks, stream=GOAL_STREAM)
        # The clamp guards against float32 rounding n * u up to n.
        self.goal[env_mask] = draw.long().clamp_max(self.n_landmarks - 1)

    def goal_position(self) -> Tensor:
        """[B, 2] position of each sub-environment's goal landmark."""
        landmarks = self.world.position[:, self.world.n_agents:]
        return landmarks.gather(1, self.goal.view(-1, 1, 1).expand(-1, 1, 2)).squeeze(1)

    def global_state(self) -> Tensor:
        return torch.cat([super().global_state(), F.one_hot(self.goal, self.n_landmarks).float()], -1)


@dataclass
class AdversaryConfig(ParticleConfig):
    num_good: int = 2
    """Good agents, and as many landmarks (mpe2's N)."""

    def __post_init__(self):
        if self.num_good < 1:
            raise ValueError(f"num_good must be at least 1, got {self.num_good}")


class Adversary(GoalLandmarkEnv):
    Config = AdversaryConfig

    def make_world(self) -> World:
        n_good = self.config.num_good
        n_agents = n_good + 1
        # mpe2 colours (x 255): red adversary, blue good agents, dark grey landmarks.
        self.colors = np.array([[217, 89, 89]] + [[89, 89, 217]] * n_good + [[38, 38, 38]] * n_good)
        return World(self.num_envs, size=[0.15] * n_agents + [0.08] * n_good,
                     movable=[True] * n_agents + [False] * n_good, collide=[False] * (n_agents + n_good),
                     n_agents=n_agents, options=PhysicsOptions(integration=self.config.integration),
                     device=self.device)

    def make_groups(self) -> list[AgentGroup]:
        n_good = self.config.num_good
        return [AgentGroup("adversary", 0, 1, obs_dim=4 * n_good),
                AgentGroup("agents", 1, 1 + n_good, obs_dim=2 + 4 * n_good)]

    def reset_entities(self, env_ids: Tensor, episode_ids: Tensor) -> Tensor:
        return self.uniform(env_ids, episode_ids, (self.world.position.shape[1], 2), -1.0, 1.0)

    def rewards(self) -> dict[str, Tensor]:
        agents = self.world.position[:, : self.world.n_agents]
        to_goal = torch.linalg.vector_norm(agents - self.goal_position().unsqueeze(1), dim=-1)  # [B, 1 + G]
        adversary_distance = to_goal[:, :1]
        good_reward = -to_goal[:, 1:].min(-1, keepdim=True).values + adversary_distance
        return {"adversary": -adversary_distance, "agents": good_reward.expand(-1, self.config.num_good)}

    def observations(self) -> dict[str, Tensor]:
        n_agents = self.world.n_agents
        agents = self.world.position[:, :n_agents]
        to_landmarks = self.world.position[:, n_agents:].unsqueeze(1) - agents.unsqueeze(2)
        to_others = without_self(agents.unsqueeze(1) - agents.unsqueeze(2))
        relative = torch.cat([to_landmarks.flatten(2), to_others.flatten(2)], -1)  # [B, 1 + G, 4G]
        to_goal = self.goal_position().unsqueeze(1) - agents[:, 1:]
        return {"adversary": relative[:, :1], "agents": torch.cat([to_goal, relative[:, 1:]], -1)}
