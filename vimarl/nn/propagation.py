"""Neural mean-field inference over the agent graph (VPP, paper 000, Sec. 4.4 and App. C.1).

The fixed point of the mean-field update (Eq. 3) is unrolled as M rounds of message passing on
policy embeddings mu_i (Eq. 6), with state messages for partial observability (Sec. 4.5).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vimarl.envs.graph import Graph
from vimarl.nn.graph_ops import NeighborAttention, neighbor_sum


class StatePropagation(nn.Module):
    """s_i^m = relu(W_1 s_i^{m-1} + W_2 sum_{j in N_i} s_j^{m-1}), m = 1..M; s_i^0 = o_i.

    Returns every round's states [s^0, ..., s^M] (s^0 is the observation itself) because the
    policy's round m reads s^{m-1}.
    """

    def __init__(self, obs_dim: int, state_dim: int, rounds: int):
        super().__init__()
        dims = [obs_dim] + [state_dim] * rounds
        self.own = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.neighbors = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims, dims[1:]))
        self.out_dim = dims[-1]

    def forward(self, obs: Tensor, graph: Graph) -> list[Tensor]:
        states = [obs]
        for own, neighbors in zip(self.own, self.neighbors):
            s = states[-1]
            states.append(torch.relu(own(s) + neighbors(neighbor_sum(s, graph))))
        return states


class MeanFieldPropagation(nn.Module):
    """The mean-field inference layers of VPP App. C.1 (Fig. 6, left panel).

    mu_i^0 = relu(W_0 o_i) embeds psi_i (each agent's independent decision); then for m = 1..M
    mu_i^m = relu(W_s s_i^{m-1} + concat_l sum_{j in N_i} a^l_ij W_V^l mu_j^{m-1}) with the
    attention a^l_ij of `NeighborAttention`, and s^m from `StatePropagation`. With M = 0 the
    policy embedding is mu^0 alone: the independent policy of App. G.1. With `concat_hops` the
    output concatenates every round's embeddings [mu^0, ..., mu^M] (IP, 001 App. B.2).
    """

    def __init__(self, obs_dim: int, embed_dim: int, state_dim: int, heads: int, rounds: int,
                 attend_self: bool = True, concat_hops: bool = False):
        super().__init__()
        self.rounds, self.concat_hops = rounds, concat_hops
        self.encoder = nn.Linear(obs_dim, embed_dim)
        # Round m reads s^{m-1}, so states up to s^{M-1} are all the policy needs.
        self.states = StatePropagation(obs_dim, state_dim, max(rounds - 1, 0))
        self.state_in = nn.ModuleList(
            nn.Linear(obs_dim if m == 0 else state_dim, embed_dim) for m in range(rounds))
        self.attention = nn.ModuleList(
            NeighborAttention(embed_dim, embed_dim, heads, include_self=attend_self) for _ in range(rounds))
        self.out_dim = embed_dim * (rounds + 1 if concat_hops else 1)

    def forward(self, obs: Tensor, graph: Graph) -> Tensor:
        """The policy embeddings mu^M [B, N, embed_dim], or [mu^0, ..., mu^M] concatenated."""
        embeddings = [torch.relu(self.encoder(obs))]
        if self.rounds:
            states = self.states(obs, graph)
            for m in range(self.rounds):
                embeddings.append(torch.relu(self.state_in[m](states[m])
                                             + self.attention[m](embeddings[-1], graph)))
        return torch.cat(embeddings, dim=-1) if self.concat_hops else embeddings[-1]
