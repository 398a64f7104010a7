"""Helpers shared by the benchmark scripts: command line, machine line, timing, tables, and the
paper-figure sweeps (`vimarl sweep`, vimarl/configs/experiments/)."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from vimarl.sweep import cpu_name


def parse_args(description: str) -> argparse.Namespace:
    """--threads (torch intra-op threads, default 1) and --quick (few repeats, for a smoke run)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="few repeats: checks that it runs, "
                        "timings are rough")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def print_machine(device: str = "cpu") -> None:
    print(f"machine: {cpu_name()} ({platform.machine()}), {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), device {device}\n")


def time_ms(fn: Callable[[], object], warmup: int, repeats: int, min_sample_s: float = 0.005) -> float:
    """Median over `repeats` samples of the time of one call to `fn`, in milliseconds.

    After `warmup` untimed calls, each sample times as many back-to-back calls as fill
    `min_sample_s` (at least one) and divides, so sub-millisecond calls are not dominated by
    the clock's resolution and the call overhead of the timer itself.
    """
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    fn()
    calls = max(1, int(min_sample_s / max(time.perf_counter() - start, 1e-9)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return 1e3 * statistics.median(samples)


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A markdown table (cells already formatted, or anything str() renders)."""
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    print()


def format_bytes(n_bytes: float) -> str:
    """1.5 KiB, 45.8 MiB, 1.2 GiB."""
    for unit in ("B", "KiB", "MiB"):
        if n_bytes < 1024:
            return f"{n_bytes:,.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:,.1f} GiB"


# -- experiment suites ----------------------------------------------------------------------
def run_experiment(name: str, argv: Sequence[str]) -> int:
    """`vimarl sweep NAME --resume *argv` (finished cells are skipped), then print its summary table.

    The figure scripts are thin wrappers around this: their cells, budgets and compared metrics
    live in vimarl/configs/experiments/NAME.yaml (docs/experiments.md)."""
    from vimarl.cli import main

    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--out", default=f"runs/sweeps/{name}-cpu")
    out = options.parse_known_args(list(argv))[0].out
    argv = [*argv, "--out", out] if "--out" not in argv else list(argv)
    status = main(["sweep", name, "--resume", *argv])
    summary = Path(out) / "summary.md"
    if summary.exists():
        print(summary.read_text())
    return status
