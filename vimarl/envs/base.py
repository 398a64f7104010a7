"""The batched environment contract: specs, TimeStep, and a base class with auto-reset.

Shapes: B sub-environments, N agents per group. Everything per group is a tensor with the
agent axis second. Actions go in as ``[B, N]`` int64 (Discrete) or ``[B, N, A]`` float (Box).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from vimarl.envs.graph import Graph
from vimarl.errors import VimarlError


@dataclass(frozen=True)
class Discrete:
    """n actions, indexed 0..n-1."""

    n: int

    def sample(self, shape: tuple[int, ...], generator: torch.Generator, device,
               action_mask: Tensor | None = None) -> Tensor:
        """Uniform random actions of `shape` (int64), only among allowed ones if masked."""
        logits = torch.zeros(*shape, self.n, device=device)
        if action_mask is not None:
            logits = logits.masked_fill(~action_mask, float("-inf"))
        flat = torch.multinomial(logits.reshape(-1, self.n).exp(), 1, generator=generator)
        return flat.view(shape)


@dataclass(frozen=True)
class Box:
    """Continuous actions in [low, high]^dim."""

    low: float
    high: float
    dim: int

    def sample(self, shape: tuple[int, ...], generator: torch.Generator, device,
               action_mask: Tensor | None = None) -> Tensor:
        """Uniform random actions of `shape + (dim,)`."""
        unit = torch.rand(*shape, self.dim, generator=generator, device=device)
        return self.low + (self.high - self.low) * unit


ActionSpace = Discrete | Box


@dataclass(frozen=True)
class GroupSpec:
    """What an algorithm needs to know about one group of agents."""

    n_agents: int
    obs_dim: int
    action_space: ActionSpace
    role: Literal["learned", "scripted", "frozen"] = "learned"
    """Learned by an algorithm, driven by the environment's script, or a frozen checkpoint."""
    graph_k: int | None = None
    """Neighbour slots K of the group's graph, None when the environment gives no graph."""
    has_action_mask: bool = False
    can_leave: bool = False
    """Agents may leave an episode before it ends (GroupStep.alive marks who is still in)."""
    static_graph: bool = False
    """The group's graph is the same in every sub-environment at every step (a road network, a
    complete graph): the replay stores it once instead of in every transition."""

    @property
    def discrete(self) -> bool:
        return isinstance(self.action_space, Discrete)


@dataclass
class GroupStep:
    """One group's part of a TimeStep."""

    obs: Tensor
    """[B, N, obs_dim] float32."""
    reward: Tensor
    """[B, N] each agent's own reward for the transition that led here (zeros after reset)."""
    graph: Graph | None = None
    action_mask: Tensor | None = None
    """[B, N, n_actions] bool, True where allowed."""
    alive: Tensor | None = None
    """[B, N] bool, False for agents that have left the episode (environments whose agents can
    leave: their slots stay, with zero observation and reward and no graph edges)."""


@dataclass
class TimeStep:
    """What reset and step return."""

    groups: dict[str, GroupStep]
    terminated: Tensor
    """[B] bool: the episode reached a terminal state (no bootstrapping)."""
    truncated: Tensor
    """[B] bool: the episode was cut by the time limit (bootstrap from final_obs)."""
    state: Tensor | None = None
    """[B, S] optional global state for centralised critics."""
    info: dict[str, Any] = field(default_factory=dict)
    """Tensors only. On auto-reset: final_obs / final_graph / final_action_mask / final_alive
    (dicts by group) and final_state."""

    @property
    def done(self) -> Tensor:
        return self.terminated | self.truncated

    def final_view(self) -> "TimeStep":
        """The last step of each finished episode: obs, graph and state before auto-reset.

        This is the s' to bootstrap from; environments that did not finish are unchanged.
        """
        final_obs = self.info.get("final_obs")
        if final_obs is None:
            return self
        final_graph = self.info.get("final_graph", {})
        groups = {
            name: dataclasses.replace(
                step, obs=final_obs[name], graph=final_graph.get(name, step.graph),
                action_mask=self.info.get("final_action_mask", {}).get(name, step.action_mask),
                alive=self.info.get("final_alive", {}).get(name, step.alive))
            for name, step in self.groups.items()
        }
        return dataclasses.replace(self, groups=groups,
                                   state=self.info.get("final_state", self.state), info={})


def _merge(done: Tensor, reset_value, final_value):
    """Element-wise: the reset value where `done [B]`, else the final value."""
    if final_value is None:
        return None
    if isinstance(final_value, Graph):
        return reset_value.where(done, final_value)
    pick = done.view(-1, *([1] * (final_value.dim() - 1)))
    return torch.where(pick, reset_value, final_value)


class BatchedEnv(ABC):
    """B copies of one environment stepped together as tensors, with auto-reset.

    Subclasses implement `_reset_envs`, `_step` and `_observe` on all B copies at once; this
    class handles episode counters, time limits, auto-reset and `info["final_obs"]`.
    Randomness comes from `vimarl.envs.rng` keyed on (seed, env index, episode index), so
    `reset(seed=s)` makes sub-environment i replay the same episodes for any batch size.
    """

    Config: ClassVar[type]
    """Dataclass of the scenario's parameters; every field has a docstring."""
    state_fields: ClassVar[tuple[str, ...]] = ()
    """Attribute names of the tensors that hold the simulation state (for checkpoints)."""

    groups: dict[str, GroupSpec]
    state_dim: int = 0
    max_steps: int

    def __init__(self, config: Any, num_envs: int, seed: int = 0, device: str | torch.device = "cpu"):
        self.config = config
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.seed = int(seed)
        self.env_ids = torch.arange(num_envs, device=self.device)
        self.episode_index = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self.episode_step = torch.zeros(num_envs, dtype=torch.int64, device=self.device)

    # -- what a scenario implements ------------------------------------------------------
    @abstractmethod
    def _reset_envs(self, env_mask: Tensor) -> None:
        """Start a new episode in the sub-environments where `env_mask [B]` is True."""

    @abstractmethod
    def _step(self, actions: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """Advance all sub-environments; return rewards by group ([B, N]) and terminated [B]."""

    @abstractmethod
    def _observe(self) -> tuple[dict[str, GroupStep], Tensor | None]:
        """Observations (rewards left zero), graphs, masks by group, and the global state.

        Return new tensors, not views of simulation state that `_reset_envs` changes in place:
        `step` keeps the pre-reset observation as info["final_obs"].
        """

    def _truncated_by_env(self) -> Tensor | None:
        """[B] episodes the simulator itself cut in the last `_step` (external environments with
        their own time limits); None when only `max_steps` applies."""
        return None

    def render(self) -> np.ndarray:
        """An RGB image (H, W, 3) uint8 of sub-environment 0."""
        raise VimarlError(f"{type(self).__name__} has no renderer; evaluate without --gif")

    # -- the public contract ---------------------------------------------------------------
    def reset(self, seed: int | None = None) -> TimeStep:
        """Reset every sub-environment. With a seed, episode counters restart from 0."""
        if seed is not None:
            self.seed = int(seed)
            self.episode_index.zero_()
        else:
            self.episode_index += 1
        self.episode_step.zero_()
        self._reset_envs(torch.ones(self.num_envs, dtype=torch.bool, device=self.device))
        groups, state = self._observe()
        false = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        return TimeStep(groups, false, false.clone(), state)

    def step(self, actions: dict[str, Tensor]) -> TimeStep:
        """Apply actions; sub-environments whose episode ended restart automatically."""
        missing = set(self.learned_groups()) - set(actions)
        if missing:
            raise VimarlError(f"step() needs actions for groups {sorted(missing)}; "
                              f"pass a dict with one entry per group in env.groups")
        rewards, terminated = self._step(actions)
        self.episode_step += 1
        truncated = self.episode_step >= self.max_steps
        truncated_by_env = self._truncated_by_env()
        if truncated_by_env is not None:
            truncated = truncated | truncated_by_env
        truncated = truncated & ~terminated
        done = terminated | truncated
        final_groups, final_state = self._observe()
        for name, step in final_groups.items():
            step.reward = rewards[name]
        info: dict[str, Any] = {"final_obs": {n: s.obs for n, s in final_groups.items()}}
        if bool(done.any()):  # one host sync per step, only to skip resets when none is due
            self.episode_index += done.long()
            self.episode_step.masked_fill_(done, 0)
            self._reset_envs(done)
            new_groups, new_state = self._observe()
            groups = {
                name: GroupStep(
                    obs=_merge(done, new_groups[name].obs, step.obs),
                    reward=step.reward,
                    graph=_merge(done, new_groups[name].graph, step.graph),
                    action_mask=_merge(done, new_groups[name].action_mask, step.action_mask),
                    alive=_merge(done, new_groups[name].alive, step.alive),
                )
                for name, step in final_groups.items()
            }
            state = _merge(done, new_state, final_state)
        else:
            groups, state = final_groups, final_state
        info["final_graph"] = {n: s.graph for n, s in final_groups.items() if s.graph is not None}
        if any(s.action_mask is not None for s in final_groups.values()):
            info["final_action_mask"] = {n: s.action_mask for n, s in final_groups.items()
                                         if s.action_mask is not None}
        if any(s.alive is not None for s in final_groups.values()):
            info["final_alive"] = {n: s.alive for n, s in final_groups.items() if s.alive is not None}
        if final_state is not None:
            info["final_state"] = final_state
        return TimeStep(groups, terminated, truncated, state, info)

    def learned_groups(self) -> dict[str, GroupSpec]:
        """The groups whose actions come from outside (learned or frozen policies)."""
        return {n: g for n, g in self.groups.items() if g.role != "scripted"}

    @property
    def n_agents(self) -> int:
        """Agents over all groups (agent-steps = env-steps x n_agents)."""
        return sum(g.n_agents for g in self.groups.values())

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: counters and the simulation tensors."""
        state = {"seed": self.seed, "episode_index": self.episode_index.clone(),
                 "episode_step": self.episode_step.clone()}
        state.update({name: getattr(self, name).clone() for name in self.state_fields})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        for name in ("episode_index", "episode_step", *self.state_fields):
            # A copy: steps update these tensors in place, which must not write into `state`.
            setattr(self, name, state[name].to(self.device, copy=True))
