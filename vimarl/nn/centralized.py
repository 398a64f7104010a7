"""Pieces of centralised-critic methods (MA-SAC, MADDPG, PIC-style baselines).

- `BatchedLinear` / `AgentMLP`: one network per agent evaluated for all agents at once
  (weights [N, in, out], one einsum per layer instead of a Python loop over agents), or one
  network shared by the agents with a one-hot agent id appended to its input.
- `joint_input`: the centralised critic input x = (o_1, ..., o_N, a_1, ..., a_N) for every
  controlled agent's critic, over one group or several (all groups' observations, then all their
  actions, groups in the algorithm's order), [B, N_total, sum_g N_g (O_g + A_g)], optionally with
  each row's own action taken from elsewhere (fresh actions, or the only ones carrying a gradient).
  Its size is O(N^2) per batch row: fine for the small N of MPE-style tasks (N <= ~30), not for
  hundreds of agents.
- `CentralQ`: per-agent centralised critics (twins optional) over all controlled agents, with
  target copies; `ActionParams`, `policies_with_targets`, `td_target`: the other pieces that
  MA-SAC and MADDPG build alike.
- `CriticLayout`: which groups the critic input holds and which agents have a critic row. Alone,
  an algorithm's critics read exactly the groups it controls; as a member of a mixed team
  (algos/team.py, `TeamView`) they read every group of the environment, in its order, as paper
  003's Q_i(s, a) over all agents does, and keep rows only for the member's own agents.
- `TeamView`: what a team member's critics read of the groups the other members control.
- `replayed_critic_inputs`: the replayed actions as critic inputs, what the acting algorithm
  stored (`CRITIC_ACTION`, e.g. MADDPG's relaxed samples) or else their one-hots.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vimarl.buffer import Transition
from vimarl.envs.base import Discrete, GroupSpec
from vimarl.nn.distributions import action_dim, action_features
from vimarl.nn.mlp import mlp


@dataclass(frozen=True)
class TeamView:
    """What a team member's centralised critics read beyond its own groups (see vimarl/algos/team.py).

    Paper 003 defines Q_i(s, a) over all agents, as MADDPG does, so in a mixed team every member's
    critic sees every group, opponents included, and the members' critics have one layout.
    """

    groups: dict[str, GroupSpec]
    """Every group the critics read, the member's own included, in the environment's order."""
    others_actions: Callable[[Transition, bool], dict[str, Tensor]]
    """(batch, lookahead) -> the other members' groups' actions as critic inputs, detached: at s'
    from each member's look-ahead policy when `lookahead`, else at s from their current policies
    (`Algorithm.critic_actions`)."""


CRITIC_ACTION = "critic_action"
"""Replay field (`Algorithm.replay_fields`) of the critic input an action was acted with, [N, A]
per group, e.g. MADDPG's relaxed Gumbel-softmax sample whose argmax went to the environment."""


class BatchedLinear(nn.Module):
    """N independent linear maps applied to [..., N, in] -> [..., N, out] (weight [N, in, out])."""

    def __init__(self, n: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(n, out_dim))
        bound = 1.0 / math.sqrt(in_dim) if in_dim else 0.0  # nn.Linear's default initialisation
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("...ni,nio->...no", x, self.weight) + self.bias


class AgentMLP(nn.Module):
    """An MLP per agent on [..., N, in] -> [..., N, out].

    shared=True: one MLP for all agents, reading [x_i, onehot(i)] so agents can still differ;
    shared=False: N MLPs with their own weights, batched (`BatchedLinear`).
    """

    def __init__(self, n_agents: int, in_dim: int, hidden: Sequence[int], out_dim: int, shared: bool,
                 activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.n_agents, self.shared = n_agents, shared
        if shared:
            self.net = mlp(in_dim + n_agents, hidden, out_dim, activation)
            self.register_buffer("agent_ids", torch.eye(n_agents), persistent=False)
        else:
            sizes = [in_dim, *hidden, out_dim]
            layers: list[nn.Module] = []
            for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
                layers.append(BatchedLinear(n_agents, a, b))
                if i < len(sizes) - 2:
                    layers.append(activation())
            self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.shared:
            ids = self.agent_ids.expand(*x.shape[:-1], self.n_agents)
            x = torch.cat([x, ids], dim=-1)
        return self.net(x)

    def forward_parts(self, parts: Sequence[Tensor]) -> Tensor:
        """`forward(torch.cat(parts, -1))` without building the concatenation: the first layer is a
        sum of one matmul per part, each on its own (broadcastable) shape, so a part that many rows
        share is multiplied once."""
        first, widths = self.net[0], [part.shape[-1] for part in parts]
        if self.shared:  # nn.Linear over [x, onehot(i)]: the id columns are agent i's own bias
            weights = first.weight.split([*widths, self.n_agents], dim=1)
            out = first.bias + weights[-1].T
            for part, weight in zip(parts, weights):
                out = out + part @ weight.T
        else:
            weights = first.weight.split(widths, dim=1)
            out = first.bias
            for part, weight in zip(parts, weights):
                out = out + torch.einsum("...ni,nio->...no", part, weight)
        return self.net[1:](out)


def per_group(x: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """One tensor (a single group) or one per controlled group, as a list in group order."""
    return [x] if isinstance(x, Tensor) else list(x)


def flatten_agents(xs: Tensor | Sequence[Tensor]) -> Tensor:
    """Per-group [B, N_g, F_g] -> [B, sum_g N_g F_g]: groups in order, agents in order within a group."""
    return torch.cat([x.flatten(1) for x in per_group(xs)], dim=1)


def own_segments(xs: Tensor | Sequence[Tensor]) -> Tensor:
    """[N_total, sum_g N_g F_g] bool: row i marks controlled agent i's columns of `flatten_agents(xs)`."""
    blocks = [torch.eye(x.shape[1], device=x.device).repeat_interleave(x.shape[2], dim=1) for x in per_group(xs)]
    return torch.block_diag(*blocks).bool()


def joint_input(obs: Tensor | Sequence[Tensor], actions: Tensor | Sequence[Tensor],
                own_action_gradient_only: bool = False,
                own_actions: Tensor | Sequence[Tensor] | None = None, rows: Tensor | None = None) -> Tensor:
    """x = (o_1..o_N, a_1..a_N) for each controlled agent's critic: [B, N_total, sum_g N_g (O_g + A_g)].

    obs [B, N, O] and actions [B, N, A] of one group, or lists of them for several groups (the
    algorithm's group order): all groups' observations first, then all their actions; row i is
    the i-th controlled agent counted in that order.

    With `own_actions` (same shapes as `actions`), row i takes agent i's action from `own_actions`
    and every other agent's from `actions` (MADDPG's actor loss). `own_action_gradient_only` is the
    case own_actions = actions with the others detached: row i carries the gradient of a_i alone,
    so sum_i Q_i(x, a) sends agent j's policy gradient only through Q_j; values are unchanged.
    `rows` (agent indices) keeps only those agents' rows (a team member's own agents, `CriticLayout`).
    """
    obs, actions = per_group(obs), per_group(actions)
    b = obs[0].shape[0]
    n = sum(o.shape[1] for o in obs) if rows is None else rows.numel()
    x = flatten_agents(obs).unsqueeze(1).expand(b, n, -1)
    if own_actions is None and own_action_gradient_only and any(a.requires_grad for a in actions):
        own_actions, actions = actions, [a.detach() for a in actions]
    joint = flatten_agents(actions).unsqueeze(1).expand(b, n, -1)
    if own_actions is not None:
        own = own_segments(actions) if rows is None else own_segments(actions)[rows]
        joint = torch.where(own, flatten_agents(own_actions).unsqueeze(1), joint)
    return torch.cat([x, joint], dim=-1)


def critic_width(groups: dict[str, GroupSpec]) -> int:
    """Width of a `joint_input` row over `groups`: sum_g N_g (O_g + A_g)."""
    return sum(spec.n_agents * (spec.obs_dim + action_dim(spec.action_space)) for spec in groups.values())


def replayed_critic_inputs(batch: Transition, groups: dict[str, GroupSpec]) -> list[Tensor]:
    """The replayed actions of `groups` as critic inputs, groups in order: the vectors the acting
    algorithm stored (`CRITIC_ACTION`) where it did, else one-hots (Discrete) or the values (Box)."""
    stored = batch.extra.get(CRITIC_ACTION, {})
    return [stored[g] if g in stored else action_features(batch.action[g], spec.action_space)
            for g, spec in groups.items()]


class CriticLayout(nn.Module):
    """The groups a centralised critic input holds (`seen`, in order) and the agents with a critic
    row (those of `own`, the groups the algorithm controls).

    Alone (team None) the two are the same. In a mixed team (`TeamView`) the critics read every
    group of the environment, 003's Q_i(s, a) over all agents, and the other groups' actions come
    from the other members through `others_actions`.
    """

    def __init__(self, own: dict[str, GroupSpec], team: TeamView | None = None):
        super().__init__()
        self.own, self.team = own, team
        self.seen = team.groups if team is not None else own
        owner = torch.cat([torch.full((spec.n_agents,), g in own) for g, spec in self.seen.items()])
        # Non-persistent: checkpoints are those of a lone algorithm; None keeps its every row.
        self.register_buffer("rows", None if bool(owner.all()) else owner.nonzero().squeeze(1), persistent=False)

    @property
    def input_dim(self) -> int:
        return critic_width(self.seen)

    def others_actions(self, batch: Transition, lookahead: bool) -> dict[str, Tensor]:
        """The groups of other team members as critic inputs (`TeamView.others_actions`); none alone."""
        return {} if self.team is None else self.team.others_actions(batch, lookahead)

    def ordered(self, own: Sequence[Tensor], others: dict[str, Tensor]) -> list[Tensor]:
        """Per-group tensors in `seen` order from `own` (the own groups' in order) and `others`."""
        mine = dict(zip(self.own, own))
        return [mine[g] if g in mine else others[g] for g in self.seen]

    def obs(self, batch: Transition, next_step: bool = False) -> list[Tensor]:
        """Every seen group's observations at s (or s'), in order."""
        obs = batch.next_obs if next_step else batch.obs
        return [obs[g] for g in self.seen]


class ActionParams(nn.Module):
    """Per-agent network of a group from o_i to the flat parameters of its action distribution:
    logits (Discrete) or (mean, log std) (Box)."""

    def __init__(self, spec: GroupSpec, hidden_dim: int, shared: bool):
        super().__init__()
        self.action_space = spec.action_space
        out = spec.action_space.n if isinstance(spec.action_space, Discrete) else 2 * spec.action_space.dim
        self.net = AgentMLP(spec.n_agents, spec.obs_dim, (hidden_dim, hidden_dim), out, shared)

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(obs)


def policies_with_targets(groups: dict[str, GroupSpec], make: Callable[[GroupSpec], nn.Module]
                          ) -> tuple[nn.ModuleDict, nn.ModuleDict]:
    """A policy module per group and a frozen target copy starting from the same weights."""
    policy = nn.ModuleDict({g: make(spec) for g, spec in groups.items()})
    target = nn.ModuleDict({g: make(spec) for g, spec in groups.items()})
    target.load_state_dict(policy.state_dict())
    target.requires_grad_(False)
    return policy, target


def td_target(batch: Transition, groups: Sequence[str], gamma: float, next_value: Tensor) -> Tensor:
    """r_i + gamma c_i next_value_i over the agents of `groups` in order ([B, N_total]; a batch
    also holds groups that other algorithms control), c_i = 0 where the episode terminated or
    agent i left it."""
    rewards = torch.cat([batch.reward[g] for g in groups], dim=1)
    continuing = torch.cat([batch.continuing(g).expand_as(batch.reward[g]) for g in groups], dim=1)
    return rewards + gamma * continuing * next_value


class CentralQ(nn.Module):
    """Per-agent centralised critics Q_i^j(x, a_1..a_N), j = 1..twins, of every controlled agent
    of `groups` (N_total rows, `joint_input` layout), and their target copies."""

    def __init__(self, groups: dict[str, GroupSpec], hidden: Sequence[int], shared: bool, twins: int = 1,
                 seen: dict[str, GroupSpec] | None = None):
        """`seen`: the groups the input holds (`CriticLayout.seen`; default `groups`), each of
        `groups`' agents having a critic."""
        super().__init__()
        n = sum(spec.n_agents for spec in groups.values())
        in_dim = self.input_dim = critic_width(seen or groups)
        self.q = nn.ModuleList(AgentMLP(n, in_dim, hidden, 1, shared) for _ in range(twins))
        self.target_q = nn.ModuleList(AgentMLP(n, in_dim, hidden, 1, shared) for _ in range(twins))
        self.target_q.load_state_dict(self.q.state_dict())
        self.target_q.requires_grad_(False)

    def values(self, inputs: Tensor, target: bool = False) -> list[Tensor]:
        """Every twin's values [B, N_total] on `joint_input` rows."""
        return [q(inputs).squeeze(-1) for q in (self.target_q if target else self.q)]

    def min_value(self, inputs: Tensor, target: bool = False) -> Tensor:
        """min_j Q_i^j(x, a): [B, N_total]."""
        return torch.stack(self.values(inputs, target)).amin(0)
