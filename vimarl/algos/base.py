"""The Algorithm contract, capability flags and the algorithm registry.

An algorithm is a torch Module that owns its networks, target networks and optimisers
(all saved by `state_dict`), picks actions with `act` and takes one gradient step with
`update`. The trainer knows nothing else about it.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vimarl.buffer import ExtraFields, Sampler, Transition
from vimarl.envs.base import GroupSpec, TimeStep
from vimarl.envs.graph import Graph
from vimarl.errors import VimarlError, unknown
from vimarl.nn.distributions import action_features


@dataclass(frozen=True)
class Capabilities:
    """What an algorithm can handle; `make_algo` checks an environment against these."""

    discrete: bool
    continuous: bool
    needs_state: bool = False
    """Needs the environment's global state (centralised critics)."""
    needs_graph: bool = False
    """Needs each group's agent graph."""
    heterogeneous: bool = False
    """Can control several learned groups at once."""
    team_critic: bool = False
    """Its centralised critics can also read the groups other team members control (`TeamView`)."""

    def describe(self) -> str:
        actions = "/".join(k for k in ("discrete", "continuous") if getattr(self, k))
        extra = [k for k in ("needs_state", "needs_graph", "heterogeneous") if getattr(self, k)]
        return ", ".join([actions, *extra])


class Algorithm(nn.Module, ABC):
    """Base class of every algorithm (see DESIGN §4)."""

    Config: ClassVar[type]
    """Dataclass of hyperparameters; each field has a docstring and the paper's default."""
    capabilities: ClassVar[Capabilities]
    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: Any,
                 device: str | torch.device = "cpu"):
        super().__init__()
        self.groups, self.state_dim, self.config = groups, state_dim, config
        self.device = torch.device(device)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    @abstractmethod
    def act(self, obs: dict[str, Tensor], graph: dict[str, Graph | None], *, explore: bool,
            action_mask: dict[str, Tensor | None] | None = None,
            state: Tensor | None = None) -> dict[str, Tensor]:
        """Actions by group: sampled when `explore`, else the deterministic (most probable) ones."""

    @abstractmethod
    def update(self, batch: Transition) -> dict[str, Tensor]:
        """One gradient step on a batch; returns detached scalar metrics (no host sync)."""

    def optimize(self, name: str, loss: Tensor, max_grad_norm: float | None = None,
                 measure_norm: bool = False) -> Tensor | None:
        """One step of optimiser `name` on `loss` (gradients cleared first, their norm clipped to
        `max_grad_norm` when given). Returns the gradient norm before clipping when it was
        clipped or `measure_norm` asks for it, else None."""
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = None
        if max_grad_norm is not None or measure_norm:
            norm = torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                                  math.inf if max_grad_norm is None else max_grad_norm)
        optimizer.step()
        return norm

    @property
    def sampler(self) -> Sampler:
        """What `update` is handed (`Sampler`, served by `ReplayBuffer.draw`): single transitions
        by default; windows of consecutive steps for recurrent learners (every tensor [T, W, ...]
        time-major, `batch.valid` marking the stored steps); the latest rollout for on-policy
        learners (rows time-major: step t of sub-environment b is row t * B + b; the trainer then
        stores exactly one rollout, discards it after the update and plays no random warm-up)."""
        return Sampler()

    def observe(self, step: TimeStep, actions: dict[str, Tensor], next_step: TimeStep) -> None:
        """Every collected vectorised step, as it is stored (e.g. MAAC's reward statistics)."""

    @property
    def reads_state(self) -> bool:
        """Its updates read the global state (`Transition.state`), so the replay stores it; by
        default what `Capabilities.needs_state` says."""
        return self.capabilities.needs_state

    def replay_fields(self) -> ExtraFields:
        """Extra per-group fields the replay should store for this algorithm, {field: {group:
        (per-row shape, dtype)}}, read back as `Transition.extra` (e.g. MADDPG's relaxed action
        samples); none by default."""
        return {}

    def replay_values(self, actions: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        """Values of `replay_fields` for the step just taken with `actions`, {field: {group: [B,
        ...]}}: the trainer calls it for every collected step, whether the actions came from
        `act` or were chosen by the trainer (warm-up)."""
        return {}

    @torch.no_grad()
    def critic_actions(self, batch: Transition, lookahead: bool) -> dict[str, Tensor]:
        """This algorithm's actions for its groups as another team member's centralised critic
        reads them (`TeamView`): at s' for a target look-ahead (`lookahead`), else at s, as an
        actor loss that samples the others' current policies does (MA-SAC Eq. 9). By default an
        exploring `act` on the batch, as action features; centralised-critic algorithms give what
        their own critics use for their agents (e.g. samples of the target policies)."""
        prefix = "next_" if lookahead else ""
        obs, graph, mask = (getattr(batch, f"{prefix}{key}") for key in ("obs", "graph", "action_mask"))
        actions = self.act({g: obs[g] for g in self.groups}, {g: graph[g] for g in self.groups}, explore=True,
                           action_mask={g: mask[g] for g in self.groups}, state=getattr(batch, f"{prefix}state"))
        return {g: action_features(actions[g], spec.action_space) for g, spec in self.groups.items()}

    def evaluation_modes(self) -> dict[str, str]:
        """Other ways to execute the trained policies that evaluation reports too, as
        {metric suffix: mode} (VM3-AC's z modes); none by default."""
        return {}

    @contextmanager
    def execution(self, mode: str | None = None) -> Iterator[None]:
        """Set up deployment for a block of evaluation episodes in `mode` (None: the configured
        one); VM3-AC restarts the agents' shared latent generator here."""
        yield

    # Optimiser states ride along in state_dict() through torch's extra-state hook.
    def get_extra_state(self) -> dict[str, Any]:
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        # Optimizer.load_state_dict keeps the given tensors when dtype and device match; a copy
        # stops two algorithms loaded from one state dict from sharing Adam moments.
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(copy.deepcopy(state[name]))

    @classmethod
    def check_env(cls, env_name: str, groups: dict[str, GroupSpec], state_dim: int) -> None:
        """Raise a one-line VimarlError when the environment needs what this algorithm lacks."""
        caps = cls.capabilities
        for group, spec in groups.items():
            kind = "discrete" if spec.discrete else "continuous"
            if not getattr(caps, kind):
                other = "continuous" if spec.discrete else "discrete"
                raise VimarlError(
                    f"algorithm '{cls.name}' cannot handle {kind} actions (group '{group}' of env "
                    f"'{env_name}'); pick an algorithm with {kind} support (see `vimarl list`) or "
                    f"a {other}-action variant of the env")
            if caps.needs_graph and spec.graph_k is None:
                raise VimarlError(f"algorithm '{cls.name}' needs an agent graph but env '{env_name}' "
                                  f"gives none for group '{group}'; enable the env's graph option")
        if caps.needs_state and not state_dim:
            raise VimarlError(f"algorithm '{cls.name}' needs a global state but env '{env_name}' "
                              f"provides none; pick an env with a state or another algorithm")
        if len(groups) > 1 and not caps.heterogeneous:
            raise VimarlError(f"algorithm '{cls.name}' controls one agent group but env '{env_name}' "
                              f"has {sorted(groups)}; pick an algorithm that supports heterogeneous groups")


class UniformPolicy(nn.Module):
    """Uniformly random actions for every group: the random-policy baseline that learning tests and
    benchmarks compare with (`evaluate` accepts it like an Algorithm)."""

    def __init__(self, groups: dict[str, GroupSpec], seed: int = 0):
        super().__init__()
        self.groups = groups
        self.generator = torch.Generator().manual_seed(seed)

    execution = Algorithm.execution  # nothing to set up for deployment

    def act(self, obs, graph, *, explore, action_mask=None, state=None):
        return {g: spec.action_space.sample(obs[g].shape[:2], self.generator, obs[g].device,
                                            (action_mask or {}).get(g))
                for g, spec in self.groups.items()}


def adam(parameters, lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel: one pass over all parameters, 2-4x faster steps on CPU than
    the default per-parameter loop, where small networks' updates are dominated by overhead."""
    return torch.optim.Adam(parameters, lr=lr, fused=True)


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Let gradients flow through `modules` to their inputs without computing their own."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@torch.no_grad()
def polyak(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- (1 - tau) target + tau source."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.lerp_(s, tau)


ALGORITHMS: dict[str, type[Algorithm]] = {}


def agent_mean(values: Tensor, present: Tensor | None) -> Tensor:
    """Mean of per-agent values [b, N] over the agents present (all when `present` is None):
    agents that have left an episode add nothing to a loss."""
    if present is None:
        return values.mean()
    weights = present.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def register(name: str, description: str, capabilities: Capabilities):
    """Class decorator adding an algorithm to the registry under `name`."""
    def decorate(cls: type[Algorithm]) -> type[Algorithm]:
        cls.name, cls.description, cls.capabilities = name, description, capabilities
        ALGORITHMS[name] = cls
        return cls
    return decorate


def get_algorithm(name: str) -> type[Algorithm]:
    if name not in ALGORITHMS:
        raise unknown("algorithm", name, ALGORITHMS)
    return ALGORITHMS[name]
