"""VDN: value decomposition networks (Sunehag et al. 2018), in pymarl's form (ALGO_SPECS §5.5).

The team's joint action value is the sum of per-agent utilities, each computed from the agent's
own observation by one network shared by the agents (with a one-hot agent id input):

    Q_tot(s, a)   = sum_i Q_i(o_i, a_i)                                         (VDN Eq. 1)
    y             = R + gamma (1 - d) sum_i Qbar_i(o'_i, argmax_a' Q_i(o'_i, a'))   double-Q
                  = R + gamma (1 - d) sum_i max_a' Qbar_i(o'_i, a')                  plain
    L(theta)      = E_D[ l(Q_tot(s, a) - y) ]

Because the sum is monotonic in every Q_i, each agent's greedy action in its own Q_i is the
team's greedy joint action, so execution is decentralised. R is the team reward: the sum of the
agents' rewards (`team_reward`, or their mean), which for broadcast team rewards is N times the
shared value; d the episode's termination. Agents absent at s (or s') add nothing to the sums.

Choices the paper leaves open (shared with QMIX, which subclasses this):
- Agent networks are feed-forward over o_i by default (enough for the 25-step particle tasks).
  `recurrent=True` gives pymarl's GRU agent over the history tau_i (fc 64 -> GRUCell 64 -> fc,
  without pymarl's last-action input), trained on windows of `sequence_length` consecutive steps
  of one sub-environment drawn from the replay, both networks unrolled over the window with the
  GRU state reset at episode starts, the window's first step starting from a zero state (R2D2's
  "zero state"; `burn_in` steps can warm it up without loss), and
      y_t = R_t + gamma (1 - d_t) Qbar_tot(s'_t, Qbar_i(tau_i,t o'_i,t, argmax_a' Q_i(tau_i,t o'_i,t, a')))
  where Q(tau o', .) takes one more GRU step from h_t on s'_t (the final observation where the
  episode ended). Steps past the replay's newest row are masked out of the loss.
- Adam, not pymarl's RMSprop; targets are hard copies every 200 gradient steps (pymarl: every 200
  episodes, which with its one update per episode is the same count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vimarl.algos.base import Capabilities, agent_mean, register
from vimarl.algos.iql import SharedQ
from vimarl.algos.q_learning import QLearner, QLearningConfig, RecurrentAgentQ, next_value, taken, td_loss
from vimarl.buffer import Transition
from vimarl.envs.base import GroupSpec


@dataclass
class VDNConfig(QLearningConfig):
    agent_ids: bool = True
    """Append a one-hot agent id to every agent's input (pymarl's obs_agent_id)."""
    recurrent: bool = False
    """GRU agents over each agent's observation history (pymarl's rnn agent, hidden_dim units), trained on windows."""
    sequence_length: int = 25
    """Recurrent agents: consecutive steps per training window (batch_size // sequence_length windows per update)."""
    burn_in: int = 0
    """Recurrent agents: first steps of each window that only warm the GRU state up (no loss through them, R2D2)."""
    window_start: Literal["episode", "anywhere"] = "episode"
    """Recurrent agents: windows start at an episode's first step, where the GRU state really is zero
    (pymarl replays whole episodes: set sequence_length to the episode length), or at any stored step
    from a zero state (then warm it up with burn_in; for episodes much longer than a window)."""
    team_reward: Literal["sum", "mean"] = "sum"
    """The team reward R trained on: the sum of the agents' rewards (the return the trainer reports) or their mean."""


def agent_network(spec: GroupSpec, config: VDNConfig) -> SharedQ | RecurrentAgentQ:
    """The agents' shared utility network: feed-forward (two hidden layers) or pymarl's GRU agent."""
    if config.recurrent:
        return RecurrentAgentQ(spec.n_agents, spec.obs_dim, config.hidden_dim, spec.action_space.n, config.agent_ids)
    return SharedQ(spec, config)


@register("vdn", "VDN: team Q as the sum of shared per-agent Q networks, trained on the team reward, "
          "double-Q targets, epsilon-greedy",
          Capabilities(discrete=True, continuous=False))
class VDN(QLearner):
    Config = VDNConfig

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: VDNConfig, device="cpu"):
        super().__init__(groups, state_dim, config, device)
        self.build(agent_network(self.spec, config))

    def mix(self, q: Tensor, state: Tensor | None, target: bool = False) -> Tensor:
        """Q_tot from per-agent values [B, N]: their sum (VDN Eq. 1)."""
        return q.sum(-1)

    def team_reward(self, batch: Transition) -> Tensor:
        reward = batch.reward[self.group]
        return reward.sum(-1) if self.config.team_reward == "sum" else reward.mean(-1)

    @staticmethod
    def present(q: Tensor, alive: Tensor | None) -> Tensor:
        """Per-agent values with absent agents' set to 0."""
        return q if alive is None else q * alive.to(q.dtype)

    def update(self, batch: Transition) -> dict[str, Tensor]:
        g, gamma = self.group, self.config.gamma
        if self.recurrent:  # windows [T, W, ...]: unroll the GRUs, then one row per step
            q, next_q, weight = self.sequence_q(batch)
            batch = batch.flatten()
        else:
            q, next_q, weight = self.policy(batch.obs[g], batch.graph[g]), self.next_q(batch), None
        q = self.present(taken(q, batch.action[g]), batch.alive.get(g))
        q_tot = self.mix(q, batch.state)
        with torch.no_grad():
            next_q = self.present(next_value(*next_q, batch.next_action_mask[g]), batch.next_alive.get(g))
            target = self.team_reward(batch) + gamma * (1.0 - batch.terminated) * self.mix(next_q, batch.next_state, True)
        loss = td_loss(q_tot, target, self.config.loss, weight)
        self.step(loss)
        return {"loss_q": loss.detach(), "q_tot": agent_mean(q_tot.detach(), weight), "epsilon": self.epsilon()}

