"""Environment metrics at evaluation: `evaluate(..., metrics=)` keeps the [B] float tensors of the
info of each sub-environment's final step, and the trainer logs their means as eval_<name>."""

from __future__ import annotations

import torch

import vimarl
from vimarl.algos.base import UniformPolicy
from vimarl.envs.registry import make_env
from vimarl.envs.traffic import FixedTimePolicy
from vimarl.logging import read_metrics
from vimarl.train import evaluate

torch.set_num_threads(1)


def test_evaluate_collects_final_step_metrics_per_sub_env():
    env = make_env("traffic_grid_2x2", num_envs=3, episode_length=20, demand_vph=600)
    metrics = {}
    evaluate(FixedTimePolicy(env.groups), env, seed=0, metrics=metrics)
    assert set(metrics) == {"average_travel_time", "vehicles_generated", "vehicles_exited", "vehicles_in_network"}
    for key, value in metrics.items():
        assert value.shape == (3,) and torch.equal(value, env.last_metrics[key])
    assert torch.all(metrics["average_travel_time"] > 27)  # at least one 300 m road at 11.1 m/s
    # Without the argument nothing changes; an env without info metrics gives an empty dict.
    other = {}
    grid = make_env("grid_coordination", num_envs=2)
    evaluate(UniformPolicy(grid.groups), grid, seed=0, metrics=other)
    assert other == {}


def test_trainer_logs_eval_metrics(tmp_path):
    out = vimarl.train("vpp", "traffic_grid_1x1", out=str(tmp_path / "run"), seed=0, total_steps=40,
                       eval_every=20, warmup_steps=20, batch_size=8, eval_episodes=2, num_envs=2,
                       progress=False, tensorboard=False, env_config={"episode_length": 10})
    rows = read_metrics(out / "metrics.csv")
    assert [r["env_steps"] for r in rows] == [0, 20, 40]
    for row in rows:
        assert row["eval_average_travel_time"] > 27
        assert row["eval_vehicles_generated"] == row["eval_vehicles_exited"] + row["eval_vehicles_in_network"]
