"""MADDPG (Lowe et al. 2017) as in openai/maddpg@3ceefa0, and MADDPG-S, its agent-shuffling variant (001 App. B.1).

Every agent i has a deterministic actor mu_i(o_i) whose output is the flat parameter of an action
distribution (logits for Discrete, (mean, log std) for Box), and a centralised critic
Q_i(x, a_1, ..., a_N) over x = (o_1, ..., o_N) and every agent's action (`maddpg/trainer/maddpg.py`,
`q_train` / `p_train`), the agents of all controlled groups (e.g. speaker and listener; x is all
groups' observations then all their actions, groups in order, `joint_input`). With bars marking target networks and one batch D shared by all agents:

    a~_k(u)  = softmax(mu_k(o_k) - log(-log u)),  u ~ U(0, 1)      relaxed Gumbel-softmax sample,
                                                                    temperature 1 (SoftCategoricalPd)
    y_i      = r_i + gamma (1 - d) Qbar_i(x', a~'_1, ..., a~'_N),   a~'_k sampled from mubar_k(o'_k)
    L_Q_i    = E_D[ (Q_i(x, a_1, ..., a_N) - y_i)^2 ]                (q_loss; the 1e-3 E[Q^2] term is off)
    L_mu_i   = -E_D[ Q_i(x, a_1, .., a~_i, .., a_N) ] + 1e-3 E_D[ mu_i(o_i)^2 ]
               (only agent i's action is re-sampled from its current actor, the others come from
               replay; the regulariser is the mean square of the flat parameters, `p_reg`)

Each gradient is clipped per variable to norm 0.5 (`U.minimize_and_clip`, tf.clip_by_norm on
every tensor separately, not the global norm), Adam lr 1e-2 for both, and right after the critic
and actor steps the targets move by Polyak averaging with tau = 0.01 (`make_update_exp`,
polyak 1 - 1e-2). Networks are MLPs 64 -> 64 ReLU -> linear (`experiments/train.py` mlp_model).

Actions (ALGO_SPECS §5.4, §6.1):
- Discrete: the reference hands the soft Gumbel-softmax vector to MPE as a force and stores it in
  replay. vimarl's discrete environments take an index, so the environment gets the argmax of that
  same relaxed sample (an exact categorical sample of softmax(mu_i), the Gumbel-max trick). The
  buffer stores the index and, by default, the soft vector itself (`replay_action` "soft", the
  reference's replay; `SoftActionReplay`): the critics see replayed actions a, in L_Q and for the
  other agents in L_mu, as the soft vectors the actors acted with, so that they are queried at the
  kind of input they learn on. Warm-up steps (uniform actions chosen by the trainer) and
  deterministic acting store one-hots; "one_hot" replays one-hots of the indices throughout.
  Sampled actions a~ (target look-ahead, actor loss) enter the critics as the soft vector itself,
  as in the reference (`critic_action` "soft"); "straight_through" feeds the one-hot of the argmax
  with the soft gradient instead, so that sampled and one-hot replayed critic inputs are alike.
  Action masks set masked logits to the dtype's minimum before sampling (the reference has none).
- Box: the reference's DiagGaussianPd, a = mean + exp(log std) * eps, unsquashed, with the
  regulariser on (mean, log std). vimarl clips the sample to [low, high] for the environment and
  the buffer; the critic input is the clipped value with the unclipped sample's gradient
  (straight-through clip, `Gaussian`), and log std is clamped to [-20, 2] for numerical safety
  (the reference leaves it free, only the regulariser bounds it).
- Exploration is the sample above; deterministic evaluation plays argmax mu_i(o_i) (Discrete) or
  the clipped mean (Box).

In a mixed team (algos/team.py, `TeamView`) the critics of the member's agents read every group of
the environment, opponents included (003's Q_i(s, a) over all agents, as MADDPG's own x): the
other groups' replayed actions in L_Q and L_mu (their stored critic inputs), and in the look-ahead
a~' the other members' actions from their own look-ahead policies (`Algorithm.critic_actions`).

Differences from the reference, by design:
- Actors are per group (their observation and action sizes differ), the critics one set over all
  N controlled agents of all groups, r_i concatenated in group order.
- All agents update at once, batched (no Python loop over agents), on one batch: the reference
  updates agent after agent on the same indices, so agent j > i's look-ahead already uses agent
  i's freshly moved target actor; here every look-ahead uses the targets from before the update.
  Critic steps precede actor steps as in the reference (`q_train`, then `p_train`, then targets).
- Per-agent networks (parameter_sharing=False, the reference) are batched `AgentMLP`s whose losses
  are summed over agents, so each agent's parameters get exactly the reference's gradient, and
  per-variable clipping clips each agent's slice of a batched tensor separately. With
  parameter_sharing=True (for large N, ALGO_SPECS §6.4) one actor per group and one critic for
  all controlled agents read a one-hot agent id; their losses are averaged over agents and each shared tensor is clipped as a whole.
- Initialisation is torch's nn.Linear default (in `BatchedLinear` too), not TF's Glorot-uniform
  weights with zero biases of tf.contrib.layers.fully_connected.
- Trainer settings of the reference (an update every 100 env steps, learning starts after
  1024 x 25 transitions, batch 1024, replay 1e6, 25-step episodes whose time limit is not a
  terminal) are trainer fields, not part of this Config.

MADDPG-S (001 App. B.1: "shuffle the agents' observations and actions in training batch", after
Liu et al. 2019; footnote 7: the operation does not change the actions themselves): every update
draws a uniformly random permutation sigma of the agents of each group (groups with different
observation or action sizes cannot trade slots, so with several groups the shuffle stays within
each group's block of the critic input) and builds every critic input as
x_sigma = (o_sigma(1), ..., o_sigma(N), a_sigma(1), ..., a_sigma(N)), the same sigma for the
observations and the actions, for x and x' alike, in the critic and the actor losses. By default
one sigma per update for the whole batch, as PIC's code does (`ddpg_vec.py`,
`np.random.permutation(n_agent)` per critic update; PIC permutes only in the critic update, here
the actor loss sees the same permuted layout); `shuffle="row"` draws one per batch row. Agent i's
identity is not lost: Q_i is still agent i's own critic (its own network, or the shared one with
agent i's one-hot id), trained on agent i's reward r_i, and in the actor loss agent i's fresh
action a~_i sits in whatever slot sigma moves it to, so the gradient still reaches mu_i. What the
critic can no longer use is the slot order of the other agents.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vimarl.algos.base import Algorithm, Capabilities, adam, frozen, polyak, register
from vimarl.buffer import ExtraFields, Transition
from vimarl.envs.base import ActionSpace, Box, Discrete, GroupSpec
from vimarl.nn.centralized import (CRITIC_ACTION, ActionParams, BatchedLinear, CentralQ, CriticLayout, TeamView,
                                   joint_input, policies_with_targets, replayed_critic_inputs, td_target)
from vimarl.nn.distributions import Gaussian, PolicyHead, action_features


@dataclass
class MADDPGConfig:
    lr: float = 0.01
    """Adam learning rate of actors and critics (openai/maddpg train.py --lr 1e-2)."""
    gamma: float = 0.95
    """Discount of the critic target y_i (train.py --gamma 0.95)."""
    tau: float = 0.01
    """Polyak step of the target actors and critics after every update (make_update_exp, polyak 1 - 1e-2)."""
    hidden_dim: int = 64
    """Units of each of the two ReLU hidden layers of every actor and critic (train.py --num-units 64)."""
    grad_clip: float = 0.5
    """Per-variable gradient norm clip (U.minimize_and_clip, grad_norm_clipping=0.5); 0 disables it."""
    policy_reg: float = 1e-3
    """Weight of the mean square of the actor's flat output (logits, or mean and log std) in the
    actor loss (p_train: loss = pg_loss + p_reg * 1e-3)."""
    parameter_sharing: bool = False
    """One actor per group shared by its agents and one critic shared by all controlled agents, each
    reading a one-hot agent id (for large N, ALGO_SPECS §6.4), or one network per agent (the reference)."""
    critic_action: Literal["soft", "straight_through"] = "soft"
    """Sampled discrete actions as critic inputs: the relaxed Gumbel-softmax vector (the reference),
    or the one-hot of its argmax with the soft vector's gradient (matches one-hot replay actions)."""
    replay_action: Literal["soft", "one_hot"] = "soft"
    """Replayed discrete actions as critic inputs: the relaxed Gumbel-softmax sample the actor acted
    with, stored in the replay (openai/maddpg replays the soft vectors it hands MPE; one-hots for
    warm-up and deterministic steps), or the one-hot of the stored index."""


@dataclass
class MADDPGSConfig(MADDPGConfig):
    shuffle: Literal["batch", "row"] = "batch"
    """One random agent permutation (per group) per update for the whole batch (PIC's ddpg_vec.py), or one per batch row."""


def masked_logits(logits: Tensor, action_mask: Tensor | None) -> Tensor:
    if action_mask is None:
        return logits
    return logits.masked_fill(~action_mask, torch.finfo(logits.dtype).min)


def relaxed_sample(params: Tensor, action_space: ActionSpace, action_mask: Tensor | None = None,
                   straight_through: bool = False) -> tuple[Tensor, Tensor]:
    """The reference's action sample from flat parameters [.., P]: (env action, critic input [.., A]).

    Discrete: soft = softmax(logits - log(-log u)) (SoftCategoricalPd.sample), the env action its
    argmax; the critic input is `soft` (or straight-through one-hot). Box: mean + std * eps,
    clipped for the environment, straight-through for the critic.
    """
    if isinstance(action_space, Discrete):
        logits = masked_logits(params, action_mask)
        uniform = torch.rand_like(logits).clamp_(1e-10, 1.0 - 1e-7)
        soft = torch.softmax(logits - torch.log(-torch.log(uniform)), dim=-1)
        action = soft.argmax(-1)
        if straight_through:
            return action, F.one_hot(action, soft.shape[-1]).to(soft.dtype) + (soft - soft.detach())
        return action, soft
    sample = box_distribution(params, action_space).sample()
    return sample.action, sample.critic_input


def box_distribution(params: Tensor, action_space: Box) -> Gaussian:
    """DiagGaussianPd from flat (mean, log std), log std clamped; samples clipped straight-through."""
    mean, log_std = params.chunk(2, dim=-1)
    log_std = log_std.clamp(PolicyHead.LOG_STD_MIN, PolicyHead.LOG_STD_MAX)
    return Gaussian(mean, log_std, action_space.low, action_space.high)


def deterministic_action(params: Tensor, action_space: ActionSpace, action_mask: Tensor | None = None) -> Tensor:
    """argmax of the logits (Discrete) or the clipped mean (Box)."""
    if isinstance(action_space, Discrete):
        return masked_logits(params, action_mask).argmax(-1)
    return box_distribution(params, action_space).mode()


class SoftActionReplay:
    """Replay of the relaxed samples an algorithm acted with (`replay_action` "soft", openai/maddpg):
    MADDPG's and PIC's critics then learn on the soft vectors they are queried at.

    `act` keeps {group: (env action, soft sample)} of its last exploring call in `acted_samples`;
    the replay stores the soft sample for actions that are those very tensors, and one-hots for any
    others (the trainer's warm-up actions, deterministic acting). Box groups store nothing extra:
    their replayed value is the critic input already.
    """

    acted_samples: dict[str, tuple[Tensor, Tensor]] = {}  # replaced, never mutated, by every act

    def replay_fields(self) -> ExtraFields:
        if self.config.replay_action != "soft":
            return {}
        return {CRITIC_ACTION: {g: ((spec.n_agents, spec.action_space.n), torch.float32)
                                for g, spec in self.groups.items() if spec.discrete}}

    def replay_values(self, actions: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        values = {}
        for g in self.replay_fields().get(CRITIC_ACTION, {}):
            acted, soft = self.acted_samples.get(g, (None, None))
            # Identity, not equality: the soft vector belongs to the actions act returned, and
            # trainer-chosen actions are new tensors even where they agree with its argmax.
            values[g] = soft if acted is actions[g] else action_features(actions[g], self.groups[g].action_space)
        return {CRITIC_ACTION: values} if values else {}


def slot_index(segments: Sequence[tuple[int, int]], perms: Sequence[Tensor]) -> Tensor:
    """Column index that moves agent perm[k] of each segment into slot k: [D], or [B, D] for perms [B, N_g].

    segments: (N_g, width_g) of each block of a row, in column order; perms: one per segment.
    """
    parts, offset = [], 0
    for (n, width), perm in zip(segments, perms):
        within = perm.unsqueeze(-1) * width + torch.arange(width, device=perm.device)
        parts.append(offset + within.flatten(-2))
        offset += n * width
    if any(p.dim() == 2 for p in parts):
        b = max(p.shape[0] for p in parts if p.dim() == 2)
        parts = [p.expand(b, -1) for p in parts]
    return torch.cat(parts, dim=-1)


def critic_input(obs: Sequence[Tensor], actions: Sequence[Tensor], perms: Sequence[Tensor] | None = None,
                 fresh: Sequence[Tensor] | None = None, rows: Tensor | None = None) -> Tensor:
    """Rows x_i = (o, a) of every controlled agent's critic, [B, N, D] (`joint_input`), per group lists.

    With `fresh`, critic i sees agent i's action from `fresh` and the others' from `actions`
    (the actor loss). With `perms` (one [N_g] or [B, N_g] per group), the agents of every group
    trade slots, slot k taking agent perm_g[k]: the same permutation for the observations and
    the actions, and row i stays agent i's critic. `rows` keeps only those agents' critics (`CriticLayout`).
    """
    inputs = joint_input(obs, actions, own_actions=fresh, rows=rows)
    if perms is None:
        return inputs
    segments = [(o.shape[1], o.shape[2]) for o in obs] + [(a.shape[1], a.shape[2]) for a in actions]
    index = slot_index(segments, [*perms, *perms])
    if index.dim() == 1:
        return inputs.index_select(-1, index)
    return inputs.gather(-1, index.unsqueeze(1).expand_as(inputs))


def clip_variables(module: nn.Module) -> Iterator[tuple[Tensor, bool]]:
    """(parameter, per_agent) for every tensor of `module`: per_agent for batched per-agent weights,
    whose agent slices are separate variables of the reference."""
    for m in module.modules():
        if isinstance(m, BatchedLinear):
            yield from ((m.weight, True), (m.bias, True))
        elif isinstance(m, nn.Linear):
            yield from ((p, False) for p in m.parameters())


@torch.no_grad()
def clip_per_variable(variables: list[tuple[Tensor, bool]], max_norm: float) -> None:
    """tf.clip_by_norm on every variable's gradient: g <- g * max_norm / max(|g|, max_norm)."""
    for p, per_agent in variables:
        if p.grad is None:
            continue
        g = p.grad
        if per_agent:
            norm = g.flatten(1).norm(dim=1).view(-1, *([1] * (g.dim() - 1)))
        else:
            norm = g.norm()
        g.mul_(max_norm / norm.clamp(min=max_norm))


@register("maddpg", "MADDPG (openai/maddpg): deterministic actors with Gumbel-softmax relaxed actions, "
          "per-agent centralised critics over all observations and actions, target networks",
          Capabilities(discrete=True, continuous=True, heterogeneous=True, team_critic=True))
class MADDPG(SoftActionReplay, Algorithm):
    Config = MADDPGConfig

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: MADDPGConfig, device="cpu",
                 team: TeamView | None = None):
        super().__init__(groups, state_dim, config, device)
        shared, hidden = config.parameter_sharing, config.hidden_dim
        self.policy, self.target_policy = policies_with_targets(groups, lambda s: ActionParams(s, hidden, shared))
        self.layout = CriticLayout(groups, team)
        # Q_i of every controlled agent, over the groups the layout reads
        self.critics = CentralQ(groups, (hidden, hidden), shared, seen=self.layout.seen)
        self.to(self.device)
        self.optimizers = {"policy": adam(self.policy.parameters(), lr=config.lr),
                           "q": adam(self.critics.q.parameters(), lr=config.lr)}
        self.clip = {"policy": list(clip_variables(self.policy)), "q": list(clip_variables(self.critics.q))}

    @property
    def critic_input_dim(self) -> int:
        """Width of every critic's input x: sum over the groups it reads of N_g (O_g + A_g)."""
        return self.critics.input_dim

    @torch.no_grad()
    def act(self, obs, graph, *, explore, action_mask=None, state=None):
        actions, acted = {}, {}
        for g, spec in self.groups.items():
            params, mask = self.policy[g](obs[g]), (action_mask or {}).get(g)
            if explore:
                acted[g] = relaxed_sample(params, spec.action_space, mask)
                actions[g] = acted[g][0]
            else:
                actions[g] = deterministic_action(params, spec.action_space, mask)
        self.acted_samples = acted
        return actions

    @torch.no_grad()
    def critic_actions(self, batch: Transition, lookahead: bool) -> dict[str, Tensor]:
        """Relaxed samples of the target actors at s' (the look-ahead a~'), else of the current ones at s."""
        policy, obs, masks = ((self.target_policy, batch.next_obs, batch.next_action_mask) if lookahead
                              else (self.policy, batch.obs, batch.action_mask))
        return dict(zip(self.groups, self._samples({g: policy[g](obs[g]) for g in self.groups}, masks)))

    def _reduce(self, per_agent: Tensor) -> Tensor:
        """Sum of the agents' losses (per-agent networks: each gets its own gradient), mean when shared."""
        return per_agent.mean() if self.config.parameter_sharing else per_agent.sum()

    def _samples(self, params: dict[str, Tensor], masks: dict[str, Tensor | None]) -> list[Tensor]:
        """Critic inputs of relaxed samples a~_k from every group's actor outputs, groups in order."""
        straight = self.config.critic_action == "straight_through"
        return [relaxed_sample(params[g], spec.action_space, masks[g], straight)[1] for g, spec in self.groups.items()]

    def _replay(self, batch: Transition) -> list[Tensor]:
        """The replayed actions as critic inputs of every group the critics read, in order: the
        stored soft samples (replay_action "soft") or one-hots for Discrete."""
        return replayed_critic_inputs(batch, self.layout.seen)

    def step(self, name: str, loss: Tensor) -> None:
        """Optimiser step with the reference's per-variable gradient clipping."""
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            clip_per_variable(self.clip[name], self.config.grad_clip)
        optimizer.step()

    def update(self, batch: Transition) -> dict[str, Tensor]:
        # openai/maddpg agent.update: critic step, actor step, then both targets.
        perms = self.permutation_for(batch)
        q_loss = self._reduce(self.q_loss(batch, perms))
        self.step("q", q_loss)
        q, reg = self.policy_terms(batch, perms)
        policy_loss = self._reduce(-q + self.config.policy_reg * reg)
        self.step("policy", policy_loss)
        polyak(self.target_policy, self.policy, self.config.tau)
        polyak(self.critics.target_q, self.critics.q, self.config.tau)
        return {"loss_q": q_loss.detach(), "loss_policy": policy_loss.detach(), "q": q.mean().detach(),
                "policy_reg": reg.mean().detach()}

    def permutation_for(self, batch: Transition) -> list[Tensor] | None:
        """The per-group agent permutations of this update's critic inputs: none for MADDPG (see MADDPGS)."""
        return None

    @torch.no_grad()
    def q_target(self, batch: Transition, perms: list[Tensor] | None = None) -> Tensor:
        """y_i = r_i + gamma (1 - d) Qbar_i(x', a~'), a~'_k sampled from the target actors: [B, N]."""
        layout = self.layout
        next_actions = layout.ordered(self.critic_actions(batch, lookahead=True).values(),
                                      layout.others_actions(batch, lookahead=True))
        inputs = critic_input(layout.obs(batch, next_step=True), next_actions, perms, rows=layout.rows)
        next_q, = self.critics.values(inputs, target=True)
        return td_target(batch, list(self.groups), self.config.gamma, next_q)

    def q_loss(self, batch: Transition, perms: list[Tensor] | None = None) -> Tensor:
        """L_Q_i on the replayed joint action, mean over the batch: [N]."""
        target = self.q_target(batch, perms)
        inputs = critic_input(self.layout.obs(batch), self._replay(batch), perms, rows=self.layout.rows)
        q, = self.critics.values(inputs)
        return (q - target).square().mean(0)

    def policy_terms(self, batch: Transition, perms: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """(E_D Q_i(x, a_1, .., a~_i, .., a_N), E_D mean mu_i(o_i)^2), each [N]; L_mu_i = -first + policy_reg * second."""
        layout, replay = self.layout, self._replay(batch)
        params = {g: self.policy[g](batch.obs[g]) for g in self.groups}
        # Only agent i's own action is fresh in row i; the other groups' stay the replayed ones.
        fresh = layout.ordered(self._samples(params, batch.action_mask), dict(zip(layout.seen, replay)))
        inputs = critic_input(layout.obs(batch), replay, perms, fresh=fresh, rows=layout.rows)
        with frozen(self.critics):  # the actor step takes gradients to the actions only
            q, = self.critics.values(inputs)
        reg = torch.cat([p.square().mean(dim=(0, 2)) for p in params.values()])
        return q.mean(0), reg


@register("maddpg_s", "MADDPG-S (001 App. B.1): MADDPG whose critics see the agents in a random order, "
          "a fresh permutation of observations and actions every update",
          Capabilities(discrete=True, continuous=True, heterogeneous=True, team_critic=True))
class MADDPGS(MADDPG):
    Config = MADDPGSConfig

    def permutation_for(self, batch: Transition) -> list[Tensor]:
        """sigma_g [N_g] (shuffle="batch") or [B, N_g] (shuffle="row") of every group the critics
        read (in a team the other members' groups too), uniform over permutations."""
        perms = []
        for g, spec in self.layout.seen.items():
            if self.config.shuffle == "batch":
                perms.append(torch.randperm(spec.n_agents, device=self.device))
            else:
                perms.append(torch.rand(batch.obs[g].shape[0], spec.n_agents, device=self.device).argsort(dim=1))
        return perms
