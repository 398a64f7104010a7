"""MA-SAC: multi-agent soft actor-critic derived as structured variational inference (paper 003).

Every agent i sees its own MDP with optimality variables o_i; the variational posterior keeps
the true dynamics and factorises over the agents' policies (Eq. 4), so maximising ELBO_i (Eq. 5)
is entropy-regularised RL for agent i against the current policies of the others. With a
centralised per-agent critic over the joint action (Eq. 6-7) this gives:

    y_i      = r_i + gamma (1 - d) [ min_j Qbar_i^j(x', a') - alpha_i log pibar_i(a'_i | o'_i) ],
               a'_k ~ pibar_k(. | o'_k) for every agent k                      (Eq. 7, one sample)
    E_Q_i    = E_D[ (Q_i^j(x, a) - y_i)^2 ]  for both twins j                    (Eq. 8)
    E_pi_i   = E_{x~D} E_{a~pi}[ alpha_i log pi_i(a_i | o_i) - min_j Q_i^j(x, a) ]  (Eq. 9)

where x = (o_1, ..., o_N) is every controlled agent's observation and a = (a_1, ..., a_N) the
joint action (Sec. 4: Q_i(x, a) over every agent; with several groups, e.g. speaker and listener,
all groups' observations then all their actions, groups in order, `joint_input`), Q_i^1, Q_i^2 are the twin sub-networks whose minimum is the Q value (Sec. 4, after
Fujimoto et al.), and bars mark target networks, which follow tau-Polyak averages of the policy
and Q networks after every gradient step (Algorithm 1). In Eq. 9 ALL agents' actions are sampled
from their current policies (MADDPG would use the replay actions of the others). Discrete actions
are straight-through Gumbel-softmax samples with inverse temperature 1 (Sec. 5.2); Box actions a
tanh-squashed Gaussian, reparameterised. Evaluation plays the most probable action.

Choices the paper leaves open, documented or exposed here:
- Eq. 7's look-ahead "is computed using the current value of parameters", yet Sec. 4 and
  Algorithm 1 also keep target policy and Q networks "to improve learning stability": the target
  uses target Q networks and, by default, target policies for a' (`next_actions`).
- Algorithm 1 steps theta_i along grad_{theta_i} E_pi_i only: agent j's policy is not trained
  through Q_i for i != j. `others_action_gradient` (default False) switches that on (the sum
  sum_i E_pi_i differentiated w.r.t. all policies).
- log pi_i in Eq. 7 and 9 is the exact E_{pi_i}[log pi_i] (minus the entropy) for discrete actions
  and the reparameterised sample's log-density for Box actions: with straight-through samples,
  the sampled log pi_i(a_i) carries no expected gradient of the entropy.
- Sums over agents are means (Adam absorbs the constant N); a gradient step updates the policies
  first, then the critics, then both targets (Algorithm 1's order).
- The critic input is [B, N, sum_g N_g (O_g + A_g)] over the N controlled agents of all groups,
  O(N^2) per batch row: the paper's design, fine for N <= ~30. Policies are per group (their
  observation and action sizes differ), the critics one set over all N agents; r_i and alpha_i
  are concatenated in group order.
- In a mixed team (algos/team.py, `TeamView`) x and a hold every group of the environment,
  opponents included: 003 defines Q_i(s, a) over all agents, so the critic of an MA-SAC team
  matches that of a MADDPG one. The other members' agents enter as each algorithm treats non-own
  agents: their stored critic inputs in Eq. 8 (e.g. a MADDPG member's soft samples), their own
  look-ahead policies' samples in Eq. 7 and their current policies' samples in Eq. 9, detached
  (`Algorithm.critic_actions`); rows, rewards and alpha_i stay the member's own agents'.
- Trainer settings of Sec. 5.2 (one gradient step every 100 env steps, batch 1024, replay 1e6,
  15000 episodes of 25 steps) are trainer fields, not part of this Config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from vimarl.algos.base import Algorithm, Capabilities, adam, agent_mean, frozen, polyak, register
from vimarl.buffer import Transition
from vimarl.envs.base import Discrete, GroupSpec
from vimarl.nn.centralized import (ActionParams, CentralQ, CriticLayout, TeamView, joint_input,
                                   policies_with_targets, replayed_critic_inputs, td_target)
from vimarl.nn.distributions import Categorical, PolicyHead, PolicySample, TanhGaussian


@dataclass
class MASACConfig:
    lr: float = 0.01
    """Adam learning rate of policies and critics (003 Sec. 5.2)."""
    gamma: float = 0.95
    """Discount multiplying the look-ahead of Eq. 7 (003 Sec. 5.2)."""
    tau: float = 0.01
    """Polyak step of the target policy and Q networks after every gradient step (003 Algorithm 1, Sec. 5.2)."""
    alpha: float = 0.02
    """Temperature alpha_i on log pi_i in Eq. 7 and 9, the same for all cooperating agents (003 Sec. 5.2:
    cooperative navigation 0.02, cooperative communication 0.005, predator-prey 0.26, physical deception 0.01)."""
    hidden_dim: int = 128
    """Units of each of the two ReLU hidden layers of every policy and Q network (003 Sec. 5.2)."""
    parameter_sharing: bool = False
    """One policy per group shared by its agents and one twin critic shared by all controlled agents,
    each reading a one-hot agent id (not in 003, whose agents have their own networks), or one
    network per agent."""
    next_actions: Literal["target", "current"] = "target"
    """Policies that sample a' for the Eq. 7 target: the target policies of Algorithm 1, or the current ones."""
    others_action_gradient: bool = False
    """Let Eq. 9's gradient reach agent j's policy through Q_i for i != j (Algorithm 1 only takes
    grad_{theta_i} E_pi_i, so the default is False)."""


class AgentPolicies(ActionParams):
    """pi_i(a_i | o_i) of every agent of a group: a Categorical or tanh Gaussian per agent."""

    def forward(self, obs: Tensor, action_mask: Tensor | None = None) -> Categorical | TanhGaussian:
        out = self.net(obs)
        if isinstance(self.action_space, Discrete):
            return Categorical(out, action_mask)  # Gumbel-softmax, inverse temperature 1
        mean, log_std = out.chunk(2, dim=-1)
        log_std = log_std.clamp(PolicyHead.LOG_STD_MIN, PolicyHead.LOG_STD_MAX)
        return TanhGaussian(mean, log_std, self.action_space.low, self.action_space.high)


def act_per_group(policy: nn.ModuleDict, obs: dict[str, Tensor], action_mask: dict[str, Tensor | None] | None,
                  explore: bool) -> dict[str, Tensor]:
    """Every group's actions from its policy module: sampled when exploring, else the most probable."""
    actions = {}
    for g, group_policy in policy.items():
        distribution = group_policy(obs[g], (action_mask or {}).get(g))
        actions[g] = distribution.sample().action if explore else distribution.mode()
    return actions


@register("masac", "Multi-agent SAC (003): per-agent centralised twin critics over all observations and "
          "actions, target policies and critics, Gumbel-softmax for discrete actions",
          Capabilities(discrete=True, continuous=True, heterogeneous=True, team_critic=True))
class MASAC(Algorithm):
    Config = MASACConfig

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: MASACConfig, device="cpu",
                 team: TeamView | None = None):
        super().__init__(groups, state_dim, config, device)
        shared, hidden = config.parameter_sharing, config.hidden_dim
        self.policy, self.target_policy = policies_with_targets(groups, lambda s: AgentPolicies(s, hidden, shared))
        self.layout = CriticLayout(groups, team)
        self.critics = CentralQ(groups, (hidden, hidden), shared, twins=2,  # Q_i^1, Q_i^2 of every agent
                                seen=self.layout.seen)
        # alpha_i per agent (003 uses one value for all cooperating agents).
        for g, spec in groups.items():
            self.register_buffer(f"alpha_{g}", torch.full((spec.n_agents,), float(config.alpha)))
        self.to(self.device)
        self.optimizers = {"policy": adam(self.policy.parameters(), lr=config.lr),
                           "q": adam(self.critics.q.parameters(), lr=config.lr)}

    def alpha(self, g: str) -> Tensor:
        """alpha_i of group g's agents: [N_g]."""
        return getattr(self, f"alpha_{g}")

    def joint_alpha(self) -> Tensor:
        """alpha_i of every controlled agent, groups in order: [N]."""
        return torch.cat([self.alpha(g) for g in self.groups])

    @property
    def critic_input_dim(self) -> int:
        """Width of every critic's input x: sum over the groups it reads of N_g (O_g + A_g)."""
        return self.critics.input_dim

    @torch.no_grad()
    def act(self, obs, graph, *, explore, action_mask=None, state=None):
        return act_per_group(self.policy, obs, action_mask, explore)

    @torch.no_grad()
    def critic_actions(self, batch: Transition, lookahead: bool) -> dict[str, Tensor]:
        """Samples a' of the Eq. 7 look-ahead policies at s' (`next_actions`), else of the current ones at s (Eq. 9)."""
        samples = (self._samples(self._lookahead_policies(), batch.next_obs, batch.next_action_mask) if lookahead
                   else self._samples(self.policy, batch.obs, batch.action_mask))
        return {g: sample.critic_input for g, sample in zip(self.groups, samples)}

    def _lookahead_policies(self) -> nn.ModuleDict:
        return self.target_policy if self.config.next_actions == "target" else self.policy

    def update(self, batch: Transition) -> dict[str, Tensor]:
        # Algorithm 1: policies (Eq. 9), then critics (Eq. 8), then both target networks.
        policy_loss, entropy = self.policy_loss(batch)
        self.optimize("policy", policy_loss)
        q_loss = self.q_loss(batch)
        self.optimize("q", q_loss)
        polyak(self.target_policy, self.policy, self.config.tau)
        polyak(self.critics.target_q, self.critics.q, self.config.tau)
        return {"loss_q": q_loss.detach(), "loss_policy": policy_loss.detach(), "entropy": entropy}

    @staticmethod
    def _log_pi(sample: PolicySample) -> Tensor:
        """log pi_i in Eq. 7 and 9: exact E[log pi_i] for Categorical, the sample's log-density for Box."""
        return sample.log_prob_mean

    def _samples(self, policies, obs: dict[str, Tensor], masks: dict[str, Tensor | None]) -> list[PolicySample]:
        """a_i ~ pi_i(. | o_i) for every group's agents, groups in order."""
        return [policies[g](obs[g], masks[g]).sample() for g in self.groups]

    @torch.no_grad()
    def q_target(self, batch: Transition) -> Tensor:
        """y_i = r_i + gamma (1 - d)(min_j Qbar_i^j(x', a') - alpha_i log pi_i(a'_i | o'_i)) (Eq. 7): [B, N]."""
        layout = self.layout
        samples = self._samples(self._lookahead_policies(), batch.next_obs, batch.next_action_mask)
        next_actions = layout.ordered([s.critic_input for s in samples], layout.others_actions(batch, lookahead=True))
        inputs = joint_input(layout.obs(batch, next_step=True), next_actions, rows=layout.rows)
        next_q = self.critics.min_value(inputs, target=True)
        log_pi = torch.cat([self._log_pi(s) for s in samples], dim=1)
        return td_target(batch, list(self.groups), self.config.gamma, next_q - self.joint_alpha() * log_pi)

    def q_loss(self, batch: Transition) -> Tensor:
        """E_Q_i (Eq. 8) summed over both twins, on the stored joint action, mean over batch and agents."""
        target = self.q_target(batch)
        layout = self.layout
        inputs = joint_input(layout.obs(batch), replayed_critic_inputs(batch, layout.seen), rows=layout.rows)
        alive = batch.joint_alive(self.groups)
        return sum(agent_mean((q - target).square(), alive) for q in self.critics.values(inputs))

    def policy_loss(self, batch: Transition) -> tuple[Tensor, Tensor]:
        """E_pi_i (Eq. 9) with a ~ pi (every agent's current policy), and the mean entropy (detached)."""
        layout = self.layout
        samples = self._samples(self.policy, batch.obs, batch.action_mask)
        # Eq. 9: every agent's action from its current policy, the other members' without gradient.
        actions = layout.ordered([s.critic_input for s in samples], layout.others_actions(batch, lookahead=False))
        inputs = joint_input(layout.obs(batch), actions, rows=layout.rows,
                             own_action_gradient_only=not self.config.others_action_gradient)
        with frozen(self.critics):
            q = self.critics.min_value(inputs)
        log_pi = torch.cat([self._log_pi(s) for s in samples], dim=1)
        loss = agent_mean(self.joint_alpha() * log_pi - q, batch.joint_alive(self.groups))
        return loss, -log_pi.mean().detach()
