"""MA-SAC: multi-agent soft actor-critic derived as structured variational inference (paper 003).

Every agent i sees its own MDP with optimality variables o_i; the variational posterior keeps
the true dynamics and factorises over the agents' policies (Eq. 4), so maximising ELBO_i (Eq. 5)
is entropy-regularised RL for agent i against the current policies of the others. With a
centralised per-agent critic over the joint action (Eq. 6-7) this gives:

    y_i      = r_i + gamma (1 - d) [ min_j Qbar_i^j(x', a') - alpha_i log pibar_i(a'_i | o'_i) ],
               a'_k ~ pibar_k(. | o'_k) for every agent k                      (Eq. 7, one sample)
    E_Q_i    = E_D[ (Q_i^j(x, a) - y_i)^2 ]  for both twins j                    (Eq. 8)
    E_pi_i   = E_{x~D} E_{a~pi}[ alpha_i log pi_i(a_i | o_i) - min_j Q_i^j(x, a) ]  (Eq. 9)

where x = (o_1, ..., o_N) is every agent's observation (agent order), a = (a_1, ..., a_N) the
joint action, Q_i^1, Q_i^2 are the twin sub-networks whose minimum is the Q value (Sec. 4, after
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
- The critic input is [B, N, N (obs + act)], O(N^2) per batch row: the paper's design, fine for
  N <= ~30.
- Trainer settings of Sec. 5.2 (one gradient step every 100 env steps, batch 1024, replay 1e6,
  15000 episodes of 25 steps) are trainer fields, not part of this Config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from vimarl.algos.base import Algorithm, Capabilities, adam, frozen, polyak, register
from vimarl.buffer import Transition
from vimarl.envs.base import Discrete, GroupSpec
from vimarl.nn.centralized import AgentMLP, CentralTwinQ, joint_input
from vimarl.nn.distributions import Categorical, PolicyHead, PolicySample, TanhGaussian, action_dim, action_features


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
    """One policy and one twin critic shared by the agents of a group, reading a one-hot agent id
    (not in 003, whose agents have their own networks), or one network per agent."""
    next_actions: Literal["target", "current"] = "target"
    """Policies that sample a' for the Eq. 7 target: the target policies of Algorithm 1, or the current ones."""
    others_action_gradient: bool = False
    """Let Eq. 9's gradient reach agent j's policy through Q_i for i != j (Algorithm 1 only takes
    grad_{theta_i} E_pi_i, so the default is False)."""


class AgentPolicies(nn.Module):
    """pi_i(a_i | o_i) of every agent of a group: a Categorical or tanh Gaussian per agent."""

    def __init__(self, spec: GroupSpec, hidden_dim: int, shared: bool):
        super().__init__()
        self.action_space = spec.action_space
        out = spec.action_space.n if isinstance(spec.action_space, Discrete) else 2 * spec.action_space.dim
        self.net = AgentMLP(spec.n_agents, spec.obs_dim, (hidden_dim, hidden_dim), out, shared)

    def forward(self, obs: Tensor, action_mask: Tensor | None = None) -> Categorical | TanhGaussian:
        out = self.net(obs)
        if isinstance(self.action_space, Discrete):
            return Categorical(out, action_mask)  # Gumbel-softmax, inverse temperature 1
        mean, log_std = out.chunk(2, dim=-1)
        log_std = log_std.clamp(PolicyHead.LOG_STD_MIN, PolicyHead.LOG_STD_MAX)
        return TanhGaussian(mean, log_std, self.action_space.low, self.action_space.high)


@register("masac", "Multi-agent SAC (003): per-agent centralised twin critics over all observations and "
          "actions, target policies and critics, Gumbel-softmax for discrete actions",
          Capabilities(discrete=True, continuous=True))
class MASAC(Algorithm):
    Config = MASACConfig

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: MASACConfig, device="cpu"):
        super().__init__(groups, state_dim, config, device)
        shared = config.parameter_sharing
        self.policy = nn.ModuleDict({g: AgentPolicies(spec, config.hidden_dim, shared) for g, spec in groups.items()})
        self.target_policy = nn.ModuleDict({g: AgentPolicies(spec, config.hidden_dim, shared)
                                            for g, spec in groups.items()})
        self.target_policy.load_state_dict(self.policy.state_dict())
        self.target_policy.requires_grad_(False)
        self.critics = nn.ModuleDict({
            g: CentralTwinQ(spec.n_agents, spec.obs_dim, action_dim(spec.action_space),
                            (config.hidden_dim, config.hidden_dim), shared)
            for g, spec in groups.items()})
        # alpha_i per agent (003 uses one value for all cooperating agents).
        for g, spec in groups.items():
            self.register_buffer(f"alpha_{g}", torch.full((spec.n_agents,), float(config.alpha)))
        self.to(self.device)
        self.optimizers = {
            "policy": adam(self.policy.parameters(), lr=config.lr),
            "q": adam([p for c in self.critics.values() for p in c.q.parameters()], lr=config.lr),
        }

    def alpha(self, g: str) -> Tensor:
        """alpha_i of group g's agents: [N]."""
        return getattr(self, f"alpha_{g}")

    @torch.no_grad()
    def act(self, obs, graph, *, explore, action_mask=None, state=None):
        actions = {}
        for g in self.groups:
            distribution = self.policy[g](obs[g], (action_mask or {}).get(g))
            actions[g] = distribution.sample().action if explore else distribution.mode()
        return actions

    def update(self, batch: Transition) -> dict[str, Tensor]:
        # Algorithm 1: policies (Eq. 9), then critics (Eq. 8), then both target networks.
        terms = [self.policy_loss(g, batch) for g in self.groups]
        policy_loss = sum(loss for loss, _ in terms)
        self.optimize("policy", policy_loss)
        q_loss = sum(self.q_loss(g, batch) for g in self.groups)
        self.optimize("q", q_loss)
        polyak(self.target_policy, self.policy, self.config.tau)
        for critics in self.critics.values():
            polyak(critics.target_q, critics.q, self.config.tau)
        entropy = torch.stack([e for _, e in terms]).mean()
        return {"loss_q": q_loss.detach(), "loss_policy": policy_loss.detach(), "entropy": entropy}

    @staticmethod
    def _log_pi(sample: PolicySample) -> Tensor:
        """log pi_i in Eq. 7 and 9: exact E[log pi_i] for Categorical, the sample's log-density for Box."""
        return sample.log_prob_mean

    @torch.no_grad()
    def q_target(self, g: str, batch: Transition) -> Tensor:
        """y_i = r_i + gamma (1 - d)(min_j Qbar_i^j(x', a') - alpha_i log pi_i(a'_i | o'_i)) (Eq. 7): [B, N]."""
        policy = self.target_policy[g] if self.config.next_actions == "target" else self.policy[g]
        sample = policy(batch.next_obs[g], batch.next_action_mask[g]).sample()
        next_q = self.critics[g].min_value(joint_input(batch.next_obs[g], sample.critic_input), target=True)
        soft_value = next_q - self.alpha(g) * self._log_pi(sample)
        not_done = (1.0 - batch.terminated.float()).unsqueeze(-1)
        return batch.reward[g] + self.config.gamma * not_done * soft_value

    def q_loss(self, g: str, batch: Transition) -> Tensor:
        """E_Q_i (Eq. 8) for both twins, on the stored joint action, mean over batch and agents."""
        target = self.q_target(g, batch)
        stored = action_features(batch.action[g], self.groups[g].action_space)
        inputs = joint_input(batch.obs[g], stored)
        return sum((q - target).square().mean() for q in self.critics[g].values(inputs))

    def policy_loss(self, g: str, batch: Transition) -> tuple[Tensor, Tensor]:
        """E_pi_i (Eq. 9) with a ~ pi (every agent's current policy), and the mean entropy (detached)."""
        distribution = self.policy[g](batch.obs[g], batch.action_mask[g])
        sample = distribution.sample()
        inputs = joint_input(batch.obs[g], sample.critic_input,
                             own_action_gradient_only=not self.config.others_action_gradient)
        with frozen(self.critics[g]):
            q = self.critics[g].min_value(inputs)
        log_pi = self._log_pi(sample)
        loss = (self.alpha(g) * log_pi - q).mean()
        return loss, -log_pi.mean().detach()
