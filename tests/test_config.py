"""Configuration: field docs, coercion, presets, overrides, and one-line errors."""

import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest

import vimarl
from vimarl.algos import ALGORITHMS
from vimarl.config import TrainConfig, load_yaml, parse_overrides, resolve
from vimarl.envs.registry import ENVIRONMENTS
from vimarl.fields import build, coerce, field_docs
from vimarl.errors import VimarlError


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


def installed_env_configs() -> list[type]:
    """Config classes of the environments whose simulators are installed (extras may be absent)."""
    configs = []
    for entry in ENVIRONMENTS.values():
        try:
            configs.append(entry.load().Config)
        except VimarlError:
            continue
    return list(dict.fromkeys(configs))


@pytest.mark.parametrize("cls", [TrainConfig, *(a.Config for a in ALGORITHMS.values()), *installed_env_configs()],
                         ids=lambda c: c.__qualname__)
def test_every_config_field_has_a_docstring(cls):
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__qualname__} fields without docstring: {missing}"


def test_field_docs_reads_the_string_under_each_field():
    assert field_docs(TrainConfig)["num_envs"] == "Sub-environments stepped together (B)."


@dataclass
class Example:
    rate: float = 0.1
    """A rate."""
    count: int = 3
    """A count."""
    flag: bool = False
    """A flag."""
    mode: Literal["sum", "mean"] = "sum"
    """A mode."""
    sizes: tuple[int, ...] = (64, 64)
    """Sizes."""
    maybe: int | None = None
    """Optional."""


def test_build_coerces_strings_from_the_command_line():
    example = build(Example, {"rate": "1e-3", "count": "1_000", "flag": "true", "mode": "mean",
                              "sizes": "[32, 16]", "maybe": "none"}, "algo")
    assert example == Example(rate=0.001, count=1000, flag=True, mode="mean", sizes=(32, 16), maybe=None)
    assert build(Example, {"maybe": "7", "count": 2.0}, "algo").maybe == 7


@pytest.mark.parametrize("values, expected", [
    ({"rat": 1}, "unknown key 'algo.rat' (did you mean 'rate'?)"),
    ({"rate": "fast"}, "algo.rate expects float, got 'fast'"),
    ({"count": "2.5"}, "algo.count expects int, got '2.5'"),
    ({"flag": "maybe"}, "algo.flag expects bool"),
    ({"mode": "max"}, "algo.mode must be one of sum, mean"),
])
def test_build_errors_are_one_line_and_name_the_fix(values, expected):
    with pytest.raises(VimarlError) as error:
        build(Example, values, "algo")
    assert expected in one_line(error)


def test_coerce_rejects_bool_for_numbers():
    with pytest.raises(VimarlError):
        coerce(True, int, "train.seed")


def test_parse_overrides_splits_sections():
    parsed = parse_overrides(["algo.lr=0.001", "env.n=4", "seed=3"])
    assert parsed == {"algo": {"lr": "0.001"}, "env": {"n": "4"}, "train": {"seed": "3"}}
    with pytest.raises(VimarlError, match="must look like key=value"):
        parse_overrides(["lr"])
    with pytest.raises(VimarlError, match="did you mean 'algo'"):
        parse_overrides(["alg.lr=1"])


def test_resolve_layers_env_preset_then_user_preset_then_overrides(tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("train: {total_steps: 999, seed: 5}\nalgo: {alpha: 0.1}\n")
    run = resolve("vpp", "grid_coordination", parse_overrides(["seed=7", "algo.lr=0.005"]), preset)
    assert run.train.num_envs == 8 and run.train.eval_deterministic is False  # env preset
    assert run.train.total_steps == 999 and run.algo_config.alpha == 0.1      # user preset
    assert run.train.seed == 7 and run.algo_config.lr == 0.005                # overrides win
    assert run.algo_config.gamma == 0.95                                       # paper default


@pytest.mark.parametrize("text, expected", [
    ("train: [1, 2", "is not valid YAML"),
    ("model: {lr: 1}", "must contain only the sections"),
])
def test_bad_preset_files(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(VimarlError) as error:
        load_yaml(path)
    assert expected in one_line(error)
    with pytest.raises(VimarlError, match="cannot read preset"):
        load_yaml(tmp_path / "missing.yaml")


def test_unknown_algorithm_and_env_suggest_close_names():
    with pytest.raises(VimarlError) as error:
        resolve("vp", "grid_coordination")
    assert "unknown algorithm 'vp' (did you mean 'vpp'?)" in one_line(error)
    with pytest.raises(VimarlError) as error:
        resolve("vpp", "grid_coordnation")
    assert "(did you mean 'grid_coordination'?)" in one_line(error)


def test_make_algo_checks_config_type_and_keys():
    env = vimarl.make_env("grid_coordination", 2)
    with pytest.raises(VimarlError) as error:
        vimarl.make_algo("vpp", env, config=TrainConfig())
    assert "must be a VPPConfig, got TrainConfig" in one_line(error)
    with pytest.raises(VimarlError, match="did you mean 'alpha'"):
        vimarl.make_algo("vpp", env, alpah=0.1)
    assert vimarl.make_algo("vpp", env, alpha=0.1).config.alpha == 0.1


@pytest.mark.parametrize("override, expected", [
    ("update_every=0", "update_every=0 is out of range: it must be at least 1"),
    ("keep_checkpoints=0", "keep_checkpoints=0 is out of range: it must be at least 1"),
    ("eval_episodes=0", "eval_episodes=0 is out of range: it must be at least 1"),
    ("warmup_steps=-1", "warmup_steps=-1 is out of range: it must be at least 0"),
    ("algo.lr=-1", "algo.lr=-1.0 is out of range: a learning rate must be positive"),
    ("algo.lr=nan", "algo.lr=nan must be a finite number"),
    ("algo.gamma=1.5", "algo.gamma=1.5 is out of range: it must lie in [0, 1]"),
    ("algo.tau=inf", "algo.tau=inf must be a finite number"),
])
def test_out_of_range_values_are_one_line_errors_naming_the_field(override, expected):
    """Issue 21 item 2 (in part): the trainer's fields by range, and every config's numbers, learning
    rates, discount and Polyak rate by name; before, update_every=0 was a ZeroDivisionError
    traceback, algo.lr=-1 torch's raw ValueError and keep_checkpoints=0 kept every checkpoint."""
    from vimarl.config import parse_overrides

    with pytest.raises(VimarlError) as error:
        resolve("vpp", "grid_coordination", parse_overrides([override]))
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_a_run_without_any_evaluation_is_refused_and_an_env_tau_is_not_a_polyak_rate():
    from vimarl.config import parse_overrides

    with pytest.raises(VimarlError, match="without any evaluation"):
        resolve("vpp", "grid_coordination", parse_overrides(["eval_every=0", "final_eval_episodes=0"]))
    assert resolve("vpp", "sumo_grid_1x1").env_config.tau == 1.5  # SUMO's headway, in seconds
