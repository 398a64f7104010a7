"""Agent graphs as data: a fixed-width neighbour list per agent, and pure builders.

A graph over the N agents of one group in each of B environments is two tensors:
``neighbors [B, N, K]`` (int64 indices into the same group) and ``mask [B, N, K]`` (bool,
False marks padding). Padded slots hold the agent's own index, so gathering with them is
always valid and only the mask decides whether a slot counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vimarl.envs import rng
from vimarl.envs.spatial import BRUTE_FORCE_PAIRS, k_nearest


@dataclass
class Graph:
    """Neighbour lists of one agent group, batched over environments."""

    neighbors: Tensor
    """[B, N, K] int64 indices of each agent's neighbours in the same group."""
    mask: Tensor
    """[B, N, K] bool; False marks a padding slot (its index is the agent itself)."""

    @property
    def k(self) -> int:
        return self.neighbors.shape[-1]

    def to(self, device: torch.device | str) -> "Graph":
        return Graph(self.neighbors.to(device), self.mask.to(device))

    def index(self, rows: Tensor) -> "Graph":
        """The graphs of the environments selected by `rows` (a bool mask or indices over B)."""
        return Graph(self.neighbors[rows], self.mask[rows])

    def where(self, rows: Tensor, other: "Graph") -> "Graph":
        """This graph where `rows [B]` is True, `other` elsewhere (same K)."""
        pick = rows.view(-1, 1, 1)
        return Graph(
            torch.where(pick, self.neighbors, other.neighbors),
            torch.where(pick, self.mask, other.mask),
        )

    def among(self, present: Tensor) -> "Graph":
        """The graph without the agents where `present [B, N]` is False: no edges to or from
        them (their slots become padding, pointing at the agent itself)."""
        neighbor_present = torch.gather(present, 1, self.neighbors.flatten(1)).view_as(self.mask)
        mask = self.mask & neighbor_present & present.unsqueeze(-1)
        own_index = torch.arange(self.neighbors.shape[1], device=self.neighbors.device).view(1, -1, 1)
        return Graph(torch.where(mask, self.neighbors, own_index), mask)

    def degree(self) -> Tensor:
        """[B, N] number of real neighbours of each agent."""
        return self.mask.sum(-1)


# ---------------------------------------------------------------------------------------
# Builders. Each returns a fresh Graph. None loops over environments, and only the fixed
# layouts loop over agents, once, to read an adjacency list.
# ---------------------------------------------------------------------------------------


def knn_graph(positions: Tensor, k: int) -> Graph:
    """Each agent's `k` nearest other agents by Euclidean distance, nearest first.

    `positions` is [B, N, D]. Equal distances are ordered by lower agent index. The result
    always has K = k; when N - 1 < k the last k - (N - 1) slots are padding.
    """
    neighbors, _ = _nearest_others(positions, k)
    return _padded(neighbors, torch.ones_like(neighbors, dtype=torch.bool), k)


def _nearest_others(positions: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The min(k, N - 1) nearest other agents of each agent and their squared distances,
    from a grid of cells in 2-D (O(N), vimarl.envs.spatial) and over all pairs otherwise."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    positions = positions.detach()  # a graph holds indices only: no gradient flows through it
    n = positions.shape[1]
    if positions.shape[-1] == 2 and n * n > BRUTE_FORCE_PAIRS:
        neighbors, distances = k_nearest(positions, positions, min(k, n - 1), exclude_self=True)
        return neighbors, distances.square()
    return _all_pairs_nearest_others(positions, k)


def radius_knn_graph(positions: Tensor, k: int, radius: float) -> Graph:
    """As `knn_graph`, with neighbours farther than `radius` masked out.

    A neighbour at distance exactly `radius` is kept. Masked slots always come after the
    real ones, since neighbours are sorted by distance.
    """
    neighbors, squared_distances = _nearest_others(positions, k)
    # Compared as distances: the rounding of radius**2 could move the boundary.
    within = squared_distances.sqrt() <= radius
    return _padded(neighbors, within, k)


def graph_from_adjacency(
    adjacency: Sequence[Sequence[int]],
    batch_size: int,
    k: int | None = None,
    device: torch.device | str | None = None,
) -> Graph:
    """The same graph in all `batch_size` environments, from neighbour lists.

    `adjacency[i]` lists agent i's neighbours in the order they take in its slots. K is `k`,
    or by default the largest degree (at least 1, so that every agent has a slot). Raises
    ValueError for a degree above k, an index out of range, an agent listing itself, or an
    agent listing the same neighbour twice.
    """
    n = len(adjacency)
    if k is None:
        k = max([len(row) for row in adjacency] + [1])
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    for agent, row in enumerate(adjacency):
        if len(row) > k:
            raise ValueError(f"agent {agent} has {len(row)} neighbours, more than k={k}")
        if len(set(row)) != len(row):
            raise ValueError(f"agent {agent} lists a neighbour twice: {list(row)}")
        for other in row:
            if not 0 <= other < n:
                raise ValueError(f"agent {agent} lists {other}, outside 0..{n - 1}")
            if other == agent:
                raise ValueError(f"agent {agent} lists itself as a neighbour")

    neighbors = [list(row) + [agent] * (k - len(row)) for agent, row in enumerate(adjacency)]
    mask = [[True] * len(row) + [False] * (k - len(row)) for row in adjacency]
    neighbors = torch.tensor(neighbors, dtype=torch.int64, device=device).view(n, k)
    mask = torch.tensor(mask, dtype=torch.bool, device=device).view(n, k)
    # repeat, not expand: environments must not share storage, or an in-place edit of one
    # environment's graph would change them all.
    return Graph(neighbors.repeat(batch_size, 1, 1), mask.repeat(batch_size, 1, 1))


def grid_graph(
    rows: int, cols: int, batch_size: int, device: torch.device | str | None = None
) -> Graph:
    """4-neighbourhood of a rows x cols grid, agent r * cols + c at cell (r, c).

    K = 4. Neighbours come in the order up, left, right, down -- (r-1, c), (r, c-1),
    (r, c+1), (r+1, c) -- with the ones off the grid left out and padding after the rest.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"a grid needs at least one row and one column, got {rows}x{cols}")
    adjacency = []
    for r in range(rows):
        for c in range(cols):
            cells = [(r - 1, c), (r, c - 1), (r, c + 1), (r + 1, c)]
            adjacency.append([i * cols + j for i, j in cells if 0 <= i < rows and 0 <= j < cols])
    return graph_from_adjacency(adjacency, batch_size, k=4, device=device)


def complete_graph(n: int, batch_size: int, device: torch.device | str | None = None) -> Graph:
    """Every agent linked to every other, in index order.

    K = n - 1, except that a lone agent (n == 1) gets K = 1, all padding.
    """
    if n < 1:
        raise ValueError(f"a graph needs at least one agent, got n={n}")
    neighbors = _other_agent(torch.arange(n - 1, device=device).expand(batch_size, n, n - 1))
    return _padded(neighbors, torch.ones_like(neighbors, dtype=torch.bool), max(n - 1, 1))


def random_k_graph(
    n: int,
    k: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Graph:
    """Each agent linked to min(k, n - 1) distinct other agents drawn uniformly, in random order.

    K = k, padded when n - 1 < k. Draws are independent across agents and environments and
    reproducible with `generator` (which must live on `device`).
    """
    if n < 1 or k < 1:
        raise ValueError(f"need n >= 1 and k >= 1, got n={n}, k={k}")
    keys = torch.rand(batch_size, n, n - 1, generator=generator, device=device)
    return random_k_graph_from_keys(keys, k)


def random_k_graph_from_keys(keys: Tensor, k: int) -> Graph:
    """`random_k_graph` from given keys `[B, N, N - 1]` (i.i.d. uniform, or distinct integers
    from them): agent i's neighbours are the other agents holding its min(k, N - 1) largest
    keys, largest first.

    Entry j of row i is the key of the j-th other agent (0..i-1, then i+1..N-1). With
    i.i.d. uniform keys this is a uniform draw without replacement, in a uniformly random
    order; environments pass keys from counter-based randomness (vimarl.envs.rng), so that
    the draw is a pure function of their counters. Time and memory are O(B N^2).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    _, n, others = keys.shape
    if others != n - 1:
        raise ValueError(f"keys must be [B, N, N - 1], got {list(keys.shape)}")
    # The other agents holding the min(k, n - 1) largest of i.i.d. uniform keys are a
    # uniform draw without replacement, and topk lists them in a uniformly random order.
    neighbors = _other_agent(keys.topk(min(k, n - 1), dim=-1).indices)
    return _padded(neighbors, torch.ones_like(neighbors, dtype=torch.bool), k)


def counter_random_k_graph(n: int, k: int, seed: int, env_ids: Tensor, *counters: Tensor | int) -> Graph:
    """`random_k_graph` for the environments `env_ids [E]`, drawn from counter-based randomness.

    The draw is a pure function of (seed, env id, *counters) -- see `vimarl.envs.rng.uniform`
    for per-environment ([E] tensors) and global (int) counters -- so an environment gets the
    same graph whatever the batch it is in. Keys are made distinct (24 random bits, then the
    slot), so ties never leave the choice to topk. Time and memory are O(E N^2).
    """
    if n < 1 or k < 1:
        raise ValueError(f"need n >= 1 and k >= 1, got n={n}, k={k}")
    unit = rng.uniform(seed, env_ids, *counters, shape=(n, n - 1))
    slot = torch.arange(n - 1, device=unit.device)
    keys = (unit * (1 << 24)).long() * max(n - 1, 1) + slot
    return random_k_graph_from_keys(keys, k)


# ---------------------------------------------------------------------------------------
# Graphs that change during an episode.
# ---------------------------------------------------------------------------------------


def refresh_graph(graph: Graph, new_graph: Graph, episode_step: Tensor, graph_every: int) -> Graph:
    """`new_graph` in the environments due for a rebuild, `graph` in the others.

    Environments call this after each step with `episode_step [B]`, the step count within
    each environment's episode; an environment is due when `episode_step % graph_every == 0`.
    A fresh episode (episode_step == 0) is therefore always refreshed.
    """
    if new_graph.k != graph.k:
        # Graph.where would broadcast K = 1 against any K instead of failing.
        raise ValueError(f"cannot mix graphs of K={graph.k} and K={new_graph.k}")
    due = episode_step % graph_every == 0
    return new_graph.where(due, graph)


@dataclass
class DynamicGraph:
    """A graph rebuilt from positions every `graph_every` steps of each environment's episode.

    `build(positions)` makes the graph of all environments (e.g. a partial of `knn_graph`);
    `update` calls it only when some environment is due and keeps the old graph elsewhere.
    """

    build: Callable[[Tensor], Graph]
    graph_every: int
    graph: Graph | None = None
    """The current graph; None until the first `update`."""

    def __post_init__(self) -> None:
        if self.graph_every < 1:
            raise ValueError(f"graph_every must be at least 1, got {self.graph_every}")

    def update(self, positions: Tensor, episode_step: Tensor) -> Graph:
        """The graph after a step; see `refresh_graph` for which environments are rebuilt."""
        if self.graph is None:
            self.graph = self.build(positions)
            return self.graph
        due = episode_step % self.graph_every == 0
        # One host sync per step, to skip the build (for knn, a pass over all agent pairs)
        # on the steps where no environment is due.
        if bool(due.any()):
            new_graph = self.build(positions)
            self.graph = refresh_graph(self.graph, new_graph, episode_step, self.graph_every)
        return self.graph


# ---------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------


def _other_agent(slot: Tensor) -> Tensor:
    """The agent at `slot [..., N, M]` of a row listing every agent but the row's own.

    Row i of such a [N, N - 1] layout holds agents 0..i-1 then i+1..N-1, so slot j is
    agent j below the diagonal and agent j + 1 from it on.
    """
    agent = torch.arange(slot.shape[-2], device=slot.device).unsqueeze(-1)
    return slot + (slot >= agent).long()


def _all_pairs_nearest_others(positions: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The min(k, N - 1) nearest other agents of each agent and their squared distances.

    Returns `neighbors [B, N, M]` (int64, nearest first, equal distances by lower index) and
    `squared_distances [B, N, M]`, with M = min(k, N - 1).
    """
    batch, n, dims = positions.shape
    # Squared differences summed one coordinate at a time: memory stays [B, N, N] (never
    # [B, N, N, D]), and unlike the |x|^2 + |y|^2 - 2xy expansion, identical coordinate
    # differences give bit-identical distances, so ties are exact (duplicate positions,
    # integer lattices).
    squared_distances = positions.new_zeros(batch, n, n)
    for d in range(dims):
        coordinate = positions[..., d]
        squared_distances += (coordinate.unsqueeze(-1) - coordinate.unsqueeze(-2)).square_()
    # Self is left out of the candidates rather than given an infinite distance, so it is
    # never picked, even when another agent shares its position.
    slots, squared_distances = _smallest(_without_diagonal(squared_distances), min(k, n - 1))
    return _other_agent(slots), squared_distances


def _without_diagonal(matrix: Tensor) -> Tensor:
    """[B, N, N - 1]: row i of the [B, N, N] `matrix` without its entry i, order kept."""
    batch, n, _ = matrix.shape
    # Flattened, diagonal entries are n + 1 apart: after dropping the first one, rows of
    # n + 1 entries each end on the next diagonal entry, which the [:, :, :-1] drops.
    rows = matrix.flatten(1)[:, 1:].view(batch, n - 1, n + 1)
    return rows[:, :, :-1].reshape(batch, n, n - 1)


def _smallest(values: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Positions and values of the `m` smallest entries along the last dimension, ascending,
    equal values ordered by lower position.

    A stable sort of whole rows would do, but costs O(N log N) per row where topk costs
    O(N): on CPU it makes a whole knn build at N = 1,225 about 3x slower. topk alone settles
    ties arbitrarily, so it only finds the m-th smallest value, and the entries equal to it
    compete by position.
    """
    size = values.shape[-1]
    mth_smallest = values.topk(m, dim=-1, largest=False).values[..., -1:]
    # Fewer than m entries lie below the m-th smallest value: all of them are taken, then as
    # many of those equal to it as fit, lowest positions first. Priorities of the equal
    # ones are distinct, so the top m priorities are exactly these entries. (float32 is
    # exact for these integers up to 2**24 agents, and twice as fast as int64 here.)
    lower_first = torch.arange(size, 0, -1, device=values.device, dtype=torch.float32)
    priority = torch.where(
        values < mth_smallest,
        size + 1.0,
        torch.where(values == mth_smallest, lower_first, 0.0),
    )
    chosen = priority.topk(m, dim=-1).indices.sort(dim=-1).values
    # Sorted by position first, so the stable sort by value keeps ties in position order.
    chosen_values, order = values.gather(-1, chosen).sort(dim=-1, stable=True)
    return chosen.gather(-1, order), chosen_values


def _padded(neighbors: Tensor, mask: Tensor, k: int) -> Graph:
    """A Graph of K = k from `neighbors`/`mask [B, N, M]` (M <= k): the k - M extra slots are
    padding, and every masked slot's index becomes the agent itself."""
    batch, n, m = neighbors.shape
    padding = k - m
    neighbors = torch.cat([neighbors, neighbors.new_zeros(batch, n, padding)], dim=-1)
    mask = torch.cat([mask, mask.new_zeros(batch, n, padding)], dim=-1)
    agent = torch.arange(n, device=neighbors.device).view(1, n, 1)
    return Graph(torch.where(mask, neighbors, agent), mask)
