"""Settings as dataclasses: a docstring per field, values coerced from strings and YAML, and the
range checks every config gets by field name and type.

The lowest layer beside vimarl.errors: environments, algorithms and the trainer build their
configs with `build` / `config_for`; vimarl.config resolves a whole run from presets on top.
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
from typing import Any

import yaml

from vimarl.errors import VimarlError, did_you_mean


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
               "threads", "envs", "episodes", "keep_checkpoints", "max_agents", "lanes", "rows", "cols",
               "gradient_steps", "critic_steps")


def is_size(name: str) -> bool:
    """A field that sizes memory or work: widths (*dim*, *hidden*, *embed*, *units*), counts of layers,
    heads, rounds, epochs, minibatches, samples, gradient steps per update, episodes, environments,
    workers, threads and of agents or entities (`n`, `n_*`, `num_*`, rows, cols, lanes, graph_k), and
    batch, buffer and sequence sizes."""
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
