"""PIC large-scale cooperative navigation (PIC simple_spread_nN, ENV_SPECS §1.1).

N agents (size 0.15, colliding) must cover N landmarks in a square arena of radius R(N).
Agents start uniform in [-R, R]^2 at rest; landmarks are a Poisson-disc sample with spacing
4.5 x 0.15 (`PICEnv.poisson_disc`; uniform in [-1.5, 1.5]^2 at N = 6, as PIC's N=6 file).

Observation: [v_i, p_i, the k+1 nearest landmarks - p_i, the k nearest other agents - p_i] with
k = min(5, N - 1) and at most N landmarks: 26 values for N >= 6, 14 for N = 3 (PIC's sizes).

Rewards, with d(l) = min_a |p_a - l| and C = the ordered pairs of agents closer than 0.3:
- team (PIC): R = -sum_l d(l) - C for every agent. PIC computes R in agent 0's reward call
  and returns 0 for the others; the env sums rewards over agents (world.collaborative), so
  each agent receives R. The trainer's return (a sum over agents and steps) is then PIC's
  reported "episode reward", N * sum_t R_t.
- local: agent i gets -d(l) for each landmark whose nearest agent it is, minus its own
  collisions #{j != i : |p_i - p_j| < 0.3}. These sum over agents to exactly R.
- violation (VPP App. G.3, added to either): r2_i = w * sum_{j != i} log max(|p_i - p_j|, 0.01),
  which depends on agents arbitrarily far away (the paper gives no formula: "r2 is the log
  function of the distances between agents", chosen to dominate r1; w = `violation_weight`).
  In team mode every agent gets R + sum_i r2_i, the sum of the local rewards.

Episode metrics, in the `info` of every step ([B] floats, each sub-environment's episode so far,
taken before any auto-reset, so the step that ends an episode carries its final values;
`vimarl.train.evaluate` logs them as eval_team_return, eval_coverage_distance, eval_collisions):
- team_return: sum over the episode's steps of N * R_t, with R_t = -sum_l d(l) - C the team reward
  above, without the violation term. It is the return a team-reward run logs, N times the one a
  local-reward run logs, whatever `reward` and `violation` say: the number to compare across them.
- coverage_distance: the mean over landmarks of d(l) after the step (at an episode's end: its
  last state).
- collisions: the ordered colliding pairs C summed over the episode's steps.

Departures from PIC: landmark placement (see `PICEnv.poisson_disc`), and N = 6, whose file used
the original per-agent reward (-sum_l d(l) - #{a : |p_a - p_i| < 0.3}, self included): here
every N gets the team reward above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from vimarl.envs.base import TimeStep
from vimarl.envs.particle.base import AgentGroup
from vimarl.envs.particle.geometry import pairwise_distance
from vimarl.envs.particle.pic import DEFAULT_SIZE, Order, PICConfig, PICEnv, nearest, table_row
from vimarl.envs.particle.world import World
from vimarl.envs.spatial import count_within, k_nearest

AGENT_SIZE = 0.15
MAX_OTHERS_SEEN = 5
LOG_DISTANCE_FLOOR = 0.01
"""Distances below this count as this in the violation term (log 0 would be -inf)."""


@dataclass(frozen=True)
class NavRow:
    """The constants of one of PIC's simple_spread_nN files."""

    radius: float
    landmark_order: Order
    other_order: Order
    poisson_landmarks: bool
    """Landmarks by Poisson disc over [-R, R]^2; otherwise uniform."""


TABLE = {
    3: NavRow(3.0, "distance", "distance", True),
    6: NavRow(1.5, "index", "lexicographic", False),
    15: NavRow(2.2, "pic_bug", "pic_bug", True),
    30: NavRow(3.0, "pic_bug", "pic_bug", True),
    100: NavRow(5.0, "distance", "distance", True),
    200: NavRow(7.0, "distance", "distance", True),
}


@dataclass
class CoopNavConfig(PICConfig):
    n_agents: int = 15
    """Agents, and as many landmarks (VPP runs 15, 30 and 200; PIC's files 3, 6, 15, 30, 100, 200;
    other N take the nearest larger file's constants, or N=200's with the radius scaled by
    sqrt(N / 200) beyond it)."""
    reward: Literal["team", "local"] = "team"
    """team: PIC's shared reward R for every agent; local: each agent's share of R (they sum to R)."""
    violation: bool = False
    """Add VPP App. G.3's reward-locality violation: the log distances to all other agents."""
    violation_weight: float = 1.0
    """Weight w of the violation term (App. G.3 only says that it dominates the reward)."""
    sort_key: Literal["table", "correct", "pic_bug"] = "table"
    """Order of the observed neighbours: table = PIC's file for this N (the buggy key |x_e - 2 x_a|
    of ENV_SPECS §1.0(b) at N=15 and 30, which the published numbers depend on; index/lexicographic
    order at N=6; nearest first otherwise), correct = nearest first, pic_bug = the buggy key."""

    def __post_init__(self):
        if self.n_agents < 2:
            raise ValueError(f"n_agents must be at least 2, got {self.n_agents}")
        if self.violation_weight < 0:
            raise ValueError(f"violation_weight must be non-negative, got {self.violation_weight}")


class CoopNav(PICEnv):
    Config = CoopNavConfig

    def __init__(self, config: CoopNavConfig, num_envs: int, seed: int = 0, device="cpu"):
        super().__init__(config, num_envs, seed, device)
        self.episode_team_return = torch.zeros(num_envs, device=self.device)
        """[B] sum of N * R_t over the current episode's steps so far."""
        self.episode_collisions = torch.zeros(num_envs, device=self.device)
        """[B] colliding ordered pairs summed over the current episode's steps so far."""
        self.last_metrics: dict[str, Tensor] = {}
        """The episode metrics after the last step, before any auto-reset."""
        self._team_terms: tuple[Tensor, Tensor] | None = None  # [B, L] d(l), [B] C of the last rewards()

    def make_world(self) -> World:
        n = self.config.n_agents
        self.row, radius_scale = table_row(TABLE, n)
        self.radius = self.row.radius * radius_scale
        self.k_others = min(MAX_OTHERS_SEEN, n - 1)
        self.k_landmarks = min(self.k_others + 1, n)
        sort_key = self.config.sort_key
        if sort_key == "table":
            exact = n in TABLE  # PIC's orderings belong to its files, not to the N in between
            self.orders = (self.row.landmark_order, self.row.other_order) if exact else ("distance", "distance")
        else:
            self.orders = ("distance", "distance") if sort_key == "correct" else ("pic_bug", "pic_bug")
        self.colors = np.array([[89, 89, 217]] * n + [[64, 64, 64]] * n, dtype=np.uint8)
        return World(self.num_envs, size=[AGENT_SIZE] * n + [DEFAULT_SIZE] * n,
                     movable=[True] * n + [False] * n, collide=[True] * n + [False] * n, n_agents=n,
                     options=self.physics(), device=self.device)

    def make_groups(self) -> list[AgentGroup]:
        n = self.config.n_agents
        return [AgentGroup("agents", 0, n, obs_dim=4 + 2 * self.k_landmarks + 2 * self.k_others)]

    def reset_entities(self, env_ids: Tensor, episode_ids: Tensor) -> Tensor:
        n, radius = self.config.n_agents, self.radius
        agents = self.uniform(env_ids, episode_ids, (n, 2), -radius, radius, stream=0)
        if self.row.poisson_landmarks:
            landmarks = self.poisson_disc(env_ids, episode_ids, n, 2 * radius, 4.5 * AGENT_SIZE, stream=100) - radius
        else:
            landmarks = self.uniform(env_ids, episode_ids, (n, 2), -radius, radius, stream=1)
        return torch.cat([agents, landmarks], dim=1)

    def _reset_envs(self, env_mask: Tensor) -> None:
        super()._reset_envs(env_mask)
        self.episode_team_return.masked_fill_(env_mask, 0.0)
        self.episode_collisions.masked_fill_(env_mask, 0.0)

    def _step(self, actions: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        rewards, terminated = super()._step(actions)  # rewards() left this step's d(l) and C
        distance, collisions = self._team_terms
        n = self.config.n_agents
        self.episode_team_return += n * (-distance.sum(-1) - collisions)
        self.episode_collisions += collisions
        self.last_metrics = {"team_return": self.episode_team_return.clone(),
                             "coverage_distance": distance.mean(-1),
                             "collisions": self.episode_collisions.clone()}  # before any auto-reset
        return rewards, terminated

    def step(self, actions: dict[str, Tensor]) -> TimeStep:
        """The base step, with the episode metrics (team_return, coverage_distance, collisions; [B],
        before any auto-reset) in info."""
        step = super().step(actions)
        step.info.update(self.last_metrics)
        return step

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["episode_metrics"] = {"team_return": self.episode_team_return.clone(),
                                    "collisions": self.episode_collisions.clone()}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        saved = state.get("episode_metrics")  # absent from older checkpoints: the sums restart at 0
        for name, attribute in (("team_return", "episode_team_return"), ("collisions", "episode_collisions")):
            value = saved[name].to(self.device, copy=True) if saved else torch.zeros(self.num_envs, device=self.device)
            setattr(self, attribute, value)

    def rewards(self) -> dict[str, Tensor]:
        config, n = self.config, self.config.n_agents
        agents, landmarks = self.position[:, :n], self.position[:, n:]
        nearest_agent, coverage_distance = k_nearest(landmarks, agents, 1)  # [B, L, 1], O(N) for large N
        coverage = torch.zeros_like(agents[..., 0]).scatter_add_(1, nearest_agent[..., 0], -coverage_distance[..., 0])
        collisions = count_within(agents, agents, 2 * AGENT_SIZE, exclude_self=True)
        self._team_terms = (coverage_distance[..., 0], collisions.sum(-1).to(coverage.dtype))
        local = coverage - collisions
        if config.violation:  # the log distances to every other agent are O(N^2) by definition
            is_self = torch.eye(n, dtype=torch.bool, device=self.device)
            log_distance = pairwise_distance(agents, agents).clamp_min(LOG_DISTANCE_FLOOR).log().masked_fill(is_self, 0.0)
            local = local + config.violation_weight * log_distance.sum(-1)
        if config.reward == "local":
            return {"agents": local}
        return {"agents": local.sum(-1, keepdim=True).expand(-1, n).contiguous()}

    def observations(self) -> dict[str, Tensor]:
        n = self.config.n_agents
        agents, landmarks = self.position[:, :n], self.position[:, n:]
        landmark_order, other_order = self.orders
        _, to_landmarks = nearest(agents, landmarks, self.k_landmarks, landmark_order)
        _, to_others = nearest(agents, agents, self.k_others, other_order, same_group=True)
        obs = torch.cat([self.velocity[:, :n], agents, to_landmarks.flatten(2), to_others.flatten(2)], dim=-1)
        return {"agents": obs}
