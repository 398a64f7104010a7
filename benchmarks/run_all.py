"""Run the performance suite in sequence, print every table and write them to one markdown file.

Parts (each a script of benchmarks/, run as a subprocess so that one part's memory and threads do
not affect the next):

    env             env_throughput.py      environment throughput against mpe2 and VMAS
    graph_ops       graph_ops.py           neighbour aggregation and attention layers
    graph_builders  graph_builders.py      knn / radius / random graph builders
    vpp_update      vpp_update.py          VPP update, act and environment stepping
    vpp             vpp_scaling.py         VPP / IP forward and update cost against the number of agents
    traffic         traffic_speed.py       batched traffic model against SUMO
    benchmarl       benchmarl_compare.py   MASAC training throughput against BenchMARL

With a CUDA device, the parts whose script takes --device (vpp, benchmarl) run a second time on
`cuda`; the others are CPU-only scripts. The full suite takes the better part of an hour on a small
machine; --quick passes each script's --quick (small cases, short timings).

    python benchmarks/run_all.py [--quick] [--only benchmarl,vpp] [--out docs/benchmarks_latest.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass(frozen=True)
class Part:
    title: str
    script: str
    cuda: bool
    """Whether the script takes --device (then it also runs on cuda when a GPU is present)."""


PARTS = {
    "env": Part("Environment throughput", "env_throughput.py", cuda=False),
    "graph_ops": Part("Neighbour aggregation and attention", "graph_ops.py", cuda=False),
    "graph_builders": Part("Graph builders", "graph_builders.py", cuda=False),
    "vpp_update": Part("VPP update, act and environment stepping", "vpp_update.py", cuda=False),
    "vpp": Part("VPP scaling", "vpp_scaling.py", cuda=True),
    "traffic": Part("Traffic", "traffic_speed.py", cuda=False),
    "benchmarl": Part("Training throughput vs BenchMARL", "benchmarl_compare.py", cuda=True),
}


def plan(names: list[str], quick: bool, threads: int, gpu: bool) -> list[tuple[str, str, list[str]]]:
    """(part, device, command) for every run, in the order of `names`, each part on cpu then on cuda."""
    runs = []
    for name in names:
        part = PARTS[name]
        command = [sys.executable, str(HERE / part.script), "--threads", str(threads), *(["--quick"] if quick else [])]
        runs.append((name, "cpu", command))
        if gpu and part.cuda:
            runs.append((name, "cuda", [*command, "--device", "cuda"]))
    return runs


def run(command: list[str]) -> tuple[int, str, float]:
    """Run `command`, echoing its stdout line by line (stderr goes straight to the terminal);
    return (exit status, stdout, seconds)."""
    start = time.perf_counter()
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, bufsize=1) as process:
        lines = []
        for line in process.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    return process.returncode, "".join(lines), time.perf_counter() - start


def shown(command: list[str]) -> str:
    """The command as a reader would type it (python for the interpreter, paths from the root)."""
    return shlex.join(["python", *(os.path.relpath(arg, ROOT) if os.path.isabs(arg) else arg for arg in command[1:])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script (smoke run)")
    parser.add_argument("--only", metavar="NAME[,NAME]", help=f"run only these parts: {', '.join(PARTS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every script (default 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks_latest.md",
                        help="markdown file for the combined output (default docs/benchmarks_latest.md)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(PARTS)
    unknown = [name for name in names if name not in PARTS]
    if unknown:
        print(f"run_all.py: unknown part {unknown[0]!r}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2

    import torch

    from vimarl.sweep import cpu_name

    gpu = torch.cuda.is_available()
    gpu_line = f"GPU: {torch.cuda.get_device_name(0)}" if gpu else "no GPU on this machine"
    header = [
        "# Benchmarks: latest run of benchmarks/run_all.py",
        "",
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- command: `{shlex.join(['python', 'benchmarks/run_all.py', *(sys.argv[1:] if argv is None else argv)])}`",
        f"- machine: {cpu_name()} ({platform.machine()}), {os.cpu_count()} CPUs; {gpu_line}",
        f"- torch {torch.__version__}, {args.threads} torch thread(s) per script, Python {platform.python_version()}",
        "",
    ]
    print("\n".join(header), flush=True)

    sections, status, failed = [], {}, False
    for name, device, command in plan(names, args.quick, args.threads, gpu):
        part = PARTS[name]
        print(f"## {part.title} ({device})\n\n$ {shown(command)}\n", flush=True)
        code, output, seconds = run(command)
        failed |= code != 0
        status[name, device] = f"{seconds:,.0f} s" if code == 0 else f"failed (exit {code})"
        # The scripts print a machine line and markdown tables, so their output goes in as it is.
        sections += [f"## {part.title} ({device})", "", f"`{shown(command)}` ({status[name, device]})", "",
                     output.rstrip(), ""]

    summary = ["| part | script | cpu | cuda |", "|---|---|---|---|"]
    for name in names:
        cuda = (status.get((name, "cuda"), "-") if gpu and PARTS[name].cuda
                else "cpu-only script" if gpu else "no GPU on this machine")
        summary.append(f"| {name} | {PARTS[name].script} | {status[name, 'cpu']} | {cuda} |")
    print("\n".join(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join([*header, *summary, "", *sections]).rstrip() + "\n")
    print(f"\nwritten to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
