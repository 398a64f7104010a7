"""Any vimarl environment as a PettingZoo ParallelEnv, for users of other MARL libraries.

The wrapper drives a BatchedEnv with num_envs == 1 and maps its contract onto PettingZoo's:

- Agents: agent i of group g is named f"{g}_{i}", for every group whose actions come from
  outside (role "learned" or "frozen"), in `env.groups` order. Scripted groups (e.g.
  prey_predator's default prey) are moved by the environment itself and are not agents here.
- Spaces: observation_space(agent) is Box(-inf, inf, (obs_dim,), float32); action_space(agent)
  is Discrete(n), or Box(low, high, (dim,), float32) for continuous groups. When the env has a
  global state (state_dim > 0), `state()` returns it and `state_space` is
  Box(-inf, inf, (state_dim,), float32); otherwise `state()` raises NotImplementedError and
  there is no `state_space` attribute, as in PettingZoo.
- Action masks: for groups with has_action_mask, infos[agent]["action_mask"] is an int8 array
  of the group's n actions, 1 where allowed (the form gymnasium's Discrete.sample(mask) takes).
- Episodes: terminations / truncations are the env's own [B] flags copied to every live agent,
  and `agents` becomes [] at the step that ends the episode. In groups whose agents can leave
  early (GroupSpec.can_leave, GroupStep.alive), an agent is terminated at the step where it
  leaves and is dropped from `agents`; its slot then gets a placeholder action.
  The BatchedEnv auto-resets: the TimeStep of the last step already holds the next episode's
  observations. PettingZoo users expect the last observation of the episode that ended, so
  the wrapper returns the pre-reset one (info["final_obs"], likewise the action masks and
  `state()`); the auto-reset episode is discarded, because the next `reset()` calls
  `env.reset(seed)` (seed given: replay from episode 0) or `env.reset()` (a new episode).
- Seeding: reset(seed=s) seeds the env and also every agent's action and observation space
  (with s + the agent's index), so two wrappers reset with the same seed sample the same.
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np
import torch
from pettingzoo import ParallelEnv

from vimarl.envs.base import BatchedEnv, Box, GroupSpec, TimeStep
from vimarl.envs.registry import make_env
from vimarl.errors import VimarlError


def _action_space(spec: GroupSpec) -> gymnasium.spaces.Space:
    space = spec.action_space
    if isinstance(space, Box):
        return gymnasium.spaces.Box(space.low, space.high, (space.dim,), np.float32)
    return gymnasium.spaces.Discrete(space.n)


def _unbounded_box(dim: int) -> gymnasium.spaces.Box:
    return gymnasium.spaces.Box(-np.inf, np.inf, (dim,), np.float32)


class PettingZooParallelEnv(ParallelEnv):
    """A BatchedEnv with one sub-environment, seen as a PettingZoo ParallelEnv.

    See the module docstring for the mapping. `env` is the wrapped BatchedEnv.
    """

    def __init__(self, env: BatchedEnv, render_mode: str | None = None):
        if env.num_envs != 1:
            raise VimarlError(f"a PettingZoo env wraps exactly one sub-environment, but this "
                              f"{type(env).__name__} has num_envs={env.num_envs}; make it with num_envs=1")
        if render_mode not in (None, "rgb_array"):
            raise VimarlError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.env = env
        self.render_mode = render_mode
        self.metadata = {"name": getattr(env, "name", type(env).__name__),
                         "render_modes": ["rgb_array"], "is_parallelizable": True}
        # The agent names of each group that takes actions from outside, in agent order.
        self.agent_groups = {name: [f"{name}_{i}" for i in range(spec.n_agents)]
                             for name, spec in env.learned_groups().items()}
        self.possible_agents = [agent for names in self.agent_groups.values() for agent in names]
        self.agents: list[str] = []
        # One space object per agent, created once: PettingZoo requires the same object on
        # every call, so that seeding it takes effect.
        self._observation_spaces = {agent: _unbounded_box(env.groups[group].obs_dim)
                                    for group, names in self.agent_groups.items() for agent in names}
        self._action_spaces = {agent: _action_space(env.groups[group])
                               for group, names in self.agent_groups.items() for agent in names}
        if env.state_dim > 0:
            self.state_space = _unbounded_box(env.state_dim)
        self._state: np.ndarray | None = None
        self._started = False

    def observation_space(self, agent: str) -> gymnasium.spaces.Box:
        return self._observation_spaces[agent]

    def action_space(self, agent: str) -> gymnasium.spaces.Space:
        return self._action_spaces[agent]

    def reset(self, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
        """Start an episode; `options` is accepted for the API and ignored."""
        if seed is not None:
            for index, agent in enumerate(self.possible_agents):
                self._action_spaces[agent].seed(seed + index)
                self._observation_spaces[agent].seed(seed + index)
        observations, infos, alive = self._read(self.env.reset(seed))
        self.agents = [agent for agent in self.possible_agents if agent in alive]
        self._started = True
        return observations, infos

    def step(self, actions: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, float],
                                                    dict[str, bool], dict[str, bool], dict[str, dict]]:
        if not self._started:
            raise VimarlError("call reset() before step()")
        if not self.agents:
            # PettingZoo's own envs return empty dicts when stepped with no live agents.
            if actions:
                raise VimarlError(f"the episode has ended, so actions for {sorted(actions)} cannot be "
                                  f"applied; call reset() to start a new one")
            return {}, {}, {}, {}, {}
        missing = [agent for agent in self.agents if agent not in actions]
        if missing:
            raise VimarlError(f"step() needs an action for every agent in env.agents; missing: {missing}")
        extra = sorted(set(actions) - set(self.agents))
        if extra:
            raise VimarlError(f"step() got actions for {extra}, which are not in env.agents {self.agents} "
                              f"(unknown names, or agents that left the episode)")
        timestep = self.env.step({group: self._group_action(group, names, actions)
                                  for group, names in self.agent_groups.items()})
        # On auto-reset the TimeStep holds the next episode; final_view is the step that ended.
        final = timestep.final_view()
        observations, infos, alive = self._read(final)
        rewards = {}
        for group, names in self.agent_groups.items():
            rewards.update(zip(names, final.groups[group].reward[0].tolist()))
        terminated, truncated = bool(timestep.terminated[0]), bool(timestep.truncated[0])
        # PettingZoo reports only the agents that were live before this step; one that left the
        # episode during it (GroupSpec.can_leave) is terminated on its own.
        live = self.agents
        terminations = {agent: terminated or agent not in alive for agent in live}
        truncations = {agent: truncated and agent in alive for agent in live}
        self.agents = [] if terminated or truncated else [agent for agent in live if agent in alive]
        return ({agent: observations[agent] for agent in live}, {agent: rewards[agent] for agent in live},
                terminations, truncations, {agent: infos[agent] for agent in live})

    def _group_action(self, group: str, names: list[str], actions: dict[str, Any]) -> torch.Tensor:
        """The [1, N] int64 or [1, N, dim] float32 action tensor of one group.

        Agents that left the episode have no action; the env ignores their slot, which gets a
        valid placeholder (0, or the point of the box nearest 0).
        """
        space = self.env.groups[group].action_space
        continuous = isinstance(space, Box)
        expected = (len(names), space.dim) if continuous else (len(names),)
        placeholder = np.clip(np.zeros(space.dim), space.low, space.high) if continuous else 0
        try:
            stacked = np.asarray([actions.get(agent, placeholder) for agent in names],
                                 dtype=np.float32 if continuous else np.int64)
        except (TypeError, ValueError):  # ragged or non-numeric actions
            stacked = None
        if stacked is None or stacked.shape != expected:
            raise VimarlError(f"each action of group '{group}' must be a number array of shape "
                              f"{expected[1:]}; got {[np.shape(actions[a]) for a in names if a in actions]}")
        # Out-of-range indices would otherwise fail deep inside the env, or wrap silently.
        if not continuous and ((stacked < 0) | (stacked >= space.n)).any():
            bad = {agent: int(a) for agent, a in zip(names, stacked) if not 0 <= a < space.n}
            raise VimarlError(f"discrete actions must be in 0..{space.n - 1}; got {bad}")
        return torch.as_tensor(stacked, device=self.env.device).unsqueeze(0)

    def _read(self, timestep: TimeStep) -> tuple[dict[str, np.ndarray], dict[str, dict], set[str]]:
        """Sub-environment 0's per-agent float32 observations, infos (action masks), and the
        agents still in the episode; also keeps the global state for `state()`.

        Copies, so that the arrays handed out never alias tensors the env updates in place.
        """
        observations: dict[str, np.ndarray] = {}
        infos: dict[str, dict] = {}
        alive: set[str] = set()
        for group, names in self.agent_groups.items():
            step = timestep.groups[group]
            obs = step.obs[0].detach().cpu().numpy().astype(np.float32, copy=True)
            observations.update(zip(names, obs))
            masks = (step.action_mask[0].detach().cpu().numpy().astype(np.int8)
                     if step.action_mask is not None else None)
            for index, agent in enumerate(names):
                infos[agent] = {} if masks is None else {"action_mask": masks[index]}
            in_episode = step.alive[0].tolist() if step.alive is not None else [True] * len(names)
            alive.update(agent for agent, present in zip(names, in_episode) if present)
        if timestep.state is not None:
            self._state = timestep.state[0].detach().cpu().numpy().astype(np.float32, copy=True)
        return observations, infos, alive

    def state(self) -> np.ndarray:
        """The global state [state_dim] at the last returned observations (pre-reset at the end)."""
        if self.env.state_dim == 0:
            return super().state()
        if self._state is None:
            raise VimarlError("call reset() before state()")
        return self._state.copy()

    def render(self) -> np.ndarray | None:
        """An RGB image (H, W, 3) uint8 when render_mode is 'rgb_array', else None.

        After the last step of an episode the env has already auto-reset, so a scenario that draws
        its current positions shows the next episode's start rather than the final frame.
        """
        if self.render_mode is None:
            gymnasium.logger.warn("render() called with render_mode=None; "
                                  "make the env with render_mode='rgb_array'")
            return None
        return self.env.render()


def to_pettingzoo(name_or_env: str | BatchedEnv, seed: int = 0, render_mode: str | None = None,
                  **env_kwargs: Any) -> PettingZooParallelEnv:
    """A PettingZoo ParallelEnv of a registered env name, or of an existing one-copy BatchedEnv.

    With a name, `seed` and `env_kwargs` (fields of the env's Config) go to make_env. An
    existing env keeps its own seed and config; reset(seed=...) reseeds either.
    """
    if isinstance(name_or_env, str):
        env = make_env(name_or_env, num_envs=1, seed=seed, **env_kwargs)
    elif isinstance(name_or_env, BatchedEnv):
        if env_kwargs:
            raise VimarlError(f"config values {sorted(env_kwargs)} apply only when to_pettingzoo gets "
                              f"an env name; this env is already built")
        env = name_or_env
    else:
        raise VimarlError(f"to_pettingzoo needs an env name or a BatchedEnv, got {type(name_or_env).__name__}")
    return PettingZooParallelEnv(env, render_mode=render_mode)
