"""Reference returns in a run's summary.json: uniform random actions and every scripted controller
that drives the env, on the final evaluation's episodes; `vimarl summary` prints them."""

from __future__ import annotations

import json

import pytest
import torch

import vimarl
from vimarl.algos.base import UniformPolicy
from vimarl.cli import main
from vimarl.envs.controllers import scripted_policy
from vimarl.envs.registry import make_env
from vimarl.logging import read_metrics
from vimarl.train import FINAL_EVAL_SEED, eval_seed, evaluate

torch.set_num_threads(1)

QUICK = dict(seed=0, num_envs=2, eval_every=100, warmup_steps=100, batch_size=16, progress=False, tensorboard=False)


def summary_of(out) -> dict:
    return json.loads((out / "summary.json").read_text())


def mean_return(policy, env, seed: int, group: str = "agents") -> float:
    return evaluate(policy, env, seed)[group].double().mean().item()


def test_coop_nav_summary_states_uniform_and_oracle_on_the_final_episodes(tmp_path, capsys):
    # Local rewards: the references must come from the run's env config, not the default one.
    out = vimarl.train("vpp", "coop_nav_n3", out=str(tmp_path / "nav"), total_steps=200, eval_episodes=2,
                       final_eval_episodes=3, env_config={"reward": "local"}, **QUICK)
    summary = summary_of(out)
    env = make_env("coop_nav_n3", 3, FINAL_EVAL_SEED, reward="local")
    uniform = mean_return(UniformPolicy(env.groups, FINAL_EVAL_SEED), env, FINAL_EVAL_SEED)
    oracle = mean_return(scripted_policy("oracle", env), env, FINAL_EVAL_SEED)
    assert summary["reference_returns"] == pytest.approx({"uniform": uniform, "oracle": oracle}, rel=1e-9)
    run = summary["eval_return_mean"]
    assert summary["oracle_fraction"] == pytest.approx((run - uniform) / (oracle - uniform))
    # The env metrics come along; team_return is N times the local-reward return.
    assert summary["reference_metrics"]["oracle"]["team_return"] == pytest.approx(3 * oracle, rel=1e-5)
    final = read_metrics(out / "metrics.csv")[-1]
    assert final["final_eval"] == 1 and final["eval_team_return"] == pytest.approx(3 * run, rel=1e-5)
    assert {"eval_coverage_distance", "eval_collisions"} <= set(final)

    assert main(["summary", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and f"final return {run:.1f}" in line
    assert f"uniform random {uniform:.1f}" in line and f"oracle {oracle:.1f}" in line
    assert f"{100 * summary['oracle_fraction']:.0f}% of the way" in line


def test_traffic_summary_states_fixed_time_and_max_pressure(tmp_path):
    out = vimarl.train("vpp", "traffic_grid_1x1", out=str(tmp_path / "traffic"), total_steps=40, eval_every=20,
                       warmup_steps=20, batch_size=8, eval_episodes=2, final_eval_episodes=2, num_envs=2,
                       progress=False, tensorboard=False, env_config={"episode_length": 10})
    summary = summary_of(out)
    env = make_env("traffic_grid_1x1", 2, FINAL_EVAL_SEED, episode_length=10)
    expected = {"uniform": mean_return(UniformPolicy(env.groups, FINAL_EVAL_SEED), env, FINAL_EVAL_SEED)}
    expected.update({name: mean_return(scripted_policy(name, env), env, FINAL_EVAL_SEED)
                     for name in ("fixed_time", "max_pressure")})
    assert summary["reference_returns"] == pytest.approx(expected, rel=1e-9)
    assert "oracle_fraction" not in summary
    assert summary["reference_metrics"]["max_pressure"]["average_travel_time"] > 27


def test_an_env_without_scripted_policies_gets_uniform_only_and_the_switch_turns_it_off(tmp_path):
    # final_eval_episodes=0: the last periodic evaluation is the final one, so are its episodes.
    out = vimarl.train("vpp", "grid_coordination", out=str(tmp_path / "grid"), total_steps=200, eval_episodes=4,
                       final_eval_episodes=0, **QUICK)
    summary = summary_of(out)
    seed = eval_seed(200 // 100)
    env = make_env("grid_coordination", 4, seed)
    assert summary["reference_returns"] == pytest.approx(
        {"uniform": mean_return(UniformPolicy(env.groups, seed), env, seed)}, rel=1e-9)
    assert "oracle_fraction" not in summary and "reference_metrics" not in summary

    off = vimarl.train("vpp", "grid_coordination", out=str(tmp_path / "off"), total_steps=100, eval_episodes=2,
                       final_eval_episodes=2, reference_policies=False, **QUICK)
    summary = summary_of(off)
    assert "reference_returns" not in summary and "oracle_fraction" not in summary
    assert main(["summary", str(off)]) == 0  # still one line, with the run's return alone
