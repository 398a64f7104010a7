"""VPP / IP scaling in the number of agents: policy forward and one update, per agent-sample.

Environment: coop_nav (PIC cooperative navigation, 26-dim observations, 5 discrete actions) with
N in (30, 200, 1225) agents and a k = 8 nearest-neighbour agent graph. Variants:

  vpp mean_field   make_algo("vpp", env): the default config (2 mean-field rounds, 2 heads,
                   embed 32, hidden 128, one Q network, expectation gradient);
  vpp loopy_bp     the same with inference="loopy_bp";
  ip               make_algo("ip", env): its defaults (embed and state width 128, twin
                   critics, concatenated hops; mean-field inference).

For each (variant, N) a replay buffer is filled with FILL_STEPS vectorised steps of FILL_ENVS
environments acting with the untrained policy (vimarl.train.fill_replay), and one batch of
BATCH = 256 transitions is drawn from it (ReplayBuffer.sample draws rows uniformly with
replacement, so 256 rows come from the 8 stored ones) and decoded once. Rows = 256 * N
agent-samples. Then

  forward  algo.act(obs, graph, explore=True) on the batch's 256 states: the policy
           distribution (inference layers, output MLP, softmax) and one sampled action per
           agent, under no_grad;
  update   algo.update(batch): the Q, policy and V gradient steps and the polyak step of the
           target V (for the expectation gradient the policy step evaluates Q_i for all 5 own
           actions).

Columns: ms per call (benchmarks/common.py time_ms: the median of 5 samples after 2 warm-up
calls for forward, of 3 samples after 1 warm-up call for update; --quick: 1 sample, no
warm-up) and microseconds per agent-sample (ms * 1000 / (256 * N)); the second table gives the
ratio of the per-agent-sample cost at the largest N to that at the smallest (the target is at
most 2x, i.e. total cost linear in N).

Peak memory: every (variant, N) cell runs in a fresh subprocess. On the CPU, after the model and
the filled buffer exist, the process's resident-set high-water mark is reset (Linux: "5" written
to /proc/self/clear_refs) and the current RSS is read (VmRSS) as the baseline; the peak
columns are the high-water mark (VmHWM) minus that baseline over (sampling and decoding the
batch + the first forward call), then, after a second reset, over the first update call. Both
include the 256-state batch itself (its size as stored in the buffer is printed). Where
clear_refs cannot be written, resource.getrusage's ru_maxrss (the process's lifetime peak) is
used instead, which can only overstate. With --device cuda the peak is
torch.cuda.max_memory_allocated() minus torch.cuda.memory_allocated() before the batch
(tensors only, not the caching allocator's reserve), and the timed calls end with
torch.cuda.synchronize().

Each CPU subprocess limits its address space (RLIMIT_AS, --memory-limit-gib) so that a cell
too large for the machine fails with an allocation error, reported as "out of memory", rather
than waking the kernel's OOM killer.

--malloc-reuse runs every cell with glibc's malloc told never to use mmap and never to give
memory back (MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_=64 GiB in the subprocess's
environment). By default glibc serves every allocation above 32 MiB (at most; its mmap
threshold) with a fresh mmap and unmaps it on free, so each large tensor is page-faulted and
zeroed by the kernel again on every call; with the option, freed memory is reused. It changes
nothing in vimarl, only the C allocator under torch; without it the numbers are what a plain
`python` process gets.

    python benchmarks/vpp_scaling.py [--threads T] [--quick] [--device cpu|cuda] [--malloc-reuse]
                                     [--variants ...] [--agents ...] [--memory-limit-gib G]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

import vimarl
from common import format_bytes, print_machine, print_table, time_ms
from vimarl.train import fill_replay

AGENTS = (30, 200, 1225)
GRAPH_K = 8
BATCH = 256
FILL_ENVS, FILL_STEPS = 2, 4
VARIANTS = {
    "vpp mean_field": ("vpp", {}),
    "vpp loopy_bp": ("vpp", {"inference": "loopy_bp"}),
    "ip": ("ip", {}),
}
TARGET_RATIO = 2.0
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30)}


def parse_args() -> argparse.Namespace:
    """benchmarks/common.py's --threads and --quick, plus this script's own options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="few repeats: checks that it runs, "
                        "timings are rough")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        metavar="VARIANT", help=f"subset of {list(VARIANTS)}")
    parser.add_argument("--agents", nargs="+", type=int, default=list(AGENTS), help="values of N")
    parser.add_argument("--memory-limit-gib", type=float, default=16.0,
                        help="address-space limit of each CPU subprocess (default 16)")
    parser.add_argument("--malloc-reuse", action="store_true",
                        help="run the cells with MALLOC_MMAP_MAX_=0 and no trimming (see the docstring)")
    parser.add_argument("--cell", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


# --- memory ---------------------------------------------------------------------------------

def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory above a baseline: resident set on the CPU, allocated tensors on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.method = "cuda max_memory_allocated" if self.cuda else "VmHWM after clear_refs"
        self.baseline = self.current()

    def current(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        rss = _status_kib("VmRSS")
        return 1024 * rss if rss is not None else 0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
        except OSError:
            self.method = "ru_maxrss (lifetime peak)"

    def peak(self) -> int:
        """Bytes above the baseline at the highest point since the last reset."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        hwm = _status_kib("VmHWM") if self.method.startswith("VmHWM") else None
        if hwm is None:  # ru_maxrss is in KiB on Linux
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return 1024 * hwm - self.baseline


# --- one cell, in its own process -----------------------------------------------------------

def run_cell(variant: str, n: int, device: torch.device, quick: bool) -> dict:
    # (warm-up, repeats) for forward and update
    fwd_reps, upd_reps = ((0, 1), (0, 1)) if quick else ((2, 5), (1, 3))
    torch.manual_seed(0)
    algo_name, overrides = VARIANTS[variant]
    env = vimarl.make_env("coop_nav", FILL_ENVS, seed=0, device=device, n_agents=n, graph_k=GRAPH_K)
    algo = vimarl.make_algo(algo_name, env, device=device, **overrides)
    codec, buffer = fill_replay(env, algo, FILL_STEPS)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    memory = PeakMemory(device)
    memory.reset()
    rows = buffer.sample(BATCH)
    batch_bytes = sum(t.numel() * t.element_size() for t in rows.values())
    batch = codec.decode(rows)

    def forward() -> None:
        algo.act(batch.obs, batch.graph, explore=True, action_mask=batch.action_mask)
        sync()

    def update() -> None:
        algo.update(batch)
        sync()

    forward()
    forward_peak = memory.peak()
    memory.reset()
    update()
    update_peak = memory.peak()

    forward_ms = time_ms(forward, *fwd_reps)
    update_ms = time_ms(update, *upd_reps)
    return {"forward_ms": forward_ms, "update_ms": update_ms, "forward_peak": forward_peak,
            "update_peak": update_peak, "batch_bytes": batch_bytes, "memory_method": memory.method}


def cell_main(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if device.type == "cpu" and args.memory_limit_gib > 0:
        limit = int(args.memory_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    variant, n = args.cell[0], int(args.cell[1])
    try:
        result = run_cell(variant, n, device, args.quick)
    except (MemoryError, RuntimeError) as error:
        message = str(error)
        if not isinstance(error, MemoryError) and "memory" not in message.lower():
            raise
        result = {"error": "out of memory"}
    print(json.dumps(result))


# --- driver ---------------------------------------------------------------------------------

def run_in_subprocess(args: argparse.Namespace, variant: str, n: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--cell", variant, str(n),
               "--threads", str(args.threads), "--device", args.device,
               "--memory-limit-gib", str(args.memory_limit_gib)] + (["--quick"] if args.quick else [])
    env = dict(os.environ)
    if args.malloc_reuse:
        env.update(MALLOC_ENV)
    start = time.perf_counter()
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    print(f"  {variant}, N = {n}: {wall:.0f} s", file=sys.stderr, flush=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return {"error": f"failed ({last[:80]})"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.cell:
        cell_main(args)
        return
    device = args.device
    if device.startswith("cuda"):
        device += f" ({torch.cuda.get_device_name(torch.device(device))})"
    print_machine(device)
    if args.malloc_reuse:
        print("malloc: " + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()) + "\n")
    results = {(v, n): run_in_subprocess(args, v, n) for v in args.variants for n in args.agents}

    rows, methods = [], set()
    for (variant, n), r in results.items():
        samples = BATCH * n
        if "error" in r:
            rows.append([variant, n, f"{samples:,}", r["error"], "", "", "", "", "", ""])
            continue
        methods.add(r["memory_method"])
        rows.append([variant, n, f"{samples:,}",
                     f"{r['forward_ms']:,.1f}", f"{1e3 * r['forward_ms'] / samples:.2f}",
                     f"{r['update_ms']:,.0f}", f"{1e3 * r['update_ms'] / samples:.1f}",
                     format_bytes(r["batch_bytes"]), format_bytes(r["forward_peak"]),
                     format_bytes(r["update_peak"])])
    print(f"coop_nav, k = {GRAPH_K}, batch {BATCH}: ms per call and us per agent-sample "
          f"(agent-samples = {BATCH} x N); peak memory above the pre-batch baseline "
          f"({', '.join(sorted(methods)) or '-'})\n")
    print_table(["variant", "N", "agent-samples", "forward ms", "forward us/agent", "update ms",
                 "update us/agent", "batch", "peak forward", "peak update"], rows)

    low, high = min(args.agents), max(args.agents)
    ratio_rows = []
    for variant in args.variants:
        a, b = results[(variant, low)], results[(variant, high)]
        if "error" in a or "error" in b or low == high:
            ratio_rows.append([variant, "-", "-", "-"])
            continue
        f_ratio = (b["forward_ms"] / high) / (a["forward_ms"] / low)
        u_ratio = (b["update_ms"] / high) / (a["update_ms"] / low)
        met = "yes" if max(f_ratio, u_ratio) <= TARGET_RATIO else "no"
        ratio_rows.append([variant, f"{f_ratio:.2f}x", f"{u_ratio:.2f}x", met])
    print(f"Cost per agent-sample at N = {high} relative to N = {low} "
          f"(target: at most {TARGET_RATIO:g}x)\n")
    print_table(["variant", "forward", "update", f"within {TARGET_RATIO:g}x"], ratio_rows)


if __name__ == "__main__":
    main()
