"""Configuration: dataclasses with a docstring per field, YAML presets, dotted overrides.

A run is resolved from, in increasing priority: the dataclass defaults (the papers' values),
the values an environment name presets (``coop_nav_n30`` sets ``n_agents: 30``),
``configs/envs/<env>.yaml`` (budgets that suit the environment), ``configs/presets/<algo>-<env>.yaml``
(tuned values for that pair, when present), a ``--preset FILE`` (or a preset name such as
``paper``, which finds ``configs/presets/<algo>-paper.yaml``) given by the user, and the
``key=value`` overrides. A preset file has up to three sections: ``train``, ``algo``, ``env``.
Overrides are ``algo.<field>=v``, ``env.<field>=v`` and trainer fields without a prefix.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vimarl.errors import VimarlError, did_you_mean

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class TrainConfig:
    """The trainer's own settings (the same for every algorithm)."""

    total_steps: int = 3000
    """Environment steps to train for, summed over the parallel sub-environments."""
    num_envs: int = 8
    """Sub-environments stepped together (B)."""
    seed: int = 0
    """Seeds the networks, the environments (training and, shifted, evaluation) and the buffer."""
    out: str = ""
    """Run directory; empty means runs/<algo>-<env>-s<seed>."""
    device: str = "cpu"
    """Torch device for environments, networks and the replay buffer (cpu, cuda, cuda:1)."""
    torch_threads: int = 1
    """CPU threads for torch; one is fastest for small models on small machines."""
    reuse_freed_memory: bool = True
    """Linux/glibc: keep freed memory for reuse instead of returning it to the kernel
    (mallopt M_MMAP_MAX=0, no trimming): large CPU updates stop page-faulting every activation
    tensor (1.2-3.5x faster updates at N = 1,225), for 1.3-1.6x more peak memory
    (docs/benchmarks.md, VPP scaling). Process-wide; stays on for the rest of the process."""
    warmup_steps: int = 1000
    """Environment steps of uniformly random actions before the policy acts and updates start
    (replay algorithms; on-policy ones act from the start)."""
    update_every: int = 1
    """Environment steps between updates (the update-to-data ratio does not depend on num_envs);
    on-policy algorithms update once per rollout instead."""
    gradient_steps: int = 1
    """Gradient steps per update."""
    batch_size: int = 1024
    """Transitions per gradient step (on-policy algorithms set their minibatches in their config)."""
    buffer_size: int = 1_000_000
    """Replay capacity in transitions (one transition = one step of one sub-environment); on-policy
    algorithms store one rollout of rollout_length x num_envs instead."""
    eval_every: int = 1000
    """Environment steps between evaluations (each one plays the deterministic and the sampled policy)."""
    eval_episodes: int = 10
    """Episodes per periodic evaluation, run in parallel. Their initial states come from a held-out
    stream: evaluation k of every run (any seed, any algorithm) plays the same fresh episodes,
    never those of an earlier evaluation or of training (DESIGN §9.3)."""
    final_eval_episodes: int = 100
    """Episodes of the final evaluation at the end of the run (at least eval_episodes), from a stream of
    their own (DESIGN §9.3: at least 100 for the score a comparison uses); 0 makes the last periodic
    evaluation the final one."""
    reference_policies: bool = True
    """At the end of the run, also play the final evaluation's episodes with uniformly random actions
    and with every scripted controller that drives the env (coop_nav's oracle; traffic's fixed_time
    and max_pressure) and write their returns into summary.json (`reference_returns`, with
    `oracle_fraction` = (run - uniform) / (oracle - uniform) where an oracle exists). Costs about one
    final evaluation per policy, once; sweeps may turn it off."""
    eval_deterministic: bool = True
    """Report the most probable actions as eval_return_mean; false reports the sampled ones there (for
    games where agents with identical inputs agree trivially under argmax, such as grid_coordination).
    Both are logged either way (eval_deterministic_return_mean, eval_sampled_return_mean)."""
    checkpoint_every: int | None = None
    """Environment steps between checkpoints; None (the default): at every evaluation, so a crash or
    a kill loses at most one evaluation interval; 0: one at the end only."""
    keep_checkpoints: int = 2
    """Checkpoints kept in OUT/checkpoints (the newest ones)."""
    save_buffer: bool = False
    """Store the replay buffer in checkpoints; needed for a resume to match an uninterrupted run."""
    tensorboard: bool = True
    """Write TensorBoard event files next to metrics.csv."""
    progress: bool = True
    """Show a progress bar with the latest evaluation return and the ETA."""

    def __post_init__(self):
        at_least = {name: 1 for name in ("total_steps", "num_envs", "torch_threads", "update_every", "gradient_steps",
                                         "batch_size", "buffer_size", "eval_episodes", "keep_checkpoints")}
        at_least |= {name: 0 for name in ("seed", "warmup_steps", "eval_every", "final_eval_episodes", "checkpoint_every")}
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        for name, minimum in at_least.items():
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise VimarlError(f"{name}={value} is out of range: it must be at least {minimum} "
                                  f"(default {defaults[name]})")
        if self.eval_every == 0 and self.final_eval_episodes == 0:
            raise VimarlError("eval_every=0 and final_eval_episodes=0 leave the run without any evaluation; "
                              "set one of them, e.g. final_eval_episodes=100")


# -- field documentation ---------------------------------------------------------------------
@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field, by field name (inherited ones too)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


# -- values from strings and YAML ------------------------------------------------------------
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` (a string from the command line, or a YAML value) as type `hint`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in options:
                return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except VimarlError as error:
                errors.append(str(error))
        raise VimarlError(errors[0] if errors else f"{key} cannot be {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        for choice in choices:
            if value == choice or str(value) == str(choice):
                return choice
        raise VimarlError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")
    if origin in (tuple, list):
        items = yaml.safe_load(value) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            items = [items]
        args = typing.get_args(hint)
        item_hint = args[0] if args else Any
        return origin(coerce(item, item_hint, f"{key}[{i}]") for i, item in enumerate(items))
    if origin is dict:
        mapping = yaml.safe_load(value) if isinstance(value, str) else value
        if not isinstance(mapping, dict):
            raise VimarlError(f"{key} expects a mapping, got {value!r}; write e.g. {key}={{a: 1, b: 2}}")
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        return {coerce(k, key_hint, key): coerce(v, value_hint, f"{key}.{k}") for k, v in mapping.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            number = float(str(value).replace("_", ""))
            if number.is_integer():
                return int(number)
        except ValueError:
            pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(str(value))
        except ValueError:
            pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif hint is Any:
        return value
    raise VimarlError(f"{key} expects {_type_name(hint)}, got {value!r}; "
                      f"write e.g. {key}={_example(hint)}")


def _example(hint: Any) -> str:
    return {bool: "true", int: "100", float: "0.01", str: "name"}.get(hint, "...")


def build(cls: type, values: dict[str, Any], where: str) -> Any:
    """An instance of dataclass `cls` from `values`, checking every key and type.

    `where` prefixes error messages with where the values came from (e.g. 'algo' for vpp).
    """
    if not isinstance(values, dict):
        raise VimarlError(f"{where} settings must be a mapping of field: value, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise VimarlError(f"unknown key '{where}.{key}'{did_you_mean(key, fields)}; "
                              f"valid keys: {', '.join(fields)}")
        kwargs[key] = coerce(value, hints[key], f"{where}.{key}")
    try:
        instance = cls(**kwargs)
    except (ValueError, TypeError) as error:
        raise VimarlError(f"invalid {where} settings: {error}") from None
    check_ranges(instance, where)
    return instance


UNIT_INTERVAL = {"algo": ("gamma", "tau", "gae_lambda", "epsilon_start", "epsilon_end"),
                 "env": ("local_ratio", "peak_center")}
"""Fields that must lie in [0, 1], by config kind (an env's tau is a SUMO driver's reaction time, not
a Polyak rate; a team member's settings, `algo.configs.<name>`, count as 'algo')."""

MAY_BE_INFINITE = ("local_trust_regions",)
"""Numeric fields that may be +-inf although their default is finite (MAMD-OP's `.inf`: unconstrained)."""

SIGNED = ("target_entropy",)
"""Numeric fields that may be negative; every other number must be at least 0."""

MAX_SIZE = 2**16
"""Upper bound of every size field (see `is_size`): 65,536 is far above any setting of the papers
(the widest layer is 512, the largest N 1,225, the largest grid 35 x 35) and refuses values such as
10**12 that would only exhaust memory or loop for ever."""

_SIZE_WORDS = ("dim", "hidden", "embed", "heads", "rounds", "layers", "size", "batch", "units", "samples",
               "epochs", "minibatches", "rollout_length", "sequence_length", "burn_in", "graph_k", "workers",
               "threads", "envs", "episodes", "keep_checkpoints", "max_agents", "lanes", "rows", "cols")


def is_size(name: str) -> bool:
    """A field that sizes memory or work: widths (*dim*, *hidden*, *embed*, *units*), counts of layers,
    heads, rounds, epochs, minibatches, samples, episodes, environments, workers, threads and of agents
    or entities (`n`, `n_*`, `num_*`, rows, cols, lanes, graph_k), and batch, buffer and sequence sizes."""
    return name == "n" or name.startswith(("n_", "num_")) or any(word in name for word in _SIZE_WORDS)


_WIDTH_WORDS = ("dim", "hidden", "embed", "units", "heads")
"""Size fields that are layer widths or head counts: at least 1, unless their default is 0 or they
are in `ZERO_MEANS_NONE`."""

ZERO_MEANS_NONE = ("latent_dim",)
"""Widths for which 0 is a setting: VM3-AC's latent_dim=0 is its no-latent ablation (002 Sec. 6)."""

UNBOUNDED_SIZES = ("buffer_size",)
"""Size fields without the `MAX_SIZE` bound: the replay buffer is checked against free memory when it
is allocated (vimarl.buffer)."""


POSITIVE = ("lr", "temperature", "target_update_interval", "decision_seconds", "road_length",
            "saturation_flow", "jam_spacing", "clip", "trust_region", "meet_distance", "reward_scale",
            "rollout_length", "minibatches", "md_delay", "epsilon_delay",
            "max_displacement", "capture_radius", "lattice_spacing", "start_half_width", "peak_width",
            "epsilon_min", "epsilon_max", "q_sigma", "map_size", "graph_every", "counterfactual_samples")
"""Numeric fields that must be positive (they divide, or a zero makes the setting meaningless)."""


def check_ranges(config: Any, where: str) -> None:
    """The checks every config gets by field name and type (README, "Bad input"):

    - numbers are finite (unless the default is not, or the field is in `MAY_BE_INFINITE`);
    - numbers are non-negative, except the fields in `SIGNED`;
    - learning rates: `lr` positive, `*_lr` non-negative; the fields in `POSITIVE` positive;
    - an algorithm's gamma, tau, gae_lambda and epsilon_start / epsilon_end, an env's local_ratio and
      peak_center in [0, 1] (`UNIT_INTERVAL`);
    - size fields (`is_size`: widths, counts, batch sizes) are integers of at most `MAX_SIZE` (the replay
      buffer's size is checked against free memory instead); widths and head counts are at least 1,
      unless their default is 0 or 0 means none (`ZERO_MEANS_NONE`: latent_dim).

    Items of a tuple field (e.g. encoder_dims, turn_ratios) are checked like the field itself.
    Errors are one line naming the field, the value and the valid range.
    """
    kind = "algo" if where.startswith("algo") else where
    for field in dataclasses.fields(config):
        value, name = getattr(config, field.name), field.name
        default = field.default if field.default is not dataclasses.MISSING else None
        items = [(f"{name}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, tuple) else [(name, value)]
        for label, item in items:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            _check_number(where, kind, name, label, item, default)


def _check_number(where: str, kind: str, name: str, label: str, value: float, default: Any) -> None:
    def out_of_range(rule: str) -> VimarlError:
        return VimarlError(f"{where}.{label}={value} is out of range: it must {rule} (default {default})")

    numeric_default = isinstance(default, (int, float)) and not isinstance(default, bool)
    if not math.isfinite(value):
        if name not in MAY_BE_INFINITE and (not numeric_default or math.isfinite(default)):
            raise VimarlError(f"{where}.{label}={value} must be a finite number (default {default})")
        return
    if (name == "lr" and value <= 0) or (name.endswith("_lr") and value < 0):
        raise VimarlError(f"{where}.{label}={value} is out of range: a learning rate must be "
                          f"{'positive' if name == 'lr' else 'non-negative'} (default {default})")
    if name not in SIGNED and value < 0:
        raise out_of_range("be at least 0")
    if name in POSITIVE and value <= 0:
        raise out_of_range("be positive")
    if name in UNIT_INTERVAL.get(kind, ()) and not 0 <= value <= 1:
        raise out_of_range("lie in [0, 1]")
    if isinstance(value, int) and is_size(name) and name not in UNBOUNDED_SIZES:
        width = any(word in name for word in _WIDTH_WORDS)
        minimum = 1 if width and default != 0 and name not in ZERO_MEANS_NONE else 0
        if not minimum <= value <= MAX_SIZE:
            raise out_of_range(f"be an integer in [{minimum}, {MAX_SIZE}] (a {'width' if width else 'size'})")


def config_for(owner: type, config: Any, keyword_values: dict[str, Any], where: str, name: str) -> Any:
    """`owner.Config` built from keyword values, or the given config after a type check.

    `where` is 'algo' or 'env' (the override prefix), `name` the registered name.
    """
    if config is None:
        return build(owner.Config, keyword_values, where)
    if keyword_values:
        raise VimarlError(f"pass either config=... or {where} keyword arguments, not both")
    if not isinstance(config, owner.Config):
        raise VimarlError(f"config for {where} '{name}' must be a {owner.Config.__qualname__}, got "
                          f"{type(config).__name__}; build it with {owner.__name__}.Config(...)")
    return config


def as_dict(config: Any) -> dict[str, Any]:
    """A dataclass as plain YAML-friendly values (tuples become lists)."""
    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value
    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


# -- presets and overrides -------------------------------------------------------------------
SECTIONS = ("train", "algo", "env")


def load_yaml(path: Path) -> dict[str, Any]:
    """A preset file's sections; a clear error for a missing, malformed or mis-shaped file."""
    try:
        content = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as error:
        raise VimarlError(f"cannot read preset {path}: {error.strerror}; check the path") from None
    except yaml.YAMLError as error:
        line = getattr(getattr(error, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise VimarlError(f"preset {path} is not valid YAML{where}; fix the file") from None
    if not isinstance(content, dict) or set(content) - set(SECTIONS):
        extra = sorted(set(content) - set(SECTIONS)) if isinstance(content, dict) else content
        raise VimarlError(f"preset {path} must contain only the sections {', '.join(SECTIONS)}; "
                          f"found {extra}")
    return content


def merge(base: dict[str, dict], update: dict[str, dict]) -> dict[str, dict]:
    merged = {section: dict(base.get(section) or {}) for section in SECTIONS}
    for section in SECTIONS:
        merged[section].update(update.get(section) or {})
    return merged


def parse_overrides(items: list[str]) -> dict[str, dict[str, str]]:
    """`['algo.lr=0.001', 'seed=3']` -> {'algo': {'lr': '0.001'}, 'env': {}, 'train': {'seed': '3'}}."""
    parsed: dict[str, dict[str, str]] = {section: {} for section in SECTIONS}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise VimarlError(f"override '{item}' must look like key=value (e.g. algo.lr=0.001)")
        section, dot, field = key.partition(".")
        if dot and section in ("algo", "env"):
            parsed[section][field] = value
        elif dot:
            raise VimarlError(f"override '{key}' has an unknown prefix '{section}'"
                              f"{did_you_mean(section, ('algo', 'env'))}; use algo.<field>, "
                              f"env.<field> or a trainer field without a prefix")
        else:
            parsed["train"][key] = value
    return parsed


def preset_layers(algo: str, env: str) -> list[Path]:
    """The preset files that apply to (algo, env), lowest priority first."""
    candidates = [CONFIG_DIR / "envs" / f"{env}.yaml", CONFIG_DIR / "presets" / f"{algo}-{env}.yaml"]
    return [path for path in candidates if path.exists()]


def find_preset(preset: str | Path, algo: str) -> Path:
    """A preset file path, or a name: `paper` finds configs/presets/<algo>-paper.yaml."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    named = CONFIG_DIR / "presets" / f"{algo}-{preset}.yaml"
    if named.exists():
        return named
    names = sorted(p.stem.removeprefix(f"{algo}-") for p in (CONFIG_DIR / "presets").glob(f"{algo}-*.yaml"))
    raise VimarlError(f"no preset file '{preset}' and no preset named '{preset}' for '{algo}'"
                      f"{did_you_mean(str(preset), names)}; named presets for {algo}: "
                      f"{', '.join(names) or 'none'}")


@dataclass
class RunConfig:
    """Everything that defines a run: written to OUT/config.yaml and read back by --resume."""

    algo: str
    env: str
    train: TrainConfig
    algo_config: Any
    env_config: Any

    def to_dict(self) -> dict[str, Any]:
        return {"algo": self.algo, "env": self.env, "train": as_dict(self.train),
                "algo_config": as_dict(self.algo_config), "env_config": as_dict(self.env_config)}


def resolve(algo: str, env: str, overrides: dict[str, dict[str, Any]] | None = None,
            preset: str | Path | None = None) -> RunConfig:
    """Build a validated RunConfig from presets and overrides (see the module docstring)."""
    from vimarl.algos import get_algorithm
    from vimarl.envs.registry import get_env

    algo_cls = get_algorithm(algo)
    entry = get_env(env)
    env_cls = entry.load()
    values: dict[str, dict] = {section: {} for section in SECTIONS}
    values["env"] = dict(entry.defaults)  # what the env's name presets, e.g. n_agents for coop_nav_n30
    for path in preset_layers(algo, env):
        values = merge(values, load_yaml(path))
    if preset:
        values = merge(values, load_yaml(find_preset(preset, algo)))
    values = merge(values, overrides or {})
    return RunConfig(algo=algo, env=env,
                     train=build(TrainConfig, values["train"], "train"),
                     algo_config=build(algo_cls.Config, values["algo"], "algo"),
                     env_config=build(env_cls.Config, values["env"], "env"))


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Read back a RunConfig written by `RunConfig.to_dict` (OUT/config.yaml)."""
    from vimarl.algos import get_algorithm
    from vimarl.envs.registry import get_env

    try:
        algo_cls = get_algorithm(data["algo"])
        env_cls = get_env(data["env"]).load()
        return RunConfig(algo=data["algo"], env=data["env"],
                         train=build(TrainConfig, data["train"], "train"),
                         algo_config=build(algo_cls.Config, data["algo_config"], "algo"),
                         env_config=build(env_cls.Config, data["env_config"], "env"))
    except (KeyError, TypeError) as error:
        raise VimarlError(f"run config is incomplete (missing {error}); "
                          f"it must be a config.yaml written by vimarl train") from None
