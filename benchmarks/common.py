"""Helpers shared by the benchmark scripts: command line, machine line, timing, tables, and
sweeps of `vimarl train` runs (one directory per cell, finished cells skipped)."""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def parse_args(description: str) -> argparse.Namespace:
    """--threads (torch intra-op threads, default 1) and --quick (few repeats, for a smoke run)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="few repeats: checks that it runs, "
                        "timings are rough")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def cpu_name() -> str:
    """platform.processor(), or the model name from /proc/cpuinfo where that is empty (Linux)."""
    name = platform.processor()
    if not name or name == platform.machine():
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                name = next((line.split(":", 1)[1].strip() for line in cpuinfo
                             if line.startswith("model name")), name)
        except OSError:
            pass
    return name or platform.machine()


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


# -- sweeps of training runs -------------------------------------------------------------------
def metrics(run_dir: Path) -> list[dict[str, str]]:
    path = Path(run_dir) / "metrics.csv"
    return list(csv.DictReader(path.open())) if path.exists() else []


def finished(run_dir: Path, total_steps: int) -> bool:
    """The run's last evaluation row reached `total_steps` env steps."""
    rows = metrics(run_dir)
    return bool(rows) and int(rows[-1]["env_steps"]) >= total_steps


def vimarl_command(*args: str) -> list[str]:
    """The `vimarl` entry point of this interpreter's environment, with `args`."""
    return [str(Path(sys.executable).parent / "vimarl"), *args]


def run_cell(train_args: list[str], run_dir: Path, total_steps: int) -> float:
    """`vimarl train *train_args` unless the run in `run_dir` is finished; its wall seconds (0 when skipped)."""
    if finished(run_dir, total_steps):
        return 0.0
    started = time.perf_counter()
    result = subprocess.run(vimarl_command("train", *train_args), capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{run_dir}: {result.stderr.strip().splitlines()[-1]}")
    return time.perf_counter() - started


def run_cells(cells: Sequence[tuple[list[str], Path, int]], workers: int) -> None:
    """Run (train_args, run_dir, total_steps) cells in a pool of `workers` and print the wall time."""
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        walls = list(pool.map(lambda cell: run_cell(*cell), cells))
    print(f"{len(cells)} runs, {time.perf_counter() - started:.0f} s wall with {workers} workers, "
          f"{sum(walls):.0f} s summed over runs that trained now")


def final_values(run_dirs: Sequence[Path], column: str | Sequence[str]) -> tuple[float, float, list[float]]:
    """Mean, population std and values of `column` (or the sum of several) at the last evaluation of each run."""
    columns = [column] if isinstance(column, str) else list(column)
    values = [sum(float(metrics(run_dir)[-1][c]) for c in columns) for run_dir in run_dirs]
    return statistics.mean(values), statistics.pstdev(values), values


def plot(run_dirs: Sequence[Path], out: Path, column: str, title: str) -> None:
    subprocess.run(vimarl_command("plot", *map(str, run_dirs), "--out", str(out), "--metric", column,
                                  "--title", title), check=True, capture_output=True)


def plot_matrix(run_dir: Path, out: Path, prefix: str, title: str) -> None:
    """Heatmap of the PREFIX_<i>_<j> columns of one run at its last evaluation (`vimarl plot --matrix`)."""
    subprocess.run(vimarl_command("plot", str(run_dir), "--out", str(out), "--matrix", prefix, "--title", title),
                   check=True, capture_output=True)
