"""MA-SAC vs MADDPG, paper 003 Fig. 2, at a reduced budget: runs, summary table, plots.

Tasks and teams as in 003 Sec. 5: cooperative navigation (`spread`, N = 3) and cooperative
communication (`speaker_listener`) with every agent trained by one algorithm; predator-prey
(`tag`, 3 predators and 1 prey) and physical deception (`adversary`) with the cooperating team
trained by MA-SAC or MADDPG and the opponent always by MADDPG (`team` algorithm), as in Fig. 2c/d.
alpha per task from 003 Sec. 5.2 (0.02, 0.005, 0.26, 0.01). The compared number is the
cooperating team's return (summed over its agents and 25 steps) of the deterministic policy
(most probable action), averaged over EVAL_EPISODES episodes after every 100 training episodes.

Budget: the paper trains 15,000 episodes with one gradient step of batch 1024 every 100 env
steps (3,750 gradient steps). Here: --episodes (default 800) episodes, batch 1024, one gradient
step every UPDATE_EVERY = 20 env steps (5x the paper's update rate, so 800 episodes give 1,000
gradient steps), 5 parallel environments; everything else is the algorithms' paper defaults.

Every (task, algorithm, seed) cell is a `vimarl train` run in OUT/<task>/<algo>-s<seed>; cells
whose metrics.csv is complete are skipped, so an interrupted sweep resumes. Cells run in a
pool of --workers processes.

    python benchmarks/masac_fig2.py [--out runs/masac_fig2] [--seeds 0 1 2] [--episodes 800] [--workers 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import final_values, plot, run_cells

EPISODE_LENGTH = 25
UPDATE_EVERY = 20
EVAL_EPISODES = 100
# task -> (env, cooperating group, alpha of 003 Sec. 5.2, opponent group or None)
TASKS = {
    "spread": ("spread", "agents", 0.02, None),
    "speaker_listener": ("speaker_listener", None, 0.005, None),
    "tag": ("tag", "predators", 0.26, "prey"),
    "adversary": ("adversary", "agents", 0.01, "adversary"),
}
ALGORITHMS = ("masac", "maddpg")


def train_args(task: str, algo: str, seed: int, episodes: int, out: Path) -> list[str]:
    env, cooperators, alpha, opponent = TASKS[task]
    common = [f"seed={seed}", f"out={out}", f"total_steps={episodes * EPISODE_LENGTH}", "num_envs=5",
              "warmup_steps=1024", f"update_every={UPDATE_EVERY}", "batch_size=1024", "buffer_size=1000000",
              f"eval_every={100 * EPISODE_LENGTH}", f"eval_episodes={EVAL_EPISODES}", "progress=false",
              "tensorboard=false"]
    if opponent is None:
        tuned = [f"algo.alpha={alpha}"] if algo == "masac" else []
        return [algo, env, *common, *tuned]
    members = f"algo.members={{{cooperators}: {algo}, {opponent}: maddpg}}"
    tuned = [f"algo.configs={{masac: {{alpha: {alpha}}}}}"] if algo == "masac" else []
    return ["team", env, *common, members, *tuned]


def metric(task: str) -> str:
    """The cooperating team's return column (single-team tasks log it as the main return)."""
    env, cooperators, _, opponent = TASKS[task]
    return "eval_return_mean" if opponent is None else f"eval_return/{cooperators}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/masac_fig2")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=800)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    options = parser.parse_args()
    out = Path(options.out)
    total_steps = options.episodes * EPISODE_LENGTH
    run_cells([(train_args(task, algo, seed, options.episodes, out / task / f"{algo}-s{seed}"),
                out / task / f"{algo}-s{seed}", total_steps)
               for task in options.tasks for algo in ALGORITHMS for seed in options.seeds], options.workers)

    print(f"\nCooperating team's deterministic return after {options.episodes} episodes "
          f"(mean +- std over seeds {options.seeds}; {EVAL_EPISODES} evaluation episodes each)\n")
    print("| task | masac | maddpg | masac at least on par |\n|---|---|---|---|")
    for task in options.tasks:
        runs = {algo: [out / task / f"{algo}-s{seed}" for seed in options.seeds] for algo in ALGORITHMS}
        (m_mean, m_std, _), (d_mean, d_std, _) = (final_values(runs[algo], metric(task)) for algo in ALGORITHMS)
        on_par = "yes" if m_mean >= d_mean - d_std else "no"
        print(f"| {task} | {m_mean:.1f} +- {m_std:.1f} | {d_mean:.1f} +- {d_std:.1f} | {on_par} |")
        plot([run for algo in ALGORITHMS for run in runs[algo]], out / f"{task}.png", metric(task),
             f"003 Fig. 2, {task}: cooperators' return, {len(options.seeds)} seeds")


if __name__ == "__main__":
    main()
