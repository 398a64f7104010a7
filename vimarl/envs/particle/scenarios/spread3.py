"""MAMT's Spread-3 (004 App. F, Fig. 9): cooperative navigation with 3 agents and 3 landmarks
whose reward functions make the agents independent ("sep"), pairwise coupled ("mix") or fully
coupled ("ful"), to show the trust-region decomposition dilemma.

What the paper says: each reward has two parts, the minimum distance between agents and
landmarks, and collisions. Sep: agent i's reward "is only related to itself, only related to
the minimum distance between itself and a certain landmark, and will not collide with other
agents". Mix: agent j as in Sep; agents i and k share "the minimum distance between i and k and
the landmark, and whether the two collide". Ful: "the normal environment settings", which App.
G.1 gives for Spread: the sum over landmarks of the closest agent's distance, shared, and -1 per
collision, individually.

All three are one formula over a partition of the agents into coupling groups g(i) (sep:
{0}{1}{2}; mix: {0, 1}{2}, so i, k = agents 0, 1 and j = agent 2; ful: {0, 1, 2}), where
landmark l is agent l's own:
    r_i = -sum_{l in g(i)} min_{a in g(i)} |p_a - l_l|
          - collision_penalty * #{a in g(i), a != i : |p_a - p_i| < 0.3}.
So sep gives r_i = -|p_i - l_i|; mix gives agents 0 and 1 the same
-(min(d_00, d_10) + min(d_01, d_11)) - [|p_0 - p_1| < 0.3] and agent 2 -|p_2 - l_2|; ful is
MAMT's Spread with 3 agents.

Left open by the paper, chosen here:
- "A certain landmark" is a fixed one: agent i owns landmark i, and a group covers the
  landmarks of its members.
- Physical contact: `contact` "coupled" (default) lets only agents of the same group push each
  other, so Sep and Mix are independent in their dynamics too ("will not collide"); "all" keeps
  MPE's contact between every pair and decouples the rewards only. Per-entity collide flags are
  enough because each structure has at most one group of several agents.
- The rest follows MPE's Spread on MAAC's code base, which MAMT builds on: agents size 0.15,
  mass 1, no accel (sensitivity 5; MAAC's fork then behaves as the original MPE), landmarks
  size 0.05; reset U[-1, 1]^2; 25 steps per episode (MAAC's default).
Observation: [v, p, landmarks - p (landmark i is agent i's own), other agents - p], 14 values;
the agents are silent, so MPE's always-zero comm entries are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vimarl.envs.particle.base import AgentGroup, ParticleEnv
from vimarl.envs.particle.geometry import pairwise_distance, without_self
from vimarl.envs.particle.maac import ForceControlConfig, maac_physics, movement_space
from vimarl.envs.particle.world import World

N_AGENTS = 3
AGENT_SIZE, LANDMARK_SIZE = 0.15, 0.05
COUPLING_GROUPS = {"sep": ((0,), (1,), (2,)), "mix": ((0, 1), (2,)), "ful": ((0, 1, 2),)}
"""Fig. 9's three Markov random fields, as partitions of the agents into coupled groups."""


@dataclass
class Spread3Config(ForceControlConfig):
    coupling: Literal["sep", "mix", "ful"] = "ful"
    """Reward structure: independent agents, agents 0 and 1 coupled, or all coupled (Fig. 9)."""
    collision_penalty: float = 1.0
    """Penalty per collision with a coupled agent (-1 per collision in MAMT's Spread)."""
    contact: Literal["coupled", "all"] = "coupled"
    """Which agents push each other physically: those of the same coupling group, or all (MPE)."""

    def __post_init__(self):
        if self.coupling not in COUPLING_GROUPS:
            raise ValueError(f"coupling must be one of {', '.join(COUPLING_GROUPS)}, got {self.coupling!r}")
        if self.contact not in ("coupled", "all"):
            raise ValueError(f"contact must be 'coupled' or 'all', got {self.contact!r}")
        if self.collision_penalty < 0:
            raise ValueError(f"collision_penalty must be non-negative, got {self.collision_penalty}")


class Spread3(ParticleEnv):
    Config = Spread3Config
    action_convention = "mpe"

    def __init__(self, config: Spread3Config, num_envs: int, seed: int = 0, device="cpu"):
        super().__init__(config, num_envs, seed, device)
        # coupled[i, a]: agents i and a are in the same group (so are i and landmark a).
        group_of = torch.empty(N_AGENTS, dtype=torch.int64)
        for index, group in enumerate(COUPLING_GROUPS[config.coupling]):
            group_of[list(group)] = index
        self.coupled = (group_of.unsqueeze(1) == group_of.unsqueeze(0)).to(self.device)

    def make_world(self) -> World:
        groups = COUPLING_GROUPS[self.config.coupling]
        if self.config.contact == "all":
            collide = [True] * N_AGENTS
        else:
            collide = [any(a in g and len(g) > 1 for g in groups) for a in range(N_AGENTS)]
        return World(self.num_envs, size=[AGENT_SIZE] * N_AGENTS + [LANDMARK_SIZE] * N_AGENTS,
                     movable=[True] * N_AGENTS + [False] * N_AGENTS, collide=collide + [False] * N_AGENTS,
                     n_agents=N_AGENTS, options=maac_physics(self.config.integration), device=self.device)

    def make_groups(self) -> list[AgentGroup]:
        return [AgentGroup("agents", 0, N_AGENTS, obs_dim=4 + 2 * N_AGENTS + 2 * (N_AGENTS - 1),
                           action_space=movement_space(self.config))]

    def reset_entities(self, env_ids: Tensor, episode_ids: Tensor) -> Tensor:
        return self.uniform(env_ids, episode_ids, (2 * N_AGENTS, 2), -1.0, 1.0)

    def rewards(self) -> dict[str, Tensor]:
        agents, landmarks = self.world.position[:, :N_AGENTS], self.world.position[:, N_AGENTS:]
        coupled = self.coupled
        to_landmarks = pairwise_distance(agents, landmarks)  # [B, a, l]
        # [B, i, l]: the closest agent of i's group to landmark l, summed over the group's landmarks.
        closest = to_landmarks.unsqueeze(1).masked_fill(~coupled.view(1, N_AGENTS, N_AGENTS, 1), float("inf"))
        coverage = torch.where(coupled, closest.min(2).values, 0.0).sum(-1)
        others = coupled & ~torch.eye(N_AGENTS, dtype=torch.bool, device=self.device)
        collisions = ((pairwise_distance(agents, agents) < 2 * AGENT_SIZE) & others).sum(-1).float()
        return {"agents": -coverage - self.config.collision_penalty * collisions}

    def observations(self) -> dict[str, Tensor]:
        world = self.world
        own = world.position[:, :N_AGENTS]
        to_landmarks = world.position[:, N_AGENTS:].unsqueeze(1) - own.unsqueeze(2)  # [B, N, L, 2]
        to_others = without_self(own.unsqueeze(1) - own.unsqueeze(2))
        return {"agents": torch.cat([world.velocity[:, :N_AGENTS], own, to_landmarks.flatten(2),
                                     to_others.flatten(2)], -1)}
