"""PIC prey and predator (PIC simple_tag_nN, ENV_SPECS §1.4).

Slow predators (accel 3, max speed 1) chase fast prey (accel 4, max speed 1.3) among immovable
landmarks that block both. Everyone starts uniform in [-R, R]^2, landmarks in [-(R - 0.1), R - 0.1]^2.
Entities: predators, then prey, then landmarks.

Observations, relative positions nearest first (absolute velocities for the observed prey):
- predator (34 values at 15 predators, 44 from 30 on): [v, p, landmarks, other predators,
  prey positions, the same prey's velocities], with 3/6/3 of them at 15 predators and 5/5/5 at
  30 and 100;
- prey (26 values): [v, p, 3 landmarks, 6 predators, the nearest other prey, its velocity].
Fewer are shown when fewer exist. PIC's neighbour orders are kept per file (`sort_key`).

Rewards:
- predators (team, shared; see coop_nav for PIC's sharing):
  R = -0.1 sum_j min_i |p_j - q_i| + 10 #{(i, j) : |p_j - q_i| < prey size + predator size};
- prey i: -10 per touching predator, minus a boundary penalty per axis of x = |q_i| / s
  (s = 1 inside PIC's table): 0 below 0.9, 10 (x - 0.9) below 1, min(e^(2x - 2), 10) beyond.

Prey policy, a substitution (`prey="scripted"`, the default): PIC's prey run a frozen network
trained against predators (scripted_agent_ckpt/...agents_best.ckpt), which cannot be shipped.
Instead each prey flees from the predators it observes, weighting the unit vector away from each
by its inverse distance (so the nearest dominate), and turns back from the edge: an inward push
that grows linearly from 0 at |x| = 0.8 s to 1 at 0.9 s (where its penalty starts) and beyond.
The sum is scaled to |u_x| + |u_y| = 1, the largest push a 5-way soft action gives, and decoded
with the prey's accel of 4 as PIC decodes its prey's actions. Obstacles are ignored. The
published numbers were measured against PIC's prey and are not comparable.
`prey="learned"` makes the prey a second learned group with its own reward.

PIC quirk kept (`pic_contact`): every pair, landmarks included, collides at 2 x the predator
size, so the drawn landmarks block only within that distance of their centres.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from vimarl.envs.particle.base import AgentGroup
from vimarl.envs.particle.geometry import boundary_penalty, pairwise_distance
from vimarl.envs.particle.pic import Order, PICConfig, PICEnv, gather, nearest, table_row
from vimarl.envs.particle.world import World

PREDATOR_ACCEL, PREDATOR_MAX_SPEED = 3.0, 1.0
PREY_ACCEL, PREY_MAX_SPEED = 4.0, 1.3
CAPTURE_REWARD = 10.0
PREY_VIEW = (3, 6, 1)
"""Landmarks, predators and other prey in a prey's observation (the frozen prey network's 26 inputs)."""
WALL_START, BOUNDARY = 0.8, 0.9
"""Where the scripted prey starts turning back, and where the prey's boundary penalty starts
(geometry.boundary_penalty)."""


@dataclass(frozen=True)
class TagRow:
    """The constants of one of PIC's simple_tag_nN files (keyed by the number of predators)."""

    n_prey: int
    n_landmarks: int
    landmark_size: float
    predator_size: float
    prey_size: float
    radius: float
    predator_view: tuple[int, int, int]
    """Landmarks, other predators and prey in a predator's observation."""
    order: Order


TABLE = {
    3: TagRow(1, 2, 0.2, 0.075, 0.05, 1.0, (2, 2, 1), "index"),
    6: TagRow(2, 3, 0.2, 0.075, 0.05, 1.5, (3, 5, 2), "index"),
    15: TagRow(5, 5, 0.1, 0.02, 0.01, 1.0, (3, 6, 3), "pic_bug"),
    30: TagRow(10, 10, 0.05, 0.01, 0.005, 1.0, (5, 5, 5), "distance"),
    100: TagRow(30, 20, 0.05, 0.01, 0.005, 1.0, (5, 5, 5), "distance"),
}


@dataclass
class PreyPredatorConfig(PICConfig):
    n_predators: int = 100
    """Predators (VPP runs 100; PIC's files 3, 6, 15, 30, 100; other numbers take the nearest larger
    file's constants, or beyond 100 that file's with the radius scaled by s = sqrt(n / 100) and the
    prey and landmark counts by s^2)."""
    n_prey: int | None = None
    """Prey; None = PIC's file (30 for 100 predators)."""
    n_landmarks: int | None = None
    """Landmarks (obstacles); None = PIC's file (20 for 100 predators)."""
    prey: Literal["scripted", "learned"] = "scripted"
    """scripted: the escape policy of the module docstring (a substitute for PIC's frozen prey
    network); learned: the prey are a second learned group."""
    sort_key: Literal["table", "correct", "pic_bug"] = "table"
    """Order of the observed neighbours: table = PIC's file (the buggy key |x_e - 2 x_a| at 15
    predators, index order at 3 and 6, nearest first otherwise), correct = nearest first,
    pic_bug = the buggy key."""

    def __post_init__(self):
        if self.n_predators < 1:
            raise ValueError(f"n_predators must be at least 1, got {self.n_predators}")
        if self.n_prey is not None and self.n_prey < 1:
            raise ValueError(f"n_prey must be at least 1, got {self.n_prey}")
        if self.n_landmarks is not None and self.n_landmarks < 0:
            raise ValueError(f"n_landmarks must be non-negative, got {self.n_landmarks}")


class PreyPredator(PICEnv):
    Config = PreyPredatorConfig

    def make_world(self) -> World:
        config = self.config
        row, radius_scale = table_row(TABLE, config.n_predators)
        self.row, self.radius, self.radius_scale = row, row.radius * radius_scale, radius_scale
        self.n_pred = config.n_predators
        self.n_prey = config.n_prey or round(row.n_prey * radius_scale ** 2)
        self.n_landmarks = round(row.n_landmarks * radius_scale ** 2) if config.n_landmarks is None \
            else config.n_landmarks
        if config.sort_key == "table":
            self.order = row.order if config.n_predators in TABLE else "distance"
        else:
            self.order = "distance" if config.sort_key == "correct" else "pic_bug"
        # No more than exist: (landmarks, predators, prey) besides the observer itself.
        seen_by_predators = (self.n_landmarks, self.n_pred - 1, self.n_prey)
        seen_by_prey = (self.n_landmarks, self.n_pred, self.n_prey - 1)
        self.predator_view = tuple(map(min, row.predator_view, seen_by_predators))
        self.prey_view = tuple(map(min, PREY_VIEW, seen_by_prey))
        agents, n_landmarks = self.n_pred + self.n_prey, self.n_landmarks
        self.colors = np.array([[217, 89, 89]] * self.n_pred + [[89, 217, 89]] * self.n_prey
                               + [[64, 64, 64]] * n_landmarks, dtype=np.uint8)
        return World(self.num_envs,
                     size=[row.predator_size] * self.n_pred + [row.prey_size] * self.n_prey
                     + [row.landmark_size] * n_landmarks,
                     movable=[True] * agents + [False] * n_landmarks, collide=[True] * (agents + n_landmarks),
                     n_agents=agents, accel=[PREDATOR_ACCEL] * self.n_pred + [PREY_ACCEL] * self.n_prey,
                     max_speed=[PREDATOR_MAX_SPEED] * self.n_pred + [PREY_MAX_SPEED] * self.n_prey
                     + [None] * n_landmarks, options=self.physics(), device=self.device)

    def make_groups(self) -> list[AgentGroup]:
        def obs_dim(view):
            landmarks, predators, prey = view
            return 4 + 2 * landmarks + 2 * predators + 4 * prey

        return [AgentGroup("predators", 0, self.n_pred, obs_dim(self.predator_view)),
                AgentGroup("prey", self.n_pred, self.n_pred + self.n_prey, obs_dim(self.prey_view),
                           role="scripted" if self.config.prey == "scripted" else "learned")]

    def reset_entities(self, env_ids: Tensor, episode_ids: Tensor) -> Tensor:
        agents, radius = self.n_pred + self.n_prey, self.radius
        positions = self.uniform(env_ids, episode_ids, (agents, 2), -radius, radius, stream=0)
        landmarks = self.uniform(env_ids, episode_ids, (self.n_landmarks, 2), -(radius - 0.1), radius - 0.1,
                                 stream=1)
        return torch.cat([positions, landmarks], dim=1)

    def split(self) -> tuple[Tensor, Tensor, Tensor]:
        """Positions of the predators, the prey and the landmarks."""
        predators_end = self.n_pred
        prey_end = predators_end + self.n_prey
        position = self.position
        return position[:, :predators_end], position[:, predators_end:prey_end], position[:, prey_end:]

    def rewards(self) -> dict[str, Tensor]:
        predators, prey, _ = self.split()
        prey_to_predator = pairwise_distance(prey, predators)  # [B, Q, P]
        touching = prey_to_predator < self.row.prey_size + self.row.predator_size
        chase = -0.1 * prey_to_predator.min(1).values.sum(-1) + CAPTURE_REWARD * touching.sum((1, 2))
        boundary = boundary_penalty(prey / self.radius_scale).sum(-1)
        prey_reward = -CAPTURE_REWARD * touching.sum(-1) - boundary
        return {"predators": chase.unsqueeze(1).expand(-1, self.n_pred).contiguous(), "prey": prey_reward}

    def observations(self) -> dict[str, Tensor]:
        predators, prey, landmarks = self.split()
        velocity = self.velocity
        prey_velocity = velocity[:, self.n_pred:self.n_pred + self.n_prey]

        def observe(own: Tensor, own_velocity: Tensor, view: tuple[int, int, int], own_group: str) -> Tensor:
            n_landmarks, n_predators, n_prey = view
            order = self.order
            _, to_landmarks = nearest(own, landmarks, n_landmarks, order)
            _, to_predators = nearest(own, predators, n_predators, order, same_group=own_group == "predators")
            seen_prey, to_prey = nearest(own, prey, n_prey, order, same_group=own_group == "prey")
            parts = [own_velocity, own, to_landmarks, to_predators, to_prey, gather(prey_velocity, seen_prey)]
            return torch.cat([part.flatten(2) for part in parts], dim=-1)

        return {"predators": observe(predators, velocity[:, :self.n_pred], self.predator_view, "predators"),
                "prey": observe(prey, prey_velocity, self.prey_view, "prey")}

    def scripted_controls(self, group: AgentGroup) -> Tensor:
        predators, prey, _ = self.split()
        _, to_predators = nearest(prey, predators, self.prey_view[1])  # [B, Q, k, 2]
        # Away from each predator, weighted by 1 / distance: -d / |d| * 1 / |d|.
        flee = -(to_predators / to_predators.square().sum(-1, keepdim=True).clamp_min(1e-8)).sum(2)
        flee = flee / flee.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        wall = ((prey.abs() / self.radius_scale - WALL_START) / (BOUNDARY - WALL_START)).clamp_min(0.0)
        push = flee - prey.sign() * wall
        return push / push.abs().sum(-1, keepdim=True).clamp_min(1e-8)
