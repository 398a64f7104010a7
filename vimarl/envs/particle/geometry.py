"""Small geometric helpers the particle scenarios share."""

from __future__ import annotations

import torch
from torch import Tensor


def pairwise_distance(a: Tensor, b: Tensor) -> Tensor:
    """|a_i - b_j| [B, I, J] from a [B, I, 2] and b [B, J, 2].

    Computed from the differences, as MPE does, not with cdist's matrix-product shortcut, whose
    rounding could flip a touching test at its threshold.
    """
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def without_self(pairwise: Tensor) -> Tensor:
    """[B, N, N, ...] -> [B, N, N - 1, ...]: drops each agent's entry about itself, keeping order."""
    n = pairwise.shape[1]
    others = ~torch.eye(n, dtype=torch.bool, device=pairwise.device)
    return pairwise[:, others].view(pairwise.shape[0], n, n - 1, *pairwise.shape[3:])


def boundary_penalty(coordinate: Tensor) -> Tensor:
    """MPE's `bound` of |x| for prey: 0 inside 0.9, linear to 1, then exp(2|x| - 2) capped at 10."""
    x = coordinate.abs()
    return torch.where(x < 0.9, 0.0, torch.where(x < 1.0, 10 * (x - 0.9), torch.exp(2 * x - 2).clamp_max(10.0)))
