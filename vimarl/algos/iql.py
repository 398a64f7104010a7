"""IQL: independent Q-learning (Tan 1993) with DQN (Mnih et al. 2015), one network shared by the agents.

Every agent i treats the others as part of its environment and learns Q(o_i, a_i) from its own
reward r_i. The agents share the network's weights and tell themselves apart by a one-hot agent
id input (ALGO_SPECS §6.4: sharing is the only practical option for N >= 30):

    Q_i(o_i, a_i)   = Q_theta(o_i, id_i)[a_i]
    y_i             = r_i + gamma c_i Qbar(o'_i, argmax_a' Q_theta(o'_i, a'))      double-Q (default)
                    = r_i + gamma c_i max_a' Qbar(o'_i, a')                          plain DQN
    L(theta)        = E_D[ mean_i l(Q_i(o_i, a_i) - y_i) ],  l = Huber (DQN) or squared error

c_i = 0 where the episode terminated or agent i left it (truncated episodes bootstrap), Qbar is
the target network (a hard copy every C gradient steps, DQN, or Polyak averaging), and agents
act epsilon-greedily with epsilon falling linearly over env steps; unavailable actions (action
masks) are never chosen nor bootstrapped from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from vimarl.algos.base import Capabilities, register
from vimarl.algos.q_learning import AgentQNetwork, QLearner, QLearningConfig, next_value, taken, td_loss
from vimarl.buffer import Transition
from vimarl.envs.base import GroupSpec
from vimarl.envs.graph import Graph
from vimarl.nn.centralized import td_target


@dataclass
class IQLConfig(QLearningConfig):
    lr: float = 5e-4
    """Adam learning rate of the shared Q network."""
    hidden_dim: int = 64
    """Units of each of the two ReLU hidden layers of the Q network."""
    loss: Literal["mse", "huber"] = "huber"
    """Regression loss on the TD error: Huber (DQN's error clipping, the default) or squared error."""
    agent_ids: bool = True
    """Append a one-hot agent id to every observation, so agents sharing the network can still differ."""


class SharedQ(AgentQNetwork):
    """Q_theta(o_i, id_i) over two hidden layers; the graph is not read."""

    def __init__(self, spec: GroupSpec, config: IQLConfig):
        hidden = config.hidden_dim
        super().__init__(spec.n_agents, spec.obs_dim, (hidden, hidden), spec.action_space.n, config.agent_ids)

    def forward(self, obs: Tensor, graph: Graph | None = None) -> Tensor:
        return super().forward(obs)


@register("iql", "Independent Q-learning: DQN per agent with one shared network and agent-id input, "
          "double-Q targets, epsilon-greedy exploration",
          Capabilities(discrete=True, continuous=False))
class IQL(QLearner):
    Config = IQLConfig

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: IQLConfig, device="cpu"):
        super().__init__(groups, state_dim, config, device)
        self.build(SharedQ(self.spec, config))

    def update(self, batch: Transition) -> dict[str, Tensor]:
        g = self.group
        q = taken(self.policy(batch.obs[g], batch.graph[g]), batch.action[g])
        target = td_target(batch, [g], self.config.gamma, next_value(*self.next_q(batch), batch.next_action_mask[g]))
        loss = td_loss(q, target, self.config.loss, batch.alive.get(g))
        self.step(loss)
        return {"loss_q": loss.detach(), "q": q.mean().detach(), "epsilon": self.epsilon()}
