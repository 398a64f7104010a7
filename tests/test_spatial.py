"""Cell-grid neighbour search (vimarl/envs/spatial.py) against all pairs."""

import pytest
import torch

from vimarl.envs.spatial import _all_pairs_nearest, cell_candidates, count_within, k_nearest


def brute_force(queries, points, k, exclude_self):
    """k nearest by a Python-level stable sort: distance, then lower index."""
    indices, distances = [], []
    for b in range(queries.shape[0]):
        rows_i, rows_d = [], []
        for q in range(queries.shape[1]):
            d = (points[b] - queries[b, q]).norm(dim=-1).tolist()
            order = sorted((dist, j) for j, dist in enumerate(d) if not (exclude_self and j == q))[:k]
            rows_i.append([j for _, j in order])
            rows_d.append([dist for dist, _ in order])
        indices.append(rows_i)
        distances.append(rows_d)
    return torch.tensor(indices), torch.tensor(distances)


@pytest.mark.parametrize("n_queries, n_points, k, exclude_self", [(400, 400, 5, True), (300, 700, 1, False),
                                                                  (500, 500, 8, True)])
def test_k_nearest_equals_all_pairs(n_queries, n_points, k, exclude_self):
    torch.manual_seed(n_points + k)
    queries = (torch.rand(2, n_queries, 2) * 2 - 1) * 8
    points = queries.clone() if exclude_self else (torch.rand(2, n_points, 2) * 2 - 1) * 8
    points[0, 3] = torch.tensor([300.0, -200.0])  # an outlier: clamped to an edge cell, still exact
    points[1, :40] = points[1, 40:80]  # clusters
    index, distance = k_nearest(queries, points, k, exclude_self)
    expected_index, expected_distance = _all_pairs_nearest(queries, points, k, exclude_self)
    assert torch.equal(index, expected_index)
    assert torch.allclose(distance, expected_distance)


def test_k_nearest_breaks_ties_by_lower_index():
    grid = torch.stack(torch.meshgrid(torch.arange(20.0), torch.arange(20.0), indexing="ij"), -1).reshape(1, 400, 2)
    index, distance = k_nearest(grid, grid, 4, exclude_self=True)
    expected_index, expected_distance = brute_force(grid, grid, 4, True)
    assert torch.equal(index, expected_index) and torch.allclose(distance, expected_distance)


def test_cell_candidates_include_every_point_within_the_cell_side():
    torch.manual_seed(3)
    queries, points = torch.rand(2, 300, 2) * 6, torch.rand(2, 350, 2) * 6
    candidates, valid = cell_candidates(queries, points, 0.4)
    distance = torch.cdist(queries, points)
    for b in range(2):
        found = {(q, int(j)) for q in range(300) for j, ok in zip(candidates[b, q], valid[b, q]) if ok}
        close = (distance[b] < 0.4).nonzero().tolist()
        assert close and all((q, j) in found for q, j in close)


def test_count_within_matches_all_pairs():
    torch.manual_seed(4)
    agents = torch.rand(3, 600, 2) * 10
    counts = count_within(agents, agents, 0.3, exclude_self=True)
    distance = torch.cdist(agents, agents, compute_mode="donot_use_mm_for_euclid_dist")
    expected = ((distance < 0.3) & ~torch.eye(600, dtype=torch.bool)).sum(-1)
    assert counts.sum() > 0 and torch.equal(counts, expected)
