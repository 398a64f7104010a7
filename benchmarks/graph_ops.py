"""Neighbour aggregation: four ways to compute sum_{j in N_i} x_j, and NeighborAttention.

For each shape (B environments, N agents, K neighbour slots, F features) the input is
x [B, N, F] and a random K-neighbour graph (`random_k_graph`) with about a quarter of the
slots masked out as padding. The implementations of the masked neighbour sum are

  (a) vimarl.nn.graph_ops.neighbor_sum: one `embedding_bag` over the flattened rows, which
      never builds the [B, N, K, F] neighbour tensor;
  (b) gather_neighbors (advanced indexing into [B * N, F]), times the mask, summed over K;
  (c) torch.gather along the agent axis with the index expanded to [B, N * K, F], times the
      mask, summed over K (the baseline of the speed-up columns);
  (d) a dense adjacency: scatter the mask into a [B, N, N] matrix, then bmm with x. Building
      the matrix is timed too, since the input is the neighbour list. Skipped where the
      matrix would exceed 1 GB.

"forward" times the call; "forward+backward" adds out.backward(grad) for a fixed random
grad, with the gradient w.r.t. x only. The second table times NeighborAttention (heads = 2,
in and out width = F rounded up to even, attending over itself and its neighbours), whose
backward also reaches its three projection matrices. Each cell is the median of repeated
samples after warm-up calls (benchmarks/common.py: time_ms).

    python benchmarks/graph_ops.py [--threads T] [--quick]
"""

from __future__ import annotations

import torch
from torch import Tensor

from common import parse_args, print_machine, print_table, time_ms
from vimarl.envs.graph import Graph, random_k_graph
from vimarl.nn.graph_ops import NeighborAttention, gather_neighbors, neighbor_sum

SHAPES = [(256, 9, 4, 32), (64, 30, 8, 64), (1024, 30, 8, 64), (8, 1225, 8, 32), (8, 200, 8, 64)]
DENSE_LIMIT_BYTES = 2**30
PADDING_FRACTION = 0.25


def make_inputs(batch: int, n: int, k: int, features: int) -> tuple[Tensor, Graph]:
    generator = torch.Generator().manual_seed(0)
    graph = random_k_graph(n, k, batch, generator=generator)
    mask = graph.mask & (torch.rand(graph.mask.shape, generator=generator) >= PADDING_FRACTION)
    agent = torch.arange(n).view(1, n, 1)
    graph = Graph(torch.where(mask, graph.neighbors, agent), mask)  # padding holds the agent itself
    return torch.randn(batch, n, features, generator=generator), graph


def by_indexing(x: Tensor, graph: Graph) -> Tensor:
    return (gather_neighbors(x, graph) * graph.mask.unsqueeze(-1).to(x.dtype)).sum(2)


def by_gather(x: Tensor, graph: Graph) -> Tensor:
    batch, n, features = x.shape
    index = graph.neighbors.view(batch, n * graph.k, 1).expand(-1, -1, features)
    neighbors = torch.gather(x, 1, index).view(batch, n, graph.k, features)
    return (neighbors * graph.mask.unsqueeze(-1).to(x.dtype)).sum(2)


def by_dense_adjacency(x: Tensor, graph: Graph) -> Tensor:
    batch, n, _ = x.shape
    adjacency = x.new_zeros(batch, n, n).scatter_add_(2, graph.neighbors, graph.mask.to(x.dtype))
    return adjacency.bmm(x)


BASELINE, DENSE = "(c) torch.gather", "(d) dense bmm"
IMPLEMENTATIONS = {"(a) embedding_bag": neighbor_sum, "(b) advanced indexing": by_indexing,
                   BASELINE: by_gather, DENSE: by_dense_adjacency}


def forward_backward(module_or_fn, x: Tensor, graph: Graph, grad: Tensor):
    def step():
        if isinstance(module_or_fn, torch.nn.Module):
            module_or_fn.zero_grad(set_to_none=True)
        x.grad = None
        module_or_fn(x, graph).backward(grad)
    return step


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    warmup, repeats = (1, 3) if args.quick else (5, 25)
    print_machine()

    rows = []
    for batch, n, k, features in SHAPES:
        x, graph = make_inputs(batch, n, k, features)
        x_grad = x.clone().requires_grad_(True)
        grad = torch.randn_like(x)
        implementations = {name: fn for name, fn in IMPLEMENTATIONS.items()
                           if name != DENSE or batch * n * n * 4 <= DENSE_LIMIT_BYTES}
        reference = by_gather(x, graph)
        for fn in implementations.values():  # all must agree before they are timed
            torch.testing.assert_close(fn(x, graph), reference, rtol=1e-4, atol=1e-4)
        passes = {"forward": lambda fn: lambda: fn(x, graph),
                  "forward+backward": lambda fn: forward_backward(fn, x_grad, graph, grad)}
        for label, make_step in passes.items():
            times = {name: time_ms(make_step(fn), warmup, repeats) for name, fn in implementations.items()}
            cells = [f"{times[name]:.3f} ms ({times[BASELINE] / times[name]:.1f}x)" if name in times
                     else "skipped (dense N x N)" for name in IMPLEMENTATIONS]
            rows.append([f"({batch}, {n}, {k}, {features})", label, *cells])
    print("Masked neighbour sum, ms per call (speed-up vs (c) torch.gather in brackets)\n")
    print_table(["(B, N, K, F)", "pass", *IMPLEMENTATIONS], rows)

    rows = []
    for batch, n, k, features in SHAPES:
        width = features + features % 2
        x, graph = make_inputs(batch, n, k, width)
        attention = NeighborAttention(width, width, heads=2)
        x_grad = x.clone().requires_grad_(True)
        with torch.no_grad():
            forward_ms = time_ms(lambda: attention(x, graph), warmup, repeats)
        backward_ms = time_ms(forward_backward(attention, x_grad, graph, torch.randn_like(x)), warmup, repeats)
        rows.append([f"({batch}, {n}, {k}, {features})", f"{forward_ms:.3f}", f"{backward_ms:.3f}"])
    print("NeighborAttention (heads = 2, include_self), ms per call\n")
    print_table(["(B, N, K, F)", "forward (no_grad)", "forward+backward"], rows)


if __name__ == "__main__":
    main()
