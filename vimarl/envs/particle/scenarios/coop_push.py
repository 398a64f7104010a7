"""PIC cooperative push (PIC simple_coop_push_nN, ENV_SPECS §1.3).

N agents push a ball (movable, colliding, heavy) onto a target (immovable, not colliding).
Agents start uniform in [-R, R]^2, the ball uniform in [-(R - 0.2), R - 0.2]^2, and the target in
the same box, redrawn when closer to the ball than a minimum distance: at most twice (PIC's N=15
and 30 files keep the second draw even when it is too close), or up to 64 times for N = 3 and 6
(PIC redraws until far enough; 64 failures in a row have probability below 1e-6).

Observation: [v_i, p_i, ball - p_i, target - p_i, the k nearest other agents - p_i]
(28 values at N = 15 with k = 10, 18 at N = 6 and 30 with k = 5).

Team reward, given to every agent (see coop_nav for PIC's sharing):
R = -2 |ball - target| - 0.1 min_i |p_i - ball| + 0.1 #{i : |p_i - ball| < agent size + ball size}.

PIC quirk kept (`pic_contact`): physics pushes agents and the ball apart at 2 x the agent size,
not at agent + ball size, so an agent must nearly reach the ball's centre to move it, while the
touch bonus counts at the true distance. PIC's N=30 file also makes agents 0-9 non-colliding
(they pass through everything, the ball included); here the same first third at any N that uses
that row.

N beyond the table (VPP runs N = 100): N=30's sizes, masses and non-colliding third, the radius
scaled by sqrt(N / 30) (3.65 at N = 100), and k = 10 other agents, which gives the observation
of 28 values that VPP App. E.2 reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from vimarl.envs.particle.base import AgentGroup
from vimarl.envs.particle.pic import Order, PICConfig, PICEnv, nearest, table_row
from vimarl.envs.particle.world import World

TARGET_SIZE, TARGET_MASS = 0.05, 4.0  # PIC's values; the target never moves, so its mass is unused
BALL_MARGIN = 0.2
"""The ball and the target start at least this far inside the arena's edge."""
OTHERS_SEEN_BEYOND_TABLE = 10


@dataclass(frozen=True)
class PushRow:
    """The constants of one of PIC's simple_coop_push_nN files."""

    radius: float
    agent_size: float
    ball_size: float
    ball_mass: float
    others_seen: int
    order: Order
    target_min_distance: float
    target_draws: int
    non_colliding_fraction: float


TABLE = {
    3: PushRow(1.0, 0.06, 0.10, 2.0, 2, "index", 0.8, 64, 0.0),
    6: PushRow(1.0, 0.04, 0.10, 4.0, 5, "index", 0.8, 64, 0.0),
    15: PushRow(2.0, 0.02, 0.20, 8.0, 10, "distance", 1.0, 2, 0.0),
    30: PushRow(2.0, 0.06, 0.70, 4.0, 5, "distance", 1.2, 2, 1 / 3),
}


@dataclass
class CoopPushConfig(PICConfig):
    n_agents: int = 100
    """Agents (VPP runs 100; PIC's files 3, 6, 15, 30; other N take the nearest larger file's
    constants, or beyond 30 the rule in the module docstring)."""
    n_neighbors: int = 0
    """Other agents in each observation; 0 = PIC's file for this N, or 10 beyond N = 30."""

    def __post_init__(self):
        if self.n_agents < 2:
            raise ValueError(f"n_agents must be at least 2, got {self.n_agents}")
        if not 0 <= self.n_neighbors < self.n_agents:
            raise ValueError(f"n_neighbors must be in [0, n_agents - 1], got {self.n_neighbors}")


class CoopPush(PICEnv):
    Config = CoopPushConfig

    def make_world(self) -> World:
        n = self.config.n_agents
        self.row, radius_scale = table_row(TABLE, n)
        self.radius = self.row.radius * radius_scale
        self.order = self.row.order if n in TABLE else "distance"
        default_seen = self.row.others_seen if radius_scale == 1.0 else OTHERS_SEEN_BEYOND_TABLE
        self.k_others = min(self.config.n_neighbors or default_seen, n - 1)
        row = self.row
        colliding = [i >= round(row.non_colliding_fraction * n) for i in range(n)]
        self.colors = np.array([[0, 0, 0]] * n + [[64, 191, 64], [115, 242, 115]], dtype=np.uint8)
        return World(self.num_envs, size=[row.agent_size] * n + [row.ball_size, TARGET_SIZE],
                     movable=[True] * n + [True, False], collide=colliding + [True, False], n_agents=n,
                     mass=[1.0] * n + [row.ball_mass, TARGET_MASS], options=self.physics(), device=self.device)

    def make_groups(self) -> list[AgentGroup]:
        return [AgentGroup("agents", 0, self.config.n_agents, obs_dim=8 + 2 * self.k_others)]

    def reset_entities(self, env_ids: Tensor, episode_ids: Tensor) -> Tensor:
        n, radius, row = self.config.n_agents, self.radius, self.row
        agents = self.uniform(env_ids, episode_ids, (n, 2), -radius, radius, stream=0)
        inner = radius - BALL_MARGIN
        ball = self.uniform(env_ids, episode_ids, (1, 2), -inner, inner, stream=1)
        draws = self.uniform(env_ids, episode_ids, (row.target_draws, 2), -inner, inner, stream=2)
        far = (draws - ball).norm(dim=-1) > row.target_min_distance  # [E, draws]
        # The first draw far enough from the ball, or the last one when none is.
        pick = torch.where(far.any(-1), far.float().argmax(-1), row.target_draws - 1)
        target = draws[torch.arange(len(env_ids), device=self.device), pick].unsqueeze(1)
        return torch.cat([agents, ball, target], dim=1)

    def rewards(self) -> dict[str, Tensor]:
        n, row = self.config.n_agents, self.row
        agents, ball, target = self.position[:, :n], self.position[:, n], self.position[:, n + 1]
        to_ball = (agents - ball.unsqueeze(1)).norm(dim=-1)  # [B, N]
        touching = (to_ball < row.agent_size + row.ball_size).sum(-1)
        team = -2 * (ball - target).norm(dim=-1) - 0.1 * to_ball.min(-1).values + 0.1 * touching
        return {"agents": team.unsqueeze(1).expand(-1, n).contiguous()}

    def observations(self) -> dict[str, Tensor]:
        n = self.config.n_agents
        agents = self.position[:, :n]
        to_ball_and_target = self.position[:, n:].unsqueeze(1) - agents.unsqueeze(2)  # [B, N, 2, 2]
        _, to_others = nearest(agents, agents, self.k_others, self.order, same_group=True)
        obs = torch.cat([self.velocity[:, :n], agents, to_ball_and_target.flatten(2), to_others.flatten(2)], dim=-1)
        return {"agents": obs}
