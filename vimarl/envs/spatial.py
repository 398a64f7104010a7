"""Neighbour search in the plane in O(N) per environment: a uniform grid of cells.

Large particle worlds (up to 1,225 agents) need each agent's nearby agents for contacts and
collisions, and its k nearest agents and landmarks for observations, rewards and the agent
graph. Over all pairs that is O(N^2) per step; binning points into square cells and looking only
at the 3 x 3 cells around a query makes it O(N), with exact results: every point within one
cell side of a query lies in those 9 cells, and `k_nearest` falls back to all pairs for the
rare query whose k-th candidate lies farther than that.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BRUTE_FORCE_PAIRS = 256 * 256
"""Up to this many (query, point) pairs per environment, all pairs are cheaper than cells."""


def cell_candidates(queries: Tensor, points: Tensor, cell: float, max_cells_per_axis: int | None = None
                    ) -> tuple[Tensor, Tensor]:
    """Indices of the points in the 3 x 3 cells around each query.

    queries [B, Q, 2], points [B, P, 2] -> (candidates [B, Q, 9M] int64 indices into P,
    valid [B, Q, 9M] bool), where M is the largest number of points in one cell. Cells are
    squares of side >= `cell`, so every point closer than `cell` to a query is a candidate. The
    grid, at most `max_cells_per_axis` (default 2 sqrt(P)) cells a side, is centred on each
    environment's median point, with cells grown until the central 98% of the points fit;
    points and queries beyond it are clamped into its edge cells.
    Clamping never moves two cells further apart, so the guarantee holds for them too, and a
    far-flung point only crowds an edge cell instead of stretching every cell.
    Invalid slots hold index 0 (a legal index, to be masked).
    """
    batch, n_points, _ = points.shape
    device = points.device
    max_cells = max_cells_per_axis or max(1, int(2 * math.sqrt(n_points)))
    # Cells grow until the central 98% of the points fit in the grid; the rest are outliers.
    spread = torch.quantile(points, torch.tensor([0.01, 0.99], device=device), dim=1)  # [2, B, 2]
    side = max(cell, float((spread[1] - spread[0]).max()) * 1.1 / max_cells, 1e-6)
    extent = float((points.amax(1) - points.amin(1)).max())
    grid = min(max_cells, int(extent // side) + 3)
    low = points.median(dim=1, keepdim=True).values - grid * side / 2

    def cell_of(xy: Tensor) -> Tensor:
        return ((xy - low) / side).floor().long().clamp_(0, grid - 1)

    env_offset = torch.arange(batch, device=device).view(batch, 1) * grid * grid
    point_cell = cell_of(points)
    key = (point_cell[..., 0] * grid + point_cell[..., 1] + env_offset).flatten()
    order = key.argsort()
    counts = torch.bincount(key, minlength=batch * grid * grid)
    starts = counts.cumsum(0) - counts
    occupancy = max(int(counts.max()), 1)

    shifts = torch.tensor([(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)], device=device)
    around = cell_of(queries).unsqueeze(2) + shifts  # [B, Q, 9, 2]
    inside = ((around >= 0) & (around < grid)).all(-1)
    around_key = (around[..., 0] * grid + around[..., 1]).clamp(0, grid * grid - 1) + env_offset.unsqueeze(-1)
    slot = torch.arange(occupancy, device=device)
    valid = inside.unsqueeze(-1) & (slot < counts[around_key].unsqueeze(-1))  # [B, Q, 9, M]
    sorted_position = (starts[around_key].unsqueeze(-1) + slot).clamp_(max=batch * n_points - 1)
    first_point = torch.arange(batch, device=device).view(batch, 1, 1, 1) * n_points
    candidates = torch.where(valid, order[sorted_position] - first_point, 0)
    return candidates.flatten(2), valid.flatten(2)


def k_nearest(queries: Tensor, points: Tensor, k: int, exclude_self: bool = False) -> tuple[Tensor, Tensor]:
    """The k nearest points of each query, nearest first, equal distances by lower index.

    queries [B, Q, 2], points [B, P, 2] (with `exclude_self`, the same set, each query
    skipping its own index) -> (indices [B, Q, k], distances [B, Q, k]). k must not exceed the
    number of eligible points.
    """
    batch, n_queries, _ = queries.shape
    n_points = points.shape[1]
    if n_queries * n_points <= BRUTE_FORCE_PAIRS:
        return _all_pairs_nearest(queries, points, k, exclude_self)
    # The cell side r is chosen so that, at the typical density rho (from the central 90% of
    # the points, so outliers do not dilute it), a disc of radius r holds lambda = k + 3 sqrt(k)
    # + 6 points on average: fewer than k then has Poisson probability below 1e-3, so the
    # all-pairs fallback stays rare, and a query meets about 9 lambda / pi candidates.
    quantiles = torch.quantile(points.flatten(0, 1).float(), torch.tensor([0.05, 0.95], device=points.device), dim=0)
    density = 0.81 * n_points / float((quantiles[1] - quantiles[0]).clamp_min(1e-6).prod())
    cell = math.sqrt((k + 3 * math.sqrt(k) + 6) / (math.pi * density))
    candidates, valid = cell_candidates(queries, points, cell)
    if exclude_self:
        valid &= candidates != torch.arange(n_queries, device=queries.device).view(1, -1, 1)
    offsets = torch.arange(batch, device=queries.device).view(batch, 1, 1) * n_points
    distance = (points.reshape(-1, 2)[candidates + offsets] - queries.unsqueeze(2)).norm(dim=-1)
    distance = distance.masked_fill(~valid, math.inf)
    if distance.shape[-1] < k:
        distance = torch.nn.functional.pad(distance, (0, k - distance.shape[-1]), value=math.inf)
        candidates = torch.nn.functional.pad(candidates, (0, k - candidates.shape[-1]))
    index, nearest_distance = _smallest_by_index(distance, candidates, k, n_points)
    # Exact unless a point outside the 3 x 3 cells could be nearer than the k-th found.
    unsure = nearest_distance[..., -1] > cell
    if bool(unsure.any()):
        rows = unsure.nonzero(as_tuple=True)
        fallback_index, fallback_distance = _all_pairs_nearest(
            queries[rows].unsqueeze(1), points[rows[0]], k, exclude_self, rows[1])
        index[rows], nearest_distance[rows] = fallback_index[:, 0], fallback_distance[:, 0]
    return index, nearest_distance


def count_within(queries: Tensor, points: Tensor, radius: float, exclude_self: bool = False) -> Tensor:
    """[B, Q]: how many points lie strictly closer than `radius` to each query."""
    batch, n_queries, _ = queries.shape
    n_points = points.shape[1]
    if n_queries * n_points <= BRUTE_FORCE_PAIRS:
        distance = torch.cdist(queries, points, compute_mode="donot_use_mm_for_euclid_dist")
        close = distance < radius
        if exclude_self:
            close &= ~torch.eye(n_queries, n_points, dtype=torch.bool, device=queries.device)
        return close.sum(-1)
    candidates, valid = cell_candidates(queries, points, radius)
    if exclude_self:
        valid &= candidates != torch.arange(n_queries, device=queries.device).view(1, -1, 1)
    offsets = torch.arange(batch, device=queries.device).view(batch, 1, 1) * n_points
    distance = (points.reshape(-1, 2)[candidates + offsets] - queries.unsqueeze(2)).norm(dim=-1)
    return ((distance < radius) & valid).sum(-1)


def _smallest_by_index(distance: Tensor, index: Tensor, k: int, n_points: int) -> tuple[Tensor, Tensor]:
    """The k smallest distances along the last axis, ascending, equal ones by lower `index`.

    Two top-k passes instead of a sort of every candidate: the first finds the k-th smallest
    distance; the second takes everything below it and, among the entries equal to it, the
    lowest indices (their priorities n_points - index are distinct).
    """
    kth = distance.topk(k, dim=-1, largest=False).values[..., -1:]
    priority = torch.where(distance < kth, float(n_points + 1),
                           torch.where(distance == kth, (n_points - index).float(), -1.0))
    chosen = priority.topk(k, dim=-1).indices
    chosen_index, chosen_distance = index.gather(-1, chosen), distance.gather(-1, chosen)
    chosen_index, order = chosen_index.sort(dim=-1)  # k entries: cheap
    chosen_distance, by_distance = chosen_distance.gather(-1, order).sort(dim=-1, stable=True)
    return chosen_index.gather(-1, by_distance), chosen_distance


def _all_pairs_nearest(queries: Tensor, points: Tensor, k: int, exclude_self: bool,
                       query_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """k nearest over every pair; `query_index` [B] names each single query's own index."""
    distance = torch.cdist(queries, points, compute_mode="donot_use_mm_for_euclid_dist")
    if exclude_self:
        own = (torch.arange(queries.shape[1], device=queries.device).view(1, -1, 1) if query_index is None
               else query_index.view(-1, 1, 1))
        distance = distance.masked_fill(torch.arange(points.shape[1], device=points.device) == own, math.inf)
    index = torch.arange(points.shape[1], device=points.device).expand_as(distance)
    return _smallest_by_index(distance, index, k, points.shape[1])
