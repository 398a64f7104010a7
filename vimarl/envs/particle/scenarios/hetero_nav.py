"""PIC heterogeneous navigation (PIC hetero_spread_nN, ENV_SPECS §1.2).

Cooperative navigation with two kinds of agents: agents 0..N/2-1 are big and slow (accel 3,
max speed 1), the others small and fast (half the size, accel 4, max speed 1.3). N landmarks,
placed as in coop_nav with spacing 4.5 x the big size; agents uniform in [-R, R]^2.

Observation (22 values for N >= 8, 14 for N = 4): [v_i, p_i, the k - 1 nearest landmarks - p_i,
the k nearest other agents - p_i], k = min(5, N - 1), nearest first. As in PIC, neither the
agent's own type nor its neighbours' types are observed.

Team reward, given to every agent (see coop_nav for PIC's sharing):
R = -sum_l min_a |p_a - l| - (S + 10 D), with S the ordered same-type pairs in contact
(big-big closer than 2 x big size, small-small closer than 2 x small size) and D the ordered
big-small pairs closer than big + small size: a colliding mixed pair costs 20.

PIC quirk kept (`pic_contact`): physics pushes every pair apart at 2 x the big size, while the
reward's thresholds are the true ones.

Groups: `groups="one"` (default) is one group "agents" of N, as PIC's observation and VPP's
single policy see it; `groups="by_type"` gives groups "big" and "small" (PIC trains one actor
per type) for algorithms with per-group networks. Both groups then get the team reward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from vimarl.envs.particle.base import AgentGroup
from vimarl.envs.particle.geometry import pairwise_distance
from vimarl.envs.particle.pic import DEFAULT_SIZE, PICConfig, PICEnv, nearest, table_row
from vimarl.envs.particle.world import World

BIG_ACCEL, BIG_MAX_SPEED = 3.0, 1.0
SMALL_ACCEL, SMALL_MAX_SPEED = 4.0, 1.3
MIXED_COLLISION_COST = 10
MAX_OTHERS_SEEN = 5


@dataclass(frozen=True)
class HeteroRow:
    """The constants of one of PIC's hetero_spread_nN files (the small size is half the big one)."""

    radius: float
    big_size: float


TABLE = {4: HeteroRow(1.0, 0.10), 8: HeteroRow(1.5, 0.10), 16: HeteroRow(2.2, 0.10),
         30: HeteroRow(3.0, 0.10), 100: HeteroRow(5.0, 0.15)}


@dataclass
class HeteroNavConfig(PICConfig):
    n_agents: int = 100
    """Agents (even: half big, half small) and landmarks (VPP runs 100; PIC's files 4, 8, 16, 30, 100;
    other N take the nearest larger file's constants, or N=100's with the radius scaled by
    sqrt(N / 100) beyond it)."""
    groups: Literal["one", "by_type"] = "one"
    """one: a single group 'agents' (PIC's observation, VPP's single policy);
    by_type: groups 'big' and 'small' for algorithms with a network per group."""

    def __post_init__(self):
        if self.n_agents < 4 or self.n_agents % 2:
            raise ValueError(f"n_agents must be even and at least 4, got {self.n_agents}")


class HeteroNav(PICEnv):
    Config = HeteroNavConfig

    def make_world(self) -> World:
        n = self.config.n_agents
        self.n_big = n // 2
        row, radius_scale = table_row(TABLE, n)
        self.radius, self.big_size = row.radius * radius_scale, row.big_size
        self.k_others = min(MAX_OTHERS_SEEN, n - 1)
        is_big = [True] * self.n_big + [False] * (n - self.n_big)
        sizes = [self.big_size if big else self.big_size / 2 for big in is_big]
        self.agent_size = torch.tensor(sizes, device=self.device)
        self.colors = np.array([[89, 89, 217] if big else [89, 217, 89] for big in is_big] + [[64, 64, 64]] * n,
                               dtype=np.uint8)
        return World(self.num_envs, size=sizes + [DEFAULT_SIZE] * n,
                     movable=[True] * n + [False] * n, collide=[True] * n + [False] * n, n_agents=n,
                     accel=[BIG_ACCEL if big else SMALL_ACCEL for big in is_big],
                     max_speed=[BIG_MAX_SPEED if big else SMALL_MAX_SPEED for big in is_big] + [None] * n,
                     options=self.physics(), device=self.device)

    def make_groups(self) -> list[AgentGroup]:
        n, obs_dim = self.config.n_agents, 4 + 2 * (self.k_others - 1) + 2 * self.k_others
        if self.config.groups == "one":
            return [AgentGroup("agents", 0, n, obs_dim)]
        return [AgentGroup("big", 0, self.n_big, obs_dim), AgentGroup("small", self.n_big, n, obs_dim)]

    def reset_entities(self, env_ids: Tensor, episode_ids: Tensor) -> Tensor:
        n, radius = self.config.n_agents, self.radius
        agents = self.uniform(env_ids, episode_ids, (n, 2), -radius, radius, stream=0)
        landmarks = self.poisson_disc(env_ids, episode_ids, n, 2 * radius, 4.5 * self.big_size, stream=100)
        return torch.cat([agents, landmarks - radius], dim=1)

    def rewards(self) -> dict[str, Tensor]:
        n = self.config.n_agents
        agents, landmarks = self.position[:, :n], self.position[:, n:]
        coverage = pairwise_distance(landmarks, agents).min(-1).values.sum(-1)
        is_big = torch.arange(n, device=self.device) < self.n_big
        same_type = is_big.unsqueeze(1) == is_big.unsqueeze(0)
        # Same type: twice the shared size; mixed: big + small. Either way the sum of the sizes.
        threshold = self.agent_size.unsqueeze(1) + self.agent_size.unsqueeze(0)
        touching = (pairwise_distance(agents, agents) < threshold) & ~torch.eye(n, dtype=torch.bool, device=self.device)
        same = (touching & same_type).sum((1, 2))
        mixed = (touching & ~same_type).sum((1, 2))
        team = -coverage - (same + MIXED_COLLISION_COST * mixed)
        return {group.name: team.unsqueeze(1).expand(-1, group.n_agents).contiguous() for group in self.agent_groups}

    def observations(self) -> dict[str, Tensor]:
        n = self.config.n_agents
        agents, landmarks = self.position[:, :n], self.position[:, n:]
        _, to_landmarks = nearest(agents, landmarks, self.k_others - 1)
        _, to_others = nearest(agents, agents, self.k_others, same_group=True)
        obs = torch.cat([self.velocity[:, :n], agents, to_landmarks.flatten(2), to_others.flatten(2)], dim=-1)
        return {group.name: obs[:, group.start:group.stop] for group in self.agent_groups}
