"""NeurComm: spatially discounted A2C with LSTM agents that message their graph neighbours
(Chu, Chinchali and Katti, "Multi-agent Reinforcement Learning for Networked System Control",
ICLR 2020), a communication baseline of paper 000 (VPP, Sec. 5.2 and App. F.1).

Networked MARL: agent i observes s_i, talks only to its graph neighbours N_i and is rewarded r_i.
Every agent carries an LSTM state (h_i, c_i); at step t it reads its own and its neighbours'
observations, its neighbours' policy fingerprints pi_{j,t-1} (their action probabilities of the step
before) and, as messages, its neighbours' hidden states h_{j,t-1}:

    e_i,t = [ relu(fc_s(s_i,t, s_N_i,t)), relu(fc_p(pi_N_i,t-1)), relu(fc_m(h_N_i,t-1)) ]
    (h_i,t, c_i,t) = LSTM(e_i,t, (h_i,t-1, c_i,t-1))                          (message passing)
    pi_i(. | h_i,t) = softmax(fc_pi(h_i,t)),   V_i(h_i,t, a_N_i,t) = fc_v([h_i,t, onehot(a_N_i,t)])

so information travels one hop per step, and h_i,t depends on nothing outside i's neighbourhood at
t (and on the j-hop neighbourhood at t - j + 1 through the recursion). The reward is discounted in
space by the graph distance d(i, j) with a factor alpha:

    r~_i,t = sum_j alpha^d(i,j) r_j,t                                          (spatial discount)

and each agent is trained as A2C on n-step returns over a rollout of T steps (no GAE):

    R_i,t = r~_i,t + gamma R_i,t+1 (0 past a terminal step),  R_i,T = V_i(h_i,T, a_N_i,T)
    A_i,t = R_i,t - V_i(h_i,t, a_N_i,t)
    L = sum_i mean_t [ -log pi_i(a_i,t | h_i,t) A_i,t + 1/2 c_v (R_i,t - V_i,t)^2 - c_H H(pi_i,t) ]

with gradients through time over the rollout (from the state carried at its start) and through the
messages into the neighbours' networks.

What the paper / official code fix (github.com/cts198859/deeprl_network, commit c279b1fc, read:
agents/utils.py `lstm_comm`, `MultiAgentOnPolicyBuffer._add_s_R_Adv`, agents/policies.py
`NCMultiAgentPolicy`, agents/models.py `MA2C_NC`, config/config_ma2c_nc_{grid,net}.ini, utils.py
`Trainer.explore`, envs/atsc_env.py): 64 fc units and 64 LSTM units; each agent has its own weights
(variable scope per agent); the three input encoders are one ReLU layer each over the concatenated
neighbour slots, the LSTM is a plain cell on their concatenation (3 x 64 inputs); the actor is a
softmax layer on h_i, the critic a linear layer on [h_i, one-hot actions of the neighbours]; the
fingerprint at an episode's start is the uniform policy; rollouts of 120 steps (`batch_size`), gamma
0.99, RMSprop (decay 0.99, epsilon 1e-5) at lr 5e-4, entropy 0.01, value coefficient 0.5, global
gradient-norm clip 40, losses summed over agents and averaged over steps, rewards divided by
`reward_norm` (2000 on the ATSC grids). The spatial discount `coop_gamma` is 0.9 on ATSC Monaco and
-1 (every agent gets the global reward) on the ATSC grid and CACC configs.

What they leave open and what we chose:
- The graph is data here (`Graph` neighbour lists [B, N, K] with padding masks; kNN graphs change
  every step): an agent's neighbour slots are gathered with the graph of that step and padding slots
  are zero, the fixed-width version of the reference's concatenation over the (static) neighbour mask.
- Distances d(i, j) are hop counts over the graph of the step the reward was earned on, found from
  the neighbour lists by expanding paths up to `spatial_hops` hops and keeping each agent's shortest
  (O(B N K^hops), never an N x N matrix); agents farther away are dropped. The reference sums over
  every distance; at the default alpha = 0.9 (its Monaco value) an agent 4 hops away would weigh
  0.66, so the default 3 hops is a real truncation on large graphs (raise `spatial_hops` where
  K^hops allows). alpha = 1 with hops at least the graph's diameter gives the reference's global
  reward (-1).
- At an episode start the state, the fingerprints and the messages all start afresh (zeros,
  uniform, zeros); the reference's messages at that step are the neighbours' previous-episode h.
- Episodes that a time limit cuts inside a rollout bootstrap from V of the final observation (one
  more LSTM step from the last state, the neighbours' actions sampled there, as the reference does
  for R_i,T); the reference's episodes are terminal and a multiple of the rollout length.
- The bootstrap step does not move the carried state (the reference's extra `forward` call at a
  rollout's end advances its LSTM one step more than the environment).
- `parameter_sharing` (not in the reference) gives all agents one set of weights reading a one-hot
  agent id, for large N where per-agent weights (70k-100k parameters per agent at 64 units) do not fit.
- PyTorch's RMSprop keeps the square average from 0 and adds epsilon outside the square root; TF1's
  starts it at 1 and adds epsilon inside.
- Fingerprints are the action probabilities the policy acted with, recomputed in the update from the
  same parameters and treated as data (no gradient), as the reference feeds its stored ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vimarl.algos.base import Algorithm, Capabilities, register
from vimarl.buffer import Sampler, Transition
from vimarl.envs.base import GroupSpec, TimeStep
from vimarl.envs.graph import Graph
from vimarl.errors import VimarlError
from vimarl.nn.centralized import AgentMLP
from vimarl.nn.distributions import Categorical
from vimarl.nn.graph_ops import gather_neighbors

MAX_PATHS = 4096
"""Most paths per agent the spatial discount may enumerate (sum of K^d for d <= spatial_hops)."""


@dataclass
class NeurCommConfig:
    lr: float = 5e-4
    """RMSprop learning rate (official config_ma2c_nc_*.ini: lr_init 5e-4, constant)."""
    rmsprop_alpha: float = 0.99
    """RMSprop's decay of the squared-gradient average (official rmsp_alpha 0.99)."""
    rmsprop_eps: float = 1e-5
    """RMSprop's epsilon (official rmsp_epsilon 1e-5)."""
    gamma: float = 0.99
    """Temporal discount (official gamma 0.99)."""
    spatial_discount: float = 0.9
    """alpha of r~_i = sum_j alpha^d(i,j) r_j; 0 keeps each agent's own reward, 1 sums its whole
    `spatial_hops` neighbourhood (official coop_gamma: 0.9 on ATSC Monaco, the real-world network,
    taken as the default; -1 = global reward on the ATSC grid and CACC, i.e. 1 here with enough hops)."""
    spatial_hops: int = 3
    """Largest graph distance d that adds to r~_i; farther agents are dropped (the reference counts
    every distance). Cost grows as K^spatial_hops."""
    rollout_length: int = 120
    """Vectorised env steps per rollout and per update, the n of the n-step returns (official
    batch_size 120 on ATSC, 60 on CACC)."""
    hidden_dim: int = 64
    """Units of the LSTM and of each input encoder (official num_lstm 64, num_fc 64)."""
    entropy_coef: float = 0.01
    """c_H, weight of the policies' entropy bonus (official entropy_coef 0.01 on ATSC, 0.05 on CACC)."""
    value_coef: float = 0.5
    """c_v, weight of the critic's squared error (official value_coef 0.5)."""
    max_grad_norm: float = 40.0
    """Global gradient-norm clip (official max_grad_norm 40); 0 disables it."""
    reward_norm: float = 1.0
    """Rewards are divided by this before the returns (official reward_norm 2000 on ATSC, 5000 on
    CACC, for SUMO's queue lengths; 1 leaves vimarl's rewards as they are)."""
    parameter_sharing: bool = False
    """One set of weights for all agents, reading a one-hot agent id, instead of per-agent weights
    (the reference's); for large N."""


class RecurrentState:
    """What NeurComm carries from one step to the next, per sub-environment: h, c [B, N, H] and the
    fingerprints pi_{t-1} [B, N, A]."""

    def __init__(self, h: Tensor, c: Tensor, fingerprint: Tensor):
        self.h, self.c, self.fingerprint = h, c, fingerprint

    @classmethod
    def fresh(cls, batch: int, n_agents: int, hidden: int, n_actions: int, device) -> RecurrentState:
        zeros = torch.zeros(batch, n_agents, hidden, device=device)
        return cls(zeros, zeros.clone(), torch.full((batch, n_agents, n_actions), 1.0 / n_actions, device=device))

    def reset(self, done: Tensor) -> RecurrentState:
        """A fresh state (zeros, uniform fingerprints) in the sub-environments where `done [B]`."""
        keep = ~done.view(-1, 1, 1)
        uniform = 1.0 / self.fingerprint.shape[-1]
        return RecurrentState(self.h * keep, self.c * keep, torch.where(keep, self.fingerprint, uniform))

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.h, self.c, self.fingerprint


def neighbor_slots(x: Tensor, graph: Graph) -> Tensor:
    """Neighbours' features in their K slots, concatenated, padding slots zero: [B, N, F] -> [B, N, K F]."""
    slots = gather_neighbors(x, graph) * graph.mask.unsqueeze(-1).to(x.dtype)
    return slots.flatten(2)


def hop_distances(graph: Graph, hops: int) -> tuple[Tensor, Tensor, Tensor]:
    """Every agent within `hops` hops of each agent and its graph distance, from the neighbour lists.

    Returns (agents, distance, first) [B, N, M] with M = sum_{d <= hops} K^d: the end points and
    lengths of all walks of at most `hops` steps from agent i, sorted by (agent, length); `first`
    marks each reached agent's shortest walk (its distance) once, and is False for the others and
    for walks through padding.
    """
    batch, n, k = graph.neighbors.shape
    frontier = torch.arange(n, device=graph.neighbors.device).view(1, n, 1).expand(batch, n, 1)
    live = torch.ones_like(frontier, dtype=torch.bool)
    reached, lengths, alive = [frontier], [torch.zeros_like(frontier)], [live]
    for d in range(1, hops + 1):
        # One step along every edge: the neighbour slots of every agent on the frontier.
        index = frontier.reshape(batch, -1, 1).expand(-1, -1, k)
        frontier = torch.gather(graph.neighbors, 1, index).view(batch, n, -1)
        live = (live.unsqueeze(-1) & torch.gather(graph.mask, 1, index).view(batch, n, -1, k)).view(batch, n, -1)
        reached.append(frontier)
        lengths.append(torch.full_like(frontier, d))
        alive.append(live)
    agents, length, valid = torch.cat(reached, -1), torch.cat(lengths, -1), torch.cat(alive, -1)
    # Sort by (agent, length) with dead walks last: the first walk to each agent is its shortest.
    key = torch.where(valid, agents * (hops + 1) + length, n * (hops + 1))
    key, order = key.sort(dim=-1)
    agents, length = agents.gather(-1, order), length.gather(-1, order)
    valid = key < n * (hops + 1)
    new_agent = torch.ones_like(valid)
    new_agent[..., 1:] = agents[..., 1:] != agents[..., :-1]
    return agents, length, valid & new_agent


def spatial_rewards(rewards: Tensor, graph: Graph, alpha: float, hops: int) -> Tensor:
    """r~_i = sum_{j: d(i,j) <= hops} alpha^d(i,j) r_j: rewards [B, N] -> [B, N]."""
    if alpha == 0.0 or hops == 0:
        return rewards
    agents, distance, first = hop_distances(graph, hops)
    weights = torch.where(first, alpha ** distance.to(rewards.dtype), 0.0)
    return (weights * rewards.gather(1, agents.flatten(1)).view_as(weights)).sum(-1)


class NeurCommAgents(nn.Module):
    """The agents' networks, batched over environments and agents (per-agent weights by default):
    the three input encoders, the LSTM cell, the actor and the neighbour-action critic."""

    def __init__(self, spec: GroupSpec, hidden: int, shared: bool):
        super().__init__()
        n, k, d, a = spec.n_agents, spec.graph_k, spec.obs_dim, spec.action_space.n
        self.hidden, self.n_actions = hidden, a

        def layer(in_dim: int, out_dim: int) -> AgentMLP:
            return AgentMLP(n, in_dim, (), out_dim, shared)

        self.encode_obs = layer((k + 1) * d, hidden)        # fc over s_i and the neighbours' s_j
        self.encode_fingerprints = layer(k * a, hidden)     # fc over the neighbours' pi_{j,t-1}
        self.encode_messages = layer(k * hidden, hidden)    # fc over the neighbours' h_{j,t-1}
        self.gates = layer(4 * hidden, 4 * hidden)          # LSTM: [e_t, h_{t-1}] -> i, f, o, u
        self.actor = layer(hidden, a)
        self.critic = layer(hidden + k * a, 1)

    def step(self, obs: Tensor, graph: Graph, state: RecurrentState) -> tuple[Tensor, Tensor]:
        """One step of message passing: (h_t, c_t) [B, N, H] each, from s_t [B, N, D] and the state
        at t - 1; nothing from outside an agent's neighbourhood in `graph` reaches its h_t."""
        own_and_neighbors = torch.cat([obs, neighbor_slots(obs, graph)], dim=-1)
        inputs = torch.cat([F.relu(self.encode_obs(own_and_neighbors)),
                            F.relu(self.encode_fingerprints(neighbor_slots(state.fingerprint, graph))),
                            F.relu(self.encode_messages(neighbor_slots(state.h, graph))),
                            state.h], dim=-1)
        i, f, o, u = self.gates(inputs).chunk(4, dim=-1)
        c = torch.sigmoid(f) * state.c + torch.sigmoid(i) * torch.tanh(u)
        return torch.sigmoid(o) * torch.tanh(c), c

    def policy(self, h: Tensor, action_mask: Tensor | None) -> Categorical:
        return Categorical(self.actor(h), action_mask)

    def value(self, h: Tensor, actions: Tensor, graph: Graph) -> Tensor:
        """V_i(h_i, a_N_i): h [B, N, H], actions [B, N] -> [B, N]."""
        neighbor_actions = neighbor_slots(F.one_hot(actions, self.n_actions).to(h.dtype), graph)
        return self.critic(torch.cat([h, neighbor_actions], dim=-1)).squeeze(-1)


@register("neurcomm", "NeurComm (Chu et al. 2020; 000 baseline): A2C with per-agent LSTMs that message their graph "
          "neighbours (hidden states, fingerprints, observations), spatially discounted rewards, on-policy rollouts",
          Capabilities(discrete=True, continuous=False, needs_graph=True))
class NeurComm(Algorithm):
    Config = NeurCommConfig

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: NeurCommConfig, device="cpu"):
        super().__init__(groups, state_dim, config, device)
        if not 0.0 <= config.spatial_discount <= 1.0:
            raise VimarlError(f"algo.spatial_discount={config.spatial_discount} must lie in [0, 1] "
                              f"(0: own reward only, 1: the whole neighbourhood)")
        if config.reward_norm <= 0:
            raise VimarlError(f"algo.reward_norm={config.reward_norm} must be positive (1 leaves rewards unscaled)")
        (self.group, self.spec), = groups.items()
        paths, layer = 1, 1  # sum of K^d for d <= spatial_hops, counted only until it passes MAX_PATHS
        for _ in range(min(config.spatial_hops, MAX_PATHS)):
            layer *= self.spec.graph_k
            paths += layer
            if paths > MAX_PATHS:
                break
        if config.spatial_discount > 0 and paths > MAX_PATHS:
            raise VimarlError(f"algo.spatial_hops={config.spatial_hops} enumerates more than {MAX_PATHS} paths per "
                              f"agent at K={self.spec.graph_k}; lower spatial_hops")
        self.agents = NeurCommAgents(self.spec, config.hidden_dim, config.parameter_sharing)
        self.to(self.device)
        self.optimizers = {"agents": torch.optim.RMSprop(self.agents.parameters(), lr=config.lr,
                                                         alpha=config.rmsprop_alpha, eps=config.rmsprop_eps)}
        self.memory: RecurrentState | None = None
        """The state carried across `act` calls on the training (or current) environment."""
        self.rollout_start: RecurrentState | None = None
        """The carried state before the current rollout's first step: where its update unrolls from."""
        self.deploying = False

    @property
    def sampler(self) -> Sampler:
        return Sampler("rollout", self.config.rollout_length)

    def fresh_state(self, batch: int) -> RecurrentState:
        return RecurrentState.fresh(batch, self.spec.n_agents, self.config.hidden_dim, self.spec.action_space.n,
                                    self.device)

    # -- acting ---------------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs, graph, *, explore, action_mask=None, state=None):
        g = self.group
        batch = obs[g].shape[0]
        if self.memory is None or self.memory.h.shape[0] != batch:
            self.memory = self.fresh_state(batch)
        if self.rollout_start is None and not self.deploying:
            self.rollout_start = self.memory  # the update unrolls the rollout from here
        h, c = self.agents.step(obs[g], graph[g], self.memory)
        policy = self.agents.policy(h, (action_mask or {}).get(g))
        self.memory = RecurrentState(h, c, policy.probs)
        return {g: policy.sample().action if explore else policy.mode()}

    def observe(self, step: TimeStep, actions: dict[str, Tensor], next_step: TimeStep) -> None:
        if self.memory is not None and self.memory.h.shape[0] == next_step.done.shape[0]:
            self.memory = self.memory.reset(next_step.done)  # new episodes start afresh

    def reset_memory(self) -> None:
        """Forget the carried state: the next `act` starts every episode afresh."""
        self.memory = None

    @contextmanager
    def execution(self, mode: str | None = None) -> Iterator[None]:
        """Evaluation episodes start from a fresh state; training's state and rollout are kept for after."""
        memory, deploying = self.memory, self.deploying
        self.memory, self.deploying = None, True
        try:
            yield
        finally:
            self.memory, self.deploying = memory, deploying

    def get_extra_state(self) -> dict[str, Any]:
        carried = {name: None if value is None else value.tensors()
                   for name, value in (("memory", self.memory), ("rollout_start", self.rollout_start))}
        return {**super().get_extra_state(), **carried}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state({name: state[name] for name in self.optimizers})
        for name in ("memory", "rollout_start"):
            tensors = state.get(name)
            setattr(self, name, None if tensors is None else RecurrentState(*(t.to(self.device) for t in tensors)))

    # -- learning -------------------------------------------------------------------------------
    def unroll(self, batch: Transition, start: RecurrentState) -> tuple[list[Tensor], list[RecurrentState]]:
        """h_t [B, N, H] for t < T over the time-major rollout, from `start`, reset where the previous
        step ended an episode, and the state after each step (h_t, c_t, pi_t; pi_t as data)."""
        g, steps = self.group, self.config.rollout_length
        obs = batch.obs[g].view(steps, -1, *batch.obs[g].shape[1:])
        neighbors, mask = (t.view(steps, -1, *t.shape[1:]) for t in (batch.graph[g].neighbors, batch.graph[g].mask))
        masks = batch.action_mask.get(g)
        masks = None if masks is None else masks.view(steps, -1, *masks.shape[1:])
        done = self.episode_ends(batch).view(steps, -1)
        state, hidden, after = start, [], []
        for t in range(steps):  # the recursion runs over time; agents and environments are batched
            if t:
                state = state.reset(done[t - 1])
            h, c = self.agents.step(obs[t], Graph(neighbors[t], mask[t]), state)
            probs = self.agents.policy(h, None if masks is None else masks[t]).probs.detach()
            state = RecurrentState(h, c, probs)
            hidden.append(h)
            after.append(state)
        return hidden, after

    @staticmethod
    def episode_ends(batch: Transition) -> Tensor:
        done = batch.terminated > 0
        return done if batch.truncated is None else done | (batch.truncated > 0)

    @torch.no_grad()
    def successor_values(self, batch: Transition, after: list[RecurrentState]) -> Tensor:
        """V_i at s'_t of every row [T B, N]: one more LSTM step from the state after step t on the next
        observation (the final one where the episode ended), the neighbours' actions sampled there."""
        g = self.group
        state = RecurrentState(*(torch.cat(parts) for parts in zip(*(s.tensors() for s in after))))
        graph = batch.next_graph[g]
        h, _ = self.agents.step(batch.next_obs[g], graph, state)
        actions = self.agents.policy(h, batch.next_action_mask.get(g)).sample().action
        return self.agents.value(h, actions, graph)

    def returns(self, batch: Transition, bootstrap: Tensor) -> Tensor:
        """n-step returns R_t = r~_t + gamma R_{t+1} over the rollout, [T B, N] time-major: the chain
        stops at a terminal step, and bootstraps from `bootstrap` [T B, N] (V_i at s'_t) at the
        rollout's last step and where a time limit cut the episode."""
        g, c, steps = self.group, self.config, self.config.rollout_length
        rewards = batch.reward[g].view(steps, -1, self.spec.n_agents) / c.reward_norm
        neighbors, mask = (t.view(steps, -1, *t.shape[1:]) for t in (batch.graph[g].neighbors, batch.graph[g].mask))
        continuing = batch.continuing(g).expand_as(batch.reward[g]).reshape(steps, -1, self.spec.n_agents)
        truncated = torch.zeros_like(batch.terminated) if batch.truncated is None else batch.truncated
        cut = (truncated > 0).view(steps, -1, 1)
        bootstrap = bootstrap.view(steps, -1, self.spec.n_agents)
        out = torch.empty_like(rewards)
        carry = bootstrap[-1]
        for t in reversed(range(steps)):
            local = spatial_rewards(rewards[t], Graph(neighbors[t], mask[t]), c.spatial_discount, c.spatial_hops)
            following = bootstrap[t] if t == steps - 1 else torch.where(cut[t], bootstrap[t], carry)
            carry = local + c.gamma * continuing[t] * following
            out[t] = carry
        return out.view(-1, self.spec.n_agents)

    def update(self, batch: Transition) -> dict[str, Tensor]:
        g, c = self.group, self.config
        rows = batch.terminated.shape[0]
        if rows % c.rollout_length:
            raise VimarlError(f"neurcomm trains on whole rollouts of rollout_length={c.rollout_length} vectorised "
                              f"steps, got {rows} rows")
        envs = rows // c.rollout_length
        start, self.rollout_start = self.rollout_start, None  # the next act starts the next rollout
        if start is None or start.h.shape[0] != envs:
            start = self.fresh_state(envs)
        hidden, after = self.unroll(batch, start)
        h = torch.cat(hidden)  # [T B, N, H] time-major, as the batch's rows
        with torch.no_grad():
            target = self.returns(batch, self.successor_values(batch, after))
        values = self.agents.value(h, batch.action[g], batch.graph[g])
        policy = self.agents.policy(h, batch.action_mask.get(g))
        advantages = (target - values).detach()
        present = batch.alive.get(g)
        weight = torch.ones_like(values) if present is None else present.to(values.dtype)

        def summed_over_agents(per_agent: Tensor) -> Tensor:  # the reference: sum over agents, mean over steps
            return (per_agent * weight).sum(-1).mean()

        policy_loss = summed_over_agents(-policy.log_prob(batch.action[g]) * advantages)
        value_loss = summed_over_agents(0.5 * (target - values).square())
        entropy = summed_over_agents(policy.entropy())
        loss = policy_loss + c.value_coef * value_loss - c.entropy_coef * entropy
        norm = self.optimize("agents", loss, c.max_grad_norm or None, measure_norm=True)
        n_present = weight.sum(-1).mean().clamp_min(1.0)
        return {"loss_policy": policy_loss.detach(), "loss_v": value_loss.detach(),
                "entropy": (entropy / n_present).detach(), "grad_norm": norm,
                "return_mean": target.mean()}
