"""The n x n grid coordination game of VPP (paper 000), App. G.1, Fig. 7.

Agents sit on an n x n grid and each picks a_i in {0, 1}. The team reward is
-sum over grid edges (i, j) of (a_i - a_j)^2, so the optimum 0 needs every agent to agree,
and an agent that picks uniformly at random scores -(#edges)/2 on average (-6 for 3 x 3).
The state is a constant scalar, so it tells an agent nothing: only coordination helps.
Each edge's cost is split equally between its two ends; agent i's local reward is
r_i = -1/2 sum_{j in N_i} (a_i - a_j)^2, a function of (a_i, a_Ni) as VPP Eq. 1 requires,
and the local rewards sum to the team reward. Episodes last one step.

The rewards always follow the grid's edges. The `graph` option changes only the graph the
agents are given for message passing (VPP App. G ablates grid vs complete): the grid itself,
the complete graph, or graph_k random other agents per agent, drawn once per episode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from vimarl.envs.base import BatchedEnv, Discrete, GroupSpec, GroupStep
from vimarl.envs.graph import Graph, complete_graph, counter_random_k_graph, grid_graph


@dataclass
class GridCoordinationConfig:
    n: int = 3
    """Grid side; n * n agents (the paper uses 3)."""
    agent_ids: bool = False
    """Append a one-hot agent index to each observation (the paper's state is only the constant)."""
    graph: Literal["grid", "complete", "random_k"] = "grid"
    """The graph the agents see (VPP App. G's ablation): grid, the 4-neighbourhood (K = 4, the
    paper's); complete, every other agent (K = n^2 - 1); random_k, graph_k distinct other agents
    drawn uniformly at each episode, keyed on (seed, sub-environment, episode). Rewards always
    follow the grid's edges, whichever graph the agents see."""
    graph_k: int = 4
    """Neighbours per agent for graph=random_k (at most n^2 - 1); the other graphs ignore it."""

    def __post_init__(self):
        if self.n < 2:
            raise ValueError(f"n must be at least 2, got {self.n}")
        if self.graph not in ("grid", "complete", "random_k"):
            raise ValueError(f"graph must be grid, complete or random_k, got {self.graph!r}")
        if self.graph == "random_k" and not 1 <= self.graph_k <= self.n * self.n - 1:
            raise ValueError(f"graph_k must be in 1..{self.n * self.n - 1} for graph=random_k, "
                             f"got {self.graph_k}")


GRAPH_STREAM = 0x67726170
"""Counter that marks the random_k graph draws."""


class GridCoordination(BatchedEnv):
    Config = GridCoordinationConfig
    state_fields = ("last_action",)
    max_steps = 1
    state_dim = 1

    def __init__(self, config: GridCoordinationConfig, num_envs: int, seed: int = 0, device="cpu"):
        super().__init__(config, num_envs, seed, device)
        n_agents = config.n * config.n
        # The game's grid, which defines the rewards; `graph` is what the agents see.
        self.reward_graph = grid_graph(config.n, config.n, num_envs, device=self.device)
        # The agents' graph when it is fixed; None for random_k, drawn per episode by `graph`.
        self.static_graph: Graph | None = None
        if config.graph == "grid":
            self.static_graph = self.reward_graph
        elif config.graph == "complete":
            self.static_graph = complete_graph(n_agents, num_envs, device=self.device)
        graph_k = config.graph_k if self.static_graph is None else self.static_graph.k
        obs_dim = 1 + (n_agents if config.agent_ids else 0)
        self.groups = {"agents": GroupSpec(n_agents=n_agents, obs_dim=obs_dim, action_space=Discrete(2),
                                           graph_k=graph_k, static_graph=self.static_graph is not None)}
        obs = torch.ones(num_envs, n_agents, 1, device=self.device)
        if config.agent_ids:
            ids = torch.eye(n_agents, device=self.device).expand(num_envs, -1, -1)
            obs = torch.cat([obs, ids], dim=-1)
        self.obs = obs
        # Shown by render(); kept across resets so the last frame of an episode shows its actions.
        self.last_action = torch.full((num_envs, n_agents), -1, dtype=torch.int64, device=self.device)

    def _reset_envs(self, env_mask: Tensor) -> None:
        """Nothing to reset: the state is constant."""

    def _step(self, actions: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        action = actions["agents"]
        self.last_action = action.clone()
        rewards = {"agents": self.local_rewards(action)}
        return rewards, torch.ones(self.num_envs, dtype=torch.bool, device=self.device)

    def local_rewards(self, action: Tensor) -> Tensor:
        """[B, N] r_i = -1/2 sum_{j in N_i} (a_i - a_j)^2, N_i agent i's grid neighbours."""
        grid = self.reward_graph
        neighbor_action = torch.gather(action, 1, grid.neighbors.flatten(1)).view_as(grid.neighbors)
        disagreement = (action.unsqueeze(-1) - neighbor_action).float().square() * grid.mask
        return -0.5 * disagreement.sum(-1)

    @property
    def graph(self) -> Graph:
        """The graph the agents see in the current episode of each sub-environment."""
        if self.static_graph is not None:
            return self.static_graph
        # A pure function of the counters: nothing to store in checkpoints, and reset(seed)
        # gives sub-environment i the same draws whatever num_envs.
        n_agents = self.groups["agents"].n_agents
        return counter_random_k_graph(n_agents, self.config.graph_k, self.seed, self.env_ids,
                                      self.episode_index, GRAPH_STREAM)

    def _observe(self) -> tuple[dict[str, GroupStep], Tensor | None]:
        zeros = torch.zeros(self.num_envs, self.groups["agents"].n_agents, device=self.device)
        step = GroupStep(obs=self.obs, reward=zeros, graph=self.graph)
        return {"agents": step}, torch.ones(self.num_envs, 1, device=self.device)

    def render(self) -> np.ndarray:
        """Sub-environment 0: cells coloured by action (grey before any), red bars on disagreement."""
        n, cell = self.config.n, 48
        colours = np.array([[70, 130, 220], [240, 150, 40], [170, 170, 170]], dtype=np.uint8)
        action = self.last_action[0].cpu().numpy().reshape(n, n)
        image = np.full((n * cell, n * cell, 3), 255, dtype=np.uint8)
        for r in range(n):
            for c in range(n):
                image[r * cell + 3:(r + 1) * cell - 3, c * cell + 3:(c + 1) * cell - 3] = colours[action[r, c]]
                if action[r, c] >= 0 and c + 1 < n and action[r, c] != action[r, c + 1]:
                    image[r * cell + 8:(r + 1) * cell - 8, (c + 1) * cell - 3:(c + 1) * cell + 3] = (220, 30, 30)
                if action[r, c] >= 0 and r + 1 < n and action[r, c] != action[r + 1, c]:
                    image[(r + 1) * cell - 3:(r + 1) * cell + 3, c * cell + 8:(c + 1) * cell - 8] = (220, 30, 30)
        return image
