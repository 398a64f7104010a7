"""VPP: Variational Policy Propagation (paper 000) and Intention Propagation (paper 001).

The optimal max-entropy joint policy of a networked MDP is a Markov random field over the agent
graph (000 Prop. 1). VPP samples from a variational approximation of it: mean-field,
prod_i q_i(a_i | s), whose fixed point (Eq. 3) is unrolled as M rounds of neural message passing
on policy embeddings (Eq. 6, App. C.1, Fig. 6 left), or loopy belief propagation, unrolled on
directed edge messages (App. C.1 right panel, C.2). It is trained SAC-style with per-agent
critics (Eq. 8):

    J_pi(theta)  = E_{s~D, a~prod q}[ sum_i alpha log q_i(a_i|s) - Q_i(s, a_i, a_Ni) ]
    J_V(eta_i)   = E_{s~D}[ 1/2 (V_i(s) - E_{a~q}[Q_i(s, a_i, a_Ni) - alpha log q_i(a_i|s)])^2 ]
    J_Q(kappa_i) = E_D[ 1/2 (Q_i(s, a_i, a_Ni) - (r_i + gamma V_target_i(s')))^2 ]

Intention Propagation (`ip`) is the same method as written up in 001: twin Q_i networks whose
minimum enters J_pi and J_V (Sec. 4.3, TD3 style), 128-unit layers, and the final node feature
concatenating the features of every layer (App. B.2).

Choices the papers leave open (SEED_ALGOS.md), exposed or documented here:
- Gradient of J_pi for discrete actions (`discrete_gradient`):
  "expectation" (default) takes E_{a_i~q_i}[alpha log q_i - Q_i(s, a_i, a_Ni)] exactly over the
  agent's own action, with the neighbours' actions a_Ni sampled and held fixed;
  "straight_through" samples every action with straight-through Gumbel-softmax, so agent j's
  policy also learns from Q_i of every i with j in N_i (`neighbor_action_gradient` switches that
  part off). The default was picked by measurement (docs/vpp.md).
  Continuous actions use the reparameterised sample for both.
- Q_i over a variable neighbour set: a DeepSets sum over neighbour action embeddings (NeighborQ).
- The graph for s': the one the environment returned with s' (stored in the buffer).
- Partial observability (Sec. 4.5): critics read s_i^M from their own state propagation.
- As 000 App. D says, one joint action is sampled per state for J_V and J_pi.
- Sums over agents i in Eq. 8 are means here (a constant factor N, which Adam absorbs), so the
  learning rate does not depend on the number of agents.
- Heterogeneous groups (001 App. B.2): each group has its own observation encoder (to a common
  width), policy head and critics, and all groups share the propagation layers. Graphs index
  agents within a group (DESIGN §3), so messages do not cross groups; for cross-type messages,
  give the types one group (e.g. hetero_nav with groups=one).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from vimarl.algos.base import Algorithm, Capabilities, adam, agent_mean, frozen, polyak, register
from vimarl.buffer import Transition
from vimarl.envs.base import Discrete, GroupSpec
from vimarl.envs.graph import Graph
from vimarl.nn.critics import NeighborQ, StateValue
from vimarl.nn.distributions import Categorical, PolicyHead, action_dim, action_features
from vimarl.nn.loopy_bp import LoopyBPPropagation
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
    """Entropy weight multiplying log q_i in Eq. 8 (000 Table 2); the initial value when auto_alpha."""
    auto_alpha: bool = False
    """Tune alpha by gradient descent towards target_entropy (SAC v2; not in the papers)."""
    target_entropy: float | None = None
    """Entropy per agent that auto_alpha aims at; None: -dim(A) for Box actions, 0.5 log n for n discrete ones."""
    inference: Literal["mean_field", "loopy_bp"] = "mean_field"
    """Variational inference layers of the policy: mean-field (every experiment of 000/001) or loopy BP (000 App. C)."""
    rounds: int = 2
    """Message-passing rounds M of the inference layers (2 in every experiment of 000; ablation 1, 2, 3)."""
    independent: bool = False
    """No propagation in the policy: q_i(a_i | o_i) (000 App. G.1's independent policy); critics unchanged."""
    embed_dim: int = 32
    """Width of the policy embeddings mu_i (and edge messages nu_ij) (000 App. I)."""
    heads: int = 2
    """Attention heads per round (000 App. I)."""
    state_dim: int = 32
    """Width of the propagated states s_i^m."""
    hidden_dim: int = 128
    """Hidden units of the output MLP and the critics (000 App. I)."""
    concat_hops: bool = False
    """Policy output MLP reads every round's embedding [mu^0, ..., mu^M] concatenated (001 App. B.2)."""
    attend_self: bool = True
    """Mean-field attention over the agent itself and its neighbours (000 Sec. 5.1), or neighbours only."""
    squash: bool = True
    """Box actions: a tanh-squashed Gaussian (SAC), or a plain Gaussian clipped to the bounds."""
    critic_aggregation: Literal["sum", "mean"] = "sum"
    """How Q_i pools neighbours' action embeddings."""
    twin_critics: bool = False
    """Two Q_i networks and their minimum in the V target and J_pi (the IP write-up, 001 Sec. 4.3)."""
    discrete_gradient: Literal["expectation", "straight_through"] = "expectation"
    """Discrete J_pi: exact expectation over the own action with sampled neighbour actions, or
    straight-through Gumbel-softmax samples for every agent (see the module docstring)."""
    neighbor_action_gradient: bool = True
    """With straight-through or Box actions, let J_pi's gradient reach the neighbours' actions a_Ni
    inside Q_i (false: each agent improves only through its own action)."""


def make_propagation(config: VPPConfig, in_dim: int) -> nn.Module:
    """The policy's inference layers (M = 0 rounds when `independent`)."""
    rounds = 0 if config.independent else config.rounds
    if config.inference == "loopy_bp":
        return LoopyBPPropagation(in_dim, config.embed_dim, config.state_dim, config.heads, rounds,
                                  concat_hops=config.concat_hops)
    return MeanFieldPropagation(in_dim, config.embed_dim, config.state_dim, config.heads, rounds,
                                attend_self=config.attend_self, concat_hops=config.concat_hops)


class VPPPolicy(nn.Module):
    """q_i(a_i | s): inference layers over the graph, then an MLP and a softmax or Gaussian (Eq. 7).

    One group reads its observations directly (mu_i^0 = relu(W_0 o_i)); several groups first
    map their observations to a common width with one encoder each (001 App. B.2).
    """

    def __init__(self, groups: dict[str, GroupSpec], config: VPPConfig):
        super().__init__()
        if len(groups) == 1:
            self.encoders = nn.ModuleDict({g: nn.Identity() for g in groups})
            in_dim = next(iter(groups.values())).obs_dim
        else:
            self.encoders = nn.ModuleDict({g: nn.Sequential(nn.Linear(spec.obs_dim, config.embed_dim), nn.ReLU())
                                           for g, spec in groups.items()})
            in_dim = config.embed_dim
        self.propagation = make_propagation(config, in_dim)
        self.heads = nn.ModuleDict({g: PolicyHead(self.propagation.out_dim, (config.hidden_dim,),
                                                  spec.action_space, squash=config.squash)
                                    for g, spec in groups.items()})

    def forward(self, group: str, obs: Tensor, graph: Graph, action_mask: Tensor | None = None):
        return self.heads[group](self.propagation(self.encoders[group](obs), graph), action_mask)


class Critics(nn.Module):
    """V_i, target V_i and one or two Q_i of one group, shared over its agents."""

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
        """min over the Q networks (just Q with one network) of Q_i(s, a_i, a_Ni): [B, N]."""
        return _minimum([q(obs, action, graph, neighbor_action) for q in self.q])

    def q_all_actions(self, obs: Tensor, graph: Graph, neighbor_action: Tensor) -> Tensor:
        """min over the Q networks of Q_i(s, a, a_Ni) for every own discrete action a: [B, N, A]."""
        return _minimum([q.all_actions(obs, graph, neighbor_action) for q in self.q])


def _minimum(values: list[Tensor]) -> Tensor:
    return values[0] if len(values) == 1 else torch.minimum(*values)


def default_target_entropy(spec: GroupSpec) -> float:
    space = spec.action_space
    return 0.5 * math.log(space.n) if isinstance(space, Discrete) else -float(space.dim)


@register("vpp", "Variational Policy Propagation (000): mean-field or loopy-BP MRF policy over the "
          "agent graph, SAC-style V/Q critics", Capabilities(discrete=True, continuous=True,
                                                             needs_graph=True, heterogeneous=True))
class VPP(Algorithm):
    Config = VPPConfig

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: VPPConfig, device="cpu"):
        super().__init__(groups, state_dim, config, device)
        self.policy = VPPPolicy(groups, config)
        self.critics = nn.ModuleDict({g: Critics(spec, config) for g, spec in groups.items()})
        self.log_alpha = nn.Parameter(torch.tensor(math.log(config.alpha)), requires_grad=config.auto_alpha)
        self.target_entropy = {g: default_target_entropy(spec) if config.target_entropy is None
                               else config.target_entropy for g, spec in groups.items()}
        self.to(self.device)
        self.optimizers = {
            "policy": adam(self.policy.parameters(), lr=config.lr),
            "value": adam([p for c in self.critics.values() for p in c.value.parameters()], lr=config.lr),
            "q": adam([p for c in self.critics.values() for p in c.q.parameters()], lr=config.lr),
        }
        if config.auto_alpha:
            self.optimizers["alpha"] = adam([self.log_alpha], lr=config.lr)

    @torch.no_grad()
    def act(self, obs, graph, *, explore, action_mask=None, state=None):
        actions = {}
        for g in self.groups:
            distribution = self.policy(g, obs[g], graph[g], (action_mask or {}).get(g))
            actions[g] = distribution.sample().action if explore else distribution.mode()
        return actions

    def update(self, batch: Transition) -> dict[str, Tensor]:
        q_loss = sum(self.q_loss(g, batch) for g in self.groups)
        self.optimize("q", q_loss)

        # J_pi (Eq. 8), with one joint action a ~ prod_i q_i(.|s) per state, also used by J_V.
        alpha = self.log_alpha.exp().detach()
        terms = {g: self.policy_terms(g, batch, alpha) for g in self.groups}
        policy_loss = sum(loss for loss, _, _ in terms.values())
        self.optimize("policy", policy_loss)

        # J_V (Eq. 8): V_i(s) towards E_q[Q_i - alpha log q_i], then the target V follows.
        value_loss = sum(agent_mean(0.5 * (self.critics[g].value(batch.obs[g], batch.graph[g]) - value_target).square(),
                                    batch.alive.get(g)) for g, (_, value_target, _) in terms.items())
        self.optimize("value", value_loss)
        for critics in self.critics.values():
            polyak(critics.target_value, critics.value, self.config.tau)

        entropy = torch.stack([entropy for _, _, entropy in terms.values()]).mean()
        if self.config.auto_alpha:
            target = sum(self.target_entropy.values()) / len(self.target_entropy)
            self.optimize("alpha", self.log_alpha * (entropy - target))
        return {"loss_q": q_loss.detach(), "loss_policy": policy_loss.detach(),
                "loss_value": value_loss.detach(), "entropy": entropy, "alpha": alpha,
                "v_target_mean": torch.stack([t.mean() for _, t, _ in terms.values()]).mean()}

    def q_loss(self, g: str, batch: Transition) -> Tensor:
        """J_Q (Eq. 8): Q_i(s, a_i, a_Ni) of the stored joint action towards r_i + gamma V_target_i(s')."""
        critics, obs, graph = self.critics[g], batch.obs[g], batch.graph[g]
        with torch.no_grad():
            next_value = critics.target_value(batch.next_obs[g], batch.next_graph[g])
            q_target = batch.reward[g] + self.config.gamma * batch.continuing(g) * next_value
        stored_action = action_features(batch.action[g], self.groups[g].action_space)
        return sum(agent_mean(0.5 * (q(obs, stored_action, graph) - q_target).square(), batch.alive.get(g))
                   for q in critics.q)

    def policy_terms(self, g: str, batch: Transition, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """J_pi of group g, the V target E_q[Q_i - alpha log q_i] [B, N] (detached), and the mean entropy."""
        critics, obs, graph = self.critics[g], batch.obs[g], batch.graph[g]
        distribution = self.policy(g, obs, graph, batch.action_mask[g])
        sample = distribution.sample()
        with frozen(critics):
            if isinstance(distribution, Categorical) and self.config.discrete_gradient == "expectation":
                # Exact over a_i: sum_a q_i(a) (alpha log q_i(a) - Q_i(s, a, a_Ni)), a_Ni sampled.
                q_all = critics.q_all_actions(obs, graph, sample.critic_input.detach())
                expected_q = (distribution.probs * q_all).sum(-1)
            else:
                neighbor_action = None if self.config.neighbor_action_gradient else sample.critic_input.detach()
                expected_q = critics.q_value(obs, sample.critic_input, graph, neighbor_action)
        entropy_term = alpha * sample.log_prob_mean
        policy_loss = agent_mean(entropy_term - expected_q, batch.alive.get(g))
        return policy_loss, (expected_q - entropy_term).detach(), -sample.log_prob_mean.mean().detach()
