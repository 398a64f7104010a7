"""MAAC: Actor-Attention-Critic (Iqbal & Sha, ICML 2019), faithful to the official code
(shariqiqbal2810/MAAC@6174a01, `algorithms/attention_sac.py`, `utils/{critics,policies,buffer}.py`;
ALGO_SPECS §3.2). It is the backbone of MAMD/MAMT (paper 004, Eq. 9-10).

Every agent i has its own policy pi_i(a_i | o_i) (discrete actions) and its own critic head; the
critics of all agents share one multi-head attention module over the other agents:

    e_i     = LeakyReLU(W_e^i BN(o_i (+) a_i) + b)          state-action encoder, per agent
    s_i     = LeakyReLU(W_s^i BN(o_i) + b)                   state encoder, per agent
    k_j^h   = W_k^h e_j,   q_i^h = W_q^h s_i,   v_j^h = LeakyReLU(W_v^h e_j + b)   (heads shared)
    x_i^h   = sum_{j != i} softmax_j(q_i^h . k_j^h / sqrt(d)) v_j^h
    Q_i(o, (., a_-i)) = W_2^i LeakyReLU(W_1^i [s_i, x_i^1..x_i^H] + b) + b    (every own action)
    Q_i(o, a)         = Q_i(o, (., a_-i))[a_i]
    reg     = 1e-3 sum_i sum_h mean_{b, j != i} (q_i^h . k_j^h)^2        (unscaled logits)

    y_i     = r_i + gamma (1 - d) Qbar_i(o', a') - log pibar_i(a'_i | o'_i) / reward_scale,
              a'_k ~ pibar_k(. | o'_k)                                     ("code" soft target)
    L_Q     = sum_i MSE(Q_i(o, a), y_i) + reg                             (a: replay actions)
    b_i     = sum_a pi_i(a | o_i) Q_i(o, (a, a~_-i)),  a~_k ~ pi_k(. | o_k) for every agent k
    L_pi_i  = mean[ log pi_i(a~_i) stopgrad(alpha log pi_i(a~_i) - (Q_i(o, a~) - b_i)) ]
              + 1e-3 mean(logits_i^2),   alpha = 1 / reward_scale

with bars marking target networks (Polyak tau after every critic+policy pair). The critic step
comes first, then the policy step, then both targets (`update`).

Choices of the reference code reproduced here (ALGO_SPECS §3.2), each a Config field where it is
a switch:
- The query and the critic head read the state-only encoding s_i (the paper's figure feeds e_i to
  the head); this is what lets one forward give Q_i for every own action (GitHub issue #28).
- The soft target subtracts log pibar'/reward_scale outside gamma (1 - d): not discounted and not
  masked at terminal steps (`soft_target="code"`); "paper" is gamma (1 - d)(Qbar - alpha log pibar).
  log pibar is the log-probability of the sampled a'_i (not its expectation).
- BatchNorm1d(affine=False) on every policy and critic-encoder input (`input_batchnorm`), with batch
  statistics during updates (targets too: the reference trains in `train()` mode throughout) and the
  running statistics when acting (`prep_rollouts` puts the policies in eval mode; `act` does so).
  The targets' BN running statistics follow their own forward passes, not Polyak (as the reference,
  whose soft update copies parameters only).
- After the critic's backward, gradients of the shared key, query ("selector") and value
  extractors AND of the per-agent state-action encoders are scaled by 1/N (`scale_shared_grads`;
  "code" keeps the encoders, which looks unintended in the reference (issue #28) and only rescales
  their learning rate; "attention" scales the attention parts only; "none" switches it off).
  Then the critic's gradient norm is clipped to 10 N; Adam with L2 weight decay 1e-3.
- Policy gradients are clipped per agent to norm 0.5 (one Adam per agent in the reference; Adam is
  elementwise, so one Adam over the batched per-agent weights is the same). The critic runs without
  gradient in the policy step (the reference disables its gradients; every critic output sits inside
  the stop-gradient anyway).
- Rewards are standardised per agent by the mean and (population) std of ALL rewards in the replay
  buffer (`normalize_rewards`, the reference buffer's default). The algorithm never sees the buffer:
  the trainer hands every collected step to `observe`, which keeps exact per-agent sums, sums of
  squares and counts (buffers, so checkpointed); these equal the buffer's statistics until the ring
  buffer wraps (after that they also remember overwritten rows). Before anything was observed the raw
  rewards are used; a zero std (a constant reward) divides by 1 instead (the reference would give NaN).
- Exploration samples the categorical, evaluation takes the argmax; action masks, where an env has
  them, are applied to the logits (the reference has none); the logit regulariser reads raw logits.

Choices of this implementation (the reference has one group of agents and no departures):
- Groups are concatenated into one agent axis of N = sum_g N_g agents, groups in order. Observations
  are zero-padded to the largest size O_max and actions to the largest count A_max; padded actions
  are masked out of every policy and carry probability 0 in the baseline. Zero-padded inputs are
  exactly 0 after BN (a constant feature) and the first layer of every per-agent network is
  initialised with its agent's true fan-in (nn.Linear's bound) and zero weights on padded inputs, so
  each agent's network computes what an unpadded one would; all agents run in one batched einsum.
- `parameter_sharing` (not in the reference) shares the policy and the critic's per-agent encoders
  and heads across agents, each reading a one-hot agent id (masac's scheme); BN keeps per-agent stats.
- Agents absent at s (`batch.joint_alive`) are not attended to and add nothing to the losses or the
  attention regulariser; the target critic attends only to agents still in at s' (`next_alive`).
  Continuation uses `Transition.continuing` (terminated or departed); in the "code" target the
  entropy term stays unmasked for departed agents as for terminal steps. BN batch statistics are
  taken over all rows, present or not. Per-agent means over present rows are summed over agents (the
  reference's sum over agents of per-agent means).
- Trainer settings of main.py (12 rollout threads, 4 updates of batch 1024 every 100 env steps,
  buffer 1e6, episode length 25 or 100) are trainer fields, not part of this Config.

Continuous (Box) actions (neither the reference nor paper 004, which runs MAAC on Multi-Walker without
saying how; the standard SAC extension, Haarnoja et al. 2018, with everything else above unchanged):
- pi_i is a tanh-Gaussian scaled to [low, high] (masac's: log std clamped to [-20, 2]); the policy
  network outputs the mean and log std of each dimension. Exploration samples, evaluation takes
  tanh(mean). The logit regulariser reads the pre-tanh mean (the quantity the squash saturates).
- The critic has no all-action head (Q_i over a continuum of own actions): its head reads
  [s_i, x_i, a_i] with the raw own action and outputs Q_i(o, a) alone. Encoders, attention over the
  others' e_j and the critic loss are unchanged (the actions enter e_j as values instead of one-hots).
- The policy gradient is SAC's reparameterised one:
      L_pi_i = mean[ alpha log pi_i(a~_i) - Q_i(o, (a~_i, stopgrad a~_-i)) ] + 1e-3 mean(mu_i^2),
  with a~_i = squash(mu_i + sigma_i noise). The others' sampled actions enter the attention as
  constants (the critic forward takes the own actions separately), so agent i's gradient is that of
  its own Q_i only, as in the discrete case; the critic's parameters are frozen (requires_grad off)
  during this forward. The counterfactual baseline b_i is dropped: it reduces the variance of score-
  function gradients, and a reparameterised gradient has no score term for it to act on (a baseline
  that does not depend on a~_i has zero gradient).
- The soft target, reward standardisation and everything else are the discrete ones; log pibar is
  the squashed density of the sampled a' (with its tanh Jacobian).
- All groups must be Box or all Discrete (one policy family), and Box groups must share one action
  space (dim, low, high): the agents are one batched axis; anything else is refused with a one-line
  error.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vimarl.algos.base import Algorithm, Capabilities, adam, frozen, polyak, register
from vimarl.buffer import Transition
from vimarl.envs.base import Box, GroupSpec, TimeStep
from vimarl.errors import VimarlError
from vimarl.nn.centralized import AgentMLP, BatchedLinear
from vimarl.nn.distributions import Categorical, PolicyHead, PolicySample, TanhGaussian, action_dim


@dataclass
class AttentionSACConfig:
    pi_lr: float = 1e-3
    """Adam learning rate of every policy (MAAC main.py `pi_lr`)."""
    q_lr: float = 1e-3
    """Adam learning rate of the attention critic (MAAC main.py `q_lr`)."""
    critic_weight_decay: float = 1e-3
    """L2 weight decay of the critic's Adam (attention_sac.py)."""
    gamma: float = 0.99
    """Discount of the soft target (MAAC main.py; the class default is 0.95)."""
    tau: float = 0.001
    """Polyak step of the target critic and target policies after every critic+policy update
    (MAAC main.py; the class default is 0.01)."""
    reward_scale: float = 100.0
    """The entropy temperature is alpha = 1 / reward_scale (MAAC main.py)."""
    policy_hidden_dim: int = 128
    """Units of each of the two LeakyReLU hidden layers of every policy (MAAC main.py `pol_hidden_dim`)."""
    critic_hidden_dim: int = 128
    """Width d of the critic's encoders, attention (heads x head size) and head (MAAC main.py)."""
    attend_heads: int = 4
    """Attention heads of the critic, each of size critic_hidden_dim / attend_heads = 32 (MAAC main.py)."""
    attention_reg: float = 1e-3
    """Weight of the squared attention logits in the critic loss (utils/critics.py)."""
    logit_reg: float = 1e-3
    """Weight of mean(logits^2) in every policy loss (attention_sac.py)."""
    critic_grad_clip: float = 10.0
    """The critic's gradient norm is clipped to this times N, the number of agents (attention_sac.py)."""
    policy_grad_clip: float = 0.5
    """Gradient norm clip of every agent's policy (attention_sac.py)."""
    soft_target: Literal["code", "paper"] = "code"
    """The critic target: "code" y = r + gamma (1 - d) Qbar - log pibar / reward_scale (the reference: entropy term neither
    discounted nor masked); "paper": y = r + gamma (1 - d)(Qbar - log pibar / reward_scale)."""
    scale_shared_grads: Literal["code", "attention", "none"] = "code"
    """Scale critic gradients by 1/N after backward: "code" the key, query and value extractors and the
    per-agent state-action encoders (the reference, issue #28), "attention" the shared extractors only,
    "none" nothing."""
    normalize_rewards: bool = True
    """Standardise rewards per agent by the statistics of every observed reward (the reference buffer's
    norm_rews=True; needs the trainer to call `observe`)."""
    input_batchnorm: bool = True
    """BatchNorm1d(affine=False) on the policy and critic-encoder inputs (the reference's norm_in=True)."""
    parameter_sharing: bool = False
    """One policy and one set of critic encoders and heads shared by all agents, each reading a one-hot
    agent id (not in the reference, whose agents have their own networks), or one per agent."""


# --- small pieces, public so that they can be tested and reused (MAMD / MAMT) ------------------

def counterfactual_baseline(probs: Tensor, all_q: Tensor) -> Tensor:
    """b_i = sum_a pi_i(a | o_i) Q_i(o, (a, a_-i)): probs and all_q [..., N, A] -> [..., N]."""
    return (probs * all_q).sum(-1)


def attention_mask(n: int, present: Tensor | None = None, device=None) -> Tensor:
    """[B or 1, N, N] bool: entry (i, j) is True where agent i attends to agent j (j != i, j present)."""
    others = ~torch.eye(n, dtype=torch.bool, device=device if present is None else present.device)
    if present is None:
        return others.unsqueeze(0)
    return others.unsqueeze(0) & present.unsqueeze(1)


def per_agent_mean(values: Tensor, present: Tensor | None) -> Tensor:
    """Mean over the batch of every agent's values [B, N] -> [N], over the rows where it is present."""
    if present is None:
        return values.mean(0)
    weights = present.to(values.dtype)
    return (values * weights).sum(0) / weights.sum(0).clamp_min(1.0)


def soft_target(reward: Tensor, continuing: Tensor, next_q: Tensor, next_log_pi: Tensor, gamma: float,
                alpha: float, variant: Literal["code", "paper"] = "code") -> Tensor:
    """y_i of the critic: "code" r + gamma c Qbar - alpha log pibar, "paper" r + gamma c (Qbar - alpha log pibar)."""
    if variant == "code":
        return reward + gamma * continuing * next_q - alpha * next_log_pi
    return reward + gamma * continuing * (next_q - alpha * next_log_pi)


class AgentBatchNorm(nn.Module):
    """BatchNorm1d(affine=False) of every (agent, feature) over [..., N, F], statistics over all
    leading axes; the identity when disabled."""

    def __init__(self, n: int, features: int, enabled: bool = True):
        super().__init__()
        self.norm = nn.BatchNorm1d(n * features, affine=False) if enabled else None

    def forward(self, x: Tensor) -> Tensor:
        if self.norm is None:
            return x
        return self.norm(x.reshape(-1, x.shape[-2] * x.shape[-1])).reshape(x.shape)


@torch.no_grad()
def _init_fan_in(net: AgentMLP, live: Tensor) -> None:
    """nn.Linear's initialisation of every agent's first layer with its true (unpadded) input size,
    zero weights on the padded inputs; `live` [N, in] marks agent i's real input columns (per-agent
    networks only)."""
    if net.shared:
        return
    layer = net.net[0]
    assert isinstance(layer, BatchedLinear)
    bound = live.sum(1).clamp_min(1).to(layer.weight).rsqrt()
    layer.weight.uniform_(-1.0, 1.0).mul_(bound.view(-1, 1, 1)).mul_(live.unsqueeze(-1).to(layer.weight))
    layer.bias.uniform_(-1.0, 1.0).mul_(bound.view(-1, 1))


def _columns(sizes: Tensor, width: int, offset: int = 0) -> Tensor:
    """[N, width] bool: columns offset .. offset + sizes[i] - 1 of row i."""
    columns = torch.arange(width)
    return (columns >= offset) & (columns < offset + sizes.unsqueeze(1))


class AgentPolicies(nn.Module):
    """Outputs of every agent's policy: BN(affine=False) -> FC -> LeakyReLU -> FC -> LeakyReLU -> FC
    (utils/policies.py), one network per agent (batched) or one shared: [..., N, O] -> [..., N, outputs]
    (A logits, or the mean and log std of A action dimensions)."""

    def __init__(self, n: int, obs_dim: int, outputs: int, hidden: int, shared: bool, batchnorm: bool,
                 obs_sizes: Tensor | None = None):
        super().__init__()
        self.norm = AgentBatchNorm(n, obs_dim, batchnorm)
        self.net = AgentMLP(n, obs_dim, (hidden, hidden), outputs, shared, nn.LeakyReLU)
        if obs_sizes is not None:
            _init_fan_in(self.net, _columns(obs_sizes, obs_dim))

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(self.norm(obs))


class AttentionCritic(nn.Module):
    """MAAC's attention critic (utils/critics.py `AttentionCritic`) over N agents of one agent axis.

    `forward(obs [B, N, O], actions [B, N, A] one-hot, present [B, N] | None)` returns
    (Q_i(o, a) [B, N], Q_i(o, (., a_-i)) for every own action [B, N, A], attention regulariser scalar).
    With `continuous` (Box actions [B, N, A]) the head also reads the own action a_i and outputs Q_i(o, a)
    alone: the second output is None.
    """

    def __init__(self, n: int, obs_dim: int, n_actions: int, hidden: int = 128, heads: int = 4,
                 shared: bool = False, batchnorm: bool = True, attention_reg: float = 1e-3,
                 obs_sizes: Tensor | None = None, action_sizes: Tensor | None = None, continuous: bool = False):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"critic_hidden_dim {hidden} is not a multiple of attend_heads {heads}")
        self.n, self.heads, self.head_dim, self.attention_reg = n, heads, hidden // heads, attention_reg
        self.continuous = continuous
        self.sa_norm = AgentBatchNorm(n, obs_dim + n_actions, batchnorm)
        self.sa_encoder = AgentMLP(n, obs_dim + n_actions, (), hidden, shared)   # critic_encoders
        self.s_norm = AgentBatchNorm(n, obs_dim, batchnorm)
        self.s_encoder = AgentMLP(n, obs_dim, (), hidden, shared)                  # state_encoders
        # All heads of one extractor in one linear map (the same initialisation as H maps hidden -> d).
        self.key = nn.Linear(hidden, hidden // heads * heads, bias=False)
        self.selector = nn.Linear(hidden, hidden // heads * heads, bias=False)
        self.value = nn.Linear(hidden, hidden // heads * heads)
        # Discrete: [s_i, x_i] -> Q_i for every own action; continuous: [s_i, x_i, a_i] -> Q_i(o, a).
        own_action = n_actions if continuous else 0
        self.head = AgentMLP(n, hidden + hidden // heads * heads + own_action, (hidden,),
                             1 if continuous else n_actions, shared, nn.LeakyReLU)
        if obs_sizes is not None and action_sizes is not None:
            # Inputs [o_i padded to O_max, onehot(a_i) padded to A_max]: fan-in O_i (+ A_i).
            _init_fan_in(self.s_encoder, _columns(obs_sizes, obs_dim))
            _init_fan_in(self.sa_encoder, _columns(obs_sizes, obs_dim + n_actions)
                         | _columns(action_sizes, obs_dim + n_actions, obs_dim))

    def shared_modules(self, include_encoders: bool = True) -> list[nn.Module]:
        """The modules whose gradients `scale_shared_grads` divides by N (the reference includes the
        per-agent state-action encoders)."""
        return [self.key, self.selector, self.value, *([self.sa_encoder] if include_encoders else [])]

    def encode(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """(e_i, s_i): the state-action and state encodings [B, N, hidden]."""
        e = F.leaky_relu(self.sa_encoder(self.sa_norm(torch.cat([obs, actions], dim=-1))))
        s = F.leaky_relu(self.s_encoder(self.s_norm(obs)))
        return e, s

    def keys_values(self, e: Tensor) -> tuple[Tensor, Tensor]:
        """(keys, values) [..., N, H, d] of state-action encodings e [..., N, hidden]."""
        split = (*e.shape[:-1], self.heads, self.head_dim)
        return self.key(e).view(split), F.leaky_relu(self.value(e)).view(split)

    def attend(self, e: Tensor, s: Tensor, present: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Attention of every agent over the others: (x [B, N, H d], weights [B, H, N, N] (row i
        over j), unscaled logits [B, H, N, N], mask [B or 1, 1, N, N])."""
        b, n, _ = e.shape
        keys, values = self.keys_values(e)
        queries = self.selector(s).view(b, n, self.heads, self.head_dim)
        logits = torch.einsum("bihd,bjhd->bhij", queries, keys)
        mask = attention_mask(n, present, e.device).unsqueeze(1)
        scaled = (logits / math.sqrt(self.head_dim)).masked_fill(~mask, torch.finfo(logits.dtype).min)
        # Multiplying by the mask zeroes the weights of an agent with nobody to attend to.
        weights = torch.softmax(scaled, dim=-1) * mask
        x = torch.einsum("bhij,bjhd->bihd", weights, values).reshape(b, n, self.heads * self.head_dim)
        return x, weights, logits, mask

    def regulariser(self, logits: Tensor, mask: Tensor, present: Tensor | None) -> Tensor:
        """attention_reg sum_i sum_h mean_{b, j != i}(logit^2), over the agents present."""
        if present is not None:
            mask = mask & present.view(*present.shape, 1).unsqueeze(1)  # agent i itself present
        mask = mask.expand(logits.shape[0], 1, -1, -1).to(logits.dtype)
        per_agent = (logits.square() * mask).sum((0, 1, 3)) / mask.sum((0, 1, 3)).clamp_min(1.0)
        return self.attention_reg * per_agent.sum()

    def forward(self, obs: Tensor, actions: Tensor, present: Tensor | None = None,
                own_actions: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
        """`own_actions` (continuous only; default `actions`): what every head reads as its own a_i, while the
        encodings e_j that the others attend to read `actions` (the policy step passes its sample twice, detached
        for the encoders: Q_i is then differentiable in a~_i alone)."""
        e, s = self.encode(obs, actions)
        x, _, logits, mask = self.attend(e, s, present)
        regulariser = self.regulariser(logits, mask, present)
        if self.continuous:
            own = actions if own_actions is None else own_actions
            return self.head(torch.cat([s, x, own], dim=-1)).squeeze(-1), None, regulariser
        all_q = self.head(torch.cat([s, x], dim=-1))
        q = all_q.gather(-1, actions.argmax(-1, keepdim=True)).squeeze(-1)
        return q, all_q, regulariser

    @torch.no_grad()
    def replaced_action_q(self, obs: Tensor, actions: Tensor, replacements: Tensor, weights: Tensor,
                          present: Tensor | None) -> tuple[Tensor, Tensor]:
        """`vimarl.algos.mamt.replaced_action_q` for this critic, exactly, without a forward per copy.

        Replacing agent j's action changes only its encoding e_j, hence its key and value: every
        other agent i keeps its query and the attention logits to the others, and its softmax is
        renormalised analytically, x'_i = (x_i - w_ij v_j + w'_ij v'_j) / (1 - w_ij + w'_ij) per head,
        with w'_ij = exp(l'_ij - logsumexp_k l_ik) (l scaled logits). The encoders and attention run
        once for the factual rows plus once per replacement (M B N agent-rows instead of
        (1 + N M) B N); only the heads run for every copy (j, m). Agent j's own x_j does not read
        a_j, so its copies only change the action its head is read at.
        """
        b, n, a = actions.shape
        m = replacements.shape[0]
        replacements = replacements.expand(m, b, n, a)
        e, s = self.encode(obs, actions)
        x, attention, logits, mask = self.attend(e, s, present)
        keys, values = self.keys_values(e)                                         # [B, N, H, d]
        queries = self.selector(s).view(b, n, self.heads, self.head_dim)
        new_e, _ = self.encode(obs.expand(m, b, n, obs.shape[-1]), replacements)
        new_keys, new_values = self.keys_values(new_e)                             # [M, B, N (j), H, d]
        scale = math.sqrt(self.head_dim)
        masked = (logits / scale).masked_fill(~mask, torch.finfo(logits.dtype).min)
        log_norm = masked.logsumexp(-1)                                            # [B, H, N (i)]
        new_logits = torch.einsum("bihd,mbjhd->mbhij", queries, new_keys) / scale  # [M, B, H, i, j]
        new_weight = torch.where(mask, (new_logits - log_norm.unsqueeze(-1)).exp(), torch.zeros_like(new_logits))
        # [M, j, B, i, H, d]: x_i with agent j's value swapped, renormalised
        old = attention.permute(0, 3, 2, 1).unsqueeze(-1)                          # [B, j, i, H, 1]
        new = new_weight.permute(0, 4, 1, 3, 2).unsqueeze(-1)                      # [M, j, B, i, H, 1]
        x_heads = x.view(b, n, self.heads, self.head_dim)
        numerator = (x_heads.unsqueeze(1) - old * values.unsqueeze(2)).transpose(0, 1) \
            + new * new_values.transpose(1, 2).unsqueeze(3)                        # [M, j, B, i, H, d]
        replaced_x = (numerator / (1 - old.transpose(0, 1) + new)).flatten(-2)     # [M, j, B, i, H d]
        own = torch.eye(n, dtype=torch.bool, device=actions.device).view(1, n, 1, n, 1)  # i == j: a_j replaced
        own_actions = torch.where(own, replacements.permute(0, 2, 1, 3).unsqueeze(3), actions.view(1, 1, b, n, a))
        if self.continuous:  # s_i enters every copy's head the same: its part of the first layer runs once
            q = self.head.forward_parts([s, replaced_x, own_actions]).squeeze(-1)
        else:
            q = self.head.forward_parts([s, replaced_x]).gather(-1, own_actions.argmax(-1, keepdim=True)).squeeze(-1)
        factual = self.head(torch.cat([s, x, actions], dim=-1)).squeeze(-1) if self.continuous else \
            self.head(torch.cat([s, x], dim=-1)).gather(-1, actions.argmax(-1, keepdim=True)).squeeze(-1)
        counterfactual = (q * weights.permute(0, 2, 1).unsqueeze(-1)).sum(0)      # [j, B, i]
        return factual, counterfactual.permute(1, 2, 0)


@register("maac", "MAAC (Iqbal & Sha 2019, official code): per-agent policies, attention critic over the other "
          "agents with all-action heads, counterfactual baseline, soft targets, reward standardisation",
          Capabilities(discrete=True, continuous=True, heterogeneous=True))
class AttentionSAC(Algorithm):
    Config = AttentionSACConfig

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: AttentionSACConfig, device="cpu"):
        super().__init__(groups, state_dim, config, device)
        spaces = [spec.action_space for spec in groups.values()]
        self.continuous = isinstance(spaces[0], Box)
        if any(isinstance(space, Box) != self.continuous for space in spaces):
            raise VimarlError(f"{self.name} needs the actions of every group Discrete or of every group Box (one "
                             f"policy family), got {spaces}: split the env or make its action spaces one kind")
        if self.continuous and len(set(spaces)) > 1:
            raise VimarlError(f"{self.name} with Box actions needs one action space (dim, low, high) shared by every "
                             f"group, got {spaces}: rescale or pad the actions in the env")
        self.action_space = spaces[0]
        self.group_sizes = [spec.n_agents for spec in groups.values()]
        self.n_agents = n = sum(self.group_sizes)
        self.obs_pad = max(spec.obs_dim for spec in groups.values())
        self.n_actions = max(action_dim(space) for space in spaces)
        obs_sizes = torch.tensor([spec.obs_dim for spec in groups.values() for _ in range(spec.n_agents)])
        action_sizes = torch.tensor([action_dim(spec.action_space) for spec in groups.values()
                                     for _ in range(spec.n_agents)])
        # [N, A_max]: which of the padded action slots are real actions of agent i.
        self.register_buffer("action_valid", torch.arange(self.n_actions) < action_sizes.unsqueeze(1),
                             persistent=False)
        self.padded_actions = bool((action_sizes < self.n_actions).any())
        shared, bn = config.parameter_sharing, config.input_batchnorm
        # Policy outputs: A logits, or the mean and log std of every action dimension.
        self.policy_outputs = 2 * self.n_actions if self.continuous else self.n_actions
        self.policy = AgentPolicies(n, self.obs_pad, self.policy_outputs, config.policy_hidden_dim, shared, bn,
                                    obs_sizes)
        self.target_policy = copy.deepcopy(self.policy).requires_grad_(False)
        critic = AttentionCritic(n, self.obs_pad, self.n_actions, config.critic_hidden_dim, config.attend_heads,
                                 shared, bn, config.attention_reg, obs_sizes, action_sizes, self.continuous)
        self.critics = nn.ModuleDict({"q": critic, "target_q": copy.deepcopy(critic).requires_grad_(False)})
        # Exact running reward statistics of everything `observe`d, per agent (float64 sums).
        for name in ("reward_count", "reward_sum", "reward_sq_sum"):
            self.register_buffer(name, torch.zeros(n, dtype=torch.float64))
        self.to(self.device)
        self.optimizers = {
            "critic": torch.optim.Adam(self.critic.parameters(), lr=config.q_lr,
                                       weight_decay=config.critic_weight_decay, fused=True),
            "policy": adam(self.policy.parameters(), lr=config.pi_lr)}

    @property
    def critic(self) -> AttentionCritic:
        return self.critics["q"]

    @property
    def target_critic(self) -> AttentionCritic:
        return self.critics["target_q"]

    @property
    def alpha(self) -> float:
        return 1.0 / self.config.reward_scale

    # --- one agent axis over all groups ---------------------------------------------------

    def joint_obs(self, obs: dict[str, Tensor]) -> Tensor:
        """Every group's [..., N_g, O_g] zero-padded to O_max and concatenated: [..., N, O_max]."""
        return torch.cat([F.pad(obs[g], (0, self.obs_pad - obs[g].shape[-1])) for g in self.groups], dim=-2)

    def joint_action_mask(self, masks: dict[str, Tensor | None] | None, lead: tuple[int, ...]) -> Tensor | None:
        """[..., N, A_max] bool of allowed actions (env masks and padding); None when all are allowed."""
        masks = masks or {}
        if not self.padded_actions and all(masks.get(g) is None for g in self.groups):
            return None
        parts, start = [], 0
        for g, size in zip(self.groups, self.group_sizes):
            valid = self.action_valid[start:start + size]
            m = masks.get(g)
            parts.append(valid.expand(*lead, size, self.n_actions) if m is None
                         else F.pad(m, (0, self.n_actions - m.shape[-1]), value=False) & valid)
            start += size
        return torch.cat(parts, dim=-2)

    def split(self, joint: Tensor, dim: int = -1) -> dict[str, Tensor]:
        """[..., N] -> {group: [..., N_g]} (the agent axis `dim`: -2 for Box actions [..., N, A])."""
        return dict(zip(self.groups, joint.split(self.group_sizes, dim=dim)))

    def stored_actions(self, actions: dict[str, Tensor]) -> Tensor:
        """Stored actions on one agent axis: [B, N] int64 (Discrete) or [B, N, A] float (Box)."""
        return torch.cat([actions[g] for g in self.groups], dim=1)

    def joint_actions(self, actions: dict[str, Tensor]) -> Tensor:
        """Stored actions as the critic's input: one-hots over A_max, or the Box values: [B, N, A_max]."""
        stored = self.stored_actions(actions)
        return stored.float() if self.continuous else F.one_hot(stored, self.n_actions).float()

    def joint_next_alive(self, batch: Transition) -> Tensor | None:
        """[B, N] who is still in at s' (None when no agent can leave)."""
        if all(batch.next_alive.get(g) is None for g in self.groups):
            return None
        return torch.cat([batch.next_alive[g] if batch.next_alive.get(g) is not None
                          else torch.ones_like(batch.reward[g], dtype=torch.bool) for g in self.groups], dim=1)

    def distribution(self, policy: AgentPolicies, obs: Tensor,
                     mask: Tensor | None) -> tuple[Tensor, Categorical | TanhGaussian]:
        """pi_i(. | o_i) and the outputs the logit regulariser reads: raw logits [..., N, A_max] and the masked
        categorical, or the pre-tanh mean [..., N, A] and the tanh-Gaussian (log std clamped to PolicyHead's
        range, as masac's)."""
        out = policy(obs)
        if not self.continuous:
            return out, Categorical(out, mask)
        mean, log_std = out.chunk(2, dim=-1)
        log_std = log_std.clamp(PolicyHead.LOG_STD_MIN, PolicyHead.LOG_STD_MAX)
        return mean, TanhGaussian(mean, log_std, self.action_space.low, self.action_space.high)

    # --- acting -----------------------------------------------------------------------------

    @torch.no_grad()
    def act(self, obs, graph, *, explore, action_mask=None, state=None):
        joint = self.joint_obs(obs)
        mask = self.joint_action_mask(action_mask, joint.shape[:-2])
        was_training = self.policy.training
        self.policy.eval()  # rollouts use BN's running statistics (the reference's prep_rollouts)
        try:
            _, distribution = self.distribution(self.policy, joint, mask)
        finally:
            self.policy.train(was_training)
        actions = distribution.sample().action if explore else distribution.mode()
        return self.split(actions, -2 if self.continuous else -1)

    # --- reward standardisation (the reference buffer's norm_rews) --------------------------

    @torch.no_grad()
    def observe(self, step: TimeStep, actions: dict[str, Tensor], next_step: TimeStep) -> None:
        """The trainer's hook on every collected step: its rewards join the statistics."""
        self.count_rewards(torch.cat([next_step.groups[g].reward for g in self.groups], dim=1))

    def count_rewards(self, rewards: Tensor) -> None:
        """Add rewards [b, N] to the running per-agent statistics that `update` standardises with."""
        rewards = rewards.reshape(-1, self.n_agents).to(self.reward_sum)
        self.reward_count += rewards.shape[0]
        self.reward_sum += rewards.sum(0)
        self.reward_sq_sum += rewards.square().sum(0)

    def reward_statistics(self) -> tuple[Tensor, Tensor]:
        """Per-agent mean and population std of every observed reward ([N] float64 each)."""
        count = self.reward_count.clamp_min(1.0)
        mean = self.reward_sum / count
        return mean, (self.reward_sq_sum / count - mean.square()).clamp_min(0.0).sqrt()

    def rewards(self, batch: Transition) -> Tensor:
        """r_i of every agent [B, N], standardised by the observed statistics when `normalize_rewards`
        (raw for agents with nothing observed yet; std 0 divides by 1)."""
        rewards = torch.cat([batch.reward[g] for g in self.groups], dim=1)
        if not self.config.normalize_rewards:
            return rewards
        mean, std = self.reward_statistics()
        seen = self.reward_count > 0
        mean = torch.where(seen, mean, 0.0)
        std = torch.where(seen & (std > 0), std, 1.0)
        return ((rewards - mean) / std).to(rewards.dtype)

    # --- losses -----------------------------------------------------------------------------

    def update(self, batch: Transition) -> dict[str, Tensor]:
        # attention_sac.py: update_critic, update_policies, update_all_targets.
        q_loss, attention_reg = self.critic_loss(batch)
        self._critic_step(q_loss + attention_reg)
        policy_loss, entropy = self.policy_loss(batch)
        self._policy_step(policy_loss)
        polyak(self.target_critic, self.critic, self.config.tau)
        polyak(self.target_policy, self.policy, self.config.tau)
        return {"loss_q": q_loss.detach(), "attention_reg": attention_reg.detach(),
                "loss_policy": policy_loss.detach(), "entropy": entropy}

    @torch.no_grad()
    def q_target(self, batch: Transition) -> Tensor:
        """y_i with a' ~ target policies and the target critic over the agents in at s': [B, N]."""
        next_obs = self.joint_obs(batch.next_obs)
        next_mask = self.joint_action_mask(batch.next_action_mask, next_obs.shape[:-2])
        _, distribution = self.distribution(self.target_policy, next_obs, next_mask)
        sample = distribution.sample()
        next_q, _, _ = self.target_critic(next_obs, sample.critic_input, self.joint_next_alive(batch))
        continuing = torch.cat([batch.continuing(g).expand_as(batch.reward[g]) for g in self.groups], dim=1)
        return soft_target(self.rewards(batch), continuing, next_q, sample.log_prob, self.config.gamma,
                           self.alpha, self.config.soft_target)

    def critic_loss(self, batch: Transition) -> tuple[Tensor, Tensor]:
        """(sum_i MSE(Q_i(o, a), y_i) on the replay actions, the attention regulariser)."""
        target = self.q_target(batch)
        alive = batch.joint_alive(self.groups)
        q, _, regulariser = self.critic(self.joint_obs(batch.obs), self.joint_actions(batch.action), alive)
        return per_agent_mean((q - target).square(), alive).sum(), regulariser

    def policy_loss(self, batch: Transition) -> tuple[Tensor, Tensor]:
        """(sum_i L_pi_i with a~ ~ pi for every agent, mean entropy (before the squash for Box actions))."""
        obs = self.joint_obs(batch.obs)
        alive = batch.joint_alive(self.groups)
        mask = self.joint_action_mask(batch.action_mask, obs.shape[:-2])
        logits, distribution = self.distribution(self.policy, obs, mask)
        sample = distribution.sample()
        advantage = self.policy_value(obs, distribution, sample, alive)
        reinforce = self.policy_surrogate(obs, mask, distribution, sample, advantage)
        valid = self.action_valid.to(logits.dtype)
        logit_reg = (logits.square() * valid).sum((0, -1)) / (valid.sum(-1) * logits.shape[0])  # mean per agent
        loss = (per_agent_mean(reinforce, alive) + self.config.logit_reg * logit_reg).sum()
        return loss, distribution.entropy().mean().detach()

    def policy_value(self, obs: Tensor, distribution: Categorical | TanhGaussian, sample: PolicySample,
                     present: Tensor | None) -> Tensor:
        """What every policy ascends [B, N]: Q_i(o, a~) - b_i without gradient (discrete), or Q_i(o, a~)
        differentiable in a~_i alone (continuous: the others' actions enter detached, the critic frozen). The
        critic's parameters are never trained by the policy loss."""
        if self.continuous:
            with frozen(self.critic):
                q, _, _ = self.critic(obs, sample.critic_input.detach(), present, own_actions=sample.critic_input)
            return q
        with torch.no_grad():
            q, all_q, _ = self.critic(obs, sample.critic_input, present)
            return q - counterfactual_baseline(distribution.probs, all_q)

    def gradient_surrogate(self, log_pi: Tensor, weight: Tensor) -> Tensor:
        """A per-row loss whose gradient estimates grad E_{a~ ~ pi}[weight(a~)]: the score function
        log pi(a~) stopgrad(weight) for categorical samples, the weight itself for reparameterised (Box) ones."""
        return weight if self.continuous else log_pi * weight.detach()

    def policy_surrogate(self, obs: Tensor, mask: Tensor | None, distribution: Categorical | TanhGaussian,
                         sample: PolicySample, advantage: Tensor) -> Tensor:
        """Per-row loss [B, N] whose gradient is the policy gradient of alpha log pi_i(a~_i) - (Q_i - b_i)
        (`policy_value`): log pi_i(a~_i) stopgrad(...) for discrete, the reparameterised value for continuous.
        obs and mask are for subclasses that evaluate other policies on the same rows (MAMD adds its
        mirror-descent term to the old policy here)."""
        log_pi = sample.log_prob
        return self.gradient_surrogate(log_pi, self.alpha * log_pi - advantage)

    # --- optimiser steps with the reference's gradient processing --------------------------

    def _critic_step(self, loss: Tensor) -> None:
        optimizer = self.optimizers["critic"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.scale_shared_grads != "none":
            for module in self.critic.shared_modules(self.config.scale_shared_grads == "code"):
                for p in module.parameters():
                    if p.grad is not None:
                        p.grad.mul_(1.0 / self.n_agents)
        nn.utils.clip_grad_norm_(self.critic.parameters(), self.config.critic_grad_clip * self.n_agents)
        optimizer.step()

    def _policy_step(self, loss: Tensor) -> None:
        optimizer = self.optimizers["policy"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_per_agent(self.policy, self.config.policy_grad_clip, self.n_agents)
        optimizer.step()


@torch.no_grad()
def clip_per_agent(module: nn.Module, max_norm: float, n: int) -> None:
    """clip_grad_norm_(max_norm) of every agent's own parameters of batched per-agent networks
    (leading axis N on every parameter); a shared network (parameter_sharing) is clipped as a whole."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return
    if getattr(getattr(module, "net", None), "shared", False):
        nn.utils.clip_grad_norm_(params, max_norm)
        return
    norms = torch.stack([p.grad.reshape(n, -1).square().sum(1) for p in params]).sum(0).sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.view(n, *([1] * (p.dim() - 1))))
