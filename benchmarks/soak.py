"""Soak test (not a test): train for a long time and watch the trainer's memory.

Starts `vimarl train ALGO ENV` in a subprocess with a budget it will not reach, samples the
process's resident set size (VmRSS in /proc/PID/status, Linux) every `--interval` seconds,
stops it with SIGTERM after `--minutes` (the trainer checkpoints and exits) and prints a table
with the growth against the first sample after `--warmup-minutes`. Goal (issue 21): flat within
5% after warm-up.

    python benchmarks/soak.py                                  # VPP on coop_nav_n15, one hour
    python benchmarks/soak.py --minutes 10 --interval 30       # a short look

The replay buffer is 20,000 transitions by default (`buffer_size=` to change), so that it is full
within the warm-up: its pages are touched as it fills, which is growth by design, not a leak.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VIMARL = Path(sys.executable).parent / "vimarl"


def rss_mb(pid: int) -> float | None:
    """The process's resident set size in MB, or None once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algo", default="vpp")
    parser.add_argument("--env", default="coop_nav_n15")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between samples")
    parser.add_argument("--warmup-minutes", type=float, default=5.0, help="growth is measured from here")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for vimarl train")
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        raise SystemExit("the soak reads /proc/PID/status: Linux only")

    out = Path(tempfile.mkdtemp(prefix="vimarl-soak-")) / "run"
    command = [str(VIMARL), "train", args.algo, args.env, f"out={out}", "total_steps=1000000000",
               "eval_every=5000", "buffer_size=20000", "progress=false", "tensorboard=false", *args.overrides]
    print("$", " ".join(command), flush=True)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started, samples = time.monotonic(), []
    try:
        while (elapsed := time.monotonic() - started) < args.minutes * 60 and process.poll() is None:
            rss = rss_mb(process.pid)
            if rss:  # None once gone, 0 before the interpreter has mapped anything
                samples.append((elapsed / 60, rss))
                print(f"{elapsed / 60:7.1f} min  {rss:9.1f} MB", flush=True)
            time.sleep(args.interval)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=300)
    if process.returncode not in (0, 130):
        raise SystemExit(f"vimarl train failed ({process.returncode}): {stderr.strip().splitlines()[-1:]}")

    after = [(minute, rss) for minute, rss in samples if minute >= args.warmup_minutes]
    print("\n| minute | RSS (MB) | growth since warm-up |\n|---|---|---|")
    for minute, rss in samples:
        growth = f"{100 * (rss / after[0][1] - 1):+.1f}%" if after and minute >= after[0][0] else "(warm-up)"
        print(f"| {minute:.1f} | {rss:.1f} | {growth} |")
    if len(after) >= 2:
        first, last = after[0][1], after[-1][1]
        print(f"\n{args.algo} on {args.env}: RSS {first:.0f} MB at {after[0][0]:.1f} min, {last:.0f} MB at "
              f"{after[-1][0]:.1f} min: {100 * (last / first - 1):+.1f}% after warm-up "
              f"(goal: within 5%); peak {max(r for _, r in samples):.0f} MB")


if __name__ == "__main__":
    main()
