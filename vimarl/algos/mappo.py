"""MA-PPO: PPO's clipped surrogate with MADDPG-style centralised critics (the baseline of paper 004).

004 Sec. 6 sets "the combination of PPO and MADDPG" as a baseline, MA-PPO, without further detail.
Here: every agent i keeps its own decentralised policy pi_i(a_i | o_i) (MADDPG's actors) and its own
centralised critic V_i(x) over every controlled agent's observation x = (o_1, ..., o_N) (MADDPG's
per-agent centralised critics, as a state value because PPO's advantage estimator needs V, not Q).
Training is on-policy: the trainer collects `rollout_length` steps of B sub-environments with the
current policies, hands the whole rollout to `update`, and discards it. Per rollout (Schulman et
al. 2017, with GAE of Schulman et al. 2016):

    delta_t^i = r_t^i + gamma c_t^i V_i(x_{t+1}) - V_i(x_t)          (c = 0 at termination / departure)
    A_t^i     = delta_t^i + gamma lambda e_t^i A_{t+1}^i               (e = 0 where an episode ends)
    L_pi      = -E[ min(rho A, clip(rho, 1 - eps, 1 + eps) A) ] - c_H E[H(pi_i)],  rho = pi_i(a|o) / pi_old(a|o)
    L_V       = E[ 1/2 (V_i(x_t) - (A_t^i + V_old_i(x_t)))^2 ]

for `epochs` passes over the rollout in `minibatches` shuffled minibatches, advantages standardised
per minibatch. At a time-limit truncation the return bootstraps from V_i of the final observation.

Choices not fixed by 004, documented here: lr, clip grad norms and the network sizes follow 004
Table 1 (Adam 1e-3, policy clip 0.5, critic clip 10 N, two hidden layers of 128; "100 steps per
update" as the rollout length, 4 epochs); eps = 0.2, lambda = 0.95, c_H = 0.01 are PPO's defaults.
Box actions use masac's tanh Gaussian (log pi of a stored action inverts the squash), with the
pre-squash Gaussian entropy as H.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vimarl.algos.base import Algorithm, Capabilities, adam, agent_mean, register
from vimarl.algos.masac import AgentPolicies, act_per_group
from vimarl.buffer import Sampler, Transition
from vimarl.envs.base import GroupSpec
from vimarl.nn.centralized import AgentMLP, flatten_agents


@dataclass
class MAPPOConfig:
    lr: float = 1e-3
    """Adam learning rate of policies and critics (004 Table 1)."""
    gamma: float = 0.99
    """Discount (004 Table 1)."""
    gae_lambda: float = 0.95
    """lambda of generalised advantage estimation (PPO's default; 004 gives none)."""
    clip: float = 0.2
    """epsilon of the clipped ratio (PPO's default)."""
    rollout_length: int = 100
    """Vectorised env steps per rollout, so a rollout holds rollout_length x num_envs transitions
    (004 Table 1: 100 steps per update)."""
    epochs: int = 4
    """Passes over each rollout (004 Table 1: 4 epochs per step)."""
    minibatches: int = 4
    """Minibatches per epoch."""
    entropy_coef: float = 0.01
    """c_H, the weight of the policies' entropy bonus (PPO's default)."""
    policy_grad_clip: float = 0.5
    """Gradient-norm clip of the policies (004 Table 1)."""
    critic_grad_clip: float = 10.0
    """Gradient-norm clip of the critics per agent: the clip is this times N (004 Table 1: 10 N)."""
    hidden_dim: int = 128
    """Units of each of the two ReLU hidden layers of every policy and critic."""
    normalize_advantages: bool = True
    """Standardise the advantages of each minibatch."""
    parameter_sharing: bool = False
    """One policy per group and one critic for all agents, each reading a one-hot agent id, or one
    network per agent (MADDPG's)."""


@register("mappo", "MA-PPO (004 baseline): PPO-clipped decentralised policies with MADDPG-style centralised "
          "critics V_i(o_1..o_N), GAE, on-policy rollouts",
          Capabilities(discrete=True, continuous=True, heterogeneous=True))
class MAPPO(Algorithm):
    Config = MAPPOConfig

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: MAPPOConfig, device="cpu"):
        super().__init__(groups, state_dim, config, device)
        shared, hidden = config.parameter_sharing, config.hidden_dim
        self.n_agents = sum(spec.n_agents for spec in groups.values())
        self.policy = torch.nn.ModuleDict({g: AgentPolicies(spec, hidden, shared) for g, spec in groups.items()})
        x_dim = sum(spec.n_agents * spec.obs_dim for spec in groups.values())
        self.critic = AgentMLP(self.n_agents, x_dim, (hidden, hidden), 1, shared)  # V_i(x) of every agent
        self.to(self.device)
        self.optimizers = {"policy": adam(self.policy.parameters(), lr=config.lr),
                           "critic": adam(self.critic.parameters(), lr=config.lr)}

    @property
    def sampler(self) -> Sampler:
        return Sampler("rollout", self.config.rollout_length)

    @torch.no_grad()
    def act(self, obs, graph, *, explore, action_mask=None, state=None):
        return act_per_group(self.policy, obs, action_mask, explore)

    # --- pieces ------------------------------------------------------------------------------

    def values(self, obs: dict[str, Tensor]) -> Tensor:
        """V_i(x) of every controlled agent: [b, N]."""
        x = flatten_agents([obs[g] for g in self.groups]).unsqueeze(1).expand(-1, self.n_agents, -1)
        return self.critic(x).squeeze(-1)

    def log_probs_and_entropy(self, batch: Transition, rows: Tensor | slice = slice(None)) -> tuple[Tensor, Tensor]:
        """log pi_i(a_i | o_i) of the stored actions and H(pi_i) of every agent on `rows`: [b, N] each."""
        log_probs, entropies = [], []
        for g in self.groups:
            mask = batch.action_mask.get(g)
            distribution = self.policy[g](batch.obs[g][rows], None if mask is None else mask[rows])
            log_probs.append(distribution.log_prob(batch.action[g][rows]))
            entropies.append(distribution.entropy())
        return torch.cat(log_probs, dim=1), torch.cat(entropies, dim=1)

    def advantages(self, batch: Transition, values: Tensor, next_values: Tensor) -> Tensor:
        """GAE over the time-major rollout (row t * B + b): [T B, N]."""
        groups = list(self.groups)
        rewards = torch.cat([batch.reward[g] for g in groups], dim=1)
        continuing = torch.cat([batch.continuing(g).expand_as(batch.reward[g]) for g in groups], dim=1)
        deltas = rewards + self.config.gamma * continuing * next_values - values
        episode_goes_on = continuing * (1.0 - batch.truncated).unsqueeze(-1)  # no carry across episodes
        steps = self.config.rollout_length
        deltas, episode_goes_on = deltas.view(steps, -1, self.n_agents), episode_goes_on.view(steps, -1, self.n_agents)
        advantages = torch.zeros_like(deltas)
        carry = torch.zeros_like(deltas[0])
        decay = self.config.gamma * self.config.gae_lambda
        for t in reversed(range(steps)):  # the recursion runs over time; agents and envs are batched
            carry = deltas[t] + decay * episode_goes_on[t] * carry
            advantages[t] = carry
        return advantages.view(-1, self.n_agents)

    @torch.no_grad()
    def advantages_and_returns(self, batch: Transition) -> tuple[Tensor, Tensor]:
        """GAE advantages of the rollout and the critics' targets (advantages + V): [T B, N] each."""
        values = self.values(batch.obs)
        advantages = self.advantages(batch, values, self.values(batch.next_obs))
        return advantages, advantages + values

    # --- the update ----------------------------------------------------------------------------

    def update(self, batch: Transition) -> dict[str, Tensor]:
        config = self.config
        advantages, returns = self.advantages_and_returns(batch)
        with torch.no_grad():
            old_log_probs, _ = self.log_probs_and_entropy(batch)
        present = batch.joint_alive(self.groups)
        rows = advantages.shape[0]
        size = max(rows // config.minibatches, 1)
        sums: dict[str, Tensor] = {}
        count = 0
        for _ in range(config.epochs):
            order = torch.randperm(rows, device=self.device)
            for start in range(0, rows - size + 1, size):
                index = order[start:start + size]
                alive = None if present is None else present[index]
                metrics = self.minibatch_step(batch, index, advantages[index], returns[index], old_log_probs[index], alive)
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value
                count += 1
        return {key: value / count for key, value in sums.items()}

    def minibatch_step(self, batch: Transition, index: Tensor, advantages: Tensor, returns: Tensor,
                       old_log_probs: Tensor, present: Tensor | None) -> dict[str, Tensor]:
        config = self.config
        if config.normalize_advantages:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        log_probs, entropy = self.log_probs_and_entropy(batch, index)
        ratio = (log_probs - old_log_probs).exp()
        clipped = ratio.clamp(1.0 - config.clip, 1.0 + config.clip)
        surrogate = torch.minimum(ratio * advantages, clipped * advantages)
        policy_loss = agent_mean(-surrogate - config.entropy_coef * entropy, present)
        self.optimize("policy", policy_loss, max_grad_norm=config.policy_grad_clip)
        obs = {g: batch.obs[g][index] for g in self.groups}
        value_loss = agent_mean(0.5 * (self.values(obs) - returns).square(), present)
        self.optimize("critic", value_loss, max_grad_norm=config.critic_grad_clip * self.n_agents)
        with torch.no_grad():
            approx_kl = agent_mean(old_log_probs - log_probs, present)
            clip_fraction = agent_mean(((ratio - 1.0).abs() > config.clip).float(), present)
        return {"loss_policy": policy_loss.detach(), "loss_v": value_loss.detach(),
                "entropy": agent_mean(entropy, present).detach(), "approx_kl": approx_kl,
                "clip_fraction": clip_fraction}
