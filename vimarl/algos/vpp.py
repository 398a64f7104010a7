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
  agent's own action, with the neighbours' actions a_Ni sampled and held fixed, so agent j gets
  no credit for its effect on the Q_i of the agents that list it;
  "neighbor_expectation" adds that credit exactly: for every i and every neighbour j in N_i,
  E_{a_j~q_j}[Q_i(s, a_i, a_j, a_{N_i minus j})] with the other actions sampled, whose gradient
  reaches q_j (an unbiased gradient of E_{a~prod q}[sum_i Q_i], at K A head evaluations per agent);
  "straight_through" samples every action with straight-through Gumbel-softmax, so agent j's
  policy also learns from Q_i of every i with j in N_i (`neighbor_action_gradient` switches that
  part off). The default was picked by measurement (docs/vpp.md).
  Continuous actions use the reparameterised sample for all of them.
- Q_i over a variable neighbour set (`critic_neighbors`): a DeepSets sum over embeddings of the
  neighbours' actions alone ("action"), or of the (o_i, o_j - o_i, a_j) pairs ("pair").
- What the V and Q heads read (`critic_reads_obs`): s_i^M, or [o_i, s_i^M].
- Stabilisers the papers do not mention, off by default: gradient-norm clipping
  (`max_grad_norm`), reward scaling (`reward_scale`, `normalize_rewards`) and an entropy weight
  tuned per agent group (`auto_alpha`).
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
from vimarl.nn.graph_ops import gather_neighbors
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
    """Tune one alpha per agent group by gradient descent towards target_entropy (SAC v2; not in the papers)."""
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
    """How Q_i pools the neighbour embeddings."""
    critic_neighbors: Literal["action", "pair"] = "action"
    """What Q_i embeds per neighbour j: its action a_j alone, or the pair [o_i, o_j - o_i, a_j]
    (one edge layer), which can tell which neighbour moves towards agent i."""
    critic_reads_obs: bool = False
    """V_i and Q_i heads read [o_i, s_i^M] instead of s_i^M alone."""
    max_grad_norm: float | None = None
    """Clip each optimiser's gradient to this global norm (None: no clipping, as the papers)."""
    reward_scale: float = 1.0
    """Multiply rewards by this in the Q target (with normalize_rewards: after dividing by the running std)."""
    normalize_rewards: bool = False
    """Divide rewards by the running standard deviation of every reward replayed so far."""
    twin_critics: bool = False
    """Two Q_i networks and their minimum in the V target and J_pi (the IP write-up, 001 Sec. 4.3)."""
    discrete_gradient: Literal["expectation", "neighbor_expectation", "straight_through"] = "expectation"
    """Discrete J_pi: exact expectation over the own action with sampled neighbour actions, plus
    the exact per-neighbour expectations that credit each neighbour (neighbor_expectation), or
    straight-through Gumbel-softmax samples for every agent (see the module docstring)."""
    neighbor_action_gradient: bool = True
    """With straight-through or Box actions, let J_pi's gradient reach the neighbours' actions a_Ni
    inside Q_i (false: each agent improves only through its own action)."""

    def __post_init__(self):
        if not self.alpha > 0:  # held as log alpha
            raise ValueError(f"alpha={self.alpha} is out of range: it must be positive (the entropy weight is "
                             f"learned and stored as log alpha)")


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
        self.value = StateValue(spec.obs_dim, config.state_dim, config.rounds, hidden, config.critic_reads_obs)
        self.target_value = copy.deepcopy(self.value).requires_grad_(False)
        self.q = nn.ModuleList(
            NeighborQ(spec.obs_dim, width, config.state_dim, config.rounds, hidden, config.critic_aggregation,
                      neighbor_input=config.critic_neighbors, read_obs=config.critic_reads_obs)
            for _ in range(2 if config.twin_critics else 1))

    def q_value(self, obs: Tensor, action: Tensor, graph: Graph, neighbor_action: Tensor | None = None) -> Tensor:
        """min over the Q networks (just Q with one network) of Q_i(s, a_i, a_Ni): [B, N]."""
        return _minimum([q(obs, action, graph, neighbor_action) for q in self.q])

    def q_all_actions(self, obs: Tensor, graph: Graph, neighbor_action: Tensor) -> Tensor:
        """min over the Q networks of Q_i(s, a, a_Ni) for every own discrete action a: [B, N, A]."""
        return _minimum([q.all_actions(obs, graph, neighbor_action) for q in self.q])

    def q_neighbor_actions(self, obs: Tensor, action: Tensor, graph: Graph) -> Tensor:
        """min over the Q networks of Q_i with neighbour slot k's action set to each a: [B, N, K, A]."""
        return _minimum([q.neighbor_all_actions(obs, action, graph) for q in self.q])


def _minimum(values: list[Tensor]) -> Tensor:
    return values[0] if len(values) == 1 else torch.minimum(*values)


@dataclass
class PolicyTerms:
    """One group's J_pi, its V target [B, N] (detached), mean entropy and mean Q gap over own actions."""

    loss: Tensor
    value_target: Tensor
    entropy: Tensor
    action_gap: Tensor | None


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
        self.log_alpha = nn.ParameterDict({g: nn.Parameter(torch.tensor(math.log(config.alpha)),
                                                           requires_grad=config.auto_alpha) for g in groups})
        self.target_entropy = {g: default_target_entropy(spec) if config.target_entropy is None
                               else config.target_entropy for g, spec in groups.items()}
        # Running count, mean and sum of squared deviations of the replayed rewards (normalize_rewards).
        self.register_buffer("reward_moments", torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64))
        self.to(self.device)
        self.optimizers = {
            "policy": adam(self.policy.parameters(), lr=config.lr),
            "value": adam([p for c in self.critics.values() for p in c.value.parameters()], lr=config.lr),
            "q": adam([p for c in self.critics.values() for p in c.q.parameters()], lr=config.lr),
        }
        if config.auto_alpha:
            self.optimizers["alpha"] = adam(self.log_alpha.parameters(), lr=config.lr)

    @torch.no_grad()
    def act(self, obs, graph, *, explore, action_mask=None, state=None):
        actions = {}
        for g in self.groups:
            distribution = self.policy(g, obs[g], graph[g], (action_mask or {}).get(g))
            actions[g] = distribution.sample().action if explore else distribution.mode()
        return actions

    def update(self, batch: Transition) -> dict[str, Tensor]:
        clip = self.config.max_grad_norm
        reward_scale = self.reward_multiplier(batch)
        q_loss = sum(self.q_loss(g, batch, reward_scale) for g in self.groups)
        q_norm = self.optimize("q", q_loss, clip, measure_norm=True)

        # J_pi (Eq. 8), with one joint action a ~ prod_i q_i(.|s) per state, also used by J_V.
        alphas = {g: self.log_alpha[g].exp().detach() for g in self.groups}
        terms = {g: self.policy_terms(g, batch, alphas[g]) for g in self.groups}
        policy_loss = sum(t.loss for t in terms.values())
        policy_norm = self.optimize("policy", policy_loss, clip, measure_norm=True)

        # J_V (Eq. 8): V_i(s) towards E_q[Q_i - alpha log q_i], then the target V follows.
        value_loss = sum(agent_mean(0.5 * (self.critics[g].value(batch.obs[g], batch.graph[g]) - t.value_target).square(),
                                    batch.alive.get(g)) for g, t in terms.items())
        value_norm = self.optimize("value", value_loss, clip, measure_norm=True)
        for critics in self.critics.values():
            polyak(critics.target_value, critics.value, self.config.tau)

        if self.config.auto_alpha:
            self.optimize("alpha", sum(self.log_alpha[g] * (t.entropy - self.target_entropy[g]) for g, t in terms.items()))
        metrics = {"loss_q": q_loss.detach(), "loss_policy": policy_loss.detach(), "loss_value": value_loss.detach(),
                   "entropy": torch.stack([t.entropy for t in terms.values()]).mean(),
                   "alpha": torch.stack(list(alphas.values())).mean(),
                   "v_target_mean": torch.stack([t.value_target.mean() for t in terms.values()]).mean(),
                   "grad_norm_q": q_norm, "grad_norm_policy": policy_norm, "grad_norm_value": value_norm}
        gaps = [t.action_gap for t in terms.values() if t.action_gap is not None]
        if gaps:
            metrics["q_action_gap"] = torch.stack(gaps).mean()
        return metrics

    def reward_multiplier(self, batch: Transition) -> float:
        """reward_scale, divided by the running std of the replayed rewards with normalize_rewards
        (Welford's update with this batch's rewards, so the first batch already counts)."""
        if not self.config.normalize_rewards:
            return self.config.reward_scale
        rewards = torch.cat([batch.reward[g].flatten() for g in self.groups]).double()
        count, mean, m2 = self.reward_moments.tolist()
        n, batch_mean = rewards.numel(), rewards.mean().item()
        delta, total = batch_mean - mean, count + n
        m2 += ((rewards - batch_mean).square().sum().item() + delta * delta * count * n / total)
        self.reward_moments.copy_(torch.tensor([total, mean + delta * n / total, m2], dtype=torch.float64))
        return self.config.reward_scale / max(math.sqrt(m2 / total), 1e-8)

    def q_loss(self, g: str, batch: Transition, reward_scale: float = 1.0) -> Tensor:
        """J_Q (Eq. 8): Q_i(s, a_i, a_Ni) of the stored joint action towards r_i + gamma V_target_i(s')."""
        critics, obs, graph = self.critics[g], batch.obs[g], batch.graph[g]
        with torch.no_grad():
            next_value = critics.target_value(batch.next_obs[g], batch.next_graph[g])
            q_target = reward_scale * batch.reward[g] + self.config.gamma * batch.continuing(g) * next_value
        stored_action = action_features(batch.action[g], self.groups[g].action_space)
        return sum(agent_mean(0.5 * (q(obs, stored_action, graph) - q_target).square(), batch.alive.get(g))
                   for q in critics.q)

    def policy_terms(self, g: str, batch: Transition, alpha: Tensor) -> PolicyTerms:
        """J_pi of group g, the V target E_q[Q_i - alpha log q_i] and what is logged about them."""
        critics, obs, graph = self.critics[g], batch.obs[g], batch.graph[g]
        distribution = self.policy(g, obs, graph, batch.action_mask[g])
        sample = distribution.sample()
        mode = self.config.discrete_gradient
        action_gap, neighbor_credit = None, 0.0
        with frozen(critics):
            if isinstance(distribution, Categorical) and mode != "straight_through":
                # Exact over a_i: sum_a q_i(a) (alpha log q_i(a) - Q_i(s, a, a_Ni)), a_Ni sampled.
                sampled = sample.critic_input.detach()
                q_all = critics.q_all_actions(obs, graph, sampled)
                expected_q = (distribution.probs * q_all).sum(-1)
                action_gap = (q_all.amax(-1) - q_all.amin(-1)).mean().detach()
                if mode == "neighbor_expectation":
                    # sum_{j in N_i} sum_a q_j(a) Q_i(s, a_i, a_j = a, a_{N_i minus j}): its gradient reaches q_j.
                    q_slots = critics.q_neighbor_actions(obs, sampled, graph)
                    neighbor_probs = gather_neighbors(distribution.probs, graph)
                    neighbor_credit = ((neighbor_probs * q_slots).sum(-1) * graph.mask).sum(-1)
                    neighbor_credit = neighbor_credit - neighbor_credit.detach()  # a gradient, not a value
            else:
                neighbor_action = None if self.config.neighbor_action_gradient else sample.critic_input.detach()
                expected_q = critics.q_value(obs, sample.critic_input, graph, neighbor_action)
        entropy_term = alpha * sample.log_prob_mean
        policy_loss = agent_mean(entropy_term - expected_q - neighbor_credit, batch.alive.get(g))
        return PolicyTerms(policy_loss, (expected_q - entropy_term).detach(),
                           -sample.log_prob_mean.mean().detach(), action_gap)

