"""Algorithms, one file each, and `make_algo`."""

from __future__ import annotations

from typing import Any

from vimarl.algos import isac, vpp  # noqa: F401  (registers the algorithms)
from vimarl.algos.base import ALGORITHMS, Algorithm, Capabilities, get_algorithm, register
from vimarl.config import build
from vimarl.envs.base import BatchedEnv
from vimarl.errors import VimarlError


def make_algo(name: str, env: BatchedEnv, config: Any = None, device: str | None = None,
              **config_overrides: Any) -> Algorithm:
    """Algorithm `name` for the learned groups of `env`; kwargs are fields of its Config."""
    cls = get_algorithm(name)
    if config is None:
        config = build(cls.Config, config_overrides, "algo")
    elif config_overrides:
        raise VimarlError("pass either config=... or hyperparameter keyword arguments to make_algo, not both")
    elif not isinstance(config, cls.Config):
        raise VimarlError(f"config for algorithm '{name}' must be a {cls.Config.__qualname__}, got "
                          f"{type(config).__name__}; build it with {cls.__name__}.Config(...)")
    groups = {g: spec for g, spec in env.groups.items() if spec.role == "learned"}
    env_name = getattr(env, "name", type(env).__name__)
    cls.check_env(env_name, groups, env.state_dim)
    return cls(groups, env.state_dim, config, device=device or env.device)


__all__ = ["ALGORITHMS", "Algorithm", "Capabilities", "get_algorithm", "make_algo", "register"]
