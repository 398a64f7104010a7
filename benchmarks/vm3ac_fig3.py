"""VM3-AC vs MA-AC vs MADDPG, paper 002 Fig. 3 and Table 3, with the beta / latent ablations, at a
reduced budget: a thin wrapper around `vimarl sweep vm3ac_fig3` (docs/experiments.md).

The cells, budgets and compared metric live in vimarl/configs/experiments/vm3ac_fig3.yaml
(Table 3's two execution modes: vm3ac_table3.yaml, or the columns eval_return_mean/z_mean and
eval_return_mean/z_shared_seed of the same VM3-AC runs). CPU scale: 20,000 env steps per run, 8
parallel environments, 25 gradient steps of batch 128 every 100 env steps after 2,000 warm-up
steps, 20 deterministic evaluation episodes every 2,500 env steps. The compared number is Fig. 3's
y-axis, the average agent return (team return / N) at the last evaluation; ablations (beta = 0,
0.05, 0.1, no latent) on pp_capture_n2 only.

Every cell is a `vimarl train` run in OUT/<task>/<label>-s<seed>; finished cells are skipped, so
an interrupted sweep resumes. Arguments go to `vimarl sweep`:

    python benchmarks/vm3ac_fig3.py [--out runs/sweeps/vm3ac_fig3-cpu] [--seeds 0 1 2] [--workers 2] [--only 'pp_capture_n2/*']
"""

import sys

from common import run_experiment

if __name__ == "__main__":
    sys.exit(run_experiment("vm3ac_fig3", sys.argv[1:]))
