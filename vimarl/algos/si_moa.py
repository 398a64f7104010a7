"""SI-MOA: social influence with models of other agents (Jaques et al., ICML 2019), on MA-AC (002 baseline).

Jaques et al. reward an agent for the causal influence of its action on the other agents' actions.
Without ordering the agents (002 Sec. 3, Fig. 1b), each agent i learns a model of the other agents
(MOA) that predicts their NEXT actions from its observation and the joint action at t, and
agent i's influence on j is how much conditioning on a_t^i moves that prediction:

    c_t^i = sum_{j != i} D_KL( p(a_{t+1}^j | a_t^i, a_t^{-i}, s_t) || p(a_{t+1}^j | a_t^{-i}, s_t) ),
    p(a_{t+1}^j | a_t^{-i}, s_t) = E_{a~^i ~ pi^i(. | o_t^i)}[ p(a_{t+1}^j | a~^i, a_t^{-i}, s_t) ]  (counterfactual marginal)

whose expectation over a_t^i is the MI I(a_t^i; a_{t+1}^j | s_t, a_t^{-i}): 002 Eq. 3-4 with a_t^j
replaced by a_{t+1}^j (and the others' simultaneous actions given, as the MOA reads them). Each agent is trained on r_t^i = alpha e_t^i + beta c_t^i (extrinsic reward e, weights
alpha and beta), and the MOA by maximum likelihood on the observed next actions. 002 Sec. 6 runs
SI-MOA "on top of MA-AC" (`ma_ac`: VM3-AC with beta = 0 and no latent) for continuous actions;
here the shaped reward replaces r^i in MA-AC's Q target (002 Eq. 48):

    Q_hat^i = alpha e^i + beta c^i + gamma (1 - d) Vbar^i(x')
    L_MOA   = E_D[ - sum_{j != i} log N(a_{t+1}^j; mu_eta^i,j(o_t^i, a_t), diag sigma_eta^i,j(o_t^i, a_t)^2) ]

and everything else (V, twin Q, policies, target V) is MA-AC's, unchanged.

What the sources fix. No code by Jaques et al. was found (searches of the stored GitHub index and
issue threads); the community reimplementation eugenevinitsky/sequential_social_dilemma_games
covers only their Experiment III, "Modeling Other Agents" (its issues #175 and #178). Read there:
models/moa_model.py at commit 6de7a797, algorithms/common_funcs_moa.py at 00aa3597 and
config/default_args.py at 0ad2c289. They fix,
for discrete actions: one MOA per agent reads its own observation and the one-hot actions of ALL
agents at t and outputs the next-step logits of all other agents at once; the MOA loss is the cross
entropy of the true next actions (pred_logits[1:] against actions[1:]); the influence is the
(closed-form categorical) KL between the prediction under the action taken and the marginal
sum_a pi^i(a) p(. | a, a^{-i}) over all counterfactual own actions, summed over the other
agents, computed with the policy's logits frozen (no gradient through the reward), clipped to
[-10, 10] (`influence_reward_clip` 10), weighted (`influence_reward_weight`, default 0.001, 1.0 in
its run scripts with a curriculum) and added to the environment reward.

What they leave open, and what we chose:
- Continuous actions (002's tasks): the MOA predicts a diagonal Gaussian over each other agent's
  next action (tanh-bounded values, as the policy emits them), mean and log std (clamped to
  [MOA_LOG_STD_MIN, MOA_LOG_STD_MAX]) from one network per agent i reading [o^i, a_t^1, ..., a_t^N]
  and giving all N agents' predictions (row j = i unused), as the reimplementation's MOA does.
  Its MOA is an LSTM over the episode; ours is a feed-forward MLP of 002 Table 1's size ("all
  networks": 2 x 128 ReLU), memoryless like MA-AC's policies and critics.
- The marginal is then a mixture of Gaussians with no closed-form KL. Estimator (Monte Carlo):
  K = `counterfactual_samples` actions a~_k^i ~ pi^i(. | o_t^i) from the current policy, M =
  `kl_samples` draws y_m ~ p_c = p(. | a_t^i, a_t^{-i}) per (i, j), and
      KL_hat = 1/M sum_m [ log p_c(y_m) - log( 1/K sum_k p(y_m | a~_k^i, a_t^{-i}) ) ].
  With an MOA that ignores a^i every component equals p_c and KL_hat is exactly 0. The outer
  average is unbiased; the log of the inner K-sample mean is biased low (Jensen), so KL_hat is
  biased high by about Var_k[p(y | a~_k)] / (2 K m(y)^2) = O(1/K). The defaults K = 16, M = 4 are
  our choice (not in any source; 16 mixture components cost 16 extra MOA passes per update).
- a_{t+1}^j is not in the replay (which stores (s, a, r, s')). The MOA's targets are fresh samples
  a'^j ~ pi^j(. | o_{t+1}^j) of the current policies, detached, instead of the replayed next actions
  of older policies: Jaques et al. train on-policy (A3C), where observed next actions come from the
  current policies, and the maximum-likelihood fit of E_{s'~P(s, a), a'~pi(s')}[log p(a'^j | a, s)]
  is the next-action model of the policies whose influence is rewarded. No extra replay field.
- Transitions that end in a terminal s' have no next action: their influence is 0 and they do not
  train the MOA (agents that leave at s' likewise drop out as influenced j).
- The influence is computed without gradient from the replayed a_t and enters only the critic's
  reward (as the reimplementation freezes it); the MOA has its own Adam optimiser (lr as the
  others; a loss weight would be absorbed by Adam) and steps after MA-AC's critic and actor steps.
- The sum over j is a sum (Jaques), not the mean VM3-AC's MI bound takes. `beta` of 002 Eq. 1
  and Jaques' beta are `influence_weight`; MAACConfig's own `beta` (entropy / MI temperature) stays 0.
- Discrete actions (Jaques' own setting; MA-AC's straight-through Gumbel-softmax policies): a
  categorical MOA over one-hot actions and the exact KL to the exact marginal over all own actions
  weighted by pi^i, as the reimplementation computes it (`counterfactual_samples` and `kl_samples`
  unused). Groups must share one kind and size of action.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vimarl.algos.base import Capabilities, adam, register
from vimarl.algos.vm3ac import MAAC, MAACConfig
from vimarl.buffer import Transition
from vimarl.envs.base import GroupSpec
from vimarl.errors import VimarlError
from vimarl.nn.centralized import AgentMLP
from vimarl.nn.distributions import action_dim, action_features

MOA_LOG_STD_MIN, MOA_LOG_STD_MAX = -5.0, 2.0
"""Clamp of the MOA's log std: a collapsed std would make the KL to the mixture blow up."""


@dataclass
class SIMOAConfig(MAACConfig):
    extrinsic_weight: float = 1.0
    """alpha in r = alpha e + beta c (Jaques et al.; the reimplementation adds the weighted influence
    to the unscaled environment reward, alpha = 1)."""
    influence_weight: float = 0.1
    """beta in r = alpha e + beta c. Neither 002 (Table 1 lists SI-MOA with MA-AC's shared values only)
    nor the reimplementation (0.001 in config/default_args.py, for its own reward scale) fixes it for
    these tasks; 0.1 is 002 Table 2's middle MI temperature (0.05-0.2) for the same tasks, since 002
    Eq. 1 treats SI-MOA's influence as another estimate of the MI term VM3-AC weighs by beta."""
    counterfactual_samples: int = 16
    """K, counterfactual actions a~^i ~ pi^i(. | o_t^i) forming the marginal mixture (our choice;
    the discrete reimplementation sums over every action exactly)."""
    kl_samples: int = 4
    """M, draws y ~ p(a_{t+1}^j | a_t^i, ...) per agent pair in the Monte Carlo KL estimate (our choice)."""
    influence_clip: float = 10.0
    """The influence c^i is clipped to [-clip, clip] (reimplementation's `influence_reward_clip` 10)."""


class ModelOfOtherAgents(nn.Module):
    """p_eta^i(a_{t+1}^j | o_t^i, a_t) of every agent i about every agent j at once: N(mu, diag sigma^2)
    over Box actions, a categorical over Discrete ones; one network per agent i (shared with a one-hot
    id under parameter sharing)."""

    def __init__(self, n: int, obs_dim: int, action_size: int, hidden: int, shared: bool, discrete: bool):
        super().__init__()
        self.n, self.discrete = n, discrete
        per_agent = action_size if discrete else 2 * action_size  # logits, or mean and log std
        self.net = AgentMLP(n, obs_dim + n * action_size, (hidden, hidden), n * per_agent, shared)

    def forward(self, obs: Tensor, joint: Tensor) -> tuple[Tensor, Tensor | None]:
        """obs [..., N, O] (row i: o^i) and joint [..., N, N A] (row i: the joint action features agent i's
        model reads), broadcastable -> Box: mean, log std [..., N (i), N (j), A]; Discrete:
        log-probabilities [..., N (i), N (j), n], None."""
        out = self.net.forward_parts([obs, joint]).unflatten(-1, (self.n, -1))
        if self.discrete:
            return out.log_softmax(-1), None
        mean, log_std = out.chunk(2, dim=-1)
        return mean, log_std.clamp(MOA_LOG_STD_MIN, MOA_LOG_STD_MAX)


def gaussian(mean: Tensor, log_std: Tensor) -> torch.distributions.Normal:
    """The MOA's diagonal Gaussian. No argument validation: a diverged run (NaN weights) then ends in
    the trainer's one-line non-finite-loss error instead of a ValueError from torch.distributions."""
    return torch.distributions.Normal(mean, log_std.exp(), validate_args=False)


@register("si_moa", "SI-MOA (Jaques et al. 2019, 002 baseline): MA-AC whose critic reward adds each agent's "
          "social influence, the KL of a model of the others' next actions to its counterfactual marginal",
          Capabilities(discrete=True, continuous=True, heterogeneous=True))
class SIMOA(MAAC):
    Config = SIMOAConfig

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: SIMOAConfig, device="cpu"):
        for name, fix in (("kl_samples", "at least 1"), ("influence_clip", "a positive bound, e.g. 10")):
            if not getattr(config, name) > 0:
                raise VimarlError(f"si_moa: {name}={getattr(config, name)} must be positive; set it to {fix}")
        super().__init__(groups, state_dim, config, device)
        action_size = action_dim(next(iter(groups.values())).action_space)
        self.discrete = next(iter(groups.values())).discrete
        self.moa = ModelOfOtherAgents(self.n_agents, self.obs_pad, action_size, config.hidden_dim,
                                      config.parameter_sharing, self.discrete).to(self.device)
        # own_columns[i]: agent i's columns of the flat joint action, the ones a counterfactual replaces.
        own = torch.eye(self.n_agents, device=self.device).repeat_interleave(action_size, dim=1).bool()
        self.register_buffer("own_columns", own, persistent=False)
        self.register_buffer("others", ~torch.eye(self.n_agents, dtype=torch.bool, device=self.device),
                             persistent=False)
        self.optimizers["moa"] = adam(self.moa.parameters(), lr=config.lr)

    @classmethod
    def check_env(cls, env_name: str, groups: dict[str, GroupSpec], state_dim: int) -> None:
        super().check_env(env_name, groups, state_dim)
        if len({spec.discrete for spec in groups.values()}) > 1:
            raise VimarlError(f"algorithm '{cls.name}' needs one kind of action across groups for its model of "
                              f"the other agents, but env '{env_name}' mixes discrete and continuous groups")

    # --- the influence reward ---------------------------------------------------------------

    def joint_rows(self, actions: Tensor) -> Tensor:
        """The joint action as every agent's MOA reads it: [..., N, A] -> [..., N, N A]."""
        flat = actions.flatten(-2).unsqueeze(-2)
        return flat.expand(*flat.shape[:-2], self.n_agents, flat.shape[-1])

    def counterfactual_rows(self, actions: Tensor, counterfactual: Tensor) -> Tensor:
        """Row i of the joint action with a^i replaced by a~_k^i: actions [B, N, A], counterfactual
        [K, B, N, A] -> [K, B, N, N A]."""
        return torch.where(self.own_columns, counterfactual.flatten(-2).unsqueeze(-2),
                           actions.flatten(-2).unsqueeze(-2))

    @torch.no_grad()
    def counterfactual_actions(self, obs: dict[str, Tensor], masks: dict[str, Tensor | None],
                               k: int) -> tuple[Tensor, Tensor]:
        """The counterfactual own actions a~_k^i of every agent [K, B, N, A] and their mixture weights
        log w_k^i [K, B, N]: K samples of pi^i(. | o_t^i) with w = 1/K (Box), or every action a with
        w = pi^i(a | o_t^i) (Discrete, K = n: the exact marginal, as the reimplementation sums)."""
        b = next(iter(obs.values())).shape[0]
        if self.discrete:
            z = self.latent(b, explore=True)
            log_pi = torch.cat([self.policy[g](self.with_latent(obs[g], z), masks[g]).log_probs for g in self.groups], 1)
            n_actions = log_pi.shape[-1]
            one_hots = torch.eye(n_actions, device=log_pi.device).view(n_actions, 1, 1, n_actions)
            return one_hots.expand(n_actions, b, self.n_agents, n_actions), log_pi.permute(2, 0, 1)
        repeated = {g: obs[g].repeat(k, 1, 1) for g in self.groups}  # row k * B + b
        samples = self.samples(repeated, self.latent(k * b, explore=True), masks)
        actions = torch.cat([s.critic_input for s in samples], dim=1).unflatten(0, (k, b))
        return actions, actions.new_full(actions.shape[:-1], -math.log(k))

    @torch.no_grad()
    def influence(self, obs: Tensor, actions: Tensor, counterfactual: Tensor, log_weights: Tensor | None = None,
                  pairs: Tensor | None = None) -> Tensor:
        """c^i = sum_{j != i} KL(p(a'^j | a_t, o^i) || sum_k w_k p(a'^j | a~_k^i, a_t^{-i}, o^i)), clipped:
        obs [B, N, O] (padded o^i), actions [B, N, A] (features of the taken ones), counterfactual
        [K, B, N, A] with log_weights [K, B, N] (None: 1/K) -> [B, N]. Discrete: the exact KL;
        Box: the Monte Carlo estimate over `kl_samples` draws (module docstring). `pairs` [B, N, N]
        bool (None: all i != j) marks which j count for i."""
        if log_weights is None:
            log_weights = actions.new_full(counterfactual.shape[:-1], -math.log(counterfactual.shape[0]))
        first, second = self.moa(obs, self.joint_rows(actions))                                # [B, N, N, .]
        cf_first, cf_second = self.moa(obs, self.counterfactual_rows(actions, counterfactual))  # [K, B, N, N, .]
        if self.discrete:  # first: log p(a'^j = b | a_t), summed over b exactly
            log_marginal = (log_weights[..., None, None] + cf_first).logsumexp(0)               # [B, N, N, n]
            kl = (first.exp() * (first - log_marginal)).sum(-1)
        else:
            conditional = gaussian(first, second)
            y = conditional.sample((self.config.kl_samples,))                                  # [M, B, N, N, A]
            log_conditional = conditional.log_prob(y).sum(-1)                                  # [M, B, N, N]
            components = gaussian(cf_first.unsqueeze(1), cf_second.unsqueeze(1))
            log_joint = components.log_prob(y).sum(-1) + log_weights[:, None, :, :, None]     # [K, M, B, N, N]
            kl = (log_conditional - log_joint.logsumexp(0)).mean(0)                            # [B, N, N]
        pairs = self.others if pairs is None else pairs & self.others
        clip = self.config.influence_clip
        return (kl * pairs).sum(-1).clamp(-clip, clip)

    def moa_loss(self, obs: Tensor, actions: Tensor, next_actions: Tensor, pairs: Tensor) -> Tensor:
        """-log p_eta^i(a'^j | o^i, a_t) averaged over the agent pairs `pairs` [B, N, N]: obs [B, N, O],
        actions [B, N, A] (features), next_actions [B, N, A] (Box) or [B, N] indices (Discrete); a'^j
        is the target of column j."""
        first, second = self.moa(obs, self.joint_rows(actions))
        if self.discrete:
            targets = next_actions.unsqueeze(1).expand(-1, self.n_agents, -1).unsqueeze(-1)
            log_likelihood = first.gather(-1, targets).squeeze(-1)
        else:
            log_likelihood = gaussian(first, second).log_prob(next_actions.unsqueeze(1)).sum(-1)
        weights = pairs.to(log_likelihood.dtype)
        return -(log_likelihood * weights).sum() / weights.sum().clamp_min(1.0)

    def influence_pairs(self, batch: Transition) -> Tensor:
        """[B, N, N] bool: agent i (in at s) influences j (!= i) when j acts at t + 1 (s' not terminal, j still in)."""
        groups = list(self.groups)
        acts_next = torch.cat([batch.continuing(g).expand_as(batch.reward[g]) for g in groups], dim=1) > 0
        pairs = self.others & acts_next.unsqueeze(1)
        alive = batch.joint_alive(groups)
        return pairs if alive is None else pairs & alive.unsqueeze(2)

    def shaped(self, batch: Transition, influence: Tensor) -> Transition:
        """The batch with r^i = alpha e^i + beta c^i, the reward MA-AC's Q target (002 Eq. 48) reads."""
        per_group = influence.split([spec.n_agents for spec in self.groups.values()], dim=1)
        alpha, beta = self.config.extrinsic_weight, self.config.influence_weight
        reward = {**batch.reward, **{g: alpha * batch.reward[g] + beta * c for g, c in zip(self.groups, per_group)}}
        return dataclasses.replace(batch, reward=reward)

    # --- one gradient step --------------------------------------------------------------------

    def update(self, batch: Transition) -> dict[str, Tensor]:
        obs = self.padded_obs(batch.obs)
        actions = torch.cat([action_features(batch.action[g], spec.action_space) for g, spec in self.groups.items()], 1)
        pairs = self.influence_pairs(batch)
        counterfactual, log_weights = self.counterfactual_actions(batch.obs, batch.action_mask,
                                                                  self.config.counterfactual_samples)
        influence = self.influence(obs, actions, counterfactual, log_weights, pairs)
        metrics = super().update(self.shaped(batch, influence))  # MA-AC: V and twin Q, then the policies
        with torch.no_grad():  # the MOA's targets: the current policies' a'^j at s'
            samples = self.samples(batch.next_obs, self.latent(actions.shape[0], explore=True), batch.next_action_mask)
            next_actions = torch.cat([s.action if self.discrete else s.critic_input for s in samples], dim=1)
        moa_loss = self.moa_loss(obs, actions, next_actions, pairs)
        self.optimize("moa", moa_loss)
        return {**metrics, "loss_moa": moa_loss.detach(), "influence": influence.mean()}
