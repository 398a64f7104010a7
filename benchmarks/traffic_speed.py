"""Traffic-signal control: decisions per second of the batched queue model (`traffic_grid_NxN`)
against SUMO through libsumo (`sumo_grid_NxN`), one torch thread.

A decision is one `env.step` of every sub-environment: `decision_seconds` = 10 simulated seconds
of every intersection. Each cell resets, runs `--warmup` decisions with the fixed-time controller
so the network fills up (default demand, 400 veh/h per entry road), then times `--decisions`
more and reports sub-environment decisions per second (steps x B / time) and intersection
decisions per second (x N). SUMO with B = 1 runs in-process; with B > 1 as a pool of B worker
processes (one libsumo simulation each), so it can use up to B cores.

    python benchmarks/traffic_speed.py            # the full table (several minutes)
    python benchmarks/traffic_speed.py --quick    # fewer decisions

SUMO comes from the `sumo` extra (`pip install -e ".[sumo]"`); without it its rows are skipped.
"""

from __future__ import annotations

import importlib.util
import time

import torch

import vimarl
from common import parse_args, print_machine, print_table
from vimarl.envs.traffic import FixedTimePolicy

BATCHED = [(4, 1), (4, 32), (10, 1), (10, 32), (15, 1), (15, 8), (35, 1), (35, 8)]
SUMO = [(4, 1), (4, 2), (10, 1), (10, 2)]


def decisions_per_second(name: str, n: int, b: int, warmup: int, decisions: int) -> float:
    env = vimarl.make_env(name, num_envs=b, seed=0)
    try:
        policy = FixedTimePolicy(env.groups)
        step = env.reset(seed=0)

        def run(k):
            nonlocal step
            for _ in range(k):
                step = env.step(policy.act({"agents": step.groups["agents"].obs}, None, explore=False))

        run(warmup)
        start = time.perf_counter()
        run(decisions)
        return decisions * b / (time.perf_counter() - start)
    finally:
        if hasattr(env, "close"):
            env.close()


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    warmup, decisions = (20, 10) if args.quick else (50, 30)
    print_machine()
    rows = []
    cases = [("batched", f"traffic_grid_{n}x{n}", n, b) for n, b in BATCHED]
    if importlib.util.find_spec("libsumo") is not None:
        cases += [("SUMO (libsumo)", f"sumo_grid_{n}x{n}", n, b) for n, b in SUMO]
    else:
        print("SUMO not installed (pip install -e '.[sumo]'): its rows are skipped\n")
    for label, name, n, b in cases:
        rate = decisions_per_second(name, n, b, warmup, decisions)
        rows.append([label, f"{n} x {n}", n * n, b, f"{rate:,.1f}", f"{rate * n * n:,.0f}"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print()
    print_table(["simulator", "grid", "intersections N", "B", "decisions/s (x B)", "intersection-decisions/s"],
                rows)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
