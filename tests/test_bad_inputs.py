"""Every numeric field of every config, set to 0, -1, nan, inf and a huge value: either a one-line
`VimarlError` (what the CLI prints as `vimarl: error: ...`) or a working algorithm / environment,
never another exception (issue 21, item 2; the rules are in vimarl.fields.check_ranges)."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

import vimarl
from vimarl.algos import ALGORITHMS
from vimarl.algos.base import UniformPolicy
from vimarl.config import TrainConfig
from vimarl.fields import build
from vimarl.envs.registry import ENVIRONMENTS, make_env
from vimarl.errors import VimarlError
from vimarl.train import act, fill_replay

INT_VALUES = (0, -1, math.nan, math.inf, 10**12)
FLOAT_VALUES = (0.0, -1.0, math.nan, math.inf, 1e12)


def numeric_fields(cls: type) -> list[tuple[str, tuple]]:
    """(field, values to try) for every int / float field of dataclass `cls` (optional ones too;
    bools and tuples are not numbers here)."""
    hints = typing.get_type_hints(cls)
    fields = []
    for field in dataclasses.fields(cls):
        options = set(typing.get_args(hints[field.name])) - {type(None)} or {hints[field.name]}
        if options == {int}:
            fields.append((field.name, INT_VALUES))
        elif options == {float} or options == {int, float}:
            fields.append((field.name, FLOAT_VALUES))
    return fields


def refused(error: VimarlError) -> None:
    message = str(error)
    assert message and "\n" not in message, f"not a one-line error: {message!r}"


def cases(cls: type) -> list[tuple[str, float]]:
    return [(name, value) for name, values in numeric_fields(cls) for value in values]


# -- algorithms ---------------------------------------------------------------------------
ALGO_ENV = "grid_coordination"  # every registered algorithm handles its discrete actions
ALGOS = sorted(name for name in ALGORITHMS if numeric_fields(ALGORITHMS[name].Config))


CONTINUOUS_ENV = "spread_vm3ac"  # continuous actions: the algorithms' Gaussian / deterministic heads
CONTINUOUS_ALGOS = sorted(name for name in ALGOS if ALGORITHMS[name].capabilities.continuous)
RECURRENT_ALGOS = sorted(name for name in ALGOS if "recurrent" in {f.name for f in
                                                                   dataclasses.fields(ALGORITHMS[name].Config)})


def one_update(env, name: str, field: str, value: float, **settings) -> str:
    """'refused' (one-line VimarlError) or 'ran' (built, acted, updated once on a replayed batch:
    the latest rollout for on-policy learners, windows of consecutive steps for recurrent ones)."""
    try:
        algo = vimarl.make_algo(name, env, **{**settings, field: value})
        sampler = algo.sampler
        steps = {"rollout": sampler.length, "windows": sampler.length + 4}.get(sampler.kind, 4)
        codec, buffer = fill_replay(env, algo, steps, capacity=steps * env.num_envs)
        algo.update(codec.decode(buffer.draw(sampler, 8)))
    except VimarlError as error:
        refused(error)
        return "refused"
    return "ran"


def raw_exceptions(env_name: str, algo_name: str, **settings) -> list[str]:
    env = make_env(env_name, 2)
    failures = []
    for field, value in cases(ALGORITHMS[algo_name].Config):
        try:
            one_update(env, algo_name, field, value, **settings)
        except Exception as error:  # noqa: BLE001  (the point: which raw exceptions escape)
            failures.append(f"algo.{field}={value}: {type(error).__name__}: {str(error).splitlines()[:1]}")
    return failures


@pytest.mark.parametrize("algo_name", ALGOS)
def test_every_numeric_algo_field_is_refused_or_works(algo_name):
    failures = raw_exceptions(ALGO_ENV, algo_name)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("algo_name", CONTINUOUS_ALGOS)
def test_every_numeric_algo_field_is_refused_or_works_on_continuous_actions(algo_name):
    failures = raw_exceptions(CONTINUOUS_ENV, algo_name)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("algo_name", RECURRENT_ALGOS)
def test_every_numeric_algo_field_is_refused_or_works_with_recurrent_agents(algo_name):
    failures = raw_exceptions(ALGO_ENV, algo_name, recurrent=True, sequence_length=4)
    assert not failures, "\n".join(failures)


def test_the_paths_above_are_exercised():
    assert {"maddpg", "masac", "vpp", "vm3ac", "mappo"} <= set(CONTINUOUS_ALGOS)
    assert {"vdn", "qmix"} <= set(RECURRENT_ALGOS)


def test_team_members_settings_are_checked_like_the_algorithms():
    env = make_env(ALGO_ENV, 2)
    for field, value in (("gamma", 2.0), ("hidden_dim", 10**12), ("lr", math.nan), ("tau", -1.0)):
        with pytest.raises(VimarlError) as error:
            vimarl.make_algo("team", env, members={"agents": "vpp"}, configs={"vpp": {field: value}})
        refused(error.value)
        assert f"algo.configs.vpp.{field}" in str(error.value)


def test_huge_sizes_are_refused_before_anything_is_allocated():
    env = make_env(ALGO_ENV, 2)
    for name, field in (("vpp", "hidden_dim"), ("dgn", "heads"), ("mappo", "rollout_length"),
                        ("mfq", "mean_field_rounds"), ("qmix", "mixing_embed_dim")):
        with pytest.raises(VimarlError, match=rf"algo\.{field}=1000000000000 is out of range: .*\[\d, 65536\]"):
            vimarl.make_algo(name, env, **{field: 10**12})


# -- environments -------------------------------------------------------------------------
def env_names() -> list[str]:
    """One registered name per environment class (each class has one Config)."""
    chosen: dict[str, str] = {}
    for name, entry in ENVIRONMENTS.items():
        if entry.target not in chosen or (entry.defaults == () and ENVIRONMENTS[chosen[entry.target]].defaults):
            chosen[entry.target] = name
    chosen["vimarl.envs.external.from_pettingzoo:PettingZooEnv"] = "mpe2_spread"  # 'pettingzoo' needs env.env
    return sorted(chosen.values())


CONFIG_ONLY = {"sumo": "SUMO starts a simulator per env (seconds each)",
               "pettingzoo": "each adapted env starts worker processes",
               "mpe": "each adapted env starts worker processes"}
"""Environments whose settings are only built and range-checked, not stepped (the reason)."""


def step_env(name: str, field: str, value: float) -> str:
    try:
        env = make_env(name, 2, **{field: value})
        learned = {g: spec for g, spec in env.groups.items() if spec.role == "learned"}
        policy = UniformPolicy(learned, seed=0)
        step = env.reset(seed=0)
        for _ in range(2):
            step = env.step(act(policy, step, explore=True))
    except VimarlError as error:
        refused(error)
        return "refused"
    return "ran"


def build_env_config(name: str, field: str, value: float) -> str:
    entry = ENVIRONMENTS[name]
    try:
        build(entry.load().Config, {**dict(entry.defaults), field: value}, "env")
    except VimarlError as error:
        refused(error)
        return "refused"
    return "built"


@pytest.mark.parametrize("env_name", env_names())
def test_every_numeric_env_field_is_refused_or_works(env_name):
    entry = ENVIRONMENTS[env_name]
    try:
        env_cls = entry.load()
    except VimarlError as error:
        pytest.skip(str(error))
    reason = entry.missing_data()
    if reason:
        pytest.skip(reason)
    check = build_env_config if entry.requires in CONFIG_ONLY else step_env
    failures = []
    for field, value in cases(env_cls.Config):
        try:
            check(env_name, field, value)
        except Exception as error:  # noqa: BLE001
            failures.append(f"env.{field}={value}: {type(error).__name__}: {str(error).splitlines()[:1]}")
    assert not failures, "\n".join(failures)


# -- the trainer --------------------------------------------------------------------------
def test_every_numeric_train_field_is_refused_or_valid():
    """TrainConfig is only built here (a huge total_steps is a valid, long run); the trainer's own
    loop with small values is covered by test_train.py."""
    failures = []
    for field, value in cases(TrainConfig):
        try:
            build(TrainConfig, {field: value}, "train")
        except VimarlError as error:
            refused(error)
        except Exception as error:  # noqa: BLE001
            failures.append(f"{field}={value}: {type(error).__name__}: {error}")
    assert not failures, "\n".join(failures)
    for field in ("batch_size", "num_envs", "eval_episodes", "torch_threads"):
        with pytest.raises(VimarlError, match=rf"train\.{field}=1000000000000 is out of range"):
            build(TrainConfig, {field: 10**12}, "train")
