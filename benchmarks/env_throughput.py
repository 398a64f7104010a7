"""Environment throughput: agent-steps per second with random actions, one CPU thread.

Compares vimarl's batched `coop_nav` (PIC cooperative navigation) with the two peers the
design names: mpe2 `simple_spread_v3` (pure Python, one environment, O(N^2) per step) and VMAS
`navigation` (torch, vectorised over environments, Python loops over agents; default
scenario settings, 12 lidar rays per agent, spawned in coop_nav's arena), at the same number
of agents N and, for VMAS, the same number of parallel environments B. Each cell steps
for at least `--seconds` after a warm-up and reports agent-steps/s = steps * B * N / time.

    python benchmarks/env_throughput.py            # the full table (several minutes)
    python benchmarks/env_throughput.py --quick    # a smoke run

mpe2 and VMAS come from the `bench` extra (`pip install -e ".[bench]"`, or `make bench`).
"""

from __future__ import annotations

import argparse
import platform
import signal
import time
from contextlib import contextmanager

import numpy as np
import torch

import vimarl

# (N, B): the papers' sizes; B is what a CPU run of that size would use.
CASES = [(3, 256), (30, 64), (200, 64), (1225, 8)]
MPE2_MAX_AGENTS = 100  # above this one mpe2 step takes seconds (O(N^2) pure Python)
PEER_TIME_LIMIT = 180  # seconds a peer may take for one cell (set-up, warm-up and timing)


@contextmanager
def time_limit(seconds: int):
    """Raise TimeoutError in the block after `seconds` (SIGALRM; main thread only)."""
    def expire(signum, frame):
        raise TimeoutError
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def timed(step, seconds: float, warmup: int = 3) -> float:
    """Steps per second of `step()` measured for at least `seconds`."""
    for _ in range(warmup):
        step()
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count < 3:
        step()
        count += 1
    return count / elapsed


def vimarl_rate(n: int, batch: int, seconds: float) -> tuple[float, float]:
    """(agent-steps/s, the arena radius coop_nav uses at this N)."""
    env = vimarl.make_env("coop_nav", batch, seed=0, n_agents=n)
    env.reset(seed=0)
    generator = torch.Generator().manual_seed(0)
    rate = timed(lambda: env.step({"agents": torch.randint(0, 5, (batch, n), generator=generator)}), seconds)
    return rate * batch * n, env.radius


def mpe2_rate(n: int, seconds: float) -> float | None:
    try:
        from mpe2 import simple_spread_v3
    except ImportError:
        return None
    env = simple_spread_v3.parallel_env(N=n, max_cycles=10 ** 9)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    names = list(env.agents)
    return timed(lambda: env.step({a: int(rng.integers(5)) for a in names}), seconds) * n


def vmas_rate(n: int, batch: int, radius: float, seconds: float) -> float | None:
    """VMAS spawns without overlap in a [-1, 1]^2 box by default, which never finishes for 30
    agents; it spawns here in coop_nav's arena, so both run at the same density."""
    try:
        import vmas
    except ImportError:
        return None
    env = vmas.make_env("navigation", num_envs=batch, device="cpu", continuous_actions=True, n_agents=n,
                        seed=0, world_spawning_x=radius, world_spawning_y=radius)
    env.reset()
    actions = lambda: [torch.rand(batch, 2) * 2 - 1 for _ in range(n)]
    return timed(lambda: env.step(actions()), seconds) * batch * n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small cases, short timings")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", default=None, help="N:B pairs, e.g. 1225:8,200:64 (default: the table)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [(3, 16), (30, 8)] if args.quick else CASES
    if args.cases:
        cases = [tuple(int(x) for x in pair.split(":")) for pair in args.cases.split(",")]
    seconds = 0.3 if args.quick else args.seconds

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch "
          f"thread(s), torch {torch.__version__}, python {platform.python_version()}")
    print()
    print("| N | B | vimarl coop_nav | mpe2 simple_spread (B=1) | VMAS navigation | vimarl / mpe2 | "
          "vimarl / VMAS | vimarl us per agent-step |")
    print("|---|---|---|---|---|---|---|---|")
    fmt = lambda rate: f"{rate:,.0f}" if rate else "n/a"
    for n, batch in cases:
        ours, radius = vimarl_rate(n, batch, seconds)
        reference = mpe2_rate(n, seconds) if n <= MPE2_MAX_AGENTS else None
        try:
            with time_limit(PEER_TIME_LIMIT):
                peer = vmas_rate(n, batch, radius, seconds)
            peer_cell = fmt(peer)
        except TimeoutError:
            peer, peer_cell = None, f"not finished in {PEER_TIME_LIMIT} s"
        mpe2_cell = fmt(reference) if n <= MPE2_MAX_AGENTS else "not run (O(N^2) Python)"
        print(f"| {n} | {batch} | {fmt(ours)} | {mpe2_cell} | {peer_cell} | "
              f"{f'{ours / reference:,.0f}x' if reference else '-'} | {f'{ours / peer:,.1f}x' if peer else '-'} | "
              f"{1e6 / ours:.2f} |", flush=True)


if __name__ == "__main__":
    main()
