"""benchmarks/run_all.py and benchmarks/benchmarl_compare.py without timing anything: the command
line, the run plan, and that vimarl and BenchMARL get the same budget (no venv, no network)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import benchmarl_compare
import run_all

from vimarl.config import parse_overrides, resolve


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_all.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--quick", "--only", "--out", "--threads"):
        assert option in text
    assert "benchmarl" in text


def test_unknown_part_is_a_one_line_error(capsys, tmp_path):
    out = tmp_path / "latest.md"
    assert run_all.main(["--only", "vpp,nope", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    expected = ("run_all.py: unknown part 'nope'; choose from env, graph_ops, graph_builders, vpp_update, vpp, "
                "traffic, benchmarl")
    assert captured.err.strip().splitlines() == [expected]
    assert not out.exists()


def test_plan_passes_quick_threads_and_cuda_where_supported():
    runs = run_all.plan(list(run_all.PARTS), quick=True, threads=2, gpu=True)
    assert [(name, device) for name, device, _ in runs] == [
        ("env", "cpu"), ("graph_ops", "cpu"), ("graph_builders", "cpu"), ("vpp_update", "cpu"),
        ("vpp", "cpu"), ("vpp", "cuda"), ("traffic", "cpu"), ("benchmarl", "cpu"), ("benchmarl", "cuda")]
    for name, device, command in runs:
        assert command[1].endswith(run_all.PARTS[name].script)
        assert "--quick" in command and command[command.index("--threads") + 1] == "2"
        assert ("--device" in command) == (device == "cuda")
    assert [device for _, device, _ in run_all.plan(["benchmarl"], quick=False, threads=1, gpu=False)] == ["cpu"]


def test_both_libraries_get_the_same_budget():
    budget = benchmarl_compare.Budget(frames=6_000, num_envs=6, update_every=600, gradient_steps=12, batch_size=256,
                                      hidden=64)
    overrides = parse_overrides(benchmarl_compare.vimarl_overrides(budget, "unused"))
    vimarl_run = resolve("masac", "spread", overrides)  # also checks every key exists and validates
    settings = benchmarl_compare.benchmarl_settings(budget)
    experiment = settings["experiment"]

    train, algo, env = vimarl_run.train, vimarl_run.algo_config, vimarl_run.env_config
    assert train.total_steps == experiment["max_n_frames"] == 6_000
    assert train.num_envs == experiment["off_policy_n_envs_per_worker"] == 6
    assert train.update_every == experiment["off_policy_collected_frames_per_batch"] == 600
    assert train.gradient_steps == experiment["off_policy_n_optimizer_steps"] == 12
    assert train.batch_size == experiment["off_policy_train_batch_size"] == 256
    assert train.buffer_size == experiment["off_policy_memory_size"]
    assert train.warmup_steps == experiment["off_policy_init_random_frames"] == 0
    assert budget.total_gradient_steps == train.total_steps // train.update_every * train.gradient_steps == 120
    assert settings["hidden"] == [algo.hidden_dim, algo.hidden_dim] == [64, 64]
    assert (algo.lr, algo.gamma, algo.tau) == (experiment["lr"], experiment["gamma"], experiment["polyak_tau"])
    assert algo.alpha == settings["algorithm"]["alpha_init"] and settings["algorithm"]["fixed_alpha"]
    assert algo.parameter_sharing and experiment["share_policy_params"] and settings["algorithm"]["share_param_critic"]
    assert env.n_agents == settings["task"]["N"] == 3
    assert env.episode_length == settings["task"]["max_cycles"] == 25
    assert env.local_ratio == settings["task"]["local_ratio"]
    assert env.action_mode == "discrete" and not experiment["prefer_continuous_actions"]


def test_budget_rejects_frames_that_do_not_split_into_updates():
    with pytest.raises(ValueError, match="multiple"):
        benchmarl_compare.Budget(frames=1_500, update_every=1_000)
    with pytest.raises(ValueError, match="multiple"):
        benchmarl_compare.Budget(num_envs=7)
