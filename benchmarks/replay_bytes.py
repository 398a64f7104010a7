"""Replay bytes per transition: the full layout (every field in every row) against what the
replay stores now: each vectorised step once (s' is the next row of the same sub-environment,
`ReplayBuffer(successors=...)`), the global state only for algorithms that read it, static graphs
once.

For each (environment, algorithm) the layouts are the `TransitionCodec` fields of one row
(`vimarl.train.replay_codec` for the current one); nothing is allocated, so the numbers are exact
and do not depend on the machine's load. Besides its rows, the replay keeps s' once per episode
end (a side table: "per episode end") and for the newest step. The last columns are the largest
replays that fit in 16 GB (episode ends not counted).

    python benchmarks/replay_bytes.py
"""

from __future__ import annotations

import math

import torch

import vimarl
from common import format_bytes, print_table
from vimarl.buffer import TransitionCodec
from vimarl.train import replay_codec

CASES = (
    ("coop_nav_n200", {}, "vpp"),
    ("traffic_grid_35x35", {}, "vpp"),
    ("traffic_grid_35x35", {}, "dgn"),
    ("traffic_grid_35x35", {"graph": "complete"}, "vpp"),
    ("traffic_grid_10x10", {"graph": "complete"}, "vpp"),
    ("traffic_grid_10x10", {}, "qmix"),
    ("jungle", {}, "vpp"),
)
MEMORY = 16e9


def row_bytes(fields: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in fields.values())


def main() -> None:
    rows = []
    for env_name, options, algo_name in CASES:
        env = vimarl.make_env(env_name, 1, seed=0, **options)
        algo = vimarl.make_algo(algo_name, env)
        full = row_bytes(TransitionCodec(algo.groups, env.state_dim, algo.replay_fields()).fields())
        codec = replay_codec(algo, env, env.reset(seed=0))
        fields, successors = codec.fields(), codec.successors()
        lean = row_bytes({k: v for k, v in fields.items() if k not in successors})
        final = row_bytes({k: v for k, v in fields.items() if k in successors})
        label = env_name + "".join(f" {k}={v}" for k, v in options.items())
        rows.append([label, algo_name, format_bytes(full), format_bytes(lean), format_bytes(final),
                     f"{full / lean:.2f}x", f"{int(MEMORY / full):,}", f"{int(MEMORY / lean):,}"])
    print("Replay bytes per transition: full layout vs each step once, declared fields, static graphs once\n")
    print_table(["env", "algorithm", "full layout", "now", "per episode end", "ratio", "rows in 16 GB (full)",
                 "rows in 16 GB (now)"], rows)


if __name__ == "__main__":
    main()
