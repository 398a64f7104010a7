"""Environment registry: names -> classes (imported on first use) and `make_env`."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

from vimarl.config import config_for
from vimarl.envs.base import BatchedEnv
from vimarl.errors import VimarlError, unknown


@dataclass(frozen=True)
class EnvEntry:
    name: str
    target: str
    """'module:Class' of the BatchedEnv subclass; imported only when the env is used."""
    description: str
    requires: str = ""
    """The pip extra that provides the simulator, when the env needs one."""

    def load(self) -> type[BatchedEnv]:
        module_name, _, class_name = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            hint = f"pip install 'vimarl[{self.requires}]'" if self.requires else "reinstall vimarl"
            raise VimarlError(f"env '{self.name}' cannot be loaded ({error}); {hint}") from None
        return getattr(module, class_name)


ENVIRONMENTS: dict[str, EnvEntry] = {}


def register_env(name: str, target: str, description: str, requires: str = "") -> None:
    ENVIRONMENTS[name] = EnvEntry(name, target, description, requires)


def get_env(name: str) -> EnvEntry:
    if name not in ENVIRONMENTS:
        raise unknown("env", name, ENVIRONMENTS)
    return ENVIRONMENTS[name]


def make_env(name: str, num_envs: int = 1, seed: int = 0, device: str | torch.device = "cpu",
             config: Any = None, **scenario_kwargs: Any) -> BatchedEnv:
    """B = `num_envs` copies of environment `name`; kwargs are fields of the env's Config."""
    env_cls = get_env(name).load()
    config = config_for(env_cls, config, scenario_kwargs, "env", name)
    if num_envs < 1:
        raise VimarlError(f"num_envs must be at least 1, got {num_envs}")
    env = env_cls(config, num_envs=num_envs, seed=seed, device=device)
    env.name = name
    return env


register_env("grid_coordination", "vimarl.envs.toy.grid_coordination:GridCoordination",
             "n x n grid game of VPP App. G.1: agents pick 0/1, team reward -sum over grid edges "
             "of (a_i - a_j)^2, one-step episodes")
