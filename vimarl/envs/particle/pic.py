"""What the PIC large-scale scenarios share (ENV_SPECS §0.2, §1): the config fields, the
physics, the per-N table lookup, the k nearest entities in PIC's orders, and the
Poisson-disc landmark placement.

PIC (Liu et al. 2019) wrote one scenario file per N (simple_spread_n30.py, ...), each with
its own constants. The scenarios here read those constants from a table keyed by N
(`table_row` says what happens between and beyond the rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from torch import Tensor

from vimarl.envs.particle.base import ParticleConfig, ParticleEnv
from vimarl.envs.particle.geometry import pairwise_distance
from vimarl.envs.particle.world import PhysicsOptions
from vimarl.envs.spatial import k_nearest

Row = TypeVar("Row")

MAX_POISSON_ROUNDS = 500
"""Candidate rounds of `PICEnv.poisson_disc` before it gives up."""
MAX_CANDIDATES = 512
"""Candidates per environment and round of `PICEnv.poisson_disc`."""

DEFAULT_SIZE = 0.05
"""MPE's size of an entity whose scenario sets none (PIC's navigation landmarks: drawn only)."""

Order = Literal["distance", "pic_bug", "index", "lexicographic"]
"""How an agent ranks the entities it observes:
distance: nearest first by |x_e - x_a| (PIC's vectorised scenarios);
pic_bug: by |x_e - 2 x_a|, the key of PIC's per-agent loops at spread N=15/30 and tag N=15
  (ENV_SPECS §1.0(b)): the observed values are still x_e - x_a, only the choice and order differ;
index: entity index order, unsorted (PIC's small files: push N=3/6, tag N=3/6, spread N=6's landmarks);
lexicographic: by (dx, dy) of x_e - x_a (spread N=6's other agents)."""


@dataclass
class PICConfig(ParticleConfig):
    """Settings every PIC scenario has."""

    integration: Literal["mpe2", "mpe"] = "mpe"
    """Order of the position and velocity updates; PIC uses the original MPE's ("mpe")."""
    pic_contact: bool = True
    """PIC's contact quirk: every pair collides at 2 x the size of agent 0 (ENV_SPECS §0.2);
    false uses the sum of the two sizes."""


class PICEnv(ParticleEnv):
    """A particle scenario on PIC's core: original MPE action decoding and physics order."""

    action_convention = "mpe"

    def physics(self) -> PhysicsOptions:
        config = self.config
        return PhysicsOptions(integration=config.integration,
                              contact_radius="first_agent" if config.pic_contact else "pairwise")

    def poisson_disc(self, env_ids: Tensor, episode_ids: Tensor, n: int, side: float, min_distance: float,
                     stream: int) -> Tensor:
        """`n` points [E, n, 2] in [0, side)^2, every two at least `min_distance` apart.

        PIC draws a full Bridson Poisson-disc sample of the square and keeps `n` of its points
        at random. A Bridson sampler grows one point at a time, so it cannot be batched over
        environments. This is random sequential addition instead, batched: each round draws
        `candidates` uniform points per environment, keeps those at least `min_distance` from
        every point kept so far and from every earlier valid candidate of the same round, and
        stops once `n` are kept. Both give uniform points with the same minimum separation; the
        spacing statistics differ slightly (Bridson's sample is maximal before thinning). With
        PIC's densities (about one landmark per unit area at a separation of 0.675, two thirds of the
        jamming density of sequential addition) a handful of rounds suffice.
        """
        count = len(env_ids)
        points = torch.zeros(count, n, 2, device=self.device)
        kept = torch.zeros(count, dtype=torch.long, device=self.device)
        candidates = min(max(n, 32), MAX_CANDIDATES)  # memory: [E, candidates, n] distances
        slots = torch.arange(n, device=self.device)
        earlier = torch.ones(candidates, candidates, dtype=torch.bool, device=self.device).tril(-1)
        for round_index in range(MAX_POISSON_ROUNDS):
            draw = self.uniform(env_ids, episode_ids, (candidates, 2), 0.0, side, stream=stream + round_index)
            to_kept = pairwise_distance(draw, points).masked_fill(slots >= kept.view(-1, 1, 1), math.inf)
            valid = to_kept.min(-1).values >= min_distance  # [E, candidates]
            # An earlier valid candidate too close rules a candidate out, even when that one is
            # itself ruled out: conservative, so every kept pair is far enough apart.
            blocked = (pairwise_distance(draw, draw) < min_distance) & earlier & valid.unsqueeze(1)
            accepted = valid & ~blocked.any(-1)
            slot = kept.view(-1, 1) + accepted.long().cumsum(-1) - 1
            accepted &= slot < n
            env_index = torch.arange(count, device=self.device).view(-1, 1).expand_as(slot)
            points[env_index[accepted], slot[accepted]] = draw[accepted]
            kept += accepted.sum(-1)
            if bool((kept == n).all()):  # one host sync per round, once per episode
                return points
        raise RuntimeError(f"cannot place {n} points {min_distance} apart in a square of side {side} "
                           f"after {MAX_POISSON_ROUNDS} rounds; the density is too high")


def table_row(table: dict[int, Row], n: int) -> tuple[Row, float]:
    """The row of PIC's per-N `table` for N = n, and the factor to scale its world radius by.

    An N between rows takes the nearest larger row (its arena is a little roomier). An N beyond
    the largest row takes that row with the radius scaled by sqrt(N / N_row), which keeps
    the number of entities per unit area (PIC's radii grow about that way: 5 at N=100, 7 at 200).
    """
    larger = [key for key in table if key >= n]
    if larger:
        return table[min(larger)], 1.0
    largest = max(table)
    return table[largest], math.sqrt(n / largest)


def nearest(origin: Tensor, targets: Tensor, k: int, order: Order = "distance",
            same_group: bool = False) -> tuple[Tensor, Tensor]:
    """The `k` targets each origin observes, in observation order.

    origin [B, N, 2], targets [B, M, 2]. Returns indices [B, N, k] into the targets and the
    relative positions targets - origin [B, N, k, 2]. With `same_group` the targets are the
    origins themselves and each leaves itself out (by index, so a coincident agent is still
    seen; PIC drops the first sorted entry instead, which only differs on exact ties).
    """
    batch, n, _ = origin.shape
    m = targets.shape[1]
    is_self = torch.eye(n, m, dtype=torch.bool, device=origin.device) if same_group else None
    if order == "index":
        slot = torch.arange(k, device=origin.device).expand(batch, n, k)
        # Row i lists every target but i: slot j is target j below i and target j + 1 from i on.
        index = slot + (slot >= torch.arange(n, device=origin.device).view(1, n, 1)).long() if same_group else slot
    elif order == "lexicographic":
        dx, dy = (targets.unsqueeze(1) - origin.unsqueeze(2)).unbind(-1)
        if same_group:
            dx = dx.masked_fill(is_self, math.inf)  # self sorts last
        by_y = dy.argsort(dim=-1, stable=True)
        index = by_y.gather(-1, dx.gather(-1, by_y).argsort(dim=-1, stable=True))[..., :k]
    elif order == "distance":
        index, _ = k_nearest(origin, targets, k, exclude_self=same_group)  # O(N) for large N
    else:
        # PIC's buggy key |(x_e - x_a) - x_a| = |x_e - 2 x_a| (only its N = 15 and 30 files).
        key = pairwise_distance(2 * origin, targets)
        if same_group:
            key = key.masked_fill(is_self, math.inf)
        index = key.topk(k, dim=-1, largest=False).indices
    return index, gather(targets, index) - origin.unsqueeze(2)


def gather(values: Tensor, index: Tensor) -> Tensor:
    """Rows of values [B, M, D] at index [B, N, k] -> [B, N, k, D]."""
    rows = torch.arange(values.shape[0], device=values.device).view(-1, 1, 1)
    return values[rows, index]
