"""What every value-based method here shares (IQL, DGN, MFQ, VDN, QMIX): the DQN machinery.

- `QLearningConfig`: the fields all of them have (learning rate, discount, epsilon schedule,
  double-Q, loss, target updates); each algorithm's Config subclasses it with its paper's defaults.
- `linear_schedule`, `epsilon_greedy`, `masked_q`: exploration with action masks.
- `next_value`: max_a' Qbar(s', a') or, with double-Q, Qbar(s', argmax_a' Q(s', a')) (van Hasselt
  et al. 2016): the action from the online network, its value from the target network.
- `td_loss`: MSE or Huber on TD errors, averaged over the agents present.
- `AgentQNetwork`: a parameter-shared per-agent Q network with an agent-id input, its recurrent
  form `RecurrentAgentQ` (pymarl's GRU agent), and `GreedyPolicy`, the policy of a value-based
  method (greedy in its critic's Q values).
- `QLearner`: the Algorithm base holding the online and target networks, the env-step counter
  that drives epsilon, acting, and hard or Polyak target updates; with a recurrent config
  (`recurrent=True`) also the GRU state carried across env steps and the unrolling of both
  networks over replayed windows (`sequence_q`).

Only one learned group (Capabilities(heterogeneous=False)) and discrete actions.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vimarl.algos.base import Algorithm, adam, agent_mean
from vimarl.buffer import Sampler, Transition
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

    def embed(self, x: Tensor) -> Tensor:
        """The first layer's output (agent id columns included), before its activation."""
        h = self.first(x)
        return h if self.agent_ids is None else h + self.agent_ids

    def forward(self, x: Tensor) -> Tensor:
        return self.rest(self.embed(x))


class RecurrentAgentQ(AgentQNetwork):
    """pymarl's rnn_agent, shared by the agents: x_t = ReLU(fc(o_t) + id_i), h_t = GRUCell(x_t, h_{t-1}),
    Q(tau_t, .) = fc(h_t). forward(obs [B, N, D], graph, hidden [B, N, H] or None = zeros) -> (Q, h_t).

    `rest` holds the ReLU and the output layer of a one-hidden-layer AgentQNetwork; the GRU cell
    sits between them (the last action is not an input, unlike pymarl's obs_last_action).
    """

    def __init__(self, n_agents: int, in_dim: int, hidden: int, n_actions: int, agent_ids: bool):
        super().__init__(n_agents, in_dim, (hidden,), n_actions, agent_ids)
        self.cell = nn.GRUCell(hidden, hidden)

    def inputs(self, obs: Tensor) -> Tensor:
        return torch.relu(self.embed(obs))

    def recur(self, x: Tensor, hidden: Tensor | None) -> Tensor:
        """h_t = GRUCell(x_t, h_{t-1}) over any leading axes [..., H]."""
        flat = self.cell(x.reshape(-1, x.shape[-1]), None if hidden is None else hidden.reshape(-1, x.shape[-1]))
        return flat.view(x.shape)

    def head(self, hidden: Tensor) -> Tensor:
        return self.rest[1](hidden)

    def forward(self, obs: Tensor, graph: Graph | None = None, hidden: Tensor | None = None) -> tuple[Tensor, Tensor]:
        hidden = self.recur(self.inputs(obs), hidden)
        return self.head(hidden), hidden

    def unroll(self, obs: Tensor, starts: Tensor, burn_in: int = 0) -> Tensor:
        """Hidden states h_t [T, W, N, H] over windows obs [T, W, N, D] from a zero state, reset to zero
        where `starts` [T, W] marks an episode's first step; no gradient reaches the first `burn_in` steps."""
        x = self.inputs(obs)  # one batched layer over the whole window
        hidden, out = torch.zeros_like(x[0]), []
        for t in range(obs.shape[0]):
            if t == burn_in and t:
                hidden = hidden.detach()
            hidden = self.recur(x[t], hidden.masked_fill(starts[t].view(-1, 1, 1), 0.0))
            out.append(hidden)
        return torch.stack(out)

    def successor_q(self, next_obs: Tensor, hidden: Tensor) -> Tensor:
        """Q(tau_t o'_t, .): one more GRU step from h_t on s'_t's observations (the final ones where
        the episode ended), batched over the whole window."""
        return self.head(self.recur(self.inputs(next_obs), hidden))


def episode_starts(batch: Transition) -> Tensor:
    """[T, W] bool: step t of a window opens an episode (the window's step t - 1 ended one; step 0
    starts from a zero state in any case)."""
    done = batch.terminated > 0
    if batch.truncated is not None:
        done = done | (batch.truncated > 0)
    return torch.cat([torch.ones_like(done[:1]), done[:-1]])


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

    Recurrent configs (`recurrent`, `sequence_length`, `burn_in` fields, a RecurrentAgentQ critic):
    the trainer samples windows of consecutive steps (`sequence_length`), and acting keeps the GRU
    state of the env it is called on in `self.memory` [B, N, H], zeroed for sub-environments whose
    episode ended (`observe`), started afresh for evaluation (`execution`) or by `reset_memory()`,
    and saved in checkpoints so that a resumed run continues exactly.
    """

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: QLearningConfig, device="cpu"):
        super().__init__(groups, state_dim, config, device)
        self.recurrent = bool(getattr(config, "recurrent", False))
        if self.recurrent and not 0 <= config.burn_in < config.sequence_length:
            raise VimarlError(f"recurrent {type(self).__name__} needs 0 <= burn_in < sequence_length, got burn_in="
                              f"{config.burn_in}, sequence_length={config.sequence_length}")
        self.memory: Tensor | None = None
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

    @property
    def sampler(self) -> Sampler:
        if not self.recurrent:
            return Sampler()
        return Sampler("windows", self.config.sequence_length, episode_aligned=self.config.window_start == "episode")

    # -- exploration ----------------------------------------------------------------------------
    def observe(self, step: TimeStep, actions: dict[str, Tensor], next_step: TimeStep) -> None:
        self.env_steps += step.terminated.shape[0]
        if self.memory is not None and self.memory.shape[0] == next_step.done.shape[0]:
            self.memory = self.memory.masked_fill(next_step.done.view(-1, 1, 1), 0.0)  # new episodes start at 0

    def epsilon(self) -> Tensor:
        """epsilon at the current env step (linear from epsilon_start to epsilon_end)."""
        c = self.config
        return linear_schedule(self.env_steps, c.epsilon_start, c.epsilon_end, c.epsilon_decay_steps)

    def q_values(self, obs: Tensor, graph: Graph | None) -> Tensor:
        """Q(o_i, .) of every agent [B, N, A] with the online network; recurrent: Q(tau_i, .) from the
        carried GRU state (zeros for an env of another size), which moves on one step."""
        if not self.recurrent:
            return self.policy(obs, graph)
        memory = self.memory if self.memory is not None and self.memory.shape[0] == obs.shape[0] else None
        q, self.memory = self.policy(obs, graph, memory)
        return q

    def reset_memory(self) -> None:
        """Forget the carried GRU state: the next `act` starts every episode afresh."""
        self.memory = None

    @contextmanager
    def execution(self, mode: str | None = None) -> Iterator[None]:
        """Evaluation episodes start from a zero GRU state; the training env's state is kept for after."""
        memory, self.memory = self.memory, None
        try:
            yield
        finally:
            self.memory = memory

    def get_extra_state(self) -> dict[str, Any]:
        state = super().get_extra_state()
        return {**state, "memory": self.memory} if self.recurrent else state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        if self.recurrent:
            memory = state.get("memory")
            self.memory = None if memory is None else memory.to(self.device)

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

    def sequence_q(self, batch: Transition) -> tuple[Tensor, tuple[Tensor, Tensor | None], Tensor]:
        """Recurrent agents on a batch of windows (every tensor [T, W, ...], from the trainer's
        `sample_sequences`): Q(tau_t, .) with gradient, (Qbar(tau_t o'_t, .), Q(tau_t o'_t, .) when
        double_q else None) without, each [T * W, N, A] time-major, and the loss weights [T * W]
        (valid steps after the burn-in). Both networks are unrolled over the same window with the
        GRU state reset at episode starts; the next-step values take one more GRU step on s'."""
        if batch.valid is None:
            raise VimarlError(f"recurrent {type(self).__name__} trains on windows of consecutive steps "
                              f"(ReplayBuffer.sample_sequences), not on single transitions")
        g, starts, burn_in = self.group, episode_starts(batch), self.config.burn_in
        hidden = self.policy.critic.unroll(batch.obs[g], starts, burn_in)
        q = self.policy.critic.head(hidden)
        with torch.no_grad():
            online = self.policy.critic.successor_q(batch.next_obs[g], hidden) if self.config.double_q else None
            target_critic = self.target_policy.critic
            target = target_critic.successor_q(batch.next_obs[g], target_critic.unroll(batch.obs[g], starts))
        weight = batch.valid.clone()
        weight[:burn_in] = False
        return q.flatten(0, 1), (target.flatten(0, 1), None if online is None else online.flatten(0, 1)), weight.flatten()

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
