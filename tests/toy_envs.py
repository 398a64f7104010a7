"""Small environments used only by tests."""

from dataclasses import dataclass

import torch

from vimarl.envs.base import BatchedEnv, Box, GroupSpec, GroupStep
from vimarl.envs.graph import grid_graph
from vimarl.envs.registry import ENVIRONMENTS, register_env


@dataclass
class ContinuousConsensusConfig:
    n: int = 2
    """Grid side."""

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")


class ContinuousConsensus(BatchedEnv):
    """Agents on an n x n grid pick a in [-1, 1]; r_i = -1/2 sum_j (a_i - a_j)^2 - (a_i - 0.5)^2."""

    Config = ContinuousConsensusConfig
    max_steps = 1
    state_dim = 0

    def __init__(self, config, num_envs, seed=0, device="cpu"):
        super().__init__(config, num_envs, seed, device)
        self.graph = grid_graph(config.n, config.n, num_envs, device=self.device)
        n_agents = config.n * config.n
        self.groups = {"agents": GroupSpec(n_agents, 1, Box(-1.0, 1.0, 1), graph_k=self.graph.k)}

    def _reset_envs(self, env_mask):
        """Nothing to reset: the observation is constant."""

    def _step(self, actions):
        a = actions["agents"][..., 0]
        neighbors = torch.gather(a, 1, self.graph.neighbors.flatten(1)).view_as(self.graph.neighbors)
        disagreement = ((a.unsqueeze(-1) - neighbors).square() * self.graph.mask).sum(-1)
        reward = -0.5 * disagreement - (a - 0.5).square()
        return {"agents": reward}, torch.ones(self.num_envs, dtype=torch.bool, device=self.device)

    def _observe(self):
        n = self.groups["agents"].n_agents
        step = GroupStep(obs=torch.ones(self.num_envs, n, 1, device=self.device),
                         reward=torch.zeros(self.num_envs, n, device=self.device), graph=self.graph)
        return {"agents": step}, None


def register_test_envs():
    if "test_continuous_consensus" not in ENVIRONMENTS:
        register_env("test_continuous_consensus", f"{__name__}:ContinuousConsensus",
                     "test only: continuous consensus on a grid")
