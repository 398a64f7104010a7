"""DGN: graph convolutional reinforcement learning (Jiang, Dun, Huang, Lu; ICLR 2020), ALGO_SPECS §5.2.

Agents are nodes of the environment's agent graph; agent i's neighbourhood is itself plus its
graph neighbours N_i (the [B, N, K] neighbour lists, padding masked). One network shared by all
agents computes, as in `PKU-AI-Edge/DGN` (Battle/Jungle):

    h_i^0 = Encoder(o_i)                                   MLP 512 -> 128, ReLU
    relation kernel (per layer l = 1, 2, per head m = 1..M):
      alpha_ij^m = softmax_{j in {i} u N_i}( (W_Q^m h_i) . (W_K^m h_j) / sqrt(d) )     (DGN Eq. 1)
      h_i^{l}    = ReLU(W_O [ sum_j alpha_ij^m W_V^m h_j^{l-1} ]_{m=1..M})             (DGN Eq. 2)
      with ReLU(Dense) projections W_Q, W_K, W_V, as the reference code has
    Q(O_i, .) = Linear([h_i^0, h_i^1, h_i^2])              the "dense" concatenation of receptive fields

The second layer attends over the first layer's outputs of the neighbours, so Q_i depends on the
agents within two hops of i and on no one else. Training is DQN (the reference: a max target,
no double-Q; `double_q` switches double-Q on), squared error on the taken action:

    L(theta) = E_D[ mean_i (Q(O_i, a_i; theta) - y_i)^2 ],   y_i = r_i + gamma c_i max_a' Qbar(O'_i, a')
             + lambda E_D[ mean_i D_KL( G^2(O_i; theta) || G^2(O'_i; thetabar) ) ]                (DGN Eq. 4)

The second term is the temporal relation regularisation (`relation_weight` lambda, 0 = plain
DGN): G^2 is the layer-2 attention distribution over {i} u N_i, per head (the KL averaged over
heads), at s with the online network and at s' with the target network, detached (the paper
uses the target network for s' [ALGO_SPECS: MEM]; the TF code the online one; the author's
PyTorch DGN+R the target one).

Which graph the target uses (`target_graph`): the paper and its TF code keep the graph fixed over
two consecutive steps, so Qbar(O'_i) and G^2(O'_i) are computed with the graph at s (default,
"current"); the author's PyTorch port uses the graph returned with s' ("next"). The relation
term always uses the graph at s at both steps: the KL compares distributions over the same
neighbour set.

Choices the paper leaves open or that differ from the reference, documented here:
- Exploration: the shared linear epsilon schedule over env steps (QLearningConfig), not the
  reference's 0.6 x 0.996 per episode with floor 0.01; targets move by Polyak tau = 0.01 after
  every gradient step (Battle).
- Battle's reference ran 8 heads x 16 units, batch 128, lr 3e-5 (Jungle 1e-4), gamma 0.96: the
  defaults below take Jungle's lr; batch and update ratio are trainer fields.
- No agent id input (the reference has none): neighbourhoods already tell agents apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from vimarl.algos.base import Capabilities, agent_mean, register
from vimarl.algos.q_learning import PolyakQLearningConfig, QLearner, next_value, taken, td_loss
from vimarl.buffer import Transition
from vimarl.envs.base import GroupSpec
from vimarl.envs.graph import Graph
from vimarl.nn.centralized import td_target
from vimarl.nn.graph_ops import NeighborAttention
from vimarl.nn.mlp import mlp


@dataclass
class DGNConfig(PolyakQLearningConfig):
    lr: float = 1e-4
    """Adam learning rate (reference: Jungle and the PyTorch port 1e-4, Battle 3e-5)."""
    gamma: float = 0.96
    """Discount (reference Battle and Jungle: 0.96)."""
    encoder_dims: tuple[int, ...] = (512, 128)
    """Hidden sizes of the observation encoder MLP; the last is the relation kernels' width (reference: 512, 128)."""
    heads: int = 8
    """Attention heads per relation kernel (reference: 8 heads x 16 units = the width 128)."""
    layers: int = 2
    """Relation kernels (convolution layers) stacked (reference: 2)."""
    tau: float = 0.01
    """Polyak step of the target network (reference Battle: 0.01 after every training step)."""
    target_graph: Literal["current", "next"] = "current"
    """Graph used for the TD target at s': the one at s (paper and TF code: the graph is fixed over two
    consecutive steps) or the one returned with s' (the author's PyTorch port)."""
    relation_weight: float = 0.0
    """lambda of the temporal relation regularisation on layer-2 attention (DGN+R; the PyTorch port uses
    0.1); 0 disables it."""


class RelationKernel(NeighborAttention):
    """One DGN convolution layer: multi-head attention of each agent over itself and its graph
    neighbours (padding masked), with ReLU(Dense) query, key and value projections as the reference,
    the heads concatenated then Dense + ReLU."""

    def __init__(self, width: int, heads: int):
        super().__init__(width, width, heads, include_self=True)
        self.query, self.key, self.value = (nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(3))
        self.out = nn.Sequential(nn.Linear(width, width), nn.ReLU())

    def forward(self, x: Tensor, graph: Graph) -> Tensor:
        return self.out(super().forward(x, graph))

    def distribution(self, x: Tensor, graph: Graph) -> Tensor:
        """alpha_ij over the slots [self, neighbour 1..K]: [B, N, 1 + K, H] (padding slots 0)."""
        neighbours, own = self.weights(x, graph)
        return torch.cat([own.unsqueeze(2), neighbours], dim=2)


class DGNQ(nn.Module):
    """Encoder, `layers` relation kernels, and the Q head over all their outputs concatenated."""

    def __init__(self, spec: GroupSpec, config: DGNConfig):
        super().__init__()
        *hidden, width = config.encoder_dims
        self.encoder = mlp(spec.obs_dim, hidden, width, output_activation=nn.ReLU)
        self.kernels = nn.ModuleList(RelationKernel(width, config.heads) for _ in range(config.layers))
        self.head = nn.Linear(width * (config.layers + 1), spec.action_space.n)

    def features(self, obs: Tensor, graph: Graph) -> list[Tensor]:
        """[h^0, h^1, ..., h^L], each [B, N, width]."""
        features = [self.encoder(obs)]
        for kernel in self.kernels:
            features.append(kernel(features[-1], graph))
        return features

    def forward(self, obs: Tensor, graph: Graph) -> Tensor:
        return self.head(torch.cat(self.features(obs, graph), dim=-1))

    def relation(self, obs: Tensor, graph: Graph) -> Tensor:
        """G^L: the last kernel's attention distributions [B, N, 1 + K, H]."""
        features = [self.encoder(obs)]
        for kernel in self.kernels[:-1]:
            features.append(kernel(features[-1], graph))
        return self.kernels[-1].distribution(features[-1], graph)


def relation_kl(p: Tensor, q: Tensor) -> Tensor:
    """D_KL(p || q) over the slot axis 2 of [B, N, 1 + K, H] distributions, mean over heads: [B, N]."""
    log_ratio = torch.log(p.clamp_min(1e-10)) - torch.log(q.clamp_min(1e-10))
    return (p * log_ratio).sum(2).mean(-1)


@register("dgn", "DGN (Jiang et al.): two multi-head attention convolutions over the agent graph, "
          "dense Q head, DQN targets, optional temporal relation regularisation",
          Capabilities(discrete=True, continuous=False, needs_graph=True))
class DGN(QLearner):
    Config = DGNConfig

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: DGNConfig, device="cpu"):
        super().__init__(groups, state_dim, config, device)
        self.build(DGNQ(self.spec, config))

    def update(self, batch: Transition) -> dict[str, Tensor]:
        g, c = self.group, self.config
        graph = batch.graph[g]
        next_graph = graph if c.target_graph == "current" else batch.next_graph[g]
        q = taken(self.policy(batch.obs[g], graph), batch.action[g])
        target = td_target(batch, [g], c.gamma, next_value(*self.next_q(batch, next_graph), batch.next_action_mask[g]))
        alive = batch.alive.get(g)
        td = td_loss(q, target, c.loss, alive)
        metrics = {"loss_q": td.detach(), "q": q.mean().detach(), "epsilon": self.epsilon()}
        loss = td
        if c.relation_weight > 0:
            with torch.no_grad():  # G^2(O'_i; thetabar) on the graph at s
                later = self.target_policy.critic.relation(batch.next_obs[g], graph)
            kl = agent_mean(relation_kl(self.policy.critic.relation(batch.obs[g], graph), later), alive)
            loss = td + c.relation_weight * kl
            metrics["relation_kl"] = kl.detach()
        self.step(loss)
        return metrics
