"""Graphs for the nn tests: random neighbour lists with interleaved padding, slot shuffles,
re-pointed padding, a line graph and breadth-first hop distances."""

from __future__ import annotations

import math
from collections import deque

import torch

from vimarl.envs.graph import Graph, graph_from_adjacency


def random_graph(batch: int, n: int, k: int, seed: int, pad: str = "self",
                 isolated: tuple[tuple[int, int], ...] = ((0, 0),)) -> Graph:
    """Random neighbour lists: each agent gets 0..min(k, n-1) distinct other agents, in
    random slots (padding interleaved with real slots). Padded slots hold the agent itself
    (pad="self", the Graph convention) or any agent at all (pad="random"), which the masked
    operations must ignore. The (env, agent) pairs in `isolated` get no neighbour."""
    gen = torch.Generator().manual_seed(seed)
    neighbors, mask = [], []
    for b in range(batch):
        env_neighbors, env_mask = [], []
        for i in range(n):
            others = [j for j in range(n) if j != i]
            order = torch.randperm(len(others), generator=gen).tolist()
            degree = int(torch.randint(0, min(k, n - 1) + 1, (), generator=gen))
            if (b, i) in isolated:
                degree = 0
            slots = [others[p] for p in order[:degree]]
            flags = [True] * degree
            for _ in range(k - degree):
                slots.append(i if pad == "self" else int(torch.randint(0, n, (), generator=gen)))
                flags.append(False)
            shuffle = torch.randperm(k, generator=gen).tolist()
            env_neighbors.append([slots[s] for s in shuffle])
            env_mask.append([flags[s] for s in shuffle])
        neighbors.append(env_neighbors)
        mask.append(env_mask)
    return Graph(torch.tensor(neighbors, dtype=torch.int64), torch.tensor(mask, dtype=torch.bool))


def permute_slots(graph: Graph, seed: int) -> Graph:
    """The same graph with every agent's K slots (index and mask together) shuffled."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(graph.k, generator=gen)
                         for _ in range(graph.neighbors[..., 0].numel())])
    order = order.view(graph.neighbors.shape)
    return Graph(graph.neighbors.gather(-1, order), graph.mask.gather(-1, order))


def repoint_padding(graph: Graph, seed: int) -> Graph:
    """The same graph with every padded slot pointing at a random agent instead."""
    gen = torch.Generator().manual_seed(seed)
    n = graph.neighbors.shape[1]
    random_index = torch.randint(0, n, graph.neighbors.shape, generator=gen)
    return Graph(torch.where(graph.mask, graph.neighbors, random_index), graph.mask.clone())


def line_graph(n: int, batch: int = 1) -> Graph:
    return graph_from_adjacency([[j for j in (i - 1, i + 1) if 0 <= j < n] for i in range(n)], batch)


def real_neighbors(graph: Graph, b: int, i: int) -> list[int]:
    return [j for j, ok in zip(graph.neighbors[b, i].tolist(), graph.mask[b, i].tolist()) if ok]


def hop_distances(graph: Graph, source: int) -> list[float]:
    """Breadth-first hop distances from `source` in environment 0 (inf if unreachable)."""
    n = graph.neighbors.shape[1]
    dist = [math.inf] * n
    dist[source] = 0
    queue = deque([source])
    while queue:
        i = queue.popleft()
        for j in real_neighbors(graph, 0, i):
            if dist[j] == math.inf:
                dist[j] = dist[i] + 1
                queue.append(j)
    return dist
