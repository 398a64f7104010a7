"""MFQ: mean-field Q-learning (Yang, Luo, Li, Zhou, Zhang, Wang; ICML 2018), ALGO_SPECS §5.3.

Agent j's Q function reads its own action and the mean action of its neighbours, which stands in
for their joint action (the mean-field approximation of the pairwise interactions):

    abar_j       = 1/|N_j| sum_{k in N_j} a_k                   a_k one-hot; N_j the GRAPH neighbours (Eq. 5)
    pi_j(a | s, abar_j) = exp(beta Q_j(s, a, abar_j)) / sum_a' exp(beta Q_j(s, a', abar_j))        (Eq. 8)
    v^MF_j(s')   = sum_a pi_j(a | s', abar'_j) Qbar_j(s', a, abar'_j)                             (Eq. 10)
    y_j          = r_j + gamma c_j v^MF_j(s')
    L(phi)       = E_D[ mean_j (Q_j(s, a_j, abar_j) - y_j)^2 ]                                     (Eq. 11)

with one network Q_phi(o_j, a_j, abar_j) shared by the agents (MLP on [o_j, abar_j] -> Q per
action) and a Polyak-averaged target network phibar (tau = 0.005 after every gradient step,
`mlii/mfrl`). At s, abar_j is the masked mean of the neighbours' stored one-hot actions over the
graph at s (`mean_action`, an O(B N K) neighbour sum, padding slots excluded; zero for an agent
without neighbours).

Difference from the reference code, by design: `mlii/mfrl` (Battle) feeds every agent the mean
one-hot action of ALL agents of its group at the previous step. Here abar_j is the paper's
definition, the mean over agent j's neighbours in the environment's agent graph.

The mean action at s' (and when acting) is not in the replay: the paper's Algorithm 1 iterates
"compute abar from the policies, then the policies from abar". Here that iteration starts from
every neighbour's uniform policy and runs `mean_field_rounds` times, each time taking the
neighbours' policy probabilities pi_k(. | s', abar_k) (the expected one-hot action; the paper
samples actions) on the graph at s':
    abar^0_j = mean_{k in N_j} uniform,  abar^{r+1}_j = mean_{k in N_j} pi_k(. | s', abar^r_k).
The target uses the target network for both pi and Qbar; acting uses the online network.

Other choices, exposed:
- `exploration`: Boltzmann sampling from pi_j (the paper; inverse temperature beta = 1/temperature)
  or epsilon-greedy (the shared schedule). The reference acts greedily (its temperature has no
  effect, ALGO_SPECS §5.3). Evaluation plays argmax_a Q_j(s, a, abar_j).
- `double_q=True` replaces v^MF by the reference's double-DQN value Qbar(s', argmax_a Q(s', a, abar'), abar').
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vimarl.algos.base import Capabilities, register
from vimarl.algos.q_learning import (PolyakQLearningConfig, QLearner, epsilon_greedy, masked_q, next_value, taken,
                                     td_loss)
from vimarl.buffer import Transition
from vimarl.envs.base import GroupSpec
from vimarl.envs.graph import Graph
from vimarl.nn.centralized import td_target
from vimarl.nn.graph_ops import neighbor_mean
from vimarl.nn.mlp import mlp


@dataclass
class MFQConfig(PolyakQLearningConfig):
    lr: float = 1e-4
    """Adam learning rate (mlii/mfrl: 1e-4)."""
    gamma: float = 0.95
    """Discount (mlii/mfrl: 0.95)."""
    tau: float = 0.005
    """Polyak step of the target network after every gradient step (mlii/mfrl: 0.005)."""
    double_q: bool = False
    """False: the paper's mean-field value v^MF(s') (Eq. 10); True: the reference's double-DQN value."""
    exploration: Literal["boltzmann", "epsilon_greedy"] = "boltzmann"
    """Acting while training: sample the Boltzmann policy pi_j (Eq. 8), or epsilon-greedy on the epsilon schedule."""
    temperature: float = 0.1
    """1 / beta of the Boltzmann policy in Eq. 8 and 10 (mlii/mfrl's softmax(Q / 0.1))."""
    mean_field_rounds: int = 1
    """Rounds of the abar <- neighbours' policies iteration used at s' and when acting (Algorithm 1)."""


def mean_action(actions: Tensor, graph: Graph) -> Tensor:
    """abar_j = 1/|N_j| sum_{k in N_j} a_k over real neighbours (padding masked): [B, N, A] -> [B, N, A]."""
    return neighbor_mean(actions, graph)


def uniform_policy(like: Tensor, action_mask: Tensor | None) -> Tensor:
    """Uniform probabilities over the available actions, shaped like `like` [B, N, A]."""
    if action_mask is None:
        return torch.full_like(like, 1.0 / like.shape[-1])
    allowed = action_mask.to(like.dtype)
    return allowed / allowed.sum(-1, keepdim=True).clamp_min(1.0)


class MeanFieldQ(nn.Module):
    """Q_phi(o_j, ., abar_j): an MLP on [o_j, abar_j] -> [B, N, A]."""

    def __init__(self, spec: GroupSpec, hidden_dim: int):
        super().__init__()
        n = spec.action_space.n
        self.net = mlp(spec.obs_dim + n, (hidden_dim, hidden_dim), n)

    def forward(self, obs: Tensor, graph: Graph | None, abar: Tensor) -> Tensor:
        return self.net(torch.cat([obs, abar], dim=-1))


@register("mfq", "MFQ (Yang et al. 2018): Q of own action and the mean action of the graph neighbours, "
          "Boltzmann policy, mean-field value target",
          Capabilities(discrete=True, continuous=False, needs_graph=True))
class MFQ(QLearner):
    Config = MFQConfig

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: MFQConfig, device="cpu"):
        super().__init__(groups, state_dim, config, device)
        self.build(MeanFieldQ(self.spec, config.hidden_dim))

    def logits(self, q: Tensor, action_mask: Tensor | None) -> Tensor:
        """beta Q_j with unavailable actions at the dtype's minimum (after the division, which would
        overflow it to -inf); an agent with no available action gets all zeros (a uniform choice
        the env ignores) rather than a row of -inf, whose softmax is NaN."""
        logits = q / self.config.temperature
        if action_mask is None:
            return logits
        logits = masked_q(logits, action_mask)
        return torch.where(action_mask.any(-1, keepdim=True), logits, torch.zeros_like(logits))

    def boltzmann(self, q: Tensor, action_mask: Tensor | None) -> Tensor:
        """pi_j(. | s, abar_j) = softmax(beta Q_j) over the available actions (Eq. 8); all zeros for
        an agent with no available action, which then adds nothing to its neighbours' abar (as
        `uniform_policy`)."""
        probs = torch.softmax(self.logits(q, action_mask), dim=-1)
        return probs if action_mask is None else probs * action_mask.any(-1, keepdim=True)

    def mean_field(self, network: nn.Module, obs: Tensor, graph: Graph, action_mask: Tensor | None
                   ) -> tuple[Tensor, Tensor]:
        """(Q(o_j, ., abar_j), abar_j) after `mean_field_rounds` rounds from uniform neighbours."""
        abar = mean_action(uniform_policy(obs.new_empty(*obs.shape[:2], self.n_actions), action_mask), graph)
        q = network(obs, graph, abar)
        for _ in range(self.config.mean_field_rounds):
            abar = mean_action(self.boltzmann(q, action_mask), graph)
            q = network(obs, graph, abar)
        return q, abar

    @torch.no_grad()
    def act(self, obs, graph, *, explore, action_mask=None, state=None):
        g = self.group
        mask = (action_mask or {}).get(g)
        q, _ = self.mean_field(self.policy, obs[g], graph[g], mask)
        if explore and self.config.exploration == "boltzmann":
            return {g: torch.distributions.Categorical(logits=self.logits(q, mask)).sample()}
        return {g: epsilon_greedy(q, self.epsilon() if explore else 0.0, mask)}

    def update(self, batch: Transition) -> dict[str, Tensor]:
        g, c = self.group, self.config
        abar = mean_action(F.one_hot(batch.action[g], self.n_actions).float(), batch.graph[g])
        q = taken(self.policy(batch.obs[g], batch.graph[g], abar), batch.action[g])
        with torch.no_grad():
            mask = batch.next_action_mask[g]
            target_q, next_abar = self.mean_field(self.target_policy, batch.next_obs[g], batch.next_graph[g], mask)
            if c.double_q:
                value = next_value(target_q, self.policy(batch.next_obs[g], batch.next_graph[g], next_abar), mask)
            else:  # v^MF(s') = sum_a pi(a | s', abar') Qbar(s', a, abar')  (Eq. 10)
                value = (self.boltzmann(target_q, mask) * target_q).sum(-1)
            target = td_target(batch, [g], c.gamma, value)
        loss = td_loss(q, target, c.loss, batch.alive.get(g))
        self.step(loss)
        return {"loss_q": loss.detach(), "q": q.mean().detach(), "epsilon": self.epsilon()}
