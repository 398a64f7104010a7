"""Algorithms, one file each, and `make_algo`."""

from __future__ import annotations

from typing import Any

from vimarl.algos import (  # noqa: F401  (registers the algorithms)
    coma,
    dgn,
    ip,
    iql,
    isac,
    lola,
    maac,
    maddpg,
    mamd,
    mamt,
    mappo,
    masac,
    maven,
    mfq,
    neurcomm,
    pic,
    qmix,
    si_moa,
    team,
    vdn,
    vm3ac,
    vpp,
)
from vimarl.algos.base import (
    ALGORITHMS,
    Algorithm,
    Capabilities,
    get_algorithm,
    register,
)
from vimarl.envs.base import BatchedEnv
from vimarl.fields import config_for


def make_algo(name: str, env: BatchedEnv, config: Any = None, device: str | None = None,
              **config_overrides: Any) -> Algorithm:
    """Algorithm `name` for the learned groups of `env`; kwargs are fields of its Config."""
    cls = get_algorithm(name)
    config = config_for(cls, config, config_overrides, "algo", name)
    groups = {g: spec for g, spec in env.groups.items() if spec.role == "learned"}
    env_name = getattr(env, "name", type(env).__name__)
    cls.check_env(env_name, groups, env.state_dim)
    return cls(groups, env.state_dim, config, device=device or env.device)


__all__ = ["ALGORITHMS", "Algorithm", "Capabilities", "get_algorithm", "make_algo", "register"]
