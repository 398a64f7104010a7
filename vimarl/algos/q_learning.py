"""What every value-based method here shares (IQL, DGN, MFQ, VDN, QMIX): the DQN machinery.

- `QLearningConfig`: the fields all of them have (learning rate, discount, epsilon schedule,
  double-Q, loss, target updates); each algorithm's Config subclasses it with its paper's defaults.
- `linear_schedule`, `epsilon_greedy`, `masked_q`: exploration with action masks.
- `next_value`: max_a' Qbar(s', a') or, with double-Q, Qbar(s', argmax_a' Q(s', a')) (van Hasselt
  et al. 2016): the action from the online network, its value from the target network.
- `td_loss`: MSE or Huber on TD errors, averaged over the agents present.
- `AgentQNetwork`: a parameter-shared per-agent Q network with an agent-id input, and
  `GreedyPolicy`, the policy of a value-based method (greedy in its critic's Q values).
- `QLearner`: the Algorithm base holding the online and target networks, the env-step counter
  that drives epsilon, acting, and hard or Polyak target updates.

Only one learned group (Capabilities(heterogeneous=False)) and discrete actions.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vimarl.algos.base import Algorithm, adam, agent_mean
from vimarl.envs.base import GroupSpec, TimeStep
from vimarl.envs.graph import Graph
from vimarl.errors import VimarlError
from vimarl.nn.mlp import mlp


@dataclass
class QLearningConfig:
    lr: float = 5e-4
    """Adam learning rate of the Q networks (pymarl's lr 5e-4)."""
    gamma: float = 0.99
    """Discount of the TD target."""
    hidden_dim: int = 64
    """Units of each hidden layer of the per-agent Q network (pymarl's rnn_hidden_dim 64)."""
    epsilon_start: float = 1.0
    """Exploration rate epsilon at env step 0 (pymarl: 1.0)."""
    epsilon_end: float = 0.05
    """Exploration rate after epsilon_decay_steps env steps (pymarl: 0.05)."""
    epsilon_decay_steps: int = 50_000
    """Env steps (summed over sub-environments, warm-up included) over which epsilon falls linearly (pymarl: 50k)."""
    double_q: bool = True
    """Double-Q target: argmax_a' from the online network, its value from the target network (else max of the target)."""
    loss: Literal["mse", "huber"] = "mse"
    """Regression loss on the TD error: squared error, or Huber (smooth L1 with delta 1, DQN's clipped error)."""
    target_update: Literal["hard", "polyak"] = "hard"
    """Target networks: a full copy every target_update_interval gradient steps, or a Polyak step of tau after each."""
    target_update_interval: int = 200
    """Gradient steps between hard target copies (pymarl: every 200 episodes, one gradient step each)."""
    tau: float = 0.01
    """Polyak step of the target networks after every gradient step when target_update = polyak."""
    max_grad_norm: float = 10.0
    """Clip the global gradient norm to this (pymarl's grad_norm_clip 10); 0 disables it."""


@dataclass
class PolyakQLearningConfig(QLearningConfig):
    """The DGN and MFQ references' update style: Polyak targets after every step, no gradient clip."""

    target_update: Literal["hard", "polyak"] = "polyak"
    """Target network updates: Polyak tau after every gradient step (the DGN and MFQ references), or hard copies."""
    max_grad_norm: float = 0.0
    """Global gradient-norm clip; 0 (the DGN and MFQ references' effective setting) disables it."""
    double_q: bool = False
    """Double-Q target; the DGN reference takes max_a' Qbar (MFQ: see its Config)."""


def linear_schedule(step: Tensor, start: float, end: float, steps: int) -> Tensor:
    """start + (end - start) min(step / steps, 1): a tensor, so acting needs no host sync."""
    fraction = (step.float() / max(steps, 1)).clamp(max=1.0)
    return start + (end - start) * fraction


def masked_q(q: Tensor, action_mask: Tensor | None) -> Tensor:
    """Q values with unavailable actions set to the dtype's minimum (never the argmax)."""
    if action_mask is None:
        return q
    return q.masked_fill(~action_mask, torch.finfo(q.dtype).min)


def epsilon_greedy(q: Tensor, epsilon: Tensor | float, action_mask: Tensor | None = None) -> Tensor:
    """[.., A] -> [..] actions: argmax_a Q, replaced with probability epsilon by an action drawn
    uniformly among the available ones (a random score per action, maximised over the available)."""
    greedy = masked_q(q, action_mask).argmax(-1)
    scores = torch.rand_like(q)
    if action_mask is not None:
        scores = scores.masked_fill(~action_mask, -1.0)
    explore = torch.rand(greedy.shape, device=q.device) < epsilon
    return torch.where(explore, scores.argmax(-1), greedy)


def next_value(target_q: Tensor, online_q: Tensor | None, action_mask: Tensor | None) -> Tensor:
    """max_a' Qbar(s', a') (online_q None), or Qbar(s', argmax_a' Q(s', a')) (double-Q): [..]."""
    if online_q is None:
        return masked_q(target_q, action_mask).amax(-1)
    best = masked_q(online_q, action_mask).argmax(-1, keepdim=True)
    return target_q.gather(-1, best).squeeze(-1)


def taken(q: Tensor, action: Tensor) -> Tensor:
    """Q(s, a) of the stored actions: q [B, N, A], action [B, N] -> [B, N]."""
    return q.gather(-1, action.unsqueeze(-1)).squeeze(-1)


def td_loss(prediction: Tensor, target: Tensor, kind: str, present: Tensor | None = None) -> Tensor:
    """Mean over the batch (and the agents present) of the squared or Huber TD error."""
    error = prediction - target.detach()
    per_entry = error.square() if kind == "mse" else F.huber_loss(error, torch.zeros_like(error), reduction="none")
    return agent_mean(per_entry, present)


class AgentQNetwork(nn.Module):
    """Q_theta(o_i, .) for every agent with one shared network: [B, N, D] -> [B, N, A].

    With `agent_ids`, the first layer also reads a one-hot agent id, stored as its weight
    columns (an embedding table [N, H] added to the first layer's output): the same function
    as concatenating the one-hot, without building a [B, N, N] input.
    """

    def __init__(self, n_agents: int, in_dim: int, hidden: Sequence[int], n_actions: int, agent_ids: bool):
        super().__init__()
        self.first = nn.Linear(in_dim, hidden[0])
        self.agent_ids = nn.Parameter(torch.empty(n_agents, hidden[0])) if agent_ids else None
        if self.agent_ids is not None:  # nn.Linear's initialisation over the in_dim + N inputs
            bound = 1.0 / math.sqrt(in_dim + n_agents)
            nn.init.uniform_(self.agent_ids, -bound, bound)
        self.rest = nn.Sequential(nn.ReLU(), mlp(hidden[0], hidden[1:], n_actions))

    def forward(self, x: Tensor) -> Tensor:
        h = self.first(x)
        if self.agent_ids is not None:
            h = h + self.agent_ids
        return self.rest(h)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A target network: a copy of `module` that takes no gradient."""
    return copy.deepcopy(module).requires_grad_(False)


class GreedyPolicy(nn.Module):
    """The policy of a value-based method: greedy (epsilon-greedy while exploring) in the Q values
    of its critic, whose parameters are all it has. forward(obs, graph, *extra) -> Q [B, N, A]."""

    def __init__(self, critic: nn.Module):
        super().__init__()
        self.critic = critic

    def forward(self, obs: Tensor, graph: Graph | None, *extra: Tensor) -> Tensor:
        return self.critic(obs, graph, *extra)


class QLearner(Algorithm):
    """Base of the value-based algorithms: one learned group, `self.policy` (a GreedyPolicy) and
    its frozen copy `self.target_policy`, epsilon-greedy acting on an env-step counter, targets.

    Subclasses build the critic and implement `update`; `target_modules` lists (target, online)
    pairs beyond the policy (QMIX's mixer).
    """

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: QLearningConfig, device="cpu"):
        super().__init__(groups, state_dim, config, device)
        if getattr(config, "recurrent", False):
            raise VimarlError(f"{type(self).__name__} recurrent=True needs whole episodes from replay, but vimarl's "
                              f"buffer stores single transitions; use recurrent=False (feed-forward agents)")
        (self.group, self.spec), = groups.items()
        self.n_agents, self.n_actions = self.spec.n_agents, self.spec.action_space.n
        # Env steps seen (drives epsilon) and gradient steps taken (drives hard target copies):
        # buffers, so checkpoints carry them and a resumed run continues the schedules.
        self.register_buffer("env_steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("gradient_steps", torch.zeros((), dtype=torch.int64))

    def build(self, critic: nn.Module) -> None:
        """Install `critic` as the policy's, its target copy, the optimiser; move to the device."""
        self.policy = GreedyPolicy(critic)
        self.target_policy = frozen_copy(self.policy)
        self.to(self.device)
        self.optimizers = {"q": adam([p for p in self.parameters() if p.requires_grad], lr=self.config.lr)}

    def target_modules(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.target_policy, self.policy)]

    # -- exploration ----------------------------------------------------------------------------
    def observe(self, step: TimeStep, actions: dict[str, Tensor], next_step: TimeStep) -> None:
        self.env_steps += step.terminated.shape[0]

    def epsilon(self) -> Tensor:
        """epsilon at the current env step (linear from epsilon_start to epsilon_end)."""
        c = self.config
        return linear_schedule(self.env_steps, c.epsilon_start, c.epsilon_end, c.epsilon_decay_steps)

    def q_values(self, obs: Tensor, graph: Graph | None) -> Tensor:
        """Q(o_i, .) of every agent [B, N, A] with the online network."""
        return self.policy(obs, graph)

    @torch.no_grad()
    def act(self, obs, graph, *, explore, action_mask=None, state=None):
        g = self.group
        q, mask = self.q_values(obs[g], graph[g]), (action_mask or {}).get(g)
        return {g: epsilon_greedy(q, self.epsilon() if explore else 0.0, mask)}

    # -- learning -------------------------------------------------------------------------------
    def next_q(self, batch, graph: Graph | None = None) -> tuple[Tensor, Tensor | None]:
        """(Qbar(s', .), Q(s', .) when double_q else None), each [B, N, A], no gradient; on the graph
        returned with s' unless `graph` is given."""
        g = self.group
        graph = batch.next_graph[g] if graph is None else graph
        with torch.no_grad():
            target = self.target_policy(batch.next_obs[g], graph)
            online = self.policy(batch.next_obs[g], graph) if self.config.double_q else None
        return target, online

    def step(self, loss: Tensor) -> None:
        """One optimiser step on `loss`, then the target networks."""
        self.optimize("q", loss, self.config.max_grad_norm or None)
        self.gradient_steps += 1
        c = self.config
        if c.target_update == "polyak":
            weight = torch.tensor(c.tau, device=self.device)
        else:  # a copy (weight 1) every target_update_interval steps, decided on the device
            weight = (self.gradient_steps % max(c.target_update_interval, 1) == 0).float()
        with torch.no_grad():
            for target, online in self.target_modules():
                for t, s in zip(target.parameters(), online.parameters()):
                    t.lerp_(s, weight)
