"""Graph builders: time per call of knn_graph, radius_knn_graph and random_k_graph.

B = 8 environments of N agents, k = 8 neighbours (4 where N <= 30). Positions are uniform in
the unit square (fixed seed); radius_knn_graph uses radius 0.2, so at small N many slots are
masked. random_k_graph draws with its own seeded generator. Each cell is the median of
repeated samples after warm-up calls (benchmarks/common.py: time_ms).

All three builders are O(B * N^2): knn over the pairwise distances, random_k over a key per
pair. The last column is B * N * N * 4 bytes, the size of one [B, N, N] float32 tensor, as an
estimate of the extra memory a call needs at its peak (the builders hold a few such tensors
at once, so the true peak is a small multiple of it).

    python benchmarks/graph_builders.py [--threads T] [--quick]
"""

from __future__ import annotations

import torch

from common import format_bytes, parse_args, print_machine, print_table, time_ms
from vimarl.envs.graph import knn_graph, radius_knn_graph, random_k_graph

BATCH = 8
AGENTS = (9, 30, 100, 200, 1225)
RADIUS = 0.2
BUILDERS = ("knn_graph", "radius_knn_graph", "random_k_graph")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    warmup, repeats = (1, 3) if args.quick else (5, 25)
    print_machine()
    rows = []
    for n in AGENTS:
        k = 4 if n <= 30 else 8
        positions = torch.rand(BATCH, n, 2, generator=torch.Generator().manual_seed(0))
        generator = torch.Generator().manual_seed(0)
        builders = {
            "knn_graph": lambda: knn_graph(positions, k),
            "radius_knn_graph": lambda: radius_knn_graph(positions, k, RADIUS),
            "random_k_graph": lambda: random_k_graph(n, k, BATCH, generator=generator),
        }
        times = [f"{time_ms(builders[name], warmup, repeats):.3f}" for name in BUILDERS]
        rows.append([BATCH, n, k, *times, format_bytes(BATCH * n * n * 4)])
    print(f"Graph builders, ms per call (radius = {RADIUS} in the unit square)\n")
    print_table(["B", "N", "k", *BUILDERS, "B*N*N*4 bytes"], rows)


if __name__ == "__main__":
    main()
