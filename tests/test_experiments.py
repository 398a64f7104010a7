"""Fair arms by construction (DESIGN §9.1) over every cell of every shipped experiment, and the
held-out evaluation stream (DESIGN §9.3)."""

from __future__ import annotations

import dataclasses
import importlib
import re

import pytest
import torch

import vimarl
from vimarl.algos import get_algorithm
from vimarl.config import find_preset, load_yaml, parse_overrides, resolve
from vimarl.fields import build
from vimarl.errors import VimarlError
from vimarl.logging import read_metrics
from vimarl.sweep import expand, experiment_names, fair_overrides, load_experiment, planned_updates, schedule_value
from vimarl.train import FINAL_EVAL_SEED, eval_seed

train_module = importlib.import_module("vimarl.train")  # vimarl.train the attribute is the function


def resolved_arms(name: str, scale: str):
    """(cell, run config, {algorithm name: its resolved config}) of one seed per arm and env."""
    seen = set()
    for cell in expand(load_experiment(name), scale):
        if (cell.env_label, cell.label) in seen:
            continue
        seen.add((cell.env_label, cell.label))
        run = cell.resolve()
        if cell.algo == "team":
            members = {name: build(get_algorithm(name).Config, run.algo_config.configs.get(name, {}), name)
                       for name in set(run.algo_config.members.values())}
        else:
            members = {cell.algo: run.algo_config}
        yield cell, run, members


CELLS = [(name, scale) for name in experiment_names() for scale in ("cpu", "paper")]


@pytest.mark.parametrize("name, scale", CELLS)
def test_every_arm_gets_the_shared_hyperparameters(name, scale):
    experiment = load_experiment(name)
    shared = {**(experiment.get("shared") or {}), **((experiment.get("scales") or {}).get(scale, {}).get("shared") or {})}
    for cell, run, members in resolved_arms(name, scale):
        if (experiment["algorithms"][cell.label] or {}).get("shared") is False:
            continue
        for algo, config in members.items():
            for field, value in shared.items():
                assert getattr(config, field) == pytest.approx(value), (
                    f"{name} ({scale}): {cell.label} on {cell.env_label} runs {algo} with {field}="
                    f"{getattr(config, field)}, the comparison shares {value}")


@pytest.mark.parametrize("name, scale", CELLS)
def test_schedules_fit_inside_every_run(name, scale):
    """Every epsilon-greedy learner reaches its final epsilon in the first half of its run, the
    warm-up ends in it too, and a mirror-descent run has at least 100 refresh windows."""
    for cell, run, members in resolved_arms(name, scale):
        train = run.train
        where = f"{name} ({scale}) {cell.label} on {cell.env_label}"
        assert train.warmup_steps <= train.total_steps / 2, where
        for config in members.values():
            if hasattr(config, "epsilon_decay_steps"):
                assert config.epsilon_decay_steps <= train.total_steps / 2, where
            if hasattr(config, "md_delay"):
                assert planned_updates(train) / config.md_delay >= 100, where


def test_the_papers_shared_tables_reach_every_arm():
    """002 Table 1 for MADDPG, MA-AC, VM3-AC, MAVEN and SI-MOA; 003 Sec. 5.2 for MA-SAC and MADDPG, team members
    (the opponents' MADDPG included) too; 004 Table 1's discount for the MAAC family and MA-PPO."""
    table1_002 = {"lr": 3e-4, "gamma": 0.99, "tau": 0.005, "hidden_dim": 128}
    sec52_003 = {"lr": 0.01, "gamma": 0.95, "tau": 0.01, "hidden_dim": 128}
    for experiment, table, algos in (("vm3ac_fig3", table1_002, {"vm3ac", "ma_ac", "maddpg", "maven", "si_moa"}),
                                     ("masac_fig2", sec52_003, {"masac", "maddpg"})):
        for scale in ("cpu", "paper"):
            seen = set()
            for _, _, members in resolved_arms(experiment, scale):
                for algo, config in members.items():
                    seen.add(algo)
                    assert {k: getattr(config, k) for k in table} == pytest.approx(table), (experiment, algo)
            assert seen == algos
    for cell, run, members in resolved_arms("mamt_fig4", "cpu"):
        if cell.algo not in ("maddpg", "lola"):  # both keep their own papers' values (004 gives none)
            assert run.algo_config.gamma == 0.99
            assert getattr(run.algo_config, "lr", None) in (None, 1e-3)
            assert getattr(run.algo_config, "pi_lr", 1e-3) == getattr(run.algo_config, "q_lr", 1e-3) == 1e-3


TUNED = {"lr", "pi_lr", "q_lr", "gamma", "tau", "hidden_dim", "alpha", "embed_dim", "state_dim"}


def test_no_arm_of_a_comparison_has_a_tuned_cpu_preset():
    """A preset that only one arm of a comparison takes may define the arm's method (MAMD-OP's
    hand-assigned trust regions) but not tune its trainer settings or learning hyperparameters."""
    for name in experiment_names():
        cells = {cell.label: cell for cell in expand(load_experiment(name), "cpu")}
        with_preset = {label: cell for label, cell in cells.items() if cell.preset}
        if not with_preset or set(with_preset) == set(cells):
            continue
        for label, cell in with_preset.items():
            preset = load_yaml(find_preset(cell.preset, cell.algo))
            assert "train" not in preset and not TUNED & set(preset.get("algo") or {}), (name, label, preset)


def test_schedule_values_follow_the_cell_budget():
    train = resolve("dgn", "spread", parse_overrides(["total_steps=10000", "warmup_steps=1000",
                                                        "update_every=2", "gradient_steps=2"])).train
    assert planned_updates(train) == 9000
    assert schedule_value({"fraction": 0.3, "of": "env_steps"}, train, "x") == 3000
    assert schedule_value({"fraction": 0.002, "of": "updates"}, train, "x") == 18
    assert schedule_value({"per_run": 45, "of": "updates"}, train, "x") == pytest.approx(0.005)
    with pytest.raises(VimarlError, match="a schedule must be"):
        schedule_value({"fraction": 0.3, "of": "episodes"}, train, "x")


def test_fair_overrides_keep_an_arms_own_value_and_refuse_missing_fields():
    overrides = fair_overrides("dgn", "spread", {"total_steps": 1000, "algo.lr": 0.5}, None, {"lr": 0.1, "gamma": 0.9},
                               {"epsilon_decay_steps": {"fraction": 0.25, "of": "env_steps"}}, "here")
    assert overrides["algo.lr"] == 0.5 and overrides["algo.gamma"] == 0.9
    assert overrides["algo.epsilon_decay_steps"] == 250
    team = fair_overrides("team", "tag", {"algo.members": "{predators: masac, prey: maddpg}",
                                          "algo.configs": "{masac: {alpha: 0.26}}"}, None, {"lr": 0.1}, {}, "here")
    assert team["algo.configs"] == {"masac": {"alpha": 0.26, "lr": 0.1}, "maddpg": {"lr": 0.1}}
    with pytest.raises(VimarlError, match="do not exist in mappo's config"):
        fair_overrides("mappo", "spread", {}, None, {"tau": 0.01}, {}, "here")


# -- the held-out evaluation stream ------------------------------------------------------------
def test_evaluation_seeds_are_fresh_per_index_and_shared_across_runs(monkeypatch, tmp_path):
    """Evaluation k of any run plays eval_seed(k): the same for two algorithms and two seeds, a
    new one at every index, and the final evaluation its own stream of at least 100 episodes."""
    calls: dict[str, list[tuple[int, int, bool]]] = {}
    real = train_module.evaluate

    def recording(algo, env, seed, deterministic=True, *args, **kwargs):
        calls.setdefault(current, []).append((seed, env.num_envs, deterministic))
        return real(algo, env, seed, deterministic, *args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", recording)
    for algo, seed in (("isac", 0), ("isac", 1), ("vpp", 2)):
        current = f"{algo}-{seed}"
        out = vimarl.train(algo, "grid_coordination", total_steps=96, warmup_steps=32, eval_every=32,
                           eval_episodes=4, final_eval_episodes=100, seed=seed, out=str(tmp_path / current),
                           progress=False, tensorboard=False)
        rows = read_metrics(out / "metrics.csv")
        assert [r["eval_episodes"] for r in rows] == [4, 4, 4, 100] and [r["final_eval"] for r in rows] == [0, 0, 0, 1]
        assert {"eval_deterministic_return_mean", "eval_sampled_return_mean", "eval_return/agents",
                "train_return/agents"} <= set(rows[-1])
    runs = list(calls.values())
    assert runs[0] == runs[1] == runs[2]
    expected = [(eval_seed(k), 4, mode) for k in range(3) for mode in (True, False)]
    # The final evaluation (deterministic, sampled), then uniform random actions on the same episodes
    # for summary.json's reference_returns (grid_coordination has no scripted controller).
    assert runs[0] == expected + [(FINAL_EVAL_SEED, 100, True), (FINAL_EVAL_SEED, 100, False), (FINAL_EVAL_SEED, 100, True)]


def test_evaluation_streams_differ_from_each_other_and_from_training():
    first = vimarl.make_env("spread", 4, seed=eval_seed(0)).reset(seed=eval_seed(0)).groups["agents"].obs
    second = vimarl.make_env("spread", 4, seed=eval_seed(1)).reset(seed=eval_seed(1)).groups["agents"].obs
    final = vimarl.make_env("spread", 4, seed=FINAL_EVAL_SEED).reset(seed=FINAL_EVAL_SEED).groups["agents"].obs
    training = vimarl.make_env("spread", 4, seed=0).reset(seed=0).groups["agents"].obs
    again = vimarl.make_env("spread", 4, seed=eval_seed(1)).reset(seed=eval_seed(1)).groups["agents"].obs
    assert torch.equal(second, again)
    for a, b in ((first, second), (first, final), (second, final), (first, training)):
        assert not torch.isclose(a, b).all(dim=-1).any()  # no sub-environment starts where another does


def test_train_returns_are_per_group_and_the_first_group_is_the_team(tmp_path):
    out = vimarl.train("team", "tag", total_steps=150, num_envs=2, warmup_steps=100, eval_every=75, eval_episodes=2,
                       final_eval_episodes=0, batch_size=16, out=str(tmp_path / "tag"), progress=False,
                       tensorboard=False, algo_config={"members": {"predators": "isac", "prey": "isac"}})
    last = read_metrics(out / "metrics.csv")[-1]
    assert last["train_return_mean"] == last["train_return/predators"] != last["train_return/prey"]
    assert last["eval_return_mean"] == last["eval_return/predators"]
    assert last["eval_episodes"] == 2 and last["final_eval"] == 0


def test_every_config_field_of_the_trainer_is_documented():
    from vimarl.config import TrainConfig
    from vimarl.fields import field_docs
    assert set(field_docs(TrainConfig)) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_sweep_configs_prints_every_arms_resolved_settings_and_runs_nothing(capsys, tmp_path, monkeypatch):
    from vimarl.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "vm3ac_fig3", "--configs"]) == 0
    printed = capsys.readouterr().out
    spread = printed.split("### spread_vm3ac")[1]
    assert "| lr | 0.0003 | 0.0003 | 0.0003 |" in spread and "| hidden_dim | 128 | 128 | 128 |" in spread
    assert "| **grad_clip** | - | - | 0.5 |" in spread  # MADDPG's own clip, visible as a difference
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name, scale", CELLS)
def test_every_cell_has_five_seeds_and_toy_games_ten(name, scale):
    cells = expand(load_experiment(name), scale)
    seeds = {(cell.env_label, cell.label): set() for cell in cells}
    for cell in cells:
        seeds[(cell.env_label, cell.label)].add(cell.seed)
    toy = {"grid_coordination"}
    for (env_label, label), found in seeds.items():
        assert len(found) >= (10 if env_label in toy else 5), (name, scale, env_label, label)


@pytest.mark.parametrize("name", experiment_names())
def test_every_claim_parses_and_names_arms_that_run_on_its_envs(name):
    """A claim the report cannot read would only fail after the sweep: check them all up front."""
    from vimarl.report import parse_compare

    experiment = load_experiment(name)
    for scale in ("cpu", "paper"):
        cells = expand(experiment, scale)
        arms = {(c.env_label, c.label) for c in cells}
        for claim in experiment.get("claims") or []:
            if "compare" not in claim:
                continue
            left, _, rights = parse_compare(claim["compare"])
            envs = claim["env"] if isinstance(claim["env"], list) else [claim["env"]]
            for operand in [left, *rights]:
                label = operand.partition(":")[0]
                if re.fullmatch(r"[-+]?[0-9.eE+-]+", label):  # a number, e.g. "vpp > -3700"
                    continue
                assert any(a == label for _, a in arms), (name, claim["claim"], label)
                if scale == "paper":
                    assert all((env, label) in arms for env in envs), (name, claim["claim"], label, envs)
