"""VPP: Variational Policy Propagation (paper 000), mean-field form.

The optimal max-entropy joint policy of a networked MDP is a Markov random field over the agent
graph (Prop. 1). VPP samples from a mean-field approximation of it, prod_i q_i(a_i | s), whose
fixed point (Eq. 3) is unrolled as M rounds of neural message passing on policy embeddings
(Eq. 6, App. C.1), and trains it SAC-style with per-agent critics (Eq. 8):

    J_pi(theta)  = E_{s~D, a~prod q}[ sum_i alpha log q_i(a_i|s) - Q_i(s, a_i, a_Ni) ]
    J_V(eta_i)   = E_{s~D}[ 1/2 (V_i(s) - E_{a~q}[Q_i(s, a_i, a_Ni) - alpha log q_i(a_i|s)])^2 ]
    J_Q(kappa_i) = E_D[ 1/2 (Q_i(s, a_i, a_Ni) - (r_i + gamma V_target_i(s')))^2 ]

Choices the paper leaves open (SEED_ALGOS.md), exposed or documented here:
- Gradient of J_pi through neighbours' discrete actions: straight-through Gumbel-softmax, so
  agent j's policy learns from Q_i of every i with j in N_i (`neighbor_action_gradient`
  switches this off); the entropy term uses the exact
  expectation -H(q_i) for categorical policies and the sample's log-density for Gaussians.
- Q_i over a variable neighbour set: a DeepSets sum over neighbour action embeddings (NeighborQ).
- The graph for s': the one the environment returned with s' (stored in the buffer).
- Partial observability (Sec. 4.5): critics read s_i^M from their own state propagation.
- As the paper's Appendix D says, one joint action is sampled per state for J_V and J_pi.
- Sums over agents i in Eq. 8 are means here (a constant factor N, which Adam absorbs), so the
  learning rate does not depend on the number of agents.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from vimarl.algos.base import Algorithm, Capabilities, frozen, polyak, register
from vimarl.buffer import Transition
from vimarl.envs.base import GroupSpec
from vimarl.envs.graph import Graph
from vimarl.nn.critics import NeighborQ, StateValue
from vimarl.nn.distributions import PolicyHead, action_dim, action_features
from vimarl.nn.propagation import MeanFieldPropagation


@dataclass
class VPPConfig:
    lr: float = 0.01
    """Adam learning rate of all networks (000 Table 2)."""
    gamma: float = 0.95
    """Discount (000 Table 2)."""
    tau: float = 0.01
    """Polyak step of the target V after every gradient step (000 Table 2)."""
    alpha: float = 0.2
    """Entropy weight multiplying log q_i in Eq. 8 (000 Table 2)."""
    rounds: int = 2
    """Mean-field rounds M of the inference layers (2 in every experiment of 000; 0 = independent)."""
    embed_dim: int = 32
    """Width of the policy embedding mu_i and of the first MLP layer (000 App. I)."""
    heads: int = 2
    """Attention heads per round (000 App. I)."""
    state_dim: int = 32
    """Width of the propagated states s_i^m."""
    hidden_dim: int = 128
    """Hidden units of the output MLP and the critics (000 App. I)."""
    attend_self: bool = True
    """Attention over the agent itself and its neighbours (000 Sec. 5.1), or neighbours only."""
    critic_aggregation: Literal["sum", "mean"] = "sum"
    """How Q_i pools neighbours' action embeddings."""
    twin_critics: bool = False
    """Two Q_i networks and their minimum in the V target and J_pi (the IP write-up, 001 Sec. 4.3)."""
    neighbor_action_gradient: bool = True
    """Let J_pi's gradient reach the neighbours' actions a_Ni inside Q_i (false: each agent
    improves only through its own action, treating its neighbours' sampled actions as fixed)."""


class VPPPolicy(nn.Module):
    """q_i(a_i | s): mean-field inference layers, then an MLP and a softmax or Gaussian (Eq. 7)."""

    def __init__(self, spec: GroupSpec, config: VPPConfig, rounds: int):
        super().__init__()
        self.propagation = MeanFieldPropagation(spec.obs_dim, config.embed_dim, config.state_dim,
                                                config.heads, rounds, config.attend_self)
        self.head = PolicyHead(self.propagation.out_dim, (config.hidden_dim,), spec.action_space)

    def forward(self, obs: Tensor, graph: Graph, action_mask: Tensor | None = None):
        return self.head(self.propagation(obs, graph), action_mask)


class Critics(nn.Module):
    """V_i, target V_i and one or two Q_i, all shared over the agents of the group."""

    def __init__(self, spec: GroupSpec, config: VPPConfig):
        super().__init__()
        hidden = (config.hidden_dim, config.hidden_dim)
        width = action_dim(spec.action_space)
        self.value = StateValue(spec.obs_dim, config.state_dim, config.rounds, hidden)
        self.target_value = copy.deepcopy(self.value).requires_grad_(False)
        self.q = nn.ModuleList(
            NeighborQ(spec.obs_dim, width, config.state_dim, config.rounds, hidden, config.critic_aggregation)
            for _ in range(2 if config.twin_critics else 1))

    def q_value(self, obs: Tensor, action: Tensor, graph: Graph, neighbor_action: Tensor | None = None) -> Tensor:
        """min over the Q networks (just Q with one network)."""
        values = [q(obs, action, graph, neighbor_action) for q in self.q]
        return values[0] if len(values) == 1 else torch.minimum(*values)


@register("vpp", "Variational Policy Propagation (000): mean-field MRF policy over the agent graph, "
          "SAC-style V/Q critics", Capabilities(discrete=True, continuous=True, needs_graph=True))
class VPP(Algorithm):
    Config = VPPConfig

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: VPPConfig, device="cpu"):
        super().__init__(groups, state_dim, config, device)
        (self.group, spec), = groups.items()
        self.action_space = spec.action_space
        self.policy = self.build_policy(spec, config)
        self.critics = Critics(spec, config)
        self.to(self.device)
        self.optimizers = {
            "policy": torch.optim.Adam(self.policy.parameters(), lr=config.lr),
            "value": torch.optim.Adam(self.critics.value.parameters(), lr=config.lr),
            "q": torch.optim.Adam(self.critics.q.parameters(), lr=config.lr),
        }

    def build_policy(self, spec: GroupSpec, config: VPPConfig) -> VPPPolicy:
        return VPPPolicy(spec, config, rounds=config.rounds)

    @torch.no_grad()
    def act(self, obs, graph, *, explore, action_mask=None, state=None):
        mask = (action_mask or {}).get(self.group)
        distribution = self.policy(obs[self.group], graph[self.group], mask)
        action = distribution.sample().action if explore else distribution.mode()
        return {self.group: action}

    def update(self, batch: Transition) -> dict[str, Tensor]:
        g, config = self.group, self.config
        obs, graph = batch.obs[g], batch.graph[g]

        # J_Q (Eq. 8): regress Q_i(s, a_i, a_Ni) of the stored joint action on r_i + gamma V_target_i(s').
        with torch.no_grad():
            next_value = self.critics.target_value(batch.next_obs[g], batch.next_graph[g])
            not_done = (1.0 - batch.terminated).unsqueeze(-1)
            q_target = batch.reward[g] + config.gamma * not_done * next_value
        stored_action = action_features(batch.action[g], self.action_space)
        q_loss = sum(0.5 * (q(obs, stored_action, graph) - q_target).square().mean()
                     for q in self.critics.q)
        self.optimize("q", q_loss)

        # One joint action a ~ prod_i q_i(.|s) from the propagation network, shared by J_V and J_pi.
        sample = self.policy(obs, graph, batch.action_mask[g]).sample()
        entropy_term = config.alpha * sample.log_prob_mean
        neighbor_action = None if config.neighbor_action_gradient else sample.critic_input.detach()
        with frozen(self.critics):
            q_sampled = self.critics.q_value(obs, sample.critic_input, graph, neighbor_action)

        # J_pi (Eq. 8): the gradient reaches every agent's action inside each Q_i(s, a_i, a_Ni).
        policy_loss = (entropy_term - q_sampled).mean()
        self.optimize("policy", policy_loss)

        # J_V (Eq. 8): V_i(s) towards E_q[Q_i - alpha log q_i], then the target V follows.
        value = self.critics.value(obs, graph)
        value_loss = 0.5 * (value - (q_sampled - entropy_term).detach()).square().mean()
        self.optimize("value", value_loss)
        polyak(self.critics.target_value, self.critics.value, config.tau)

        return {"loss_q": q_loss.detach(), "loss_policy": policy_loss.detach(),
                "loss_value": value_loss.detach(), "entropy": -sample.log_prob_mean.mean().detach(),
                "q_mean": q_sampled.mean().detach()}

