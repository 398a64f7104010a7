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
  agent i's valid actions, differentiated directly (discrete actions make it exact). Its gradient
  is the expectation of the score-function gradient of Eq. 10 (at q = 1) without the sampling
  noise of one action, so it is the default. "sample": the paper's and MDPO's estimate
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
from vimarl.nn.distributions import Categorical, PolicySample

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
    """KL(pi_i || pi_old_i) in the policy loss: "exact" sum over the categorical's actions, differentiated directly;
    "sample" log pi_i - log pi_old_i at the sampled action in the score-function weight (Eq. 10, MDPO's code)."""
    tsallis_q: float = 0.2
    """The MDPO code's `tsallis_q` (Table 1: 0.2): log_q with exponent q = 2 - tsallis_q replaces log in the KL and in
    the policy loss's entropy term; 1.0 is the ordinary log."""


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


def categorical_divergence(log_p: Tensor, log_p_old: Tensor, valid: Tensor | None, q: float = 1.0) -> Tensor:
    """sum_a p(a) (log_q p(a) - log_q p_old(a)) over the valid actions, from log-probabilities [..., A] -> [...];
    KL(p || p_old) at q = 1."""
    gap = probability_log(log_p, q) - probability_log(log_p_old, q)
    if valid is not None:
        # Masked actions have p = 0 and log p near or at -inf in both: their gap (maybe nan) must reach neither the
        # product nor its gradient.
        gap = torch.where(valid, gap, 0.0)
    return (log_p.exp() * gap).sum(-1)


@register("mamd", "MAMD (Li et al., 004 Sec. 5.1): MAAC's attention critics and policy gradient plus a mirror-descent "
          "KL penalty KL(pi_i || pi_old_i) / epsilon_i to a periodically refreshed old policy, epsilon_i = epsilon / n",
          Capabilities(discrete=True, continuous=False, heterogeneous=True))
class MirrorDescentAttentionSAC(AttentionSAC):
    Config = MirrorDescentConfig

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: MirrorDescentConfig, device="cpu"):
        if config.md_delay < 1 or config.trust_region <= 0:
            raise ValueError(f"mamd needs md_delay >= 1 and trust_region > 0, got {config.md_delay}, {config.trust_region}")
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
        self.q_exponent = 2.0 - config.tsallis_q
        self.kl_names = [f"kl_{i}" for i in range(self.n_agents)]
        # KL(pi_i || pi_old_i) [B, N] of the latest policy loss, for `update`'s metrics.
        self.last_kl_rows: Tensor | None = None

    def policy_surrogate(self, obs: Tensor, mask: Tensor | None, distribution: Categorical, sample: PolicySample,
                         advantage: Tensor) -> Tensor:
        """Eq. 10 per row [B, N]: score + penalty / epsilon_i (the two terms of `mirror_descent_terms`)."""
        score, penalty = self.mirror_descent_terms(obs, mask, distribution, sample, advantage)
        return score + penalty / self.epsilon_i

    def mirror_descent_terms(self, obs: Tensor, mask: Tensor | None, distribution: Categorical, sample: PolicySample,
                             advantage: Tensor) -> tuple[Tensor, Tensor]:
        """(score, penalty) rows [B, N] of Eq. 10: score = log pi_i(a~_i) stopgrad(alpha log_q pi_i(a~_i) - (Q_i - b_i));
        penalty = KL_i (exact) or log pi_i(a~_i) stopgrad(log_q pi_i(a~_i) - log_q pi_old_i(a~_i)) (sample), the term
        weighted by 1 / epsilon_i (a hook: MAMT weighs it by learned epsilon_i and differentiates through the weight)."""
        with torch.no_grad():
            _, old = self.distribution(self.old_policy, obs, mask)
        self.last_kl_rows = categorical_divergence(distribution.log_probs.detach(), old.log_probs, mask)
        log_pi = sample.log_prob
        q = self.q_exponent
        score = log_pi * (self.alpha * probability_log(log_pi, q) - advantage).detach()
        if self.config.kl_estimator == "sample":
            sampled_gap = probability_log(log_pi, q) - probability_log(old.log_prob(sample.action), q)
            return score, log_pi * sampled_gap.detach()
        return score, categorical_divergence(distribution.log_probs, old.log_probs, mask, q)

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
