"""Per-agent critics over a variable neighbour set (VPP Eq. 8: V_i(s), Q_i(s, a_i, a_Ni)).

Under partial observability the critics read the propagated state s_i^M (000 Sec. 4.5) from
their own `StatePropagation`, separate from the policy's; with `read_obs` the heads also read
the agent's own observation o_i, which the propagated state only reaches through ReLU layers
over sums of raw neighbour observations.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from vimarl.envs.graph import Graph
from vimarl.nn.graph_ops import gather_neighbors, neighbor_mean, neighbor_sum
from vimarl.nn.mlp import mlp
from vimarl.nn.propagation import StatePropagation


class AgentState(nn.Module):
    """What a critic head reads about agent i: s_i^M, or [o_i, s_i^M] with `read_obs`."""

    def __init__(self, obs_dim: int, state_dim: int, rounds: int, read_obs: bool = False):
        super().__init__()
        self.states = StatePropagation(obs_dim, state_dim, rounds)
        self.read_obs = read_obs and rounds > 0  # with M = 0, s_i^0 is o_i already
        self.out_dim = self.states.out_dim + (obs_dim if self.read_obs else 0)

    def forward(self, obs: Tensor, graph: Graph) -> Tensor:
        state = self.states(obs, graph)[-1]
        return torch.cat([obs, state], dim=-1) if self.read_obs else state


class StateValue(nn.Module):
    """V_i(s_i^M) (or V_i(o_i, s_i^M)) for every agent: [B, N, obs_dim] -> [B, N]."""

    def __init__(self, obs_dim: int, state_dim: int, rounds: int, hidden: tuple[int, ...], read_obs: bool = False):
        super().__init__()
        self.agent_state = AgentState(obs_dim, state_dim, rounds, read_obs)
        self.head = mlp(self.agent_state.out_dim, hidden, 1)

    def forward(self, obs: Tensor, graph: Graph) -> Tensor:
        return self.head(self.agent_state(obs, graph)).squeeze(-1)


class NeighborQ(nn.Module):
    """Q_i(s_i^M, a_i, a_Ni), permutation invariant in the neighbours (a DeepSets aggregation).

    Each neighbour slot is embedded by a shared MLP phi, the embeddings are summed (or
    averaged) over the masked neighbour slots, and an MLP reads [s_i^M, a_i, aggregate]. What
    phi reads (`neighbor_input`):
    - "action": the neighbour's action a_j alone, a histogram of the neighbours' actions that
      cannot tell which neighbour moves towards agent i;
    - "pair": one edge layer over [o_i, o_j - o_i, a_j], so the action is read with where the
      neighbour is and how it moves relative to agent i.
    A sum lets Q_i count neighbours, which local rewards like -sum_j (a_i - a_j)^2 need.
    """

    def __init__(self, obs_dim: int, action_dim: int, state_dim: int, rounds: int,
                 hidden: tuple[int, ...], aggregation: Literal["sum", "mean"] = "sum",
                 action_embed_dim: int = 32, neighbor_input: Literal["action", "pair"] = "action",
                 read_obs: bool = False):
        super().__init__()
        self.agent_state = AgentState(obs_dim, state_dim, rounds, read_obs)
        self.pairs, self.mean = neighbor_input == "pair", aggregation == "mean"
        self.neighbor_embed = (mlp(2 * obs_dim + action_dim, hidden[:1], action_embed_dim, output_activation=nn.ReLU)
                               if self.pairs else mlp(action_dim, (), action_embed_dim, output_activation=nn.ReLU))
        self.head = mlp(self.agent_state.out_dim + action_dim + action_embed_dim, hidden, 1)

    def edges(self, obs: Tensor, graph: Graph) -> Tensor:
        """[o_i, o_j - o_i] for every neighbour slot: [B, N, K, 2 D]."""
        own = obs.unsqueeze(2).expand(-1, -1, graph.k, -1)
        return torch.cat([own, gather_neighbors(obs, graph) - own], dim=-1)

    def pool(self, slots: Tensor, graph: Graph) -> Tensor:
        """Sum (or mean) of slot embeddings [B, N, K, ..., E] over the real neighbours."""
        mask = graph.mask.view(*graph.mask.shape, *([1] * (slots.dim() - 3))).to(slots.dtype)
        pooled = (slots * mask).sum(2)
        if self.mean:
            degree = graph.degree().clamp(min=1).to(slots.dtype)
            pooled = pooled / degree.view(*degree.shape, *([1] * (pooled.dim() - 2)))
        return pooled

    def context(self, obs: Tensor, graph: Graph, neighbor_action: Tensor) -> tuple[Tensor, Tensor]:
        """What Q_i reads besides a_i: its own features [B, N, S] and the pooled neighbours [B, N, E]."""
        if self.pairs:
            slots = self.neighbor_embed(torch.cat([self.edges(obs, graph), gather_neighbors(neighbor_action, graph)], -1))
            pooled = self.pool(slots, graph)
        else:  # phi(a_j) does not depend on i: embed once per agent, pool without the [B, N, K, E] tensor
            aggregate = neighbor_mean if self.mean else neighbor_sum
            pooled = aggregate(self.neighbor_embed(neighbor_action), graph)
        return self.agent_state(obs, graph), pooled

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

    def neighbor_all_actions(self, obs: Tensor, action: Tensor, graph: Graph) -> Tensor:
        """Q_i(s, a_i, a_Ni) with neighbour slot k's action replaced by each discrete action a and
        the other slots kept: [B, N, K, A]. The actions [B, N, A] are one-hot; padding slots
        return Q_i unchanged. Costs K A head evaluations per agent (the pooled sum is corrected
        slot by slot, not recomputed)."""
        batch, n, width = action.shape
        candidates = torch.eye(width, dtype=obs.dtype, device=obs.device)
        mask = graph.mask.unsqueeze(-1).to(obs.dtype)  # [B, N, K, 1]
        if self.pairs:
            edges = self.edges(obs, graph)
            slots = self.neighbor_embed(torch.cat([edges, gather_neighbors(action, graph)], -1)) * mask
            replaced = self.neighbor_embed(torch.cat([edges.unsqueeze(3).expand(-1, -1, -1, width, -1),
                                                      candidates.expand(batch, n, graph.k, width, width)], -1))
        else:
            slots = gather_neighbors(self.neighbor_embed(action), graph) * mask
            replaced = self.neighbor_embed(candidates).expand(batch, n, graph.k, width, -1)
        summed = slots.sum(2, keepdim=True).unsqueeze(3)  # [B, N, 1, 1, E]
        pooled = summed - slots.unsqueeze(3) + replaced * mask.unsqueeze(-1)  # [B, N, K, A, E]
        if self.mean:
            pooled = pooled / graph.degree().clamp(min=1).to(obs.dtype).view(batch, n, 1, 1, 1)
        own = torch.cat([self.agent_state(obs, graph), action], -1).view(batch, n, 1, 1, -1)
        return self.head(torch.cat([own.expand(-1, -1, graph.k, width, -1), pooled], -1)).squeeze(-1)
