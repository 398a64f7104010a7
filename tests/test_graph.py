"""Graph builders against brute-force pure-Python references, and the Graph methods."""

from __future__ import annotations

import math

import pytest
import torch

from vimarl.envs.graph import (
    DynamicGraph,
    Graph,
    complete_graph,
    graph_from_adjacency,
    grid_graph,
    knn_graph,
    radius_knn_graph,
    random_k_graph,
    refresh_graph,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------
# References: loops over environments and agents, sorting (distance, index) pairs.
# ---------------------------------------------------------------------------------------


def reference_knn(positions: torch.Tensor, k: int, radius: float | None = None):
    """(neighbors, mask) as nested lists. Squared distances are summed coordinate by
    coordinate in the same order as the builder, so float64 results are bit-identical."""
    neighbors, mask = [], []
    for env in positions.tolist():
        env_neighbors, env_mask = [], []
        for i, p in enumerate(env):
            candidates = []
            for j, q in enumerate(env):
                if j != i:
                    squared = 0.0
                    for a, b in zip(p, q):
                        squared += (a - b) ** 2
                    candidates.append((squared, j))
            candidates.sort()  # by distance, then by index
            real = [j for d, j in candidates[:k] if radius is None or math.sqrt(d) <= radius]
            env_neighbors.append(real + [i] * (k - len(real)))
            env_mask.append([True] * len(real) + [False] * (k - len(real)))
        neighbors.append(env_neighbors)
        mask.append(env_mask)
    return neighbors, mask


def reference_grid(rows: int, cols: int) -> list[list[int]]:
    """Neighbour lists of a rows x cols grid in the order up, left, right, down."""
    adjacency = []
    for r in range(rows):
        for c in range(cols):
            row = []
            for i, j in [(r - 1, c), (r, c - 1), (r, c + 1), (r + 1, c)]:
                if 0 <= i < rows and 0 <= j < cols:
                    row.append(i * cols + j)
            adjacency.append(row)
    return adjacency


def as_lists(graph: Graph):
    return graph.neighbors.tolist(), graph.mask.tolist()


def padded(adjacency: list[list[int]], k: int, batch_size: int):
    """(neighbors, mask) nested lists of one adjacency list repeated over environments."""
    neighbors = [row + [i] * (k - len(row)) for i, row in enumerate(adjacency)]
    mask = [[True] * len(row) + [False] * (k - len(row)) for row in adjacency]
    return [neighbors] * batch_size, [mask] * batch_size


def assert_valid(graph: Graph, n: int) -> None:
    """Dtypes, padding slots on the agent itself, and indices in range."""
    assert graph.neighbors.dtype == torch.int64 and graph.mask.dtype == torch.bool
    assert graph.neighbors.shape == graph.mask.shape and graph.neighbors.shape[1] == n
    agent = torch.arange(n).view(1, n, 1).expand_as(graph.neighbors)
    assert torch.equal(graph.neighbors[~graph.mask], agent[~graph.mask])
    assert ((graph.neighbors >= 0) & (graph.neighbors < n)).all()


# ---------------------------------------------------------------------------------------
# knn_graph / radius_knn_graph
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 12, 40])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_knn_matches_reference_on_random_positions(n, k):
    generator = torch.Generator().manual_seed(1000 * n + k)
    positions = torch.rand(3, n, 2, generator=generator, dtype=torch.float64)
    graph = knn_graph(positions, k)
    assert graph.k == k
    assert_valid(graph, n)
    assert as_lists(graph) == reference_knn(positions, k)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_knn_breaks_many_ties_by_lower_index(dims):
    # Integer positions in a tiny box: most distances are shared by several agents, including
    # at the k-th place, where the choice between equals decides who is in at all.
    generator = torch.Generator().manual_seed(dims)
    positions = torch.randint(0, 3, (4, 30, dims), generator=generator).float()
    for k in [1, 4, 9]:
        assert as_lists(knn_graph(positions, k)) == reference_knn(positions, k)


def test_knn_duplicate_positions_keep_index_order_and_exclude_self():
    positions = torch.zeros(2, 5, 2)
    graph = knn_graph(positions, 3)
    expected = [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2], [0, 1, 2]]
    assert graph.neighbors.tolist() == [expected] * 2
    assert graph.mask.all()

    # A co-located agent is the nearest, never self.
    positions = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [5.0, 5.0]]])
    assert knn_graph(positions, 1).neighbors.tolist() == [[[1], [0], [0]]]


def lattice(rows: int, cols: int) -> torch.Tensor:
    """[1, rows * cols, 2] positions (r, c) of agent r * cols + c."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([r, c], dim=-1).view(1, rows * cols, 2).float()


def test_knn_on_lattice_orders_equal_distances_by_index():
    # 0 1 2
    # 3 4 5
    # 6 7 8
    graph = knn_graph(lattice(3, 3), 4)
    neighbors = graph.neighbors[0].tolist()
    assert neighbors[4] == [1, 3, 5, 7]  # centre: the four at distance 1
    # corner: 1 and 3 at distance 1, 4 at sqrt(2), then 2 and 6 tie at distance 2 for the
    # last slot and the lower index wins.
    assert neighbors[0] == [1, 3, 4, 2]
    assert neighbors[8] == [5, 7, 4, 2]  # 2 and 6 at distance 2: index order
    assert neighbors[1] == [0, 2, 4, 3]  # edge: 0, 2, 4 at 1; 3 and 5 at sqrt(2)
    assert as_lists(knn_graph(lattice(4, 5), 7)) == reference_knn(lattice(4, 5), 7)


def test_knn_pads_when_fewer_agents_than_k():
    positions = torch.tensor([[[0.0], [3.0], [1.0]]])
    graph = knn_graph(positions, 4)
    assert graph.neighbors.tolist() == [[[2, 1, 0, 0], [2, 0, 1, 1], [0, 1, 2, 2]]]
    assert graph.mask.tolist() == [[[True, True, False, False]] * 3]


def test_knn_single_agent_is_all_padding():
    graph = knn_graph(torch.rand(4, 1, 2), 3)
    assert graph.neighbors.tolist() == [[[0, 0, 0]]] * 4
    assert not graph.mask.any()
    assert graph.degree().tolist() == [[0]] * 4


def test_knn_large_group_matches_stable_sort():
    # A second, vectorised reference at a size where the topk tie handling matters most.
    generator = torch.Generator().manual_seed(7)
    positions = torch.randint(0, 20, (2, 300, 2), generator=generator).float()
    squared = ((positions.unsqueeze(2) - positions.unsqueeze(1)) ** 2).sum(-1)
    squared.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    expected = squared.sort(dim=-1, stable=True).indices[..., :8]
    assert torch.equal(knn_graph(positions, 8).neighbors, expected)


def test_knn_ignores_gradients_and_rejects_bad_k():
    positions = torch.rand(1, 4, 2, requires_grad=True)
    graph = knn_graph(positions, 2)
    assert not graph.neighbors.requires_grad
    with pytest.raises(ValueError):
        knn_graph(positions, 0)


@pytest.mark.parametrize("radius", [0.0, 0.2, 0.5, 2.0])
def test_radius_knn_matches_reference(radius):
    generator = torch.Generator().manual_seed(int(radius * 10))
    positions = torch.rand(3, 15, 2, generator=generator, dtype=torch.float64)
    graph = radius_knn_graph(positions, 5, radius)
    assert_valid(graph, 15)
    assert as_lists(graph) == reference_knn(positions, 5, radius)


def test_radius_knn_on_lattice_keeps_the_boundary_and_pads_after_real_slots():
    graph = radius_knn_graph(lattice(3, 3), 4, radius=1.0)
    neighbors, mask = as_lists(graph)
    assert neighbors[0][0] == [1, 3, 0, 0] and mask[0][0] == [True, True, False, False]
    assert neighbors[0][4] == [1, 3, 5, 7] and mask[0][4] == [True] * 4
    assert neighbors[0][1] == [0, 2, 4, 1] and mask[0][1] == [True, True, True, False]

    # sqrt(2) exactly: the diagonal neighbour is kept.
    graph = radius_knn_graph(lattice(3, 3), 4, radius=math.sqrt(2))
    assert graph.neighbors[0, 0].tolist() == [1, 3, 4, 0]
    assert graph.mask[0, 0].tolist() == [True, True, True, False]


def test_radius_zero_keeps_only_colocated_agents():
    positions = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]])
    graph = radius_knn_graph(positions, 2, radius=0.0)
    assert graph.neighbors.tolist() == [[[2, 0], [1, 1], [0, 2]]]
    assert graph.mask.tolist() == [[[True, False], [False, False], [True, False]]]


# ---------------------------------------------------------------------------------------
# graph_from_adjacency / grid_graph / complete_graph
# ---------------------------------------------------------------------------------------


def test_graph_from_adjacency_pads_and_repeats_over_environments():
    adjacency = [[2, 1], [], [0], [0, 1, 2]]
    graph = graph_from_adjacency(adjacency, batch_size=2)
    assert graph.k == 3
    assert graph.neighbors.tolist() == [[[2, 1, 0], [1, 1, 1], [0, 2, 2], [0, 1, 2]]] * 2
    assert graph.mask.tolist() == [
        [[True, True, False], [False] * 3, [True, False, False], [True] * 3]
    ] * 2
    assert_valid(graph, 4)

    wider = graph_from_adjacency(adjacency, batch_size=1, k=5)
    assert as_lists(wider) == padded(adjacency, 5, 1)

    # Environments do not share storage.
    graph.neighbors[0, 0, 0] = 3
    assert graph.neighbors[1, 0, 0] == 2


def test_graph_from_adjacency_without_edges_has_one_padding_slot():
    graph = graph_from_adjacency([[], []], batch_size=1)
    assert graph.neighbors.tolist() == [[[0], [1]]]
    assert not graph.mask.any()


@pytest.mark.parametrize(
    "adjacency, k",
    [
        ([[1, 2], [0], [0]], 1),  # degree above k
        ([[1], [3], [0]], None),  # index out of range
        ([[1], [-1], [0]], None),  # negative index
        ([[1], [1], [0]], None),  # lists itself
        ([[1, 1], [0]], None),  # same neighbour twice
        ([[1], [0]], 0),  # no slot at all
    ],
)
def test_graph_from_adjacency_rejects_bad_lists(adjacency, k):
    with pytest.raises(ValueError):
        graph_from_adjacency(adjacency, batch_size=1, k=k)


def test_grid_3x3_by_hand():
    # 0 1 2
    # 3 4 5
    # 6 7 8    neighbours in the order up, left, right, down
    expected = [
        [1, 3], [0, 2, 4], [1, 5],
        [0, 4, 6], [1, 3, 5, 7], [2, 4, 8],
        [3, 7], [4, 6, 8], [5, 7],
    ]  # fmt: skip
    graph = grid_graph(3, 3, batch_size=2)
    assert graph.k == 4
    assert as_lists(graph) == padded(expected, 4, 2)
    assert graph.neighbors[0, 0].tolist() == [1, 3, 0, 0]  # corner
    assert graph.neighbors[0, 3].tolist() == [0, 4, 6, 3]  # edge
    assert graph.neighbors[0, 4].tolist() == [1, 3, 5, 7]  # centre


def test_grid_1x1_and_1xc():
    single = grid_graph(1, 1, batch_size=1)
    assert single.neighbors.tolist() == [[[0, 0, 0, 0]]] and not single.mask.any()
    row = grid_graph(1, 4, batch_size=1)
    assert as_lists(row) == padded([[1], [0, 2], [1, 3], [2]], 4, 1)
    column = grid_graph(3, 1, batch_size=1)
    assert as_lists(column) == padded([[1], [0, 2], [1]], 4, 1)


def test_grid_4x5_matches_reference():
    graph = grid_graph(4, 5, batch_size=3)
    assert as_lists(graph) == padded(reference_grid(4, 5), 4, 3)
    assert graph.neighbors[0, 0].tolist() == [1, 5, 0, 0]
    assert graph.neighbors[0, 7].tolist() == [2, 6, 8, 12]
    assert graph.neighbors[0, 19].tolist() == [14, 18, 19, 19]
    assert graph.degree()[0].sum() == 2 * (4 * 4 + 3 * 5)  # each edge counted from both ends


def test_grid_rejects_empty():
    with pytest.raises(ValueError):
        grid_graph(0, 3, batch_size=1)


def test_complete_graph():
    graph = complete_graph(4, batch_size=2)
    expected = [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    assert as_lists(graph) == padded(expected, 3, 2)
    reference = [[j for j in range(7) if j != i] for i in range(7)]
    assert as_lists(complete_graph(7, batch_size=1)) == padded(reference, 6, 1)

    single = complete_graph(1, batch_size=3)
    assert single.neighbors.tolist() == [[[0]]] * 3 and not single.mask.any()


# ---------------------------------------------------------------------------------------
# random_k_graph
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, k", [(10, 3), (3, 5), (6, 5), (1, 2)])
def test_random_k_draws_distinct_other_agents(n, k):
    generator = torch.Generator().manual_seed(n + k)
    graph = random_k_graph(n, k, batch_size=4, generator=generator)
    assert graph.k == k
    assert_valid(graph, n)
    assert (graph.degree() == min(k, n - 1)).all()
    for env_neighbors, env_mask in zip(*as_lists(graph)):
        for agent, (row, row_mask) in enumerate(zip(env_neighbors, env_mask)):
            real = [j for j, m in zip(row, row_mask) if m]
            assert row_mask == sorted(row_mask, reverse=True)  # real slots first
            assert agent not in real and len(set(real)) == len(real)


def test_random_k_is_reproducible_with_a_generator():
    def draw(seed):
        return random_k_graph(12, 4, 3, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(5).neighbors, draw(5).neighbors)
    assert not torch.equal(draw(5).neighbors, draw(6).neighbors)


def test_random_k_is_roughly_uniform():
    n, k, draws = 5, 2, 4000
    graph = random_k_graph(n, k, draws, generator=torch.Generator().manual_seed(0))
    # How often each agent j is among agent i's neighbours: (n - 1) choices, k taken.
    chosen = torch.zeros(n, n)
    chosen.index_put_(
        (torch.arange(n).view(1, n, 1).expand_as(graph.neighbors), graph.neighbors),
        torch.ones(()),
        accumulate=True,
    )
    expected = draws * k / (n - 1)
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    assert chosen.diagonal().sum() == 0
    assert ((chosen[off_diagonal] - expected).abs() < 0.1 * expected).all()
    # The first slot is uniform over the others as well: the order is random too.
    first = torch.bincount(graph.neighbors[:, 0, 0], minlength=n).float()
    assert first[0] == 0
    assert ((first[1:] - draws / (n - 1)).abs() < 0.1 * draws / (n - 1)).all()


# ---------------------------------------------------------------------------------------
# refresh_graph / DynamicGraph
# ---------------------------------------------------------------------------------------


def test_refresh_graph_replaces_only_due_environments():
    old = complete_graph(4, batch_size=5)
    new = random_k_graph(4, 3, 5, generator=torch.Generator().manual_seed(0))
    step = torch.tensor([0, 1, 2, 3, 4])
    refreshed = refresh_graph(old, new, step, graph_every=2)
    for env, due in enumerate([True, False, True, False, True]):
        source = new if due else old
        assert torch.equal(refreshed.neighbors[env], source.neighbors[env])
        assert torch.equal(refreshed.mask[env], source.mask[env])

    # Episode step 0 refreshes whatever graph_every is.
    refreshed = refresh_graph(old, new, torch.tensor([0, 3, 7, 9, 0]), graph_every=10)
    assert torch.equal(refreshed.neighbors[[0, 4]], new.neighbors[[0, 4]])
    assert torch.equal(refreshed.neighbors[1:4], old.neighbors[1:4])


def test_refresh_graph_rejects_a_different_k():
    positions = torch.rand(2, 4, 2)
    step = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError):
        refresh_graph(knn_graph(positions, 3), knn_graph(positions, 1), step, graph_every=1)


def test_dynamic_graph_builds_only_when_due():
    calls = []

    def build(positions):
        calls.append(positions)
        return knn_graph(positions, 2)

    dynamic = DynamicGraph(build, graph_every=3)
    generator = torch.Generator().manual_seed(0)
    first_positions = torch.rand(3, 6, 2, generator=generator)

    # The first call builds whatever the steps.
    first = dynamic.update(first_positions, torch.tensor([1, 2, 4]))
    assert len(calls) == 1 and dynamic.graph is first
    assert torch.equal(first.neighbors, knn_graph(first_positions, 2).neighbors)

    # No environment due: no build, same graph.
    again = dynamic.update(torch.rand(3, 6, 2, generator=generator), torch.tensor([2, 4, 5]))
    assert len(calls) == 1 and again is first

    # Environment 1 due (step 3), environment 2 fresh (step 0): only those change.
    moved = torch.rand(3, 6, 2, generator=generator)
    updated = dynamic.update(moved, torch.tensor([4, 3, 0]))
    assert len(calls) == 2 and dynamic.graph is updated
    rebuilt = knn_graph(moved, 2)
    assert torch.equal(updated.neighbors[0], first.neighbors[0])
    assert torch.equal(updated.neighbors[1:], rebuilt.neighbors[1:])
    assert not torch.equal(rebuilt.neighbors[0], first.neighbors[0])  # env 0 really kept

    with pytest.raises(ValueError):
        DynamicGraph(build, graph_every=0)


# ---------------------------------------------------------------------------------------
# Graph methods
# ---------------------------------------------------------------------------------------


def test_graph_where_index_degree():
    a = grid_graph(2, 2, batch_size=3)
    # The complete graph with a spare slot, to have the grid's K = 4.
    b = graph_from_adjacency([[j for j in range(4) if j != i] for i in range(4)], 3, k=4)

    mixed = a.where(torch.tensor([True, False, True]), b)
    assert torch.equal(mixed.neighbors[0], a.neighbors[0])
    assert torch.equal(mixed.neighbors[1], b.neighbors[1])
    assert torch.equal(mixed.mask[1], b.mask[1])
    assert torch.equal(mixed.neighbors[2], a.neighbors[2])

    assert a.degree().tolist() == [[2, 2, 2, 2]] * 3
    assert mixed.degree().tolist() == [[2] * 4, [3] * 4, [2] * 4]

    picked = mixed.index(torch.tensor([False, True, False]))
    assert picked.neighbors.shape == (1, 4, 4) and torch.equal(picked.neighbors[0], b.neighbors[1])
    picked = mixed.index(torch.tensor([2, 1]))
    assert torch.equal(picked.mask, torch.stack([a.mask[2], b.mask[1]]))
    assert mixed.to("cpu").k == 4


def test_among_drops_every_edge_to_and_from_absent_agents():
    graph = complete_graph(3, 2)
    present = torch.tensor([[True, False, True], [True, True, True]])
    restricted = graph.among(present)
    assert restricted.mask[0].tolist() == [[False, True], [False, False], [True, False]]
    assert restricted.neighbors[0].tolist() == [[0, 2], [1, 1], [0, 2]]  # padding points at self
    assert torch.equal(restricted.mask[1], graph.mask[1]) and torch.equal(restricted.neighbors[1], graph.neighbors[1])
