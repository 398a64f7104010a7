"""Any PettingZoo ParallelEnv as a vimarl BatchedEnv: B copies, agents stacked by group.

Layout
- Groups: agents are grouped by their name without the trailing "_<index>" ("walker_0" ->
  "walker"), in `possible_agents` order; the agents of a group must share their observation
  and action spaces.
- Observations: `gymnasium.spaces.flatten` of each agent's observation as float32 [B, N, D]
  (Box: row-major; Discrete: one-hot; Dict: keys in sorted order; Tuple: in order). A Dict
  observation with "observation" and "action_mask" entries (PettingZoo's convention for masked
  actions) is split: the observation part is flattened and the mask becomes the group's action
  mask; `infos[agent]["action_mask"]` is read the same way.
- Actions: Discrete(n) -> [B, N] int64; a 1-D Box with the same bounds on every dimension ->
  [B, N, dim] float32. Other action spaces are refused with a one-line error.
- Agents that leave (terminated or truncated while others go on) keep their slot: observation
  and reward zero, `alive` False, no graph edges, and their actions are not passed on. An
  episode ends when no agent is left: terminated if any agent terminated, else truncated.
- Graph: the graph_k nearest agents of the same group when positions are known (a built-in
  reader for multiwalker, pursuit and mpe2, or `positions="module:function"`), else complete.
- Randomness: episode e of copy i is reset with seed `rng.integers(seed, i, e)`, so each copy
  replays the same episodes whatever B.
- Time limits: the environment's own truncation, plus `episode_length` when set; `max_steps`
  is episode_length, else the environment's `max_cycles` when it has one.
- Checkpoints keep the counters only: a foreign simulator's state cannot be saved, so loading a
  checkpoint starts new episodes.
- Copies run in this process (`num_workers=0`) or spread over worker processes, each stepping
  its share and sending back stacked arrays: one message per worker per step.
"""

from __future__ import annotations

import importlib
import inspect
import multiprocessing
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import gymnasium
import numpy as np
import torch
from torch import Tensor

from vimarl.envs import rng
from vimarl.envs.base import BatchedEnv, Box, Discrete, GroupSpec, GroupStep
from vimarl.envs.graph import Graph, complete_graph, knn_graph
from vimarl.errors import VimarlError


@dataclass
class PettingZooConfig:
    env: str = ""
    """The ParallelEnv factory as 'module:function', e.g. 'pettingzoo.sisl.multiwalker_v9:parallel_env'."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the factory, e.g. {n_walkers: 3}."""
    graph: Literal["auto", "knn", "complete"] = "auto"
    """knn: each agent's graph_k nearest agents of its group (needs positions); complete: every
    other agent of the group; auto: knn when positions are known, else complete."""
    graph_k: int = 4
    """Neighbours per agent for the knn graph (fewer agents in a group give padded slots)."""
    positions: str = ""
    """'module:function' mapping the raw environment (`env.unwrapped`) to {agent: (x, y)};
    empty uses the built-in reader of a known environment."""
    episode_length: int = 0
    """A time limit in steps on top of the environment's own; 0 keeps only the environment's."""
    num_workers: int = 0
    """Worker processes that step the B copies; 0 steps them in this process."""

    def __post_init__(self):
        if ":" not in self.env:
            raise ValueError(f"env must name a ParallelEnv factory as 'module:function', got {self.env!r} "
                             f"(e.g. env.env=pettingzoo.sisl.multiwalker_v9:parallel_env)")
        if self.graph not in ("auto", "knn", "complete"):
            raise ValueError(f"graph must be auto, knn or complete, got {self.graph!r}")
        if self.graph_k < 1:
            raise ValueError(f"graph_k must be at least 1, got {self.graph_k}")
        if self.episode_length < 0 or self.num_workers < 0:
            raise ValueError("episode_length and num_workers must be non-negative")


def _load(target: str, what: str) -> Callable:
    module_name, _, attribute = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except ImportError as error:
        raise VimarlError(f"{what} '{target}' cannot be imported ({error}); install the package that "
                          f"provides it (e.g. pip install 'vimarl[pettingzoo]')") from None
    except AttributeError:
        raise VimarlError(f"{what} '{target}': module {module_name} has no attribute {attribute!r}") from None


# -- positions of known environments ------------------------------------------------------------
def _multiwalker_positions(raw) -> dict[str, np.ndarray]:
    return {f"walker_{i}": np.array(walker.hull.position) for i, walker in enumerate(raw.env.walkers)
            if walker.hull is not None}  # a fallen walker's body is destroyed


def _pursuit_positions(raw) -> dict[str, np.ndarray]:
    layer = raw.env.pursuer_layer
    return {f"pursuer_{i}": layer.get_position(i).astype(np.float64) for i in range(layer.n_agents())}


def _mpe2_positions(raw) -> dict[str, np.ndarray]:
    return {agent.name: agent.state.p_pos for agent in raw.world.agents}


POSITION_READERS: dict[str, Callable[[Any], dict[str, np.ndarray]]] = {
    "pettingzoo.sisl.multiwalker": _multiwalker_positions,
    "pettingzoo.sisl.pursuit": _pursuit_positions,
    "mpe2.": _mpe2_positions,
}
"""Module prefix of the raw environment class -> function giving each agent's (x, y)."""


def position_reader(raw, target: str) -> Callable[[Any], dict[str, np.ndarray]] | None:
    if target:
        return _load(target, "positions")
    module = type(raw).__module__
    return next((reader for prefix, reader in POSITION_READERS.items() if module.startswith(prefix)), None)


# -- how agents map onto groups ------------------------------------------------------------------
def _is_masked_dict(space) -> bool:
    return isinstance(space, gymnasium.spaces.Dict) and {"observation", "action_mask"} <= set(space.spaces)


@dataclass
class GroupLayout:
    agents: list[str]
    observation_space: gymnasium.Space
    action_space: gymnasium.Space
    obs_dim: int
    has_action_mask: bool

    def flat_observation(self, observation) -> np.ndarray:
        if _is_masked_dict(self.observation_space):
            return gymnasium.spaces.flatten(self.observation_space["observation"], observation["observation"])
        if isinstance(self.observation_space, gymnasium.spaces.Box):
            return np.asarray(observation, dtype=np.float32).reshape(-1)
        return gymnasium.spaces.flatten(self.observation_space, observation)

    def vimarl_action_space(self, group: str) -> Discrete | Box:
        space = self.action_space
        if isinstance(space, gymnasium.spaces.Discrete):
            if space.start != 0:
                raise VimarlError(f"group '{group}': Discrete actions must start at 0, got start={space.start}")
            return Discrete(int(space.n))
        if isinstance(space, gymnasium.spaces.Box) and len(space.shape) == 1:
            low, high = np.unique(space.low), np.unique(space.high)
            if len(low) == 1 and len(high) == 1 and np.isfinite(low[0]) and np.isfinite(high[0]):
                return Box(float(low[0]), float(high[0]), int(space.shape[0]))
        raise VimarlError(f"group '{group}': action space {space} is not supported; vimarl takes Discrete(n) "
                          f"or a 1-D Box with one finite bound for all dimensions (wrap the env to rescale)")


def checked_observation(agent: str, group: GroupLayout, observation, env: str) -> np.ndarray:
    """The flat observation of `agent`, or a one-line VimarlError naming it when the wrapped env
    returned one of another size than its observation space's, or one with NaN / Inf."""
    flat = group.flat_observation(observation)
    if flat.shape != (group.obs_dim,):
        raise VimarlError(f"{env} returned an observation of {flat.size} values for agent {agent}, whose observation "
                          f"space has {group.obs_dim}")
    if not np.isfinite(flat).all():
        raise VimarlError(f"{env} returned a non-finite observation for agent {agent} (at index "
                          f"{int(np.flatnonzero(~np.isfinite(flat))[0])}); a wrapped env must return finite values")
    return flat


def group_name(agent: str) -> str:
    return re.sub(r"_\d+$", "", agent)


def agent_layout(env, infos: dict[str, dict]) -> dict[str, GroupLayout]:
    """Groups of `env.possible_agents` with identical spaces (`infos`: those of a reset)."""
    members: dict[str, list[str]] = {}
    for agent in env.possible_agents:
        members.setdefault(group_name(agent), []).append(agent)
    layout = {}
    for name, agents in members.items():
        observation_space, action_space = env.observation_space(agents[0]), env.action_space(agents[0])
        for agent in agents[1:]:
            if env.observation_space(agent) != observation_space or env.action_space(agent) != action_space:
                raise VimarlError(f"agents {agents[0]} and {agent} share the group '{name}' but not their "
                                  f"spaces; rename the agents so that each group has one observation and "
                                  f"action space")
        flat_space = observation_space["observation"] if _is_masked_dict(observation_space) else observation_space
        masked = _is_masked_dict(observation_space) or "action_mask" in infos.get(agents[0], {})
        layout[name] = GroupLayout(agents, observation_space, action_space,
                                   int(gymnasium.spaces.flatdim(flat_space)), masked)
    return layout


def _state_dim(env) -> int:
    try:
        return int(np.asarray(env.state()).size)
    except (NotImplementedError, AttributeError):
        return 0


# -- stepping the copies ------------------------------------------------------------------------
class Copies:
    """Some of the B copies, in this process; everything comes back as arrays stacked over copies."""

    def __init__(self, config: PettingZooConfig, count: int, render_first: bool):
        factory = _load(config.env, "env")
        self.name = config.env  # for messages
        parameters = inspect.signature(factory).parameters
        renders = "render_mode" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        self.envs = []
        for index in range(count):
            kwargs = dict(config.kwargs)
            if render_first and index == 0 and renders:  # only copy 0 is ever drawn
                kwargs["render_mode"] = "rgb_array"
            self.envs.append(factory(**kwargs))
        _, infos = self.envs[0].reset(seed=0)
        self.layout = agent_layout(self.envs[0], infos)
        self.state_dim = _state_dim(self.envs[0])
        raw = self.envs[0].unwrapped
        self.positions = position_reader(raw, config.positions)
        self.max_cycles = getattr(raw, "max_cycles", None) or getattr(getattr(raw, "env", None), "max_cycles", None)
        self.slots = {agent: (name, i) for name, group in self.layout.items() for i, agent in enumerate(group.agents)}
        self.arrays = {name: self._empty(group, count) for name, group in self.layout.items()}
        self.state = np.zeros((count, self.state_dim), np.float32)

    def _empty(self, group: GroupLayout, count: int) -> dict[str, np.ndarray]:
        n = len(group.agents)
        arrays = {"obs": np.zeros((count, n, group.obs_dim), np.float32),
                  "reward": np.zeros((count, n), np.float32),
                  "alive": np.zeros((count, n), bool),
                  "position": np.zeros((count, n, 2), np.float32)}
        if group.has_action_mask:
            arrays["action_mask"] = np.ones((count, n, int(group.action_space.n)), bool)
        return arrays

    def _record(self, copy: int, observations: dict, infos: dict, rewards: dict) -> None:
        """Write one copy's agents into the stacked arrays. An agent that left in this step still
        has its final observation; one that left earlier has none (zeros). `alive`: still in."""
        env = self.envs[copy]
        for arrays in self.arrays.values():
            arrays["obs"][copy] = 0.0
            arrays["reward"][copy] = 0.0
            arrays["alive"][copy] = False
        for agent, observation in observations.items():
            name, slot = self.slots[agent]
            arrays, group = self.arrays[name], self.layout[name]
            arrays["obs"][copy, slot] = checked_observation(agent, group, observation, self.name)
            if group.has_action_mask:
                mask = observation["action_mask"] if _is_masked_dict(group.observation_space) \
                    else infos.get(agent, {}).get("action_mask")
                if mask is not None:
                    arrays["action_mask"][copy, slot] = np.asarray(mask, bool)
        for agent in env.agents:
            name, slot = self.slots[agent]
            self.arrays[name]["alive"][copy, slot] = True
        for agent, reward in rewards.items():
            name, slot = self.slots[agent]
            if not np.isfinite(reward):
                raise VimarlError(f"{self.name} returned reward {reward} for agent {agent}; a wrapped env "
                                  f"must return finite rewards")
            self.arrays[name]["reward"][copy, slot] = reward
        if self.positions is not None:
            for agent, position in self.positions(env.unwrapped).items():
                if agent in self.slots:
                    name, slot = self.slots[agent]
                    self.arrays[name]["position"][copy, slot] = np.asarray(position)[:2]
        if self.state_dim:
            try:
                self.state[copy] = np.asarray(env.state(), np.float32).reshape(-1)
            except Exception:
                # multiwalker cannot give a state once a walker has fallen, which ends its
                # episode: the last state stays, and a terminal transition never bootstraps from it.
                if env.agents:
                    raise

    def reset(self, copies: list[int], seeds: list[int]) -> dict:
        for copy, seed in zip(copies, seeds):
            observations, infos = self.envs[copy].reset(seed=seed)
            self._record(copy, observations, infos, {})
        return self.snapshot()

    def step(self, actions: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, dict]:
        count = len(self.envs)
        terminated, truncated = np.zeros(count, bool), np.zeros(count, bool)
        for copy, env in enumerate(self.envs):
            env_actions = {agent: actions[self.slots[agent][0]][copy, self.slots[agent][1]] for agent in env.agents}
            for agent, action in env_actions.items():
                space = env.action_space(agent)
                if not space.contains(np.asarray(action, dtype=space.dtype)):
                    raise VimarlError(f"action {np.asarray(action).tolist()} for agent {agent} is outside its action "
                                      f"space {space} of {self.name}")
            observations, rewards, terminations, truncations, infos = env.step(env_actions)
            self._record(copy, observations, infos, rewards)
            if not env.agents:
                terminated[copy] = any(terminations.values())
                truncated[copy] = not terminated[copy]
        return terminated, truncated, self.snapshot()

    def snapshot(self) -> dict:
        return {"groups": {name: {key: value.copy() for key, value in arrays.items()}
                           for name, arrays in self.arrays.items()},
                "state": self.state.copy()}

    def render(self) -> np.ndarray:
        return self.envs[0].render()

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _worker(connection, config: PettingZooConfig, count: int, render_first: bool) -> None:
    torch.set_num_threads(1)
    copies = Copies(config, count, render_first)
    while True:
        command, argument = connection.recv()
        if command == "close":
            copies.close()
            connection.close()
            return
        connection.send(getattr(copies, command)(*argument))


class WorkerPool:
    """The copies spread over worker processes, with the interface of `Copies`."""

    def __init__(self, config: PettingZooConfig, count: int, workers: int):
        workers = min(workers, count)
        self.shares = [len(part) for part in np.array_split(np.arange(count), workers)]
        self.offsets = np.cumsum([0, *self.shares])
        context = multiprocessing.get_context("spawn")  # fork is unsafe after torch's threads start
        self.connections, self.processes = [], []
        for index, share in enumerate(self.shares):
            parent, child = context.Pipe()
            process = context.Process(target=_worker, args=(child, config, share, index == 0), daemon=True)
            process.start()
            self.connections.append(parent)
            self.processes.append(process)

    def _call(self, requests: dict[int, tuple]) -> list:
        for worker, (command, argument) in requests.items():
            self.connections[worker].send((command, argument))
        return [self.connections[worker].recv() for worker in requests]

    def reset(self, copies: list[int], seeds: list[int]) -> dict:
        requests = {}
        for worker in range(len(self.shares)):
            lo, hi = self.offsets[worker], self.offsets[worker + 1]
            local = [(c - lo, s) for c, s in zip(copies, seeds) if lo <= c < hi]
            requests[worker] = ("reset", ([c for c, _ in local], [s for _, s in local]))
        return _concatenate(self._call(requests))

    def step(self, actions: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, dict]:
        requests = {worker: ("step", ({name: value[self.offsets[worker]:self.offsets[worker + 1]]
                                       for name, value in actions.items()},))
                    for worker in range(len(self.shares))}
        replies = self._call(requests)
        return (np.concatenate([r[0] for r in replies]), np.concatenate([r[1] for r in replies]),
                _concatenate([r[2] for r in replies]))

    def render(self) -> np.ndarray:
        return self._call({0: ("render", ())})[0]

    def close(self) -> None:
        for connection, process in zip(self.connections, self.processes):
            if process.is_alive():
                connection.send(("close", ()))
                process.join(timeout=5)


def _concatenate(snapshots: list[dict]) -> dict:
    first = snapshots[0]
    return {"groups": {name: {key: np.concatenate([s["groups"][name][key] for s in snapshots])
                              for key in arrays} for name, arrays in first["groups"].items()},
            "state": np.concatenate([s["state"] for s in snapshots])}


# -- the BatchedEnv ------------------------------------------------------------------------------
class PettingZooEnv(BatchedEnv):
    """B copies of a PettingZoo ParallelEnv (see the module docstring for the layout)."""

    Config = PettingZooConfig

    def __init__(self, config: PettingZooConfig, num_envs: int, seed: int = 0, device="cpu"):
        super().__init__(config, num_envs, seed, device)
        # This process always holds copy 0's layout; the workers build theirs from the same factory.
        probe = Copies(config, 1, render_first=config.num_workers == 0)
        self.layout, self.state_dim = probe.layout, probe.state_dim
        if config.graph == "knn" and probe.positions is None:
            raise VimarlError(f"graph=knn needs agent positions, and none are known for {config.env}; "
                              f"give env.positions=module:function or use env.graph=complete")
        self.use_knn = probe.positions is not None and config.graph != "complete"
        if config.num_workers:
            probe.close()
            self.copies = WorkerPool(config, num_envs, config.num_workers)
        else:
            self.copies = probe if num_envs == 1 else Copies(config, num_envs, render_first=True)
            if self.copies is not probe:
                probe.close()
        self.groups = {}
        for name, group in self.layout.items():
            n = len(group.agents)
            # A lone agent gets one padding slot: graph-based algorithms then run on every group.
            graph_k = max(1, min(config.graph_k, n - 1) if self.use_knn else n - 1)
            self.groups[name] = GroupSpec(n_agents=n, obs_dim=group.obs_dim,
                                          action_space=group.vimarl_action_space(name), graph_k=graph_k,
                                          has_action_mask=group.has_action_mask, can_leave=True)
        # The environment truncates itself; max_steps only makes its limit known (PettingZoo's
        # max_cycles, read where the SISL and mpe2 envs keep it) when episode_length is unset.
        self.max_steps = config.episode_length or probe.max_cycles or torch.iinfo(torch.int64).max
        self.truncated_now: Tensor | None = None
        self.latest: dict | None = None

    def _reset_envs(self, env_mask: Tensor) -> None:
        copies = env_mask.nonzero().flatten()
        seeds = rng.integers(self.seed, self.env_ids[copies], self.episode_index[copies])
        self.latest = self.copies.reset(copies.tolist(), seeds.tolist())

    def _step(self, actions: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        arrays = {name: actions[name].detach().cpu().numpy() for name in self.groups}
        terminated, truncated, self.latest = self.copies.step(arrays)
        self.truncated_now = torch.from_numpy(truncated).to(self.device)
        rewards = {name: torch.from_numpy(self.latest["groups"][name]["reward"]).to(self.device)
                   for name in self.groups}
        return rewards, torch.from_numpy(terminated).to(self.device)

    def _truncated_by_env(self) -> Tensor | None:
        return self.truncated_now

    def _observe(self) -> tuple[dict[str, GroupStep], Tensor | None]:
        groups = {}
        for name, spec in self.groups.items():
            arrays = {key: torch.from_numpy(value).to(self.device) for key, value in self.latest["groups"][name].items()}
            alive = arrays["alive"]
            groups[name] = GroupStep(obs=arrays["obs"], reward=torch.zeros_like(arrays["reward"]),
                                     graph=self._graph(spec, arrays["position"], alive),
                                     action_mask=arrays.get("action_mask"), alive=alive)
        state = torch.from_numpy(self.latest["state"]).to(self.device) if self.state_dim else None
        return groups, state

    def _graph(self, spec: GroupSpec, position: Tensor, alive: Tensor) -> Graph:
        """The group's graph without agents that have left."""
        if self.use_knn or spec.n_agents == 1:
            graph = knn_graph(position, spec.graph_k)
        else:
            graph = complete_graph(spec.n_agents, self.num_envs, device=self.device)
        return graph.among(alive)

    def render(self) -> np.ndarray:
        image = self.copies.render()
        if image is None:
            raise VimarlError(f"{self.config.env} returned no image; it may not support render_mode='rgb_array'")
        return np.asarray(image, dtype=np.uint8)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Counters only: the simulator's own state cannot be restored, so episodes restart."""
        super().load_state_dict(state)
        self.episode_step.zero_()
        self._reset_envs(torch.ones(self.num_envs, dtype=torch.bool, device=self.device))

    def close(self) -> None:
        self.copies.close()

    def __del__(self):
        copies = getattr(self, "copies", None)
        if isinstance(copies, WorkerPool):
            copies.close()
