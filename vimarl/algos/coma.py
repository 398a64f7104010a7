"""COMA: counterfactual multi-agent policy gradients (Foerster et al., AAAI 2018).

Decentralised actors pi(u^a | tau^a) share one network; one centralised critic, also shared by the
agents (an agent-id input tells them apart), gives for agent a the values of all its actions with the
others' actions held fixed, Q(s, (u^{-a}, .)), in a single forward pass (the paper's Fig. 1c input /
output layout). The counterfactual advantage of agent a (Eq. 4) compares the action it took with the
policy-weighted average over its own actions, the others' actions fixed:

    A^a(s, u)  = Q(s, u) - sum_{u'^a} pi^a(u'^a | tau^a) Q(s, (u^{-a}, u'^a))                    (4)
    g          = E_pi[ sum_a grad log pi^a(u^a | tau^a) A^a(s, u) ]                               (5)

and the critic regresses Q(s_t, u_t) on TD(lambda) returns built from a target critic Qbar at the
actions taken (the paper's Sec. 4, "TD(lambda)"; Sutton & Barto's forward view, computed backwards):

    G_t = r_t + gamma [ (1 - lambda) Qbar(s_{t+1}, u_{t+1}) + lambda G_{t+1} ]

What the official code fixes (oxwhirl/pymarl @ c971afdceb34635d31b778021b0ef90d7af51e86, read for
this file: src/learners/coma_learner.py, src/modules/critics/coma.py, src/utils/rl_utils.py
build_td_lambda_targets, src/controllers/basic_controller.py, src/components/action_selectors.py,
src/config/algs/coma.yaml, src/config/default.yaml):

- Critic: Linear 128, ReLU, Linear 128, ReLU, Linear |A|, over the concatenation of the global state,
  agent a's observation, every agent's one-hot action with agent a's own zeroed, the previous joint
  action (zeros at an episode's first step) and a one-hot agent id.
- Targets: TD(lambda) with lambda 0.8, gamma 0.99, from the target critic at the actions taken; the
  recursion zeroes the bootstrap at termination and starts from Qbar at the batch's last step.
- Critic training "seq": backwards over time, one RMSprop step per time step on that step's rows
  (mean squared TD error); the Q vectors of each step, computed just before its step, are the ones
  the actor's advantages use. The target critic is copied in full after an update once 200 critic
  steps have passed since the last copy.
- Actor: softmax over the policy logits, mixed with the uniform distribution, (1 - eps) softmax +
  eps / |A|, eps linear from 0.5 to 0.01 over 100k env steps (mask_before_softmax False: the mixing
  spreads eps over all |A| actions); unavailable actions are zeroed afterwards and the policy
  renormalised. The actor loss -sum mask log pi(u^a) stopgrad(A^a) / sum mask uses this eps-mixed
  policy (the learner calls the controller outside test mode) both in log pi and in the baseline.
  Evaluation is greedy in the masked softmax (test_greedy).
- RMSprop lr 5e-4 for actor and critic (alpha 0.99, eps 1e-5), gradient norms clipped to 10.
- Data: on-policy, a batch of 8 whole episodes from 8 parallel environments per update.

What they leave open, or what vimarl cannot take as is, and what we chose:

- Data: vimarl's on-policy path (`Sampler("rollout")`, as MA-PPO): the trainer hands `update` the last
  `rollout_length` vectorised steps of its num_envs sub-environments (rows t * B + b) and discards them.
  With rollout_length = the episode length and episodes that start together (fixed-length MPE and
  traffic episodes), a rollout is pymarl's batch of whole episodes. Otherwise episodes may cross a
  rollout's ends: G_t then bootstraps at the rollout's last row from Qbar at its next state s'_T, with
  the joint action at s'_T sampled from the current behaviour policy (pymarl too samples an action at
  an episode's final stored state to bootstrap a time-limited episode). A time-limit truncation inside
  the rollout bootstraps the same way from the final observation; a termination does not bootstrap.
- The previous joint action of row t is row t - 1's of the same sub-environment (none after an episode
  end). For the rollout's first step it comes from a replay field (`previous_action`) filled while
  collecting (`observe`), so it is exact across rollout boundaries too.
- Global state: the env's `state` when it has one (state_dim > 0); otherwise the concatenation of all
  agents' observations stands in for it.
- Actor network: pymarl's agent is a GRU (rnn_hidden_dim 64) that also reads its last action. By
  default here, as MA-PPO, the actor is a feed-forward network: two 64-unit ReLU layers shared by the
  agents with an agent-id input (`AgentQNetwork`'s id embedding), reading only the observation (named
  deviation). `recurrent=True` gives pymarl's Linear-GRU-Linear agent (`RecurrentAgentQ`, without
  the last-action input): acting carries the GRU state of every training sub-environment (zeroed at
  episode ends), each step stores the state it acted from (`actor_hidden`), and the update unrolls the
  actor over the rollout from the stored state of its first step (computed by the weights that acted),
  resetting at episode starts, with backpropagation through the whole rollout (pymarl: through whole
  episodes, from a zero state).
- Rewards: COMA assumes one team reward. Each agent's critic head regresses on that agent's own reward
  r^a, which is the team reward in team-reward tasks (MPE spread, coop_nav with reward=team).
- critic_train_mode "seq" (default) is pymarl's; "batched" takes one critic step on the whole rollout
  instead (fewer, larger steps), counted as rollout_length steps for the target interval so that the
  target critic is copied after as much data as in "seq" (counted as one, a copy every 200 rollouts
  left the target at its initial weights for a whole short run). "seq" is affordable here: rollout_length
  small steps per update, the same work as pymarl's.
- Agents that leave an episode (`alive`) are left out of both losses, as pymarl's mask leaves out padding.
- The critic's first layer is computed factorised (state, observation, joint action, own action,
  previous joint action and id terms separately): the same function as pymarl's Linear over the
  concatenated input (`COMACritic.reference`), without building an N x N|A| input per agent.

Only one learned group (heterogeneous=False) and discrete actions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vimarl.algos.base import Algorithm, Capabilities, agent_mean, register
from vimarl.algos.q_learning import (
    AgentQNetwork,
    RecurrentAgentQ,
    frozen_copy,
    linear_schedule,
    taken,
)
from vimarl.buffer import ExtraFields, Sampler, Transition
from vimarl.envs.base import GroupSpec, TimeStep
from vimarl.errors import VimarlError
from vimarl.nn.mlp import mlp

NO_ACTION = -1
"""Stored as the previous action where there is none (an episode's first step): a zero one-hot."""


@dataclass
class COMAConfig:
    lr: float = 5e-4
    """RMSprop learning rate of the actor (pymarl default.yaml / coma.yaml lr 0.0005)."""
    critic_lr: float = 5e-4
    """RMSprop learning rate of the critic (pymarl coma.yaml critic_lr 0.0005)."""
    rmsprop_alpha: float = 0.99
    """RMSprop smoothing constant of both optimisers (pymarl optim_alpha 0.99)."""
    rmsprop_eps: float = 1e-5
    """RMSprop epsilon of both optimisers (pymarl optim_eps 1e-5)."""
    gamma: float = 0.99
    """Discount (pymarl default.yaml gamma 0.99)."""
    td_lambda: float = 0.8
    """lambda of the critic's TD(lambda) returns, in [0, 1] (pymarl coma.yaml td_lambda 0.8)."""
    epsilon_start: float = 0.5
    """Weight eps of the uniform distribution in the behaviour policy (1 - eps) softmax + eps / |A| at
    env step 0 (pymarl coma.yaml epsilon_start 0.5)."""
    epsilon_end: float = 0.01
    """eps after epsilon_decay_steps env steps (pymarl coma.yaml epsilon_finish 0.01)."""
    epsilon_decay_steps: int = 100_000
    """Env steps (summed over sub-environments) over which eps falls linearly (pymarl coma.yaml
    epsilon_anneal_time 100000); an experiment's `schedules` can set it as a fraction of the run."""
    target_update_interval: int = 200
    """Critic gradient steps between hard copies of the target critic, checked after each update
    (pymarl coma.yaml target_update_interval 200)."""
    max_grad_norm: float = 10.0
    """Clip of the global gradient norm of actor and critic, each on its own (pymarl grad_norm_clip
    10); 0 disables it."""
    hidden_dim: int = 64
    """Units of each of the actor's two ReLU hidden layers (pymarl rnn_hidden_dim 64, there a
    Linear-GRU agent)."""
    critic_hidden_dim: int = 128
    """Units of each of the critic's two ReLU hidden layers (pymarl modules/critics/coma.py: 128)."""
    rollout_length: int = 25
    """Vectorised env steps per on-policy rollout, one update each (pymarl: batches of 8 whole
    episodes from 8 parallel envs; set it to the env's episode length, 25 on MPE, with num_envs=8
    for the same batches)."""
    critic_train_mode: Literal["seq", "batched"] = "seq"
    """seq: one critic step per time step of the rollout, backwards from the last (pymarl coma.yaml
    critic_train_mode "seq"); batched: one critic step on the whole rollout, counted as
    rollout_length critic steps for target_update_interval."""
    recurrent: bool = False
    """Actor as pymarl's GRU agent (Linear hidden_dim, GRUCell, Linear; pymarl default.yaml agent
    "rnn"), unrolled over each rollout; False: a two-layer MLP (our default, as MA-PPO)."""


def one_hot(actions: Tensor, n_actions: int) -> Tensor:
    """[..] action indices -> [.., A] float one-hots; NO_ACTION gives zeros."""
    return F.one_hot(actions.clamp_min(0), n_actions).float() * (actions >= 0).unsqueeze(-1).float()


class COMACritic(nn.Module):
    """Q(s, (u^{-a}, .)) of every agent a: forward(context [b, C], obs [b, N, O], actions [b, N],
    previous [b, N]) -> [b, N, A]; `previous` holds NO_ACTION where there is no previous step.

    pymarl's critic is a Linear over x^a = (s, o^a, onehot(u) with agent a's block zeroed,
    onehot(u_prev), onehot(a)) (`inputs` builds it, `reference` applies it); forward computes the
    same first layer as W_s s + W_o o^a + W_u onehot(u) - W_u[a, u^a] + W_p onehot(u_prev) + W_id[a]
    + b, whose joint terms are shared by all agents of a row.
    """

    def __init__(self, n_agents: int, context_dim: int, obs_dim: int, n_actions: int, hidden: int):
        super().__init__()
        self.n_agents, self.n_actions = n_agents, n_actions
        self.widths = (context_dim, obs_dim, n_agents * n_actions, n_agents * n_actions, n_agents)
        self.first = nn.Linear(sum(self.widths), hidden)  # pymarl's fc1, initialised over the full input
        self.rest = nn.Sequential(nn.ReLU(), mlp(hidden, (hidden,), n_actions))  # fc2, fc3

    def inputs(self, context: Tensor, obs: Tensor, actions: Tensor, previous: Tensor) -> Tensor:
        """pymarl's critic input x^a of every agent: [b, N, C + O + 2 N A + N]."""
        b, n, a = obs.shape[0], self.n_agents, self.n_actions
        others = one_hot(actions, a).unsqueeze(1).expand(b, n, n, a)
        others = others * (1.0 - torch.eye(n, device=obs.device)).view(1, n, n, 1)  # agent a's own block zeroed
        last = one_hot(previous, a).reshape(b, 1, n * a).expand(b, n, n * a)
        ids = torch.eye(n, device=obs.device).expand(b, n, n)
        return torch.cat([context.unsqueeze(1).expand(b, n, -1), obs, others.reshape(b, n, n * a), last, ids], -1)

    def reference(self, x: Tensor) -> Tensor:
        """The critic on explicit inputs (`inputs`): pymarl's forward."""
        return self.rest(self.first(x))

    def forward(self, context: Tensor, obs: Tensor, actions: Tensor, previous: Tensor) -> Tensor:
        w_context, w_obs, w_joint, w_previous, w_id = self.first.weight.split(self.widths, dim=1)
        joint, last = one_hot(actions, self.n_actions), one_hot(previous, self.n_actions)
        shared = (F.linear(context, w_context) + F.linear(joint.flatten(1), w_joint)
                  + F.linear(last.flatten(1), w_previous) + self.first.bias)  # [b, H], the same for every agent
        own_columns = w_joint.t().view(self.n_agents, self.n_actions, -1)  # [N, A, H]: W_u[a, u]
        own = torch.einsum("bna,nah->bnh", joint, own_columns)
        return self.rest(shared.unsqueeze(1) + F.linear(obs, w_obs) - own + w_id.t())


def behaviour_probs(logits: Tensor, epsilon: Tensor | float, action_mask: Tensor | None) -> Tensor:
    """pymarl's COMA policy [.., A]: (1 - eps) softmax(logits) + eps / |A| over all actions, then the
    unavailable actions zeroed and the rest renormalised (mask_before_softmax False)."""
    probs = (1.0 - epsilon) * logits.softmax(-1) + epsilon / logits.shape[-1]
    if action_mask is None:
        return probs
    probs = probs * action_mask
    return probs / probs.sum(-1, keepdim=True)


def sample(probs: Tensor) -> Tensor:
    """One action per distribution: probs [.., A] -> [..]."""
    return torch.multinomial(probs.flatten(0, -2), 1).view(probs.shape[:-1])


def counterfactual_advantage(q: Tensor, probs: Tensor, actions: Tensor) -> Tensor:
    """Eq. 4: Q(s, u) - sum_u' pi(u') Q(s, (u^{-a}, u')), [b, N], no gradient."""
    baseline = (probs * q).sum(-1)
    return (taken(q, actions) - baseline).detach()


@register("coma", "COMA (Foerster et al. 2018, pymarl): shared actors, one centralised critic Q(s, (u^-a, .)) "
          "with TD(lambda) targets, counterfactual-baseline policy gradient, on-policy rollouts",
          Capabilities(discrete=True, continuous=False))
class COMA(Algorithm):
    Config = COMAConfig

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: COMAConfig, device="cpu"):
        super().__init__(groups, state_dim, config, device)
        if not 0.0 <= config.td_lambda <= 1.0:
            raise VimarlError(f"algo.td_lambda={config.td_lambda} is out of range: it must lie in [0, 1] (default 0.8)")
        (self.group, self.spec), = groups.items()
        n, obs_dim = self.spec.n_agents, self.spec.obs_dim
        self.n_agents, self.n_actions = n, self.spec.action_space.n
        context_dim = state_dim if state_dim else n * obs_dim  # all observations stand in for a missing state
        self.recurrent = bool(config.recurrent)
        if self.recurrent:  # logits from pymarl's rnn_agent
            self.policy = RecurrentAgentQ(n, obs_dim, config.hidden_dim, self.n_actions, agent_ids=True)
        else:
            hidden = (config.hidden_dim, config.hidden_dim)
            self.policy = AgentQNetwork(n, obs_dim, hidden, self.n_actions, agent_ids=True)
        self.memory: Tensor | None = None
        """[B, N, H] (recurrent): the GRU state of the sub-environments `act` was last called on."""
        self.acting_hidden: Tensor | None = None
        """[B, N, H] (recurrent): the GRU state the last exploring `act` started from (its `actor_hidden` field)."""
        self.critic = COMACritic(n, context_dim, obs_dim, self.n_actions, config.critic_hidden_dim)
        self.target_critic = frozen_copy(self.critic)
        # Counters as buffers, so checkpoints carry the schedules: env steps (eps), critic steps and
        # the critic step of the last target copy (the interval).
        self.register_buffer("env_steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("critic_steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("last_target_copy", torch.zeros((), dtype=torch.int64))
        self.last_actions: Tensor | None = None
        """[B, N]: each training sub-environment's latest joint action, NO_ACTION after an episode end."""
        self.previous_of_step: Tensor | None = None
        """[B, N]: the previous joint action of the step `observe` saw last (its `previous_action` field)."""
        self.to(self.device)

        def rmsprop(parameters, lr):
            return torch.optim.RMSprop(parameters, lr=lr, alpha=config.rmsprop_alpha, eps=config.rmsprop_eps)

        self.optimizers = {"actor": rmsprop(self.policy.parameters(), config.lr),
                           "critic": rmsprop(self.critic.parameters(), config.critic_lr)}

    @property
    def sampler(self) -> Sampler:
        return Sampler("rollout", self.config.rollout_length)

    @property
    def reads_state(self) -> bool:
        return self.state_dim > 0

    # --- acting ----------------------------------------------------------------------------------

    def epsilon(self) -> Tensor:
        c = self.config
        return linear_schedule(self.env_steps, c.epsilon_start, c.epsilon_end, c.epsilon_decay_steps)

    def probs(self, obs: Tensor, action_mask: Tensor | None, epsilon: Tensor | float) -> Tensor:
        """The feed-forward actor's behaviour policy of every agent [b, N, A] (eps = 0: the masked softmax)."""
        return behaviour_probs(self.policy(obs), epsilon, action_mask)

    def logits(self, obs: Tensor) -> Tensor:
        """The actor's logits [B, N, A]; the recurrent actor moves its carried GRU state on one step."""
        if not self.recurrent:
            return self.policy(obs)
        memory = self.memory if self.memory is not None and self.memory.shape[:2] == obs.shape[:2] else None
        if memory is None:
            memory = torch.zeros(*obs.shape[:2], self.config.hidden_dim, device=obs.device)
        self.acting_hidden = memory
        logits, self.memory = self.policy(obs, None, self.acting_hidden)
        return logits

    @torch.no_grad()
    def act(self, obs, graph, *, explore, action_mask=None, state=None):
        g = self.group
        mask = (action_mask or {}).get(g)
        logits = self.logits(obs[g])
        if not explore:  # pymarl's test mode: greedy in the masked softmax
            return {g: behaviour_probs(logits, 0.0, mask).argmax(-1)}
        return {g: sample(behaviour_probs(logits, self.epsilon(), mask))}

    @contextmanager
    def execution(self, mode: str | None = None) -> Iterator[None]:
        """Evaluation episodes start from a zero GRU state; the training envs' state is kept for after."""
        kept, self.memory = (self.memory, self.acting_hidden), None
        try:
            yield
        finally:
            self.memory, self.acting_hidden = kept

    def observe(self, step: TimeStep, actions: dict[str, Tensor], next_step: TimeStep) -> None:
        g = self.group
        self.env_steps += step.terminated.shape[0]
        if self.memory is not None and self.memory.shape[0] == next_step.done.shape[0]:
            self.memory = self.memory.masked_fill(next_step.done.view(-1, 1, 1), 0.0)  # new episodes start at 0
        taken_now = actions[g].long()
        if self.last_actions is None or self.last_actions.shape != taken_now.shape:
            self.last_actions = torch.full_like(taken_now, NO_ACTION)
        self.previous_of_step = self.last_actions
        self.last_actions = taken_now.masked_fill(next_step.done.view(-1, 1), NO_ACTION)

    def replay_fields(self) -> ExtraFields:
        fields = {"previous_action": {self.group: ((self.n_agents,), torch.int64)}}
        if self.recurrent:
            fields["actor_hidden"] = {self.group: ((self.n_agents, self.config.hidden_dim), torch.float32)}
        return fields

    def replay_values(self, actions: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        g = self.group
        previous = self.previous_of_step
        if previous is None or previous.shape != actions[g].shape:
            previous = torch.full_like(actions[g], NO_ACTION, dtype=torch.int64)
        values = {"previous_action": {g: previous}}
        if self.recurrent:
            hidden = self.acting_hidden
            if hidden is None or hidden.shape[:2] != actions[g].shape:  # actions not from act: a zero state
                hidden = torch.zeros(*actions[g].shape, self.config.hidden_dim, device=actions[g].device)
            values["actor_hidden"] = {g: hidden}
        return values

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "last_actions": self.last_actions, "memory": self.memory,
                "acting_hidden": self.acting_hidden}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        for key in ("last_actions", "memory", "acting_hidden"):
            value = state.get(key)
            setattr(self, key, None if value is None else value.to(self.device))

    # --- pieces ------------------------------------------------------------------------------------

    def context(self, state: Tensor | None, obs: Tensor) -> Tensor:
        """The critic's global input: the state, or every agent's observation when the env has none."""
        return state if self.state_dim else obs.flatten(1)

    @staticmethod
    def episode_ended(batch: Transition) -> Tensor:
        """[b] bool: the row ended its episode (terminated, or truncated by a time limit)."""
        ended = batch.terminated > 0
        return ended if batch.truncated is None else ended | (batch.truncated > 0)

    def previous_actions(self, batch: Transition) -> Tensor:
        """[T B, N]: row t's previous joint action is row t - 1's of the same sub-environment, NO_ACTION
        after an episode end; the first step's comes from the `previous_action` field when stored."""
        g, steps = self.group, self.config.rollout_length
        actions = batch.action[g].view(steps, -1, self.n_agents)
        ended = self.episode_ended(batch).view(steps, -1, 1)
        previous = torch.full_like(actions, NO_ACTION)
        previous[1:] = actions[:-1].masked_fill(ended[:-1], NO_ACTION)
        stored = batch.extra.get("previous_action", {}).get(g)
        if stored is not None:
            previous[0] = stored.view(steps, -1, self.n_agents)[0]
        return previous.view(-1, self.n_agents)

    def episode_goes_on(self, batch: Transition) -> Tensor:
        """[T B, N]: row t's episode (and agent) continues at row t + 1 inside the rollout."""
        g = self.group
        return batch.continuing(g).expand_as(batch.reward[g]) * self.row_goes_on(batch).unsqueeze(-1)

    def row_goes_on(self, batch: Transition) -> Tensor:
        """[T B] float: row t's episode continues at row t + 1 inside the rollout (not ended, not the last step)."""
        goes_on = (~self.episode_ended(batch)).float().view(self.config.rollout_length, -1).clone()
        goes_on[-1] = 0.0  # the next step is in the next rollout
        return goes_on.view(-1)

    def rollout_logits(self, batch: Transition) -> tuple[Tensor, Tensor]:
        """The actor's logits at every row's s_t (with gradient) and s'_t (without), [T B, N, A] each.
        Recurrent: unrolled over the rollout from the stored GRU state of its first step, reset to zero
        at episode starts; the logits at s'_t take one more GRU step from h_t."""
        g = self.group
        obs, next_obs = batch.obs[g], batch.next_obs[g]
        if not self.recurrent:
            with torch.no_grad():
                next_logits = self.policy(next_obs)
            return self.policy(obs), next_logits
        steps = self.config.rollout_length
        stored = batch.extra.get("actor_hidden", {}).get(g)
        x = self.policy.inputs(obs).view(steps, -1, self.n_agents, self.config.hidden_dim)
        starts = self.episode_ended(batch).view(steps, -1, 1, 1)
        hidden = torch.zeros_like(x[0]) if stored is None else stored.view(steps, -1, *stored.shape[1:])[0]
        states = []
        for t in range(steps):  # backpropagation through time over the rollout
            if t:
                hidden = hidden.masked_fill(starts[t - 1], 0.0)
            hidden = self.policy.recur(x[t], hidden)
            states.append(hidden)
        hiddens = torch.stack(states).flatten(0, 1)
        with torch.no_grad():
            next_logits = self.policy.successor_q(next_obs, hiddens)
        return self.policy.head(hiddens), next_logits

    @torch.no_grad()
    def bootstrap_values(self, batch: Transition, next_logits: Tensor) -> Tensor:
        """Qbar(s_{t+1}, u_{t+1}) of every row [T B, N] from the target critic: u_{t+1} is the next row's
        joint action where the episode goes on inside the rollout, else (rollout end, truncation) a
        sample of the behaviour policy at the final observation."""
        g, steps = self.group, self.config.rollout_length
        actions = batch.action[g].view(steps, -1, self.n_agents)
        sampled = sample(behaviour_probs(next_logits, self.epsilon(), batch.next_action_mask.get(g)))
        following = torch.cat([actions[1:], actions[-1:]]).view(-1, self.n_agents)
        next_actions = torch.where(self.row_goes_on(batch).unsqueeze(-1) > 0, following, sampled)
        context = self.context(batch.next_state, batch.next_obs[g])
        q = self.target_critic(context, batch.next_obs[g], next_actions, batch.action[g])
        return taken(q, next_actions)

    def lambda_returns(self, batch: Transition, next_values: Tensor, goes_on: Tensor) -> Tensor:
        """TD(lambda) targets over the time-major rollout [T B, N] (pymarl build_td_lambda_targets):
        G_t = r_t + gamma c_t [(1 - lambda) Qbar_{t+1} + lambda (e_t G_{t+1} + (1 - e_t) Qbar_{t+1})],
        c_t = 0 at termination, e_t = 0 where the episode does not go on inside the rollout."""
        g, c = self.group, self.config
        steps, n = c.rollout_length, self.n_agents
        rewards = batch.reward[g].view(steps, -1, n)
        continuing = batch.continuing(g).expand_as(batch.reward[g]).view(steps, -1, n)
        next_values, goes_on = next_values.view(steps, -1, n), goes_on.view(steps, -1, n)
        returns = torch.empty_like(rewards)
        carry = torch.zeros_like(rewards[0])
        for t in reversed(range(steps)):  # the recursion runs over time; envs and agents are batched
            ahead = goes_on[t] * carry + (1.0 - goes_on[t]) * next_values[t]
            carry = rewards[t] + c.gamma * continuing[t] * ((1.0 - c.td_lambda) * next_values[t] + c.td_lambda * ahead)
            returns[t] = carry
        return returns.view(-1, n)

    def copy_target_when_due(self) -> None:
        """pymarl: a full copy once target_update_interval critic steps have passed since the last one;
        decided on the device (a copy is a lerp of weight 1, none one of weight 0)."""
        due = self.critic_steps - self.last_target_copy >= self.config.target_update_interval
        with torch.no_grad():
            for t, s in zip(self.target_critic.parameters(), self.critic.parameters()):
                t.lerp_(s, due.float())
        self.last_target_copy.copy_(torch.where(due, self.critic_steps, self.last_target_copy))

    # --- the update --------------------------------------------------------------------------------

    def train_critic(self, context: Tensor, obs: Tensor, actions: Tensor, previous: Tensor, targets: Tensor,
                     present: Tensor | None) -> tuple[Tensor, Tensor]:
        """Critic steps on the rollout; returns the Q vectors each row had just before its step
        [T B, N, A] (no gradient) and the mean loss."""
        c, clip = self.config, self.config.max_grad_norm or None
        if c.critic_train_mode == "batched":
            q = self.critic(context, obs, actions, previous)
            loss = agent_mean((taken(q, actions) - targets).square(), present)
            self.optimize("critic", loss, clip)
            self.critic_steps += c.rollout_length  # counted as the time steps it covers, so targets copy as in seq
            return q.detach(), loss.detach()
        steps = c.rollout_length
        width = actions.shape[0] // steps
        q_values = torch.empty(actions.shape[0], self.n_agents, self.n_actions, device=self.device)
        losses = torch.zeros((), device=self.device)
        for t in reversed(range(steps)):  # pymarl's "seq": one step per time step, backwards
            rows = slice(t * width, (t + 1) * width)
            q = self.critic(context[rows], obs[rows], actions[rows], previous[rows])
            alive = None if present is None else present[rows]
            loss = agent_mean((taken(q, actions[rows]) - targets[rows]).square(), alive)
            self.optimize("critic", loss, clip)
            q_values[rows] = q.detach()
            losses = losses + loss.detach()
        self.critic_steps += steps
        return q_values, losses / steps

    def update(self, batch: Transition) -> dict[str, Tensor]:
        g, c = self.group, self.config
        obs, actions = batch.obs[g], batch.action[g]
        present = batch.joint_alive(self.groups)
        previous = self.previous_actions(batch)
        goes_on = self.episode_goes_on(batch)
        logits, next_logits = self.rollout_logits(batch)
        targets = self.lambda_returns(batch, self.bootstrap_values(batch, next_logits), goes_on)
        context = self.context(batch.state, obs)
        q_values, critic_loss = self.train_critic(context, obs, actions, previous, targets, present)

        probs = behaviour_probs(logits, self.epsilon(), batch.action_mask.get(g))  # pymarl's non-test-mode forward
        advantages = counterfactual_advantage(q_values, probs.detach(), actions)
        log_probs = taken(probs, actions).clamp_min(1e-30).log()
        actor_loss = -agent_mean(advantages * log_probs, present)
        self.optimize("actor", actor_loss, c.max_grad_norm or None)
        self.copy_target_when_due()
        with torch.no_grad():
            entropy = agent_mean(-(probs * probs.clamp_min(1e-30).log()).sum(-1), present)
        return {"loss_policy": actor_loss.detach(), "loss_q": critic_loss,
                "advantage_mean": agent_mean(advantages, present),
                "q_taken_mean": agent_mean(taken(q_values, actions), present),
                "target_mean": agent_mean(targets, present), "entropy": entropy, "epsilon": self.epsilon().detach()}
