"""MAMD: Multi-Agent Mirror Descent policy optimisation (Li, Wang, Jin, Sheng & Zha, "Dealing with
Non-Stationarity in MARL via Trust-Region Decomposition", Sec. 5.1, Eq. 8-10, Algorithm 1, Table 1).

The joint trust region E_o[KL(pi, pi^k)] <= epsilon factorises under the mean-field assumption
(Theorem 3) into equal local trust regions (Eq. 8)

    E_{o_i}[ KL(pi_i(. | o_i) || pi_i^k(. | o_i)) ] <= epsilon_i = epsilon / n     for every agent i,

which MAMD handles by mirror descent (MDPO, Tomar et al. 2020) on top of MAAC. The critics and
their update are MAAC's (Eq. 9: attention critics, soft targets from the target policies; everything
of `AttentionSAC`, which this class extends). The policy gradient of agent i is Eq. 10,

    grad J_i = E_{o ~ D, a~ ~ pi}[ grad log pi_i(a~_i | o_i) (KL_i / epsilon_i + Q_i(o, a~) - b_i(o, a~_-i)) ]

with b_i MAAC's counterfactual baseline. As a loss (minimised, the penalty with the sign of a
penalty: Eq. 10 prints "+ KL / epsilon_i" next to "Q - b", which would reward leaving the trust
region; we read it as the penalty of the constrained problem Eq. 8 and as MDPO's loss) this is

    L_pi_i = mean[ log pi_i(a~_i) stopgrad(alpha log_q pi_i(a~_i) - (Q_i - b_i)) ] + KL_i / epsilon_i
             + 1e-3 mean(logits_i^2)

where pi_old is a frozen copy of the policies, refreshed by a hard copy after every `md_delay`-th
update (MDPO's "m-step-old copy"; Algorithm 1 lines 3 and 17-18; Table 1: 100 iterations). The
copy and the update counter are a submodule and a buffer, so a resumed run refreshes at the same
iterations. The loss at the copy itself is MAAC's: KL_i = 0 right after every refresh.

Open choices (each a Config field where it is a switch):
- KL_i (`kl_estimator`). "exact" (default): sum_a pi_i(a) (log_q pi_i(a) - log_q pi_old_i(a)) over
  agent i's valid actions, differentiated through pi_i(a) only: its gradient is the exact
  expectation over a~_i of Eq. 10's score-function term, without the sampling noise of one action,
  so it is the default. At q = 1 this is the gradient of the KL itself. For q != 1 differentiating
  the q-log gap as well would not be: sum_a pi (log_q pi - log_q pi_old) is not minimal at
  pi = pi_old (its gradient there is pi^(1-q), not constant over actions); on spread N = 2 that
  drove the policies to determinism and MAMD did not learn (5k env steps: -64.8 -> -73.7, against
  -33.4 with the score gradient). "sample": the paper's and MDPO's estimate
  log_q pi_i(a~_i) - log_q pi_old_i(a~_i) at the sampled action, inside the stop-gradient weight of
  log pi_i(a~_i) exactly as Eq. 10 writes it (an unbiased estimate of the same gradient at q = 1).
- The entropy term. Eq. 10 omits it, but MAMD "directly combines" MAAC with MDPO and MDPO keeps its
  entropy regulariser (lambda) next to the KL, so MAAC's alpha log pi term stays; with
  epsilon -> infinity the loss is exactly MAAC's. The critic's soft target (Eq. 9) keeps the
  ordinary log (Eq. 9 as printed; MDPO's q-log would also enter its value target).
- Tsallis q-log (`tsallis_q`, Table 1: 0.2): log_q(x) = (x^(1-q) - 1) / (1 - q) replaces log in
  the KL and in the policy loss's entropy term, applied to the probabilities of the categorical
  (the score function grad log pi stays the ordinary log: it is the gradient, not a divergence).
  The field is the MDPO code's `tsallis_q`, whose log_q takes the exponent q = 2 - tsallis_q
  (ALGO_SPECS §4.1); we read Table 1's "tsallis q 0.2" as that command-line value, so the default
  is exponent q = 1.8. Probabilities are floored at 1e-6 inside log_q (MDPO's `safe_x`) where
  q != 1; tsallis_q = 1 is the ordinary log, unfloored. For q != 1, sum_a pi (log_q pi - log_q
  pi_old) is zero at pi = pi_old but is not a divergence (it can be negative).
- epsilon (`trust_region`): the paper gives no value for MAMD (Table 1's "trust region clip 0.01 to
  100" bounds MAMT's learned epsilon_i). We choose epsilon = 1, inside that range; epsilon_i =
  epsilon / n, not clipped (the clip belongs to MAMT's learned trust regions).
- One update = one "iteration" (one critic and one policy step, Algorithm 1 lines 13-16); the
  refresh follows the target updates. The old copy's BatchNorm uses batch statistics in the loss
  (as the current policy does in the same loss, so KL_i is exactly 0 at a refresh) and never
  updates its copied running statistics.
- Metrics: `kl_i` is the exact (Shannon, q = 1) KL(pi_i || pi_old_i) averaged over the batch rows
  where agent i is present, measured in this update's policy loss (before its step), whatever the
  estimator and q (the quantity of the paper's Fig. 5); `kl` its mean over agents; `epsilon_i` (the mean
  over agents where epsilon_i is one per agent, as MAMT's learned ones).

Continuous (Box) actions (MAAC's tanh-Gaussian policies and reparameterised gradient, `maac`):
- KL(pi_i || pi_old_i) of two tanh-Gaussians equals the KL of their diagonal Gaussians before the
  squash: KL is invariant under one invertible map (tanh, then the affine scale to [low, high])
  applied to both. "exact" is that closed form, differentiated directly. "sample" is the
  reparameterised estimate log pi_i(a~_i) - log pi_old_i(a~_i) at a~_i = squash(mu_i + sigma_i noise),
  differentiated through a~_i (the tanh Jacobians of the two densities cancel; pi_old is evaluated at
  the pre-squash sample, no atanh of a saturated action): an unbiased estimate of grad KL_i.
- The Tsallis q-log acts on probabilities (x <= 1) and MDPO defines it for categoricals; a density
  can exceed 1, where log_q has no divergence meaning, so Box actions use the ordinary log (exponent
  q = 1) whatever `tsallis_q`: the loss is MDPO's Shannon one.
- The score term is MAAC's reparameterised alpha log pi_i(a~_i) - Q_i(o, a~); the penalty enters with
  the same weight 1 / epsilon_i.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from vimarl.algos.base import Capabilities, register
from vimarl.algos.maac import AttentionSAC, AttentionSACConfig, per_agent_mean
from vimarl.buffer import Transition
from vimarl.envs.base import GroupSpec
from vimarl.errors import VimarlError
from vimarl.nn.distributions import Categorical, PolicySample, TanhGaussian

PROBABILITY_FLOOR = 1e-6
"""Smallest probability inside log_q for q != 1 (MDPO's `safe_x`): log_q(0) is -infinity for q > 1."""


@dataclass
class MirrorDescentConfig(AttentionSACConfig):
    trust_region: float = 1.0
    """The joint trust region epsilon; every agent gets epsilon_i = epsilon / n (Eq. 8) and the KL weight
    1 / epsilon_i in its policy loss (Eq. 10). Not given in the paper; chosen inside Table 1's trust-region
    range 0.01..100."""
    local_trust_regions: tuple[float, ...] = ()
    """Per-agent epsilon_i replacing the equal split, for a decomposition assigned by hand (MAMD-OP, 004 App. F:
    e.g. `--preset op_mix` on spread3); `.inf` leaves an agent unconstrained. Empty: epsilon / n for everyone."""
    md_delay: int = 100
    """Updates between hard copies of the policies into the old policy pi_old (Table 1: mirror-descent delay 100)."""
    kl_estimator: Literal["exact", "sample"] = "exact"
    """KL(pi_i || pi_old_i) in the policy loss: "exact" sum over the categorical's actions (its score gradient);
    "sample" log pi_i - log pi_old_i at the sampled action in the score-function weight (Eq. 10, MDPO's code)."""
    tsallis_q: float = 0.2
    """The MDPO code's `tsallis_q` (Table 1: 0.2): log_q with exponent q = 2 - tsallis_q replaces log in the KL and in
    the policy loss's entropy term; 1.0 is the ordinary log."""

    def __post_init__(self):
        if self.md_delay < 1:
            raise ValueError(f"md_delay={self.md_delay} is out of range: it must be at least 1")
        if not self.trust_region > 0:
            raise ValueError(f"trust_region={self.trust_region} is out of range: it must be positive")
        if any(not epsilon > 0 for epsilon in self.local_trust_regions):
            raise ValueError(f"local_trust_regions={list(self.local_trust_regions)} is out of range: every "
                             f"epsilon_i must be positive (.inf leaves an agent unconstrained)")


def tsallis_log(log_x: Tensor, q: float) -> Tensor:
    """log_q(x) = (x^(1-q) - 1) / (1 - q) given log x (expm1 keeps it accurate near x = 1); log x itself at q = 1."""
    if q == 1.0:
        return log_x
    return torch.expm1((1.0 - q) * log_x) / (1.0 - q)


def probability_log(log_p: Tensor, q: float) -> Tensor:
    """log_q of probabilities given their logs, floored at PROBABILITY_FLOOR where q != 1."""
    if q == 1.0:
        return log_p
    return tsallis_log(log_p.clamp_min(math.log(PROBABILITY_FLOOR)), q)


def categorical_divergence(log_p: Tensor, log_p_old: Tensor, valid: Tensor | None, q: float = 1.0,
                           score_gradient: bool = False) -> Tensor:
    """sum_a p(a) (log_q p(a) - log_q p_old(a)) over the valid actions, from log-probabilities [..., A] -> [...];
    KL(p || p_old) at q = 1. With `score_gradient` the gap is a constant to autograd, so the gradient is
    sum_a grad p(a) (log_q p(a) - log_q p_old(a)), the expectation of the sampled estimator's score-function
    gradient (Eq. 10); at q = 1 that is also KL's own gradient (sum_a p grad log p = 0)."""
    gap = probability_log(log_p, q) - probability_log(log_p_old, q)
    if score_gradient:
        gap = gap.detach()
    if valid is not None:
        # Masked actions have p = 0 and log p near or at -inf in both: their gap (maybe nan) must reach neither the
        # product nor its gradient.
        gap = torch.where(valid, gap, 0.0)
    return (log_p.exp() * gap).sum(-1)


def gaussian_divergence(mean: Tensor, log_std: Tensor, mean_old: Tensor, log_std_old: Tensor) -> Tensor:
    """KL(N(mean, std^2) || N(mean_old, std_old^2)) of diagonal Gaussians [..., A] -> [...]; also the KL of the two
    tanh-Gaussians over them (KL is invariant under one invertible map applied to both)."""
    variance_ratio = (2.0 * (log_std - log_std_old)).exp()
    gap = (mean - mean_old) / log_std_old.exp()
    return (0.5 * (variance_ratio + gap.square() - 1.0) - (log_std - log_std_old)).sum(-1)


def policy_divergence(p: Categorical | TanhGaussian, p_old: Categorical | TanhGaussian, valid: Tensor | None,
                      q: float = 1.0, score_gradient: bool = False) -> Tensor:
    """KL(p || p_old) [...] (sum_a p (log_q p - log_q p_old) for categoricals at q != 1, with `score_gradient` as
    `categorical_divergence`; q must be 1 for tanh-Gaussians, whose closed form is differentiated directly)."""
    if isinstance(p, TanhGaussian):
        return gaussian_divergence(p.mean, p.log_std, p_old.mean, p_old.log_std)
    return categorical_divergence(p.log_probs, p_old.log_probs, valid, q, score_gradient)


@register("mamd", "MAMD (Li et al., 004 Sec. 5.1): MAAC's attention critics and policy gradient plus a mirror-descent "
          "KL penalty KL(pi_i || pi_old_i) / epsilon_i to a periodically refreshed old policy, epsilon_i = epsilon / n",
          Capabilities(discrete=True, continuous=True, heterogeneous=True))
class MirrorDescentAttentionSAC(AttentionSAC):
    Config = MirrorDescentConfig

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: MirrorDescentConfig, device="cpu"):
        super().__init__(groups, state_dim, config, device)
        self.old_policy = copy.deepcopy(self.policy).requires_grad_(False)
        for module in self.old_policy.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                # Train mode with track_running_stats off: batch statistics, copied running statistics untouched.
                module.track_running_stats = False
        self.register_buffer("md_iteration", torch.zeros((), dtype=torch.long, device=self.device))
        self.epsilon_i = config.trust_region / self.n_agents
        if config.local_trust_regions:
            if len(config.local_trust_regions) != self.n_agents or min(config.local_trust_regions) <= 0:
                raise VimarlError(f"algo.local_trust_regions needs {self.n_agents} positive values (one per agent, "
                                  f".inf for none), got {list(config.local_trust_regions)}")
            self.epsilon_i = torch.tensor(config.local_trust_regions, device=self.device)
        self.q_exponent = 1.0 if self.continuous else 2.0 - config.tsallis_q  # no q-log of densities
        self.kl_names = [f"kl_{i}" for i in range(self.n_agents)]
        # KL(pi_i || pi_old_i) [B, N] of the latest policy loss, for `update`'s metrics.
        self.last_kl_rows: Tensor | None = None

    def policy_surrogate(self, obs: Tensor, mask: Tensor | None, distribution: Categorical | TanhGaussian,
                         sample: PolicySample, advantage: Tensor) -> Tensor:
        """Eq. 10 per row [B, N]: score + penalty / epsilon_i (the two terms of `mirror_descent_terms`)."""
        score, penalty = self.mirror_descent_terms(obs, mask, distribution, sample, advantage)
        return score + penalty / self.epsilon_i

    def mirror_descent_terms(self, obs: Tensor, mask: Tensor | None, distribution: Categorical | TanhGaussian,
                             sample: PolicySample, advantage: Tensor) -> tuple[Tensor, Tensor]:
        """(score, penalty) rows [B, N] of Eq. 10: score = log pi_i(a~_i) stopgrad(alpha log_q pi_i(a~_i) - (Q_i - b_i));
        penalty = KL_i (exact) or log pi_i(a~_i) stopgrad(log_q pi_i(a~_i) - log_q pi_old_i(a~_i)) (sample), the term
        weighted by 1 / epsilon_i (a hook: MAMT weighs it by learned epsilon_i and differentiates through the weight).
        Box actions: the reparameterised forms (`gradient_surrogate`) at q = 1."""
        with torch.no_grad():
            _, old = self.distribution(self.old_policy, obs, mask)
            self.last_kl_rows = policy_divergence(distribution, old, mask)
        log_pi = sample.log_prob
        q = self.q_exponent
        score = self.gradient_surrogate(log_pi, self.alpha * probability_log(log_pi, q) - advantage)
        if self.config.kl_estimator == "sample":
            old_log_pi = old.log_prob_pre_tanh(sample.pre_tanh) if self.continuous else old.log_prob(sample.action)
            return score, self.gradient_surrogate(log_pi, probability_log(log_pi, q) - probability_log(old_log_pi, q))
        return score, policy_divergence(distribution, old, mask, q, score_gradient=True)

    def update(self, batch: Transition) -> dict[str, Tensor]:
        metrics = super().update(batch)
        kl = per_agent_mean(self.last_kl_rows, batch.joint_alive(self.groups))
        self.md_iteration += 1
        self.refresh_old_policy(self.md_iteration % self.config.md_delay == 0)
        return {**metrics, **dict(zip(self.kl_names, kl.unbind())), "kl": kl.mean(),
                "epsilon_i": torch.as_tensor(self.epsilon_i, device=kl.device).mean()}

    @torch.no_grad()
    def refresh_old_policy(self, due: Tensor) -> None:
        """pi_old <- pi (parameters and BN statistics) where `due` (a bool tensor: no host sync to branch on it)."""
        for old, current in zip([*self.old_policy.parameters(), *self.old_policy.buffers()],
                                [*self.policy.parameters(), *self.policy.buffers()]):
            old.copy_(torch.where(due, current, old))
