"""BenchMARL side of benchmarks/benchmarl_compare.py; runs inside .venv-benchmarl, not vimarl's venv.

    .venv-benchmarl/bin/python benchmarks/_benchmarl_runner.py SETTINGS_JSON

SETTINGS_JSON (written by benchmarl_compare.benchmarl_settings) holds the ExperimentConfig,
MasacConfig and task fields to override, the hidden layer sizes, the seed and the torch thread
count. The runner builds one MASAC Experiment on PettingZoo simple_spread, times
`Experiment.run()` (collection plus training; evaluation, loggers, JSON output and checkpoints are
switched off in the settings) and, within it, the gradient steps (`_optimizer_loop`), then
evaluates the trained policy outside the timed part and prints one line `RESULT {json}` after
whatever BenchMARL itself printed.

Only the standard library, torch, torchrl and benchmarl are imported: vimarl is not installed here.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def evaluate(experiment, episodes: int) -> float:
    """Mean over `episodes` deterministic episodes of the team return (sum over agents and steps),
    the quantity vimarl's evaluation reports."""
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    returns = []
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        for _ in range(episodes):
            rollout = experiment.test_env.rollout(max_steps=experiment.max_steps, policy=experiment.policy,
                                                  auto_cast_to_device=True, break_when_any_done=True)
            returns.append(sum(rollout.get(("next", group, "reward")).sum().item()
                               for group in experiment.group_map))
    return sum(returns) / len(returns)


def override(config, values: dict) -> None:
    """Set existing fields of a BenchMARL config dataclass (a typo raises instead of being ignored)."""
    for key, value in values.items():
        if not hasattr(config, key):
            raise AttributeError(f"{type(config).__name__} has no field {key!r}")
        setattr(config, key, value)


def main(settings: dict) -> dict:
    torch.set_num_threads(settings["threads"])
    from benchmarl.algorithms import MasacConfig
    from benchmarl.environments import PettingZooTask
    from benchmarl.experiment import Experiment, ExperimentConfig
    from benchmarl.models.mlp import MlpConfig

    config = ExperimentConfig.get_from_yaml()
    override(config, settings["experiment"])
    algorithm = MasacConfig.get_from_yaml()
    override(algorithm, settings["algorithm"])
    task = PettingZooTask.SIMPLE_SPREAD.get_from_yaml()
    task.config.update(settings["task"])
    # vimarl's MASAC networks: two hidden layers of `hidden` ReLU units (BenchMARL's default is Tanh).
    mlp = MlpConfig(num_cells=settings["hidden"], layer_class=torch.nn.Linear, activation_class=torch.nn.ReLU)
    experiment = Experiment(task=task, algorithm_config=algorithm, model_config=mlp, critic_model_config=mlp,
                            seed=settings["seed"], config=config)

    # run() closes the environments when it ends; keep them open for the evaluation after timing.
    close = experiment.close
    experiment.close = lambda: None
    # One call of _optimizer_loop is one gradient step (sample, losses, backward, optimizers, targets).
    update_s, optimizer_loop = 0.0, experiment._optimizer_loop

    def timed_optimizer_loop(group):
        nonlocal update_s
        start = time.perf_counter()
        try:
            return optimizer_loop(group)
        finally:
            update_s += time.perf_counter() - start
    experiment._optimizer_loop = timed_optimizer_loop

    start = time.perf_counter()
    experiment.run()
    wall_s = time.perf_counter() - start
    eval_return = evaluate(experiment, settings["eval_episodes"])
    close()

    iterations = experiment.n_iters_performed
    return {
        "frames": experiment.total_frames,
        "gradient_steps": iterations * config.off_policy_n_optimizer_steps,
        "wall_s": wall_s,
        "update_s": update_s,
        "eval_return": eval_return,
        "versions": {name: __import__(name).__version__ for name in (
            "benchmarl", "torchrl", "tensordict", "pettingzoo", "torch")},
    }


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(result), flush=True)
