"""Scripted controllers: hand-written policies for one env family, usable wherever
`vimarl.train.evaluate` takes an algorithm, and by name in `vimarl eval --policy NAME ENV`.

A controller is an `nn.Module` with `groups`, `act(obs, graph, *, explore, action_mask=None,
state=None)` and `execution`, like `vimarl.algos.base.UniformPolicy`. `SCRIPTED_POLICIES` maps
a policy name to its class (imported on first use); `scripted_policy(name, env)` builds it for
an env after the class's `check` has refused, in one line, an env it does not control.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from vimarl.envs.base import BatchedEnv, GroupSpec
from vimarl.errors import unknown


class ScriptedPolicy(nn.Module):
    """Base of the scripted controllers: nothing to learn, nothing to set up for deployment."""

    def __init__(self, groups: dict[str, GroupSpec]):
        super().__init__()
        self.groups = groups

    @classmethod
    def check(cls, env: BatchedEnv, name: str) -> None:
        """Raise a one-line VimarlError naming the fix when `env` is not one this controller
        drives (`name`: the policy's name, for the message)."""

    @classmethod
    def for_env(cls, env: BatchedEnv, name: str) -> ScriptedPolicy:
        """The controller with its defaults for `env`, after `check`."""
        cls.check(env, name)
        return cls(env.groups)

    @contextmanager
    def execution(self, mode: str | None = None) -> Iterator[None]:
        """`evaluate` enters this around each block of evaluation episodes."""
        yield

    def act(self, obs, graph, *, explore, action_mask=None, state=None) -> dict[str, Tensor]:
        raise NotImplementedError


def env_name(env: BatchedEnv) -> str:
    """The registry name `make_env` gave `env` (its class name otherwise), for messages."""
    return getattr(env, "name", type(env).__name__)


SCRIPTED_POLICIES = {
    "fixed_time": "vimarl.envs.traffic.controllers:FixedTimePolicy",
    "max_pressure": "vimarl.envs.traffic.controllers:MaxPressurePolicy",
    "oracle": "vimarl.envs.particle.controllers:CoopNavOracle",
}
"""The controllers by the names `vimarl eval --policy NAME ENV` knows them ('module:Class')."""


def scripted_policy(name: str, env: BatchedEnv) -> ScriptedPolicy:
    """SCRIPTED_POLICIES[name] with its defaults for `env`; a one-line VimarlError for an unknown
    name or an env the controller does not control."""
    if name not in SCRIPTED_POLICIES:
        raise unknown("policy", name, SCRIPTED_POLICIES)
    module_name, _, class_name = SCRIPTED_POLICIES[name].partition(":")
    controller: type[ScriptedPolicy] = getattr(importlib.import_module(module_name), class_name)
    return controller.for_env(env, name)
