"""Neural loopy belief propagation over the agent graph (VPP, paper 000, App. C.1 and C.2).

The Bethe free energy (000 App. C.2) adds edge beliefs q_ij to the node beliefs q_i of the
mean-field approximation; its fixed point is nu_ij <- T_1(s, {nu_ki}_{k in N_i \\ j}) on the
directed edges and mu_i <- T_2(s, {nu_ki}_{k in N_i}) on the nodes. This layer unrolls it for
M rounds with the parameterisation of 000 App. C.1 (Fig. 6, right panel). It is a drop-in
alternative to `vimarl.nn.propagation.MeanFieldPropagation`: same constructor shape, same
`forward(x, graph) -> [B, N, out_dim]`.

Messages. nu_ki is the message from k into i, one per real slot of i's neighbour list
(k = N_i[slot]); they are stored as `incoming [B, N, K, embed_dim]`, incoming[b, i, slot] =
nu_{N_i[slot] -> i}, zero on padding slots. So k sends to i exactly when k is in N_i: i
listens to the agents it lists.

    mu_i^0   = relu(W_0 x_i)                                       (embedding of psi_i)
    nu_ki^0  = relu(W_e [mu_k^0, mu_i^0])                          (embedding of psi_ki, sender first)
    nu_ki^m  = relu(W_s^m [s_k^{m-1}, s_i^{m-1}] + sum_{l in N_k \\ i} a^m_{k,l|i} nu_lk^{m-1}),  m = 1..M
    mu_i^m   = relu(W_3^m s_i^m + W_4^m sum_{k in N_i} nu_ki^m)

with states s^0 = x and s^m from `StatePropagation` (000 Sec. 4.5). The output is mu^M, or
with `concat_hops` the concatenation [mu^0, mu^1, ..., mu^M] (001 App. B.2 concatenates the
features of every layer). With M = 0 the output is mu^0 and the graph is not read.

Attention (000 App. C.1: "the attention a_ij now is over the corresponding edge"). Node k
attends over its incoming edges l in N_k with H heads; head h owns the h-th embed_dim / H
chunk of each message, and its weights multiply that chunk directly (no value projection,
as in the paper's formula). The key is W_K^m nu_lk^{m-1} (the edge). The query is
W_Q^m mu_k^0, the embedding of the receiving node's own psi_k: the paper does not say what
queries an edge, and mu^0 is the one node embedding every round has without computing an
extra readout per round. Logits are scaled by sqrt(embed_dim / H), as in `NeighborAttention`.

Excluding the reverse edge. The message k -> i must not use what i told k. When i is in N_k
the message nu_ik exists and is left out; kNN graphs are not symmetric, and when i is NOT in
N_k there is no reverse message (it is treated as zero) and all of N_k is used. Two rules for
the weights a_{k,l|i}:

- `renormalize=True` (default): a softmax over N_k \\ i, so nu_ki^m is a function of
  {nu_lk^{m-1}}_{l in N_k \\ i} only, exactly the fixed-point rule above (the test suite
  checks that perturbing nu_ik^0 leaves nu_ki^1 unchanged). A softmax over all of N_k with
  the reverse term dropped afterwards would still let nu_ik reach nu_ki through the
  normaliser.
- `renormalize=False`: the softmax over all of N_k, computed once per node, minus the reverse
  term: total_k - a_ki nu_ik. Cheaper to state, but nu_ki then depends on nu_ik through the
  weights of the other edges.

Both are computed from per-node sums, never per edge: with e_kl = exp(z_kl - c_k) (c_k the
largest logit of node k, per head), U_k = sum_l e_kl nu_lk and Z_k = sum_l e_kl, the message
that leaves out slot r is (U_k - e_kr nu_rk) / (Z_k - e_kr). For r not holding the largest
logit, Z_k - e_kr >= 1 (the largest term stays), so the subtraction's error stays at the
scale of ordinary rounding (about K * eps * max |nu|). For
the slot holding the largest logit, the remaining terms can all be tiny, so that one case is
summed separately with the second largest logit as the shift. Each node thus gets K + 1
candidate aggregates (leave out slot r, or leave out nothing), and each edge gathers one.

The reverse slot of edge (i, slot) is found by gathering the sender's neighbour list and
comparing it with i: O(B * N * K * K), never an N x N matrix. Neighbour lists are assumed free
of duplicates, as every builder in vimarl.envs.graph guarantees.

Padding slots carry nothing: their messages are zeroed, they get no attention and never match
as a reverse edge, so the index stored in them does not change any output.

Receptive field: with M >= 1 rounds, mu_i^M depends on the agents within M + 1 hops of i and
on no other (a hop goes from an agent to one it lists, i to k in N_i). nu^0 already mixes
sender and receiver, and each round reaches one edge further back: mu_i^M reads nu_ki^M,
which reads nu_lk^{M-1}, ..., down to nu^0 of an edge whose sender is M + 1 hops from i (the
states s^M reach only M hops). With M = 0, mu_i^0 reads x_i alone.

Cost per round: O(B * N * K * (K + embed_dim)) time and O(B * N * K * embed_dim) memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vimarl.envs.graph import Graph
from vimarl.nn.graph_ops import gather_neighbors
from vimarl.nn.propagation import StatePropagation


class LoopyBPPropagation(nn.Module):
    """Loopy belief propagation layers of VPP App. C.1 (Fig. 6, right panel); see the module
    docstring for the equations and the rules chosen where the paper is silent."""

    def __init__(self, in_dim: int, embed_dim: int, state_dim: int, heads: int, rounds: int,
                 concat_hops: bool = False, *, renormalize: bool = True):
        super().__init__()
        if embed_dim % heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by heads {heads}")
        if rounds < 0:
            raise ValueError(f"rounds must be non-negative, got {rounds}")
        self.rounds, self.heads, self.head_dim = rounds, heads, embed_dim // heads
        self.embed_dim, self.concat_hops, self.renormalize = embed_dim, concat_hops, renormalize
        self.encoder = nn.Linear(in_dim, embed_dim)  # W_0
        self.states = StatePropagation(in_dim, state_dim, rounds)
        state_dims = [in_dim] + [state_dim] * rounds  # dims of s^0 .. s^M
        # Parameters that nothing would read are not created, so every parameter gets a
        # gradient: with M = 0 there are no messages at all.
        self.edge_init = nn.Linear(2 * embed_dim, embed_dim) if rounds else None  # W_e
        self.edge_state = nn.ModuleList(  # W_s^m, read as [sender, receiver]
            nn.Linear(2 * state_dims[m], embed_dim) for m in range(rounds))
        self.query = nn.ModuleList(nn.Linear(embed_dim, embed_dim, bias=False) for _ in range(rounds))
        self.key = nn.ModuleList(nn.Linear(embed_dim, embed_dim, bias=False) for _ in range(rounds))
        # Node readouts (W_3^m, W_4^m), for m = 1..M with concat_hops, else for m = M only.
        self.readout_rounds = list(range(1, rounds + 1)) if concat_hops else [rounds] if rounds else []
        self.readout_state = nn.ModuleList(nn.Linear(state_dim, embed_dim) for _ in self.readout_rounds)
        self.readout_messages = nn.ModuleList(
            nn.Linear(embed_dim, embed_dim, bias=False) for _ in self.readout_rounds)
        self.out_dim = embed_dim * (rounds + 1) if concat_hops else embed_dim

    def forward(self, x: Tensor, graph: Graph) -> Tensor:
        """Node embeddings [B, N, out_dim]: mu^M, or [mu^0, ..., mu^M] with concat_hops."""
        return self._propagate(x, graph)[1]

    def messages(self, x: Tensor, graph: Graph, initial: Tensor | None = None) -> list[Tensor]:
        """The incoming messages of every round, [nu^0, nu^1, ..., nu^M], each [B, N, K, embed_dim]
        with [b, i, slot] = nu_{N_i[slot] -> i} (zero on padding slots); [] when M = 0.

        `initial` replaces nu^0 (same layout; its padding slots are zeroed), to probe how later
        messages depend on the initial ones.
        """
        return self._propagate(x, graph, initial)[0]

    # -----------------------------------------------------------------------------------

    def _propagate(self, x: Tensor, graph: Graph,
                   initial: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        node = torch.relu(self.encoder(x))  # mu^0
        if self.rounds == 0:
            return [], node
        mask = graph.mask.unsqueeze(-1).to(x.dtype)
        states = self.states(x, graph)
        if initial is None:
            incoming = torch.relu(self._edge_linear(self.edge_init, node, graph))
        else:
            incoming = initial
        incoming = incoming * mask
        history, outputs = [incoming], [node]
        reverse = self._reverse_index(graph)
        for m in range(self.rounds):
            aggregated = self._aggregate(m, incoming, node, graph, reverse)
            incoming = torch.relu(self._edge_linear(self.edge_state[m], states[m], graph) + aggregated)
            incoming = incoming * mask
            history.append(incoming)
            if m + 1 in self.readout_rounds:
                r = self.readout_rounds.index(m + 1)
                outputs.append(torch.relu(self.readout_state[r](states[m + 1])
                                          + self.readout_messages[r](incoming.sum(2))))
        out = torch.cat(outputs, dim=-1) if self.concat_hops else outputs[-1]
        return history, out

    @staticmethod
    def _edge_linear(linear: nn.Linear, h: Tensor, graph: Graph) -> Tensor:
        """W [h_k, h_i] + b for every slot (k = N_i[slot] sends to i): [B, N, K, out].

        The weight is split into its sender and receiver halves and applied per node before
        the gather, so no [B, N, K, 2 * F] concatenation is built.
        """
        dim = h.shape[-1]
        sender = F.linear(h, linear.weight[:, :dim])
        receiver = F.linear(h, linear.weight[:, dim:], linear.bias)
        return gather_neighbors(sender, graph) + receiver.unsqueeze(2)

    @staticmethod
    def _reverse_index(graph: Graph) -> Tensor:
        """[B, N, K] flat row, in a [B * N * (K + 1), ...] table of per-node aggregates, of the
        aggregate that edge (i, slot) reads: row (b, k, r) leaves out k's slot r, where
        N_k[r] == i is a real slot of k; row (b, k, K) leaves out nothing (i not in N_k)."""
        batch, n, k = graph.neighbors.shape
        agent = torch.arange(n, device=graph.neighbors.device).view(1, n, 1, 1)
        # [B, N, K, K]: the neighbour list of the sender in each slot, compared with i.
        matches = (gather_neighbors(graph.neighbors, graph) == agent) & gather_neighbors(graph.mask, graph)
        found = matches.any(-1)
        slot = torch.where(found, matches.to(torch.uint8).argmax(-1), k)
        sender = graph.neighbors + torch.arange(0, batch * n, n, device=slot.device).view(batch, 1, 1)
        return sender * (k + 1) + slot

    def _aggregate(self, m: int, incoming: Tensor, node: Tensor, graph: Graph,
                   reverse: Tensor) -> Tensor:
        """sum_{l in N_k \\ i} a_{k,l|i} nu_lk for every edge k -> i: [B, N, K, embed_dim]."""
        batch, n, k, _ = incoming.shape
        heads, head_dim = self.heads, self.head_dim
        mask = graph.mask.unsqueeze(-1)  # [B, N, K, 1], broadcast over heads
        values = incoming.view(batch, n, k, heads, head_dim)
        query = self.query[m](node).view(batch, n, 1, heads, head_dim)
        keys = self.key[m](incoming).view(batch, n, k, heads, head_dim)
        logits = (query * keys).sum(-1) / math.sqrt(head_dim)  # [B, N, K, H], z_kl
        # Shifts are detached: softmax does not depend on them, and they only keep exp in range.
        shift = _masked_max(logits.detach(), mask)
        weights = _masked_exp(logits, shift, mask)  # e_kl
        totals = (weights.unsqueeze(-1) * values).sum(2, keepdim=True)  # U_k [B, N, 1, H, D]
        norms = weights.sum(2, keepdim=True)  # Z_k [B, N, 1, H]
        dropped = weights.unsqueeze(-1) * values  # e_kr nu_rk
        if self.renormalize:
            # Leaving out the slot of the largest logit: the rest, summed around their own
            # largest logit, so that their sum cannot underflow.
            largest = logits.detach().masked_fill(~mask, -math.inf).argmax(2, keepdim=True)
            top = torch.zeros_like(logits, dtype=torch.bool).scatter(2, largest, True)
            rest = mask & ~top
            rest_weights = _masked_exp(logits, _masked_max(logits.detach(), rest), rest)
            rest_total = (rest_weights.unsqueeze(-1) * values).sum(2, keepdim=True)
            rest_norm = rest_weights.sum(2, keepdim=True)
            # Elsewhere Z_k - e_kr >= 1; the other branch's denominators are made safe too, as
            # torch.where still backpropagates through them.
            left_out = torch.where(
                top.unsqueeze(-1),
                rest_total / _safe(rest_norm).unsqueeze(-1),
                (totals - dropped) / torch.where(top | ~mask, 1.0, norms - weights).unsqueeze(-1))
            everything = totals / _safe(norms).unsqueeze(-1)
        else:
            norms = _safe(norms).unsqueeze(-1)
            left_out = (totals - dropped) / norms
            everything = totals / norms
        table = torch.cat([left_out, everything], dim=2)  # [B, N, K + 1, H, D]
        return table.reshape(batch * n * (k + 1), -1)[reverse]


def _masked_max(logits: Tensor, mask: Tensor) -> Tensor:
    """Largest logit over the slots where `mask` [B, N, K, H] holds, keepdim; 0 where none."""
    largest = logits.masked_fill(~mask, -math.inf).amax(2, keepdim=True)
    return torch.where(torch.isfinite(largest), largest, 0.0)


def _masked_exp(logits: Tensor, shift: Tensor, mask: Tensor) -> Tensor:
    """exp(logits - shift) where `mask` holds, exactly 0 elsewhere (with a finite gradient)."""
    return torch.exp(torch.where(mask, logits - shift, 0.0)) * mask


def _safe(norm: Tensor) -> Tensor:
    """A normaliser with empty sums (0) replaced by 1: their numerators are 0 too."""
    return torch.where(norm > 0, norm, 1.0)
