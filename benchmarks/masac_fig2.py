"""MA-SAC vs MADDPG, paper 003 Fig. 2, at a reduced budget: a thin wrapper around
`vimarl sweep masac_fig2` (docs/experiments.md).

The cells, budgets and compared metric live in vimarl/configs/experiments/masac_fig2.yaml:
cooperative navigation (`spread`, N = 3) and cooperative communication (`speaker_listener`) with
every agent trained by one algorithm; predator-prey (`tag`) and physical deception (`adversary`)
with the cooperating team trained by MA-SAC or MADDPG and the opponent always by MADDPG (`team`).
alpha per task from 003 Sec. 5.2. CPU scale: 800 episodes of 25 steps, batch 1024, one gradient
step every 20 env steps, 5 parallel environments, 100 evaluation episodes every 100 episodes.
The compared number is the cooperating team's deterministic return at the last evaluation.

Every (task, algorithm, seed) cell is a `vimarl train` run in OUT/<task>/<algo>-s<seed>; finished
cells are skipped, so an interrupted sweep resumes. Arguments go to `vimarl sweep`:

    python benchmarks/masac_fig2.py [--out runs/sweeps/masac_fig2-cpu] [--seeds 0 1 2] [--workers 2] [--scale paper]
"""

import sys

from common import run_experiment

if __name__ == "__main__":
    sys.exit(run_experiment("masac_fig2", sys.argv[1:]))
