"""MAAC / MAMD / MAMT with their baselines, paper 004 Fig. 4 and Fig. 1a / 10, at a reduced budget:
a thin wrapper around `vimarl sweep mamt_fig4` and `vimarl sweep mamt_fig10` (docs/experiments.md).

The cells, budgets, compared metrics and the diagnostics of Figs. 5-7 (per-agent KL, MAMT's
learned epsilon_i, D_ns and the coordination-coefficient matrix of seed 0) live in
vimarl/configs/experiments/mamt_fig4.yaml and mamt_fig10.yaml. CPU scale: 10,000 env steps per
run, 8 parallel environments, one gradient step of batch 128 every 2 env steps (every 8 on
rover-tower) after 1,000 warm-up steps, Polyak tau 0.01 for the MAAC family, 20 deterministic
evaluation episodes every 1,000 env steps. The compared number is the team return (the rovers'
on rover-tower) at the last evaluation.

Each figure's sweep goes to OUT/<experiment> (default runs/sweeps/<experiment>-cpu); finished
cells are skipped, so an interrupted sweep resumes. Other arguments go to `vimarl sweep`:

    python benchmarks/mamt_fig4_fig10.py [--figures 4 10] [--out runs/mamt] [--seeds 0 1 2] [--workers 2]
"""

import argparse
import sys

from common import run_experiment

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figures", nargs="+", default=["4", "10"], choices=["4", "10"])
    parser.add_argument("--out", default=None, help="parent folder of the figures' sweeps")
    options, rest = parser.parse_known_args()
    status = 0
    for figure in options.figures:
        name = f"mamt_fig{figure}"
        out = ["--out", f"{options.out}/{name}"] if options.out else []
        status = run_experiment(name, [*rest, *out]) or status
    sys.exit(status)
