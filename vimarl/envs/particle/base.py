"""The shared part of every particle scenario: actions -> physics -> rewards, observations,
k-nearest-neighbour agent graphs, resets from counter-based randomness, and rendering.

A scenario subclasses ParticleEnv and implements `make_world`, `reset_entities`, `rewards` and
`observations`; everything else (auto-reset, graphs, global state, checkpoints) is here.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from vimarl.envs import rng
from vimarl.envs.base import BatchedEnv, Box, Discrete, GroupSpec, GroupStep, TimeStep
from vimarl.envs.graph import (
    DynamicGraph,
    Graph,
    complete_graph,
    counter_random_k_graph,
    knn_graph,
)
from vimarl.envs.particle.world import World, decode_actions


@dataclass
class ParticleConfig:
    """Settings every particle scenario has."""

    action_mode: Literal["discrete", "continuous"] = "discrete"
    """discrete: 5 actions (no-op, -x, +x, -y, +y); continuous: a 5-vector in [0, 1] (mpe2 layout)."""
    episode_length: int = 25
    """Steps per episode (25 in every MPE experiment of the papers)."""
    graph: Literal["knn", "random_k", "complete"] = "knn"
    """The agent graph of each group. knn: each agent's graph_k nearest agents of its group,
    rebuilt from positions every graph_every steps (the papers' graph). random_k: graph_k
    distinct other agents of the group drawn uniformly, redrawn at each episode start and every
    graph_every steps, from counter-based randomness keyed on (seed, sub-environment, episode,
    group, step of the draw), so reset(seed) replays the same graphs whatever num_envs (the
    papers' random-graph ablation). complete: every other agent of the group, K = N - 1, fixed;
    messages and memory then grow as O(N^2) per sub-environment, as does random_k's draw."""
    graph_k: int = 0
    """Neighbours per agent for graph=knn and graph=random_k, at most N - 1; 0 = the papers' rule
    (8 if N > 30, else 4). graph=complete ignores it."""
    graph_every: int = 5
    """Rebuild the knn graph, or redraw the random_k graph, every this many steps of an episode
    (the papers use 5 and ablate 1 and 10); graph=complete ignores it."""
    integration: Literal["mpe2", "mpe"] = "mpe2"
    """Order of the position and velocity updates: mpe2's, or the original MPE's."""


def default_k(n_agents: int) -> int:
    return 8 if n_agents > 30 else 4


GRAPH_STREAM = 0x67726170
"""Counter that keeps the random_k graph draws apart from every reset draw."""


class StaticGraph:
    """The same graph at every step, with DynamicGraph's `update` interface."""

    def __init__(self, graph: Graph):
        self.graph = graph

    def update(self, positions: Tensor, episode_step: Tensor) -> Graph:
        return self.graph


@dataclass
class AgentGroup:
    """Agents [start, stop) of the world form one group."""

    name: str
    start: int
    stop: int
    obs_dim: int
    role: Literal["learned", "scripted", "frozen"] = "learned"
    action_space: Discrete | Box | None = None
    """Defaults to the movement action space of the config's action_mode."""

    @property
    def n_agents(self) -> int:
        return self.stop - self.start


class ParticleEnv(BatchedEnv):
    """Base class of the particle scenarios."""

    state_fields = ("position", "velocity")
    action_convention: Literal["mpe2", "mpe"] = "mpe2"
    """How a 5-way action maps to a force direction (see world.ACTION_TO_FORCE)."""

    def __init__(self, config: ParticleConfig, num_envs: int, seed: int = 0, device="cpu"):
        super().__init__(config, num_envs, seed, device)
        self.max_steps = config.episode_length
        self.world = self.make_world()
        self.agent_groups = self.make_groups()
        movement = Discrete(5) if config.action_mode == "discrete" else Box(0.0, 1.0, 5)
        self.groups, self.graphs = {}, {}
        for index, group in enumerate(self.agent_groups):
            self.graphs[group.name] = self.make_graph(index, group)
            self.groups[group.name] = GroupSpec(group.n_agents, group.obs_dim, group.action_space or movement,
                                                role=group.role, graph_k=self.graph_k(group),
                                                static_graph=self.config.graph == "complete")
        self.state_dim = self.world.position.shape[1] * 2 + self.world.n_agents * 2

    # -- agent graphs ----------------------------------------------------------------------------
    def graph_k(self, group: AgentGroup) -> int:
        """Neighbour slots K of a group's graph under the config's `graph` option."""
        n = group.n_agents
        if self.config.graph == "complete":
            return max(n - 1, 1)
        return min(self.config.graph_k or default_k(n), max(n - 1, 1))

    def make_graph(self, index: int, group: AgentGroup) -> DynamicGraph | StaticGraph:
        """The graph source of the `index`-th group: `update(positions, episode_step)` gives the
        graph after each reset and step."""
        kind, k, every = self.config.graph, self.graph_k(group), self.config.graph_every
        if kind == "complete":
            return StaticGraph(complete_graph(group.n_agents, self.num_envs, device=self.device))
        if kind == "knn":
            return DynamicGraph(lambda positions: knn_graph(positions, k), every)
        if kind == "random_k":
            def draw(positions: Tensor) -> Graph:
                # Every sub-environment's graph is the one drawn at its latest refresh step, so
                # the build is right for the environments that are not due as well.
                refresh_step = self.episode_step - self.episode_step % every
                return counter_random_k_graph(group.n_agents, k, self.seed, self.env_ids, self.episode_index,
                                              GRAPH_STREAM, index, refresh_step)
            return DynamicGraph(draw, every)
        raise ValueError(f"graph must be knn, random_k or complete, got {self.config.graph!r}")

    def state_dict(self) -> dict:
        """The base state plus each group's current graph, which between two refreshes depends
        on past positions (knn) and is not rebuilt from the restored state alone."""
        state = super().state_dict()
        state["graphs"] = {name: {"neighbors": source.graph.neighbors.clone(), "mask": source.graph.mask.clone()}
                           for name, source in self.graphs.items()
                           if isinstance(source, DynamicGraph) and source.graph is not None}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        saved = state.get("graphs", {})
        for name, source in self.graphs.items():
            if isinstance(source, DynamicGraph):
                graph = saved.get(name)
                # Without a saved graph (older checkpoints) the next update rebuilds it: exact for
                # random_k, from the restored positions for knn.
                source.graph = None if graph is None else Graph(graph["neighbors"].to(self.device, copy=True),
                                                                graph["mask"].to(self.device, copy=True))

    # -- what a scenario implements --------------------------------------------------------------
    @abstractmethod
    def make_world(self) -> World:
        """The physical world: agents first, then landmarks and other entities."""

    @abstractmethod
    def make_groups(self) -> list[AgentGroup]:
        """The agent groups, as consecutive ranges of the world's agents."""

    @abstractmethod
    def reset_entities(self, env_ids: Tensor, episode_ids: Tensor) -> Tensor:
        """Initial positions [len(env_ids), E, 2] of the selected sub-environments."""

    @abstractmethod
    def rewards(self) -> dict[str, Tensor]:
        """Rewards [B, N] by group for the current (post-step) state."""

    @abstractmethod
    def observations(self) -> dict[str, Tensor]:
        """Observations [B, N, D] by group."""

    def scripted_controls(self, group: AgentGroup) -> Tensor:
        """Unit controls [B, N, 2] of a scripted group."""
        raise TypeError(f"scenario {type(self).__name__} has no scripted group")

    # -- the BatchedEnv hooks --------------------------------------------------------------------
    def _reset_envs(self, env_mask: Tensor) -> None:
        env_ids = self.env_ids[env_mask]
        self.world.position[env_mask] = self.reset_entities(env_ids, self.episode_index[env_ids])
        self.world.velocity[env_mask] = 0.0

    def _step(self, actions: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        controls = [self.scripted_controls(g) if g.role == "scripted"
                    else self.movement(g, actions[g.name]) for g in self.agent_groups]
        self.apply_actions(actions)
        self.world.step(self.world.action_force(torch.cat(controls, dim=1)))
        terminated = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        return self.rewards(), terminated

    def movement(self, group: AgentGroup, action: Tensor) -> Tensor:
        """Unit controls [B, N, 2] of a group from its actions (scenarios with extra action
        parts, e.g. messages, override this and `apply_actions`). Continuous actions are
        clipped to the action space first, as mpe2's wrapper does."""
        space = self.groups[group.name].action_space
        if isinstance(space, Box):
            action = action.clamp(space.low, space.high)
        return decode_actions(action, self.action_convention)

    def apply_actions(self, actions: dict[str, Tensor]) -> None:
        """Non-physical effects of actions (e.g. messages); none by default."""

    def _observe(self) -> tuple[dict[str, GroupStep], Tensor | None]:
        observations = self.observations()
        steps = {}
        for group in self.agent_groups:
            positions = self.world.position[:, group.start:group.stop]
            graph = self.graphs[group.name].update(positions, self.episode_step)
            steps[group.name] = GroupStep(obs=observations[group.name],
                                          reward=torch.zeros(self.num_envs, group.n_agents, device=self.device),
                                          graph=graph)
        return steps, self.global_state()

    def global_state(self) -> Tensor:
        """[B, 2E + 2A]: every entity's position and every agent's velocity."""
        world = self.world
        return torch.cat([world.position.flatten(1), world.velocity[:, : world.n_agents].flatten(1)], dim=1)

    # -- helpers for scenarios ---------------------------------------------------------------------
    def uniform(self, env_ids: Tensor, episode_ids: Tensor, shape: tuple[int, ...], low: float, high: float,
                stream: int = 0) -> Tensor:
        """Uniform draws for resets, keyed on (seed, env, episode, stream)."""
        unit = rng.uniform(self.seed, env_ids, episode_ids, stream, shape=shape)
        return low + (high - low) * unit

    @property
    def position(self) -> Tensor:
        return self.world.position

    @position.setter
    def position(self, value: Tensor) -> None:
        self.world.position = value

    @property
    def velocity(self) -> Tensor:
        return self.world.velocity

    @velocity.setter
    def velocity(self, value: Tensor) -> None:
        self.world.velocity = value

    # -- rendering -------------------------------------------------------------------------------
    colors: np.ndarray | None = None
    """[E, 3] uint8 colours; scenarios may set it, otherwise agents are blue and the rest grey."""

    camera: tuple[int, float] | None = None
    """(episode index, half-width) of sub-environment 0's camera; None until the first render of
    an episode (`reset` clears it)."""

    def reset(self, seed: int | None = None) -> TimeStep:
        self.camera = None  # a reset with a seed restarts the episode counters
        return super().reset(seed)

    def view_half_width(self, position: np.ndarray | None = None) -> float:
        """Half-width of sub-environment 0's square view, centred on the origin and fixed for an
        episode, so that a GIF does not rescale from frame to frame: 1.1 x the extent of the
        entities at the episode's first render (the spawn extent, at least 1), grown to 1.25 x the
        extent when an entity leaves the view (random play: one to three times an episode),
        never shrunk within the episode."""
        if position is None:
            position = self.world.position[0].cpu().numpy()
        extent = float(np.abs(position).max()) + float(self.world.size.max())
        episode = int(self.episode_index[0])
        if self.camera is None or self.camera[0] != episode:
            self.camera = (episode, 1.1 * max(1.0, extent))
        elif extent > self.camera[1]:
            self.camera = (episode, 1.25 * extent)
        return self.camera[1]

    def render(self, resolution: int = 400) -> np.ndarray:
        """Sub-environment 0 as an RGB image, in a view fixed for the episode (`view_half_width`)."""
        position = self.world.position[0].cpu().numpy()
        size = self.world.size.cpu().numpy()
        colors = self.colors if self.colors is not None else np.array(
            [[60, 90, 220]] * self.world.n_agents + [[120, 120, 120]] * (len(size) - self.world.n_agents))
        half = self.view_half_width(position)
        scale = resolution / (2 * half)
        image = np.full((resolution, resolution, 3), 255, dtype=np.uint8)
        ys, xs = np.mgrid[0:resolution, 0:resolution]
        order = list(range(self.world.n_agents, len(size))) + list(range(self.world.n_agents))
        for e in order:  # landmarks first, agents on top
            cx, cy = (position[e, 0] + half) * scale, (half - position[e, 1]) * scale
            radius = max(size[e] * scale, 1.5)
            x0, x1 = int(max(cx - radius, 0)), int(min(cx + radius + 1, resolution))
            y0, y1 = int(max(cy - radius, 0)), int(min(cy + radius + 1, resolution))
            if x0 >= x1 or y0 >= y1:
                continue
            inside = (xs[y0:y1, x0:x1] - cx) ** 2 + (ys[y0:y1, x0:x1] - cy) ** 2 <= radius ** 2
            image[y0:y1, x0:x1][inside] = colors[e]
        return image
