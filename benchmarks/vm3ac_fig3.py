"""VM3-AC vs MA-AC vs MADDPG, paper 002 Fig. 3 and Table 3, with the beta / latent ablations, at a
reduced budget: runs, summary tables, plots.

Tasks of Fig. 3 (c)-(h): predator-prey (N, M, C) = (2, 16, 1), (3, 16, 1), (4, 16, 2)
(`pp_capture_n2/3/4`), cooperative treasure collection N = 4, 5 (`treasure_n4/5`) and
cooperative navigation N = 3 (`spread_vm3ac`); multi-walker (a)-(b) is left out (500-step
episodes, far beyond this budget). VM3-AC takes beta and dim(z) from 002 Table 2 (the
configs/presets/vm3ac-<task>.yaml files); everything else is Table 1 (lr 3e-4, batch 128,
2 x 128 ReLU, tau 0.005) for all three algorithms.

Budget: --steps env steps per run (default 20,000: 200 episodes of T = 100, 400 of T = 50), 8
parallel environments, one gradient step of batch 128 every 4 env steps (25 every 100; the
paper's Spinning Up code takes one per env step) after 2,000 warm-up steps; the paper trains
for several hundred thousand to millions of steps (Fig. 3's x-axes). Every run is evaluated
every --steps/8 env steps on 20 episodes with the deterministic policy (the mean action); VM3-AC
is evaluated with z = E[z] = 0 (the reported return) and with shared-seed z (Table 3's two rows).

Ablations on pp_capture_n2 (Sec. 6's "effect of beta" and the latent ablation): VM3-AC with
beta = 0, 0.05, 0.1 (0.15, Table 2's value, is the Fig. 3 run) and VM3-AC with dim(z) = 0.

The compared number is Fig. 3's y-axis, the average of all agents' returns (the logged team
return divided by N), at the last evaluation, mean +- std over seeds. Every cell is a
`vimarl train` run in OUT/<task>/<label>-s<seed>; finished cells are skipped, so an interrupted
sweep resumes.

    python benchmarks/vm3ac_fig3.py [--out runs/vm3ac_fig3] [--seeds 0 1 2] [--steps 20000] [--workers 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import final_values, plot, print_table, run_cells

import vimarl
from vimarl.algos.base import UniformPolicy
from vimarl.train import EVAL_SEED_OFFSET, evaluate

# task -> (number of agents N, the metric columns that sum to the team return)
TASKS = {"pp_capture_n2": (2, ["eval_return_mean"]), "pp_capture_n3": (3, ["eval_return_mean"]),
         "pp_capture_n4": (4, ["eval_return_mean"]),
         "treasure_n4": (4, ["eval_return/collectors", "eval_return/deposits"]),
         "treasure_n5": (5, ["eval_return/collectors", "eval_return/deposits"]),
         "spread_vm3ac": (3, ["eval_return_mean"])}
ALGORITHMS = {"vm3ac": ("vm3ac",), "ma_ac": ("ma_ac",), "maddpg": ("maddpg",)}  # label -> train arguments
ABLATION_TASK = "pp_capture_n2"
ABLATIONS = {"vm3ac_beta0": ("vm3ac", "algo.beta=0"), "vm3ac_beta0.05": ("vm3ac", "algo.beta=0.05"),
             "vm3ac_beta0.1": ("vm3ac", "algo.beta=0.1"), "vm3ac_no_latent": ("vm3ac", "algo.latent_dim=0")}
Z_MODES = {"z = E[z] = 0": "eval_return_mean/z_mean", "z shared seed": "eval_return_mean/z_shared_seed"}


def train_args(task: str, label_args: tuple[str, ...], seed: int, steps: int, out: Path) -> list[str]:
    algo, *overrides = label_args
    return [algo, task, *overrides, f"seed={seed}", f"out={out}", f"total_steps={steps}", "num_envs=8",
            "warmup_steps=2000", "update_every=100", "gradient_steps=25", "batch_size=128",
            "buffer_size=500000", f"eval_every={steps // 8}", "eval_episodes=20", "progress=false",
            "tensorboard=false"]


def uniform_random_return(task: str, episodes: int = 20) -> float:
    """Team return of uniformly random actions on the evaluation episodes of seed 0's runs."""
    env = vimarl.make_env(task, episodes, seed=EVAL_SEED_OFFSET)
    return sum(float(r.mean()) for r in evaluate(UniformPolicy(env.groups), env, seed=EVAL_SEED_OFFSET).values())


def per_agent(summary: tuple[float, float, list[float]], n_agents: int) -> str:
    mean, std, _ = summary
    return f"{mean / n_agents:.1f} +- {std / n_agents:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/vm3ac_fig3")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--no-ablations", dest="ablations", action="store_false")
    options = parser.parse_args()
    out = Path(options.out)

    def directory(task: str, label: str, seed: int) -> Path:
        return out / task / f"{label}-s{seed}"

    cells = [(task, label, args) for task in options.tasks for label, args in ALGORITHMS.items()]
    if options.ablations:
        cells += [(ABLATION_TASK, label, args) for label, args in ABLATIONS.items()]
    run_cells([(train_args(task, args, seed, options.steps, directory(task, label, seed)),
                directory(task, label, seed), options.steps)
               for task, label, args in cells for seed in options.seeds], options.workers)

    def runs(task: str, label: str) -> list[Path]:
        return [directory(task, label, seed) for seed in options.seeds]

    print(f"\nFig. 3: average agent return (team return / N), deterministic policy, 20 episodes, after "
          f"{options.steps} env steps; mean +- std over seeds {options.seeds}\n")
    rows = []
    for task, (n, team) in TASKS.items():
        if task not in options.tasks:
            continue
        finals = {label: final_values(runs(task, label), team) for label in ALGORITHMS}
        best_baseline = max(finals[label][0] for label in ("ma_ac", "maddpg"))
        rows.append([task, *(per_agent(finals[label], n) for label in ALGORITHMS),
                     f"{uniform_random_return(task) / n:.1f}", "yes" if finals["vm3ac"][0] > best_baseline else "no"])
        plot([run for label in ALGORITHMS for run in runs(task, label)], out / f"{task}.png", team[0],
             f"002 Fig. 3, {task}: {team[0]}, {len(options.seeds)} seeds")
    print_table(["task", *ALGORITHMS, "uniform random", "vm3ac above both"], rows)

    # Table 3 reports the predator-prey tasks, whose one group's return is the team return.
    print("Table 3: VM3-AC executed with z = 0 vs shared-seed z (average agent return)\n")
    print_table(["task", *Z_MODES], [[task, *(per_agent(final_values(runs(task, "vm3ac"), column), n)
                                               for column in Z_MODES.values())]
                                     for task, (n, _) in TASKS.items()
                                     if task in options.tasks and task.startswith("pp_capture")])
    if options.ablations:
        n = TASKS[ABLATION_TASK][0]
        print(f"Ablations on {ABLATION_TASK} (average agent return)\n")
        labels = ["vm3ac", *ABLATIONS]
        print_table(["variant", "final return"],
                    [[label, per_agent(final_values(runs(ABLATION_TASK, label), "eval_return_mean"), n)]
                     for label in labels])
        plot([run for label in labels for run in runs(ABLATION_TASK, label)], out / "ablations.png",
             "eval_return_mean", f"002 ablations on {ABLATION_TASK}: team return, {len(options.seeds)} seeds")


if __name__ == "__main__":
    main()
