"""MAMT: Multi-Agent Mirror descent policy optimisation with Trust region decomposition (Li, Wang, Jin,
Sheng & Zha, "Dealing with Non-Stationarity in MARL via Trust-Region Decomposition", Sec. 5.2-5.3,
Eq. 11-15, Fig. 2, Algorithm 2, Table 1).

MAMD (`mamd`, which this class extends) splits the joint trust region equally, epsilon_i = epsilon / n.
When agents are coupled unevenly (Eq. 11: agent k independent of i and j) that split constrains some
agents too much and others too little (the trust region decomposition dilemma, Sec. 5.2). MAMT learns
the local trust regions epsilon_i instead, from four pieces added to every update:

1. Coordination coefficients (Eq. 14), a counterfactual on agent i's centralised critic:

       C^_ij = softmax_{j != i} |Q_i(o, a_\\j) - Q_i(o, a)|,    C_ij = C^_ij if C^_ij >= delta else 0,

   with a the replayed joint action and delta = 0.2 (Table 1).
2. Action models h_{phi_i^j}(o_i): agent i's categorical prediction of agent j's action from o_i alone, for
   every ordered pair i != j, trained by cross-entropy on the replayed a_j (Table 1: CrossEntropyLoss,
   L2 1e-3, gradient clip 0.5).
3. The non-stationarity signal (Eq. 12)

       D_ns_i = Pi_ns( sum_{j != i} C_ij KL[ h_{phi_i^j}(o_i) || pi_j(o_j) ] ),

   how much the others' current policies have moved away from what agent i learned to expect of them.
4. The trust-region decomposition network TRD-Net (Fig. 2): every agent encodes (o_i, a_i) together with an
   embedding of its epsilon_i (MP-Encoder f_{theta^-}), the embeddings pass one weighted graph convolution
   over C, a second encoder of the same structure (g_{w^+}) embeds the same inputs, and the KL-Encoder maps
   both embeddings to KL^_i >= 0. It is trained on Eq. 13, L_ns = (sum_i KL^_i - sum_i D_ns_i)^2.

The trust regions solve the bilevel problem after Eq. 14: maximise
F(epsilon) = E_o[ sum_i V_i^{pi(epsilon)}(o) - KL^_i(o, epsilon; theta) ] with theta = argmin L_ns, by
two-timescale gradient steps (Eq. 15, equal learning rates, more steps on theta: Algorithm 2's slow and fast
loops). The policy step is MAMD's Eq. 10 with the learned epsilon_i.

Order of one `update` (Algorithm 2 lines 11-19): C and D_ns from the current critic, policies and action
models; one action-model step; one TRD-Net step (Eq. 13); MAAC's critic step and MAMD's policy step
(Eq. 9-10, weighting KL_i by 1 / epsilon_i); the targets; the old-policy refresh (mamd); and on every
`epsilon_delay`-th update one epsilon step whose gradient is taken at the same (epsilon_k, theta_k, psi_k) as
this update's theta and policy steps (Eq. 15 is simultaneous in epsilon and theta).

Open choices (the paper leaves them open or says nothing; a Config field where it is a switch):
- The counterfactual Q_i(a_\\j) of Eq. 14 (`counterfactual`). "marginal" (default): COMA's counterfactual
  baseline, the paper's stated starting point: agent j's action marginalised under its current policy,
  sum_{a'} pi_j(a' | o_j) Q_i(o, (a', a_-j)); one critic forward over the factual rows and N x A counterfactual
  copies. "mean_action": agent j's one-hot replaced by pi_j(. | o_j) (the critic's input at the expected
  action; N copies, cheaper, but an input the critic never saw in training). Either is one batched forward for
  all (i, j). The critic runs in eval mode for it: BatchNorm's running statistics normalise every row on its
  own, so the counterfactual copies neither shift the statistics of the factual rows nor update them.
  The softmax runs over the agents j != i present at s; the threshold keeps C^_ij >= delta (Eq. 14's tie).
  The rows of an absent agent i are 0.
- Pi_ns (`ns_clip`): clipping to [0, ns_clip] with ns_clip = 1 nat (Eq. 12 only says "constrains D_ns to a
  specific range"). KL[h || pi_j] is over agent j's allowed actions (h is masked like pi_j), in the Shannon
  log (the Tsallis q of mamd stays inside the policy loss).
- Action models: one network per ordered pair (i, j), j != i (N (N - 1) batched networks), each the policies'
  architecture (BN, two LeakyReLU layers of `model_hidden_dim`); "L2 regularisation 1e-3" is read as the
  policies' L2 (MAAC's 1e-3 mean(logits^2)); each pair's gradient is clipped to 0.5 (Table 1); Adam 1e-3.
  The loss is each pair's mean cross-entropy over the rows where both agents are present, summed over pairs.
- TRD-Net sizes (Fig. 12 is not in the text): epsilon_i enters as LeakyReLU(Linear(log epsilon_i)) of
  `trd_epsilon_embedding` = 16 units; MP-Encoder, second encoder and KL-Encoder are one-hidden-layer LeakyReLU
  MLPs of `trd_hidden_dim` = 64 units shared by all agents and reading a one-hot agent id (a GNN's shared
  weights, heterogeneous agents told apart by the id); (o_i, a_i) pass a per-agent BatchNorm like the critic's
  inputs. The graph convolution is m_i + sum_j W_ij m_j -> Linear -> LeakyReLU with W = (C + C^T) / 2 (Fig. 2's
  "weighted undirected graph" made symmetric) and a self-loop of weight 1; KL^_i = softplus(KL-Encoder), a
  divergence is non-negative. Absent agents add nothing to the sums of Eq. 13; its square is averaged over the
  batch. Gradient clip 10 N (Table 1), Adam 1e-3.
- d F / d epsilon through pi(epsilon) (the open part of the bilevel problem): a one-step lookahead. The policy
  loss is S(psi) + sum_i P_i(psi) / epsilon_i (S: Eq. 10 without its trust-region term, with the entropy and
  logit terms; P_i = `mirror_descent_terms`' penalty); one gradient step psi' = psi - eta grad L changes the
  return to first order by -grad S . (psi' - psi), whose epsilon_i-dependent part is
  eta <grad_psi_i S, grad_psi_i P_i> / epsilon_i (eta = pi_lr, the policies' learning rate as an SGD step).
  So d(-F)/d log epsilon_i = eta <grad S, grad P_i>_i / epsilon_i + d(sum_k mean KL^_k)/d log epsilon_i, the
  second through TRD-Net's epsilon embedding with theta fixed. The inner product is over agent i's own policy
  parameters, so MAMT needs per-agent policies (`parameter_sharing` False).
- epsilon_i is learned as log epsilon_i (positive; Adam at `epsilon_lr`, Table 1's Adam 1e-3 for every network,
  "alpha_k and beta_k equal"), clipped to [0.01, 100] (Table 1) after every step and initialised at MAMD's
  equal split trust_region / n. The two timescales (Eq. 15, "more gradient descent steps on theta, similar as
  Fujimoto et al. (2018)"): theta steps every update, epsilon every `epsilon_delay` = 2 updates (TD3's policy
  delay), on the updates k with (k + 1) % epsilon_delay == 0 (counted by mamd's `md_iteration`, so a resumed
  run keeps the schedule; reading it costs one host sync per update).
- Metrics (all scalars, every update): mamd's `kl_i`, `kl` and `epsilon_i` (the mean learned epsilon_i before this update's epsilon step), plus
  `epsilon_i` per agent as `epsilon_0`..; `dns_0`.. (D_ns_i averaged over the rows where i is present) and
  `dns`; `coord_i_j` (C_ij averaged over the batch) for N <= `coordination_metrics_max_agents` = 8 (the paper's
  tasks), else only `coord`, the mean of C over i != j (also logged for small N); `loss_action_model`,
  `loss_ns`, `kl_hat` (sum_i KL^_i, batch mean).

Continuous (Box) actions (MAMD's tanh-Gaussian policies, `mamd`; the paper's Multi-Walker runs):
- The counterfactual of Eq. 14 has no finite sum over agent j's actions: "marginal" estimates
  E_{a' ~ pi_j}[Q_i(o, (a', a_-j))] by Monte Carlo with K = `counterfactual_samples` = 8 samples of pi_j
  per row (N x K copies, still one critic forward); "mean_action" feeds the mean of those K samples
  (the expected action) as agent j's action.
- Action models predict a tanh-Gaussian (mean, log std) of a_j, trained by the negative log-likelihood
  of the replayed a_j (the cross-entropy of a density); their L2 term reads the pre-tanh means.
  KL[h_i^j || pi_j] in Eq. 12 is the closed-form KL of the Gaussians before the squash (`mamd`).
- TRD-Net reads the raw actions in place of the one-hots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vimarl.algos.base import Capabilities, adam, register
from vimarl.algos.maac import (AgentBatchNorm, AgentPolicies, AttentionCritic, attention_mask, clip_per_agent,
                               per_agent_mean)
from vimarl.algos.mamd import (MirrorDescentAttentionSAC, MirrorDescentConfig, categorical_divergence,
                               policy_divergence)
from vimarl.buffer import Transition
from vimarl.envs.base import GroupSpec
from vimarl.errors import VimarlError
from vimarl.nn.centralized import AgentMLP
from vimarl.nn.distributions import Categorical, PolicySample, TanhGaussian


@dataclass
class TrustRegionDecompositionConfig(MirrorDescentConfig):
    coordination_threshold: float = 0.2
    """delta of Eq. 14: coordination coefficients below it are set to 0 (Table 1: 0.2)."""
    counterfactual: Literal["marginal", "mean_action"] = "marginal"
    """Q_i(a_\\j) of Eq. 14: "marginal" sums Q_i over agent j's actions weighted by pi_j (COMA's counterfactual);
    "mean_action" feeds pi_j's probabilities in place of a_j's one-hot (one copy per j instead of one per action).
    Box actions: the marginal by Monte Carlo over `counterfactual_samples` samples of pi_j, or their mean."""
    counterfactual_samples: int = 8
    """K, samples of pi_j per row in the counterfactual of Eq. 14 for Box actions (not used for Discrete ones)."""
    model_lr: float = 1e-3
    """Adam learning rate of the action models h_{phi_i^j} (Table 1: Adam 1e-3)."""
    model_hidden_dim: int = 64
    """Units of each of the two hidden layers of every action model (not in the paper's text)."""
    model_reg: float = 1e-3
    """Weight of mean(logits^2) of every action model (Table 1: modelling policy L2 regularisation 0.001)."""
    model_grad_clip: float = 0.5
    """Gradient norm clip of every action model (Table 1: modelling policy clip grad 0.5)."""
    ns_clip: float = 1.0
    """Pi_ns of Eq. 12 clips D_ns_i to [0, ns_clip] nats (the paper gives no range)."""
    trd_lr: float = 1e-3
    """Adam learning rate of TRD-Net's theta (Table 1: Adam 1e-3; Eq. 15's beta_k)."""
    trd_hidden_dim: int = 64
    """Width of TRD-Net's encoders, graph convolution and KL-Encoder (Fig. 12 is not in the text)."""
    trd_epsilon_embedding: int = 16
    """Width of TRD-Net's embedding of log epsilon_i (Fig. 12 is not in the text)."""
    trd_grad_clip: float = 10.0
    """TRD-Net's gradient norm is clipped to this times N (Table 1: 10 * num of agents)."""
    epsilon_lr: float = 1e-3
    """Adam learning rate of log epsilon_i (Eq. 15's alpha_k, equal to beta_k as in the paper)."""
    epsilon_delay: int = 2
    """Updates per epsilon step (Eq. 15's two timescales: theta steps every update; TD3's delay 2, which the paper
    cites for the scheme)."""
    epsilon_min: float = 0.01
    """Lower clip of every learned epsilon_i (Table 1: trust region clip from 0.01)."""
    epsilon_max: float = 100.0
    """Upper clip of every learned epsilon_i (Table 1: trust region clip to 100)."""
    coordination_metrics_max_agents: int = 8
    """Log every C_ij as `coord_i_j` up to this many agents (the paper's tasks have <= 8); beyond, only their mean."""

    def __post_init__(self):
        super().__post_init__()
        if self.epsilon_delay < 1:
            raise ValueError(f"epsilon_delay={self.epsilon_delay} is out of range: it must be at least 1")
        if not 0 < self.epsilon_min <= self.epsilon_max:
            raise ValueError(f"epsilon_min={self.epsilon_min}, epsilon_max={self.epsilon_max} are out of range: "
                             f"they must satisfy 0 < epsilon_min <= epsilon_max")


# --- the pieces of Sec. 5.3, public so that they can be tested --------------------------------

@torch.no_grad()
def replaced_action_q(critic: nn.Module, obs: Tensor, actions: Tensor, replacements: Tensor, weights: Tensor,
                      present: Tensor | None) -> tuple[Tensor, Tensor]:
    """(Q_i(o, a) [B, N], Q_i(o, a_\\j) [B, N (i), N (j)]) from ONE forward of `critic` (AttentionCritic's
    signature) over the factual rows (actions [B, N, A]) stacked with every counterfactual copy (j, m): agent j's
    action replaced by replacements[m, :, j] ([M, B, N, A], broadcastable), the M copies of j then summed with
    weights [M, B, N] (weights[m, b, j] of copy (j, m))."""
    b, n, a = actions.shape
    replaced = torch.eye(n, dtype=torch.bool, device=actions.device)  # [copy j, agent k]: k's action replaced
    copies = torch.where(replaced[:, None, None, :, None], replacements[None], actions[None, None])  # [j, m, B, N, A]
    rows = torch.cat([actions, copies.reshape(-1, n, a)])
    repeats = rows.shape[0] // b
    q, _, _ = critic(obs.repeat(repeats, 1, 1), rows, None if present is None else present.repeat(repeats, 1))
    q = q.view(repeats, b, n)
    # [j, m, B, i] weighted by weights[m, B, j] -> [j, B, i]
    counterfactual = (q[1:].view(n, -1, b, n) * weights.permute(2, 0, 1).unsqueeze(-1)).sum(1)
    return q[0], counterfactual.permute(1, 2, 0)


def counterfactual_actions(policy: Tensor | TanhGaussian, variant: Literal["marginal", "mean_action"],
                           samples: int) -> tuple[Tensor, Tensor]:
    """(replacements [M, B, N, A], weights [M, B, N]) of Eq. 14's counterfactual for `replaced_action_q`, given
    every pi_j as its probabilities [B, N, A] (Discrete) or its tanh-Gaussian (Box). Discrete: every action a'
    weighted by pi_j(a' | o_j) ("marginal"), or pi_j's probabilities once ("mean_action"). Box: K = `samples` draws
    of pi_j weighted 1 / K ("marginal", Monte Carlo), or their mean once."""
    if isinstance(policy, TanhGaussian):
        shape = (samples, *policy.mean.shape)
        draws = TanhGaussian(policy.mean.expand(shape), policy.log_std.expand(shape), policy.offset - policy.scale,
                             policy.offset + policy.scale).sample().action
        if variant == "mean_action":
            return draws.mean(0, keepdim=True), torch.ones_like(draws[:1, ..., 0])
        return draws, torch.full_like(draws[..., 0], 1.0 / samples)
    if variant == "mean_action":
        return policy.unsqueeze(0), torch.ones_like(policy[None, ..., 0])
    a = policy.shape[-1]
    return torch.eye(a, dtype=policy.dtype, device=policy.device)[:, None, None, :], policy.permute(2, 0, 1)


def counterfactual_q(critic: nn.Module, obs: Tensor, actions: Tensor, policy: Tensor | TanhGaussian,
                     present: Tensor | None, variant: Literal["marginal", "mean_action"] = "marginal",
                     samples: int = 8) -> tuple[Tensor, Tensor]:
    """(Q_i(o, a) [B, N], Q_i(o, a_\\j) [B, N (i), N (j)]) of Eq. 14 for the policies pi_j (`counterfactual_actions`):
    the attention critic's own exact shortcut (`AttentionCritic.replaced_action_q`), or for any other critic
    one forward over every copy (`replaced_action_q`)."""
    replaced = getattr(critic, "replaced_action_q", None)
    if replaced is None:
        return replaced_action_q(critic, obs, actions, *counterfactual_actions(policy, variant, samples), present)
    return replaced(obs, actions, *counterfactual_actions(policy, variant, samples), present)


def coordination_coefficients(q: Tensor, counterfactual: Tensor, threshold: float, present: Tensor | None) -> Tensor:
    """Eq. 14: C [B, N, N] with C_ij = softmax over the present j != i of |Q_i(a_\\j) - Q_i(a)|, zeroed below
    `threshold` (delta) and in the rows of absent agents i. q [B, N], counterfactual [B, N, N]."""
    gap = (counterfactual - q.unsqueeze(-1)).abs()
    others = attention_mask(q.shape[-1], present, q.device)
    weights = torch.softmax(gap.masked_fill(~others, torch.finfo(gap.dtype).min), dim=-1) * others
    if present is not None:
        weights = weights * present.unsqueeze(-1)
    return torch.where(weights >= threshold, weights, 0.0)


def coordinated_divergence(pair_kl: Tensor, coordination: Tensor, observer: Tensor, target: Tensor,
                           clip: float) -> Tensor:
    """Eq. 12: D_ns_i = clip(sum_{j != i} C_ij KL[h_i^j(o_i) || pi_j(o_j)], 0, clip) [B, N] from the KLs [B, P] of
    the ordered pairs (observer i, target j) and C [B, N, N]."""
    weighted = coordination[:, observer, target] * pair_kl
    total = torch.zeros_like(coordination[..., 0]).index_add_(1, observer, weighted)
    return total.clamp(0.0, clip)


def non_stationarity(model_log_probs: Tensor, policy_log_probs: Tensor, coordination: Tensor, observer: Tensor,
                     target: Tensor, pair_mask: Tensor | None, clip: float) -> Tensor:
    """`coordinated_divergence` of categorical action models and policies, from the models' log-probabilities
    [B, P, A], the policies' [B, N, A] and the pairs' allowed actions (agent j's) [B, P, A] or None."""
    kl = categorical_divergence(model_log_probs, policy_log_probs[:, target], pair_mask)
    return coordinated_divergence(kl, coordination, observer, target, clip)


class TrustRegionDecompositionNet(nn.Module):
    """TRD-Net (Fig. 2): KL^_i [B, N] from (o_i, a_i), log epsilon_i [N] and the coordination graph C [B, N, N]."""

    def __init__(self, n: int, obs_dim: int, n_actions: int, hidden: int, embedding: int, batchnorm: bool):
        super().__init__()
        inputs = obs_dim + n_actions + embedding
        self.norm = AgentBatchNorm(n, obs_dim + n_actions, batchnorm)
        self.epsilon_embedding = nn.Linear(1, embedding)
        self.message_encoder = AgentMLP(n, inputs, (hidden,), hidden, True, nn.LeakyReLU)   # MP-Encoder f_{theta^-}
        self.graph_convolution = nn.Linear(hidden, hidden)
        self.agent_encoder = AgentMLP(n, inputs, (hidden,), hidden, True, nn.LeakyReLU)     # g_{w^+}
        self.kl_encoder = AgentMLP(n, 2 * hidden, (hidden,), 1, True, nn.LeakyReLU)

    def forward(self, obs: Tensor, actions: Tensor, log_epsilon: Tensor, coordination: Tensor) -> Tensor:
        x = self.norm(torch.cat([obs, actions], dim=-1))
        embedded = F.leaky_relu(self.epsilon_embedding(log_epsilon.unsqueeze(-1)))
        x = torch.cat([x, embedded.expand(*x.shape[:-1], -1)], dim=-1)
        messages = F.leaky_relu(self.message_encoder(x))
        undirected = (coordination + coordination.transpose(-1, -2)) / 2
        convolved = F.leaky_relu(self.graph_convolution(messages + undirected @ messages))
        own = F.leaky_relu(self.agent_encoder(x))
        return F.softplus(self.kl_encoder(torch.cat([convolved, own], dim=-1))).squeeze(-1)


@register("mamt", "MAMT (Li et al., 004 Sec. 5.3): MAMD with local trust regions epsilon_i learned from a trust-region "
          "decomposition network over counterfactual coordination coefficients and action models of the others",
          Capabilities(discrete=True, continuous=True, heterogeneous=True))
class TrustRegionDecompositionSAC(MirrorDescentAttentionSAC):
    Config = TrustRegionDecompositionConfig

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: TrustRegionDecompositionConfig,
                 device="cpu"):
        n = sum(spec.n_agents for spec in groups.values())
        if n < 2 or config.parameter_sharing:
            raise ValueError(f"mamt needs >= 2 agents (it models the others) and per-agent policies "
                             f"(parameter_sharing off: the epsilon gradient is per agent), got {n}, "
                             f"parameter_sharing={config.parameter_sharing}")
        if config.local_trust_regions:
            raise VimarlError("mamt learns its local trust regions; algo.local_trust_regions (MAMD-OP) is for mamd")
        super().__init__(groups, state_dim, config, device)  # sets epsilon_i = trust_region / n: log_epsilon's start
        observer, target = (~torch.eye(n, dtype=torch.bool)).nonzero().unbind(1)
        self.register_buffer("observer", observer.to(self.device), persistent=False)  # pair p = (observer i, target j)
        self.register_buffer("target", target.to(self.device), persistent=False)
        obs_sizes = torch.tensor([spec.obs_dim for spec in groups.values() for _ in range(spec.n_agents)])
        self.action_models = AgentPolicies(len(observer), self.obs_pad, self.policy_outputs, config.model_hidden_dim,
                                           False, config.input_batchnorm, obs_sizes[observer]).to(self.device)
        self.trd = TrustRegionDecompositionNet(n, self.obs_pad, self.n_actions, config.trd_hidden_dim,
                                               config.trd_epsilon_embedding, config.input_batchnorm).to(self.device)
        self.optimizers.update({"action_model": adam(self.action_models.parameters(), config.model_lr),
                                "trd": adam(self.trd.parameters(), config.trd_lr),
                                "epsilon": adam([self.log_epsilon], config.epsilon_lr)})
        self.pair_names = [f"coord_{i}_{j}" for i, j in zip(observer.tolist(), target.tolist())]
        self.epsilon_names = [f"epsilon_{i}" for i in range(n)]
        self.dns_names = [f"dns_{i}" for i in range(n)]
        # Per-update state between `update` and the policy loss it calls (through MAAC's update).
        self.epsilon_due = False
        self.last_penalty_rows: Tensor | None = None
        self.policy_alignment: Tensor | None = None

    # --- the learned local trust regions ----------------------------------------------------

    @property
    def epsilon_i(self) -> Tensor:
        """The learned local trust regions [N], detached: the policy loss (Eq. 10) treats them as constants."""
        return self.log_epsilon.detach().exp()

    @epsilon_i.setter
    def epsilon_i(self, value: float) -> None:
        """Set every epsilon_i to `value` (clipped to Table 1's range); the first call, MAMD's constructor assigning
        its equal split trust_region / n, creates the parameter."""
        log_value = math.log(min(max(value, self.config.epsilon_min), self.config.epsilon_max))
        if "log_epsilon" not in self._parameters:
            self.log_epsilon = nn.Parameter(torch.full((self.n_agents,), log_value, device=self.device))
        else:
            with torch.no_grad():
                self.log_epsilon.fill_(log_value)

    def mirror_descent_terms(self, obs: Tensor, mask: Tensor | None, distribution: Categorical | TanhGaussian,
                             sample: PolicySample, advantage: Tensor) -> tuple[Tensor, Tensor]:
        score, penalty = super().mirror_descent_terms(obs, mask, distribution, sample, advantage)
        self.last_penalty_rows = penalty  # with its graph, for `policy_alignment`
        return score, penalty

    def policy_loss(self, batch: Transition) -> tuple[Tensor, Tensor]:
        loss, entropy = super().policy_loss(batch)
        if self.epsilon_due:
            penalty = per_agent_mean(self.last_penalty_rows, batch.joint_alive(self.groups)).sum()
            self.policy_alignment = self.score_penalty_alignment(loss, penalty)
        return loss, entropy

    def score_penalty_alignment(self, loss: Tensor, penalty: Tensor) -> Tensor:
        """<grad_psi_i S, grad_psi_i P_i> per agent [N] over agent i's own policy parameters, with
        grad S = grad loss - grad P / epsilon (everything of the policy loss but the trust-region term)."""
        params = list(self.policy.parameters())
        total = torch.autograd.grad(loss, params, retain_graph=True)
        penalty_grads = torch.autograd.grad(penalty, params, retain_graph=True)
        inverse = 1.0 / self.epsilon_i
        return sum(((t - g * inverse.view(-1, *[1] * (g.dim() - 1))) * g).reshape(self.n_agents, -1).sum(1)
                   for t, g in zip(total, penalty_grads))

    # --- one update ---------------------------------------------------------------------------

    @torch.no_grad()
    def coordination(self, obs: Tensor, actions: Tensor, policy: Tensor | TanhGaussian,
                     present: Tensor | None) -> Tensor:
        """C [B, N, N] of Eq. 14 from the current critic in eval mode (row-wise BN running statistics), given the
        policies as `counterfactual_actions` takes them."""
        critic: AttentionCritic = self.critic
        was_training = critic.training
        critic.eval()
        try:
            q, counterfactual = counterfactual_q(critic, obs, actions, policy, present, self.config.counterfactual,
                                                 self.config.counterfactual_samples)
        finally:
            critic.train(was_training)
        return coordination_coefficients(q, counterfactual, self.config.coordination_threshold, present)

    def update(self, batch: Transition) -> dict[str, Tensor]:
        config, n = self.config, self.n_agents
        obs = self.joint_obs(batch.obs)
        alive = batch.joint_alive(self.groups)
        mask = self.joint_action_mask(batch.action_mask, obs.shape[:-2])
        actions = self.joint_actions(batch.action)
        with torch.no_grad():
            _, policy = self.distribution(self.policy, obs, mask)
        coordination = self.coordination(obs, actions, policy if self.continuous else policy.probs, alive)

        # Action models: D_ns (Eq. 12) from the models before their step, then their cross-entropy step.
        pair_mask = None if mask is None else mask[:, self.target]
        model_logits, model = self.distribution(self.action_models, obs[:, self.observer], pair_mask)
        with torch.no_grad():
            pair_kl = policy_divergence(model, self.select_agents(policy, self.target), pair_mask)
        dns = coordinated_divergence(pair_kl, coordination, self.observer, self.target, config.ns_clip)
        pair_present = None if alive is None else alive[:, self.observer] & alive[:, self.target]
        model_loss = self.action_model_loss(model_logits, model, batch.action, pair_present)
        self.optimizers["action_model"].zero_grad(set_to_none=True)
        model_loss.backward()
        clip_per_agent(self.action_models, config.model_grad_clip, len(self.pair_names))
        self.optimizers["action_model"].step()

        # TRD-Net (Eq. 13) on theta; on an epsilon update also d(sum_i KL^_i)/d log epsilon at theta_k.
        self.epsilon_due = (int(self.md_iteration) + 1) % config.epsilon_delay == 0
        log_epsilon = self.log_epsilon.detach().requires_grad_(self.epsilon_due)
        weights = torch.ones_like(dns) if alive is None else alive.to(dns.dtype)
        kl_hat = (self.trd(obs, actions, log_epsilon, coordination) * weights).sum(-1)
        ns_loss = (kl_hat - (dns * weights).sum(-1)).square().mean()
        if self.epsilon_due:
            kl_hat_grad, = torch.autograd.grad(kl_hat.mean(), log_epsilon, retain_graph=True)
        self.optimize("trd", ns_loss, config.trd_grad_clip * n)

        # Critic, policy (Eq. 9-10 with the learned epsilon_i), targets, old-policy refresh.
        metrics = super().update(batch)
        if self.epsilon_due:
            # d(-F)/d log epsilon_i: the one-step lookahead of the return plus TRD-Net's KL^ (module docstring).
            self.epsilon_step(kl_hat_grad + config.pi_lr * self.policy_alignment / self.epsilon_i)
        self.epsilon_due, self.last_penalty_rows, self.policy_alignment = False, None, None

        coordination_mean = coordination.mean(0)[self.observer, self.target]
        pairs = (dict(zip(self.pair_names, coordination_mean.unbind()))
                 if n <= config.coordination_metrics_max_agents else {})
        dns_per_agent = per_agent_mean(dns, alive)
        return {**metrics, **dict(zip(self.epsilon_names, self.epsilon_i.unbind())),
                **dict(zip(self.dns_names, dns_per_agent.unbind())), "dns": dns_per_agent.mean(),
                **pairs, "coord": coordination_mean.mean(), "loss_action_model": model_loss.detach(),
                "loss_ns": ns_loss.detach(), "kl_hat": kl_hat.detach().mean()}

    def select_agents(self, policy: Categorical | TanhGaussian, index: Tensor) -> Categorical | TanhGaussian:
        """The policies of the agents `index` [P]: [B, N, ..] -> [B, P, ..]."""
        if isinstance(policy, TanhGaussian):
            return TanhGaussian(policy.mean[:, index], policy.log_std[:, index], self.action_space.low,
                                self.action_space.high)
        return Categorical(policy.logits[:, index])  # logits already masked

    def action_model_loss(self, logits: Tensor, model: Categorical | TanhGaussian, action: dict[str, Tensor],
                          pair_present: Tensor | None) -> Tensor:
        """Sum over pairs (i, j) of the mean cross-entropy (negative log-likelihood) -log h_i^j(a_j | o_i) of the
        replayed a_j, plus model_reg mean(logits^2) over agent j's real actions (the pre-tanh means for Box)."""
        cross_entropy = -model.log_prob(self.stored_actions(action)[:, self.target])
        valid = self.action_valid[self.target].to(logits.dtype)
        logit_reg = (logits.square() * valid).sum((0, -1)) / (valid.sum(-1) * logits.shape[0])
        return (per_agent_mean(cross_entropy, pair_present) + self.config.model_reg * logit_reg).sum()

    @torch.no_grad()
    def epsilon_step(self, gradient: Tensor) -> None:
        """One Adam step of log epsilon on `gradient`, then the clip to [epsilon_min, epsilon_max] (Table 1)."""
        optimizer = self.optimizers["epsilon"]
        optimizer.zero_grad(set_to_none=True)
        self.log_epsilon.grad = gradient
        optimizer.step()
        self.log_epsilon.clamp_(math.log(self.config.epsilon_min), math.log(self.config.epsilon_max))
