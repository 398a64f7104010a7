"""Per-agent critics over a variable neighbour set (VPP Eq. 8: V_i(s), Q_i(s, a_i, a_Ni)).

Under partial observability the critics read the propagated state s_i^M (000 Sec. 4.5) from
their own `StatePropagation`, separate from the policy's.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from vimarl.envs.graph import Graph
from vimarl.nn.graph_ops import neighbor_mean, neighbor_sum
from vimarl.nn.mlp import mlp
from vimarl.nn.propagation import StatePropagation


class StateValue(nn.Module):
    """V_i(s_i^M) for every agent: [B, N, obs_dim] -> [B, N]."""

    def __init__(self, obs_dim: int, state_dim: int, rounds: int, hidden: tuple[int, ...]):
        super().__init__()
        self.states = StatePropagation(obs_dim, state_dim, rounds)
        self.head = mlp(self.states.out_dim, hidden, 1)

    def forward(self, obs: Tensor, graph: Graph) -> Tensor:
        return self.head(self.states(obs, graph)[-1]).squeeze(-1)


class NeighborQ(nn.Module):
    """Q_i(s_i^M, a_i, a_Ni), permutation invariant in the neighbours (a DeepSets aggregation).

    Each neighbour's action is embedded by a shared MLP phi, the embeddings are summed (or
    averaged) over the masked neighbour slots, and an MLP reads [s_i^M, a_i, aggregate].
    A sum lets Q_i count neighbours, which local rewards like -sum_j (a_i - a_j)^2 need.
    """

    def __init__(self, obs_dim: int, action_dim: int, state_dim: int, rounds: int,
                 hidden: tuple[int, ...], aggregation: Literal["sum", "mean"] = "sum",
                 action_embed_dim: int = 32):
        super().__init__()
        self.states = StatePropagation(obs_dim, state_dim, rounds)
        self.neighbor_action = mlp(action_dim, (), action_embed_dim, output_activation=nn.ReLU)
        self.aggregate = neighbor_sum if aggregation == "sum" else neighbor_mean
        self.head = mlp(self.states.out_dim + action_dim + action_embed_dim, hidden, 1)

    def context(self, obs: Tensor, graph: Graph, neighbor_action: Tensor) -> tuple[Tensor, Tensor]:
        """What Q_i reads besides a_i: s_i^M [B, N, S] and the pooled neighbour actions [B, N, E]."""
        return self.states(obs, graph)[-1], self.aggregate(self.neighbor_action(neighbor_action), graph)

    def forward(self, obs: Tensor, action: Tensor, graph: Graph, neighbor_action: Tensor | None = None) -> Tensor:
        """obs [B, N, D], action [B, N, A] (one-hot or continuous) -> Q [B, N].

        `neighbor_action` (default: `action`) is what the neighbours' slots read, so a caller can
        stop gradients through the neighbours' actions while keeping the agent's own.
        """
        state, neighbors = self.context(obs, graph, action if neighbor_action is None else neighbor_action)
        return self.head(torch.cat([state, action, neighbors], dim=-1)).squeeze(-1)

    def all_actions(self, obs: Tensor, graph: Graph, neighbor_action: Tensor) -> Tensor:
        """Q_i(s, a, a_Ni) for every own discrete action a at once: [B, N, A].

        The neighbours' actions are the given ones [B, N, A]; the state and neighbour pooling
        are computed once and only the head runs A times.
        """
        state, neighbors = self.context(obs, graph, neighbor_action)
        batch, n, width = neighbor_action.shape
        own = torch.eye(width, dtype=state.dtype, device=state.device).expand(batch, n, width, width)
        state, neighbors = (x.unsqueeze(2).expand(-1, -1, width, -1) for x in (state, neighbors))
        return self.head(torch.cat([state, own, neighbors], dim=-1)).squeeze(-1)
