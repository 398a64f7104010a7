"""Mixed teams: a different algorithm, or a frozen trained policy, for each agent group.

MA-SAC's Fig. 2 (paper 003) trains the cooperators of `adversary` and `tag` with one algorithm
and their opponents with another. `team` composes registered algorithms: each learned group of
the environment is assigned to a member algorithm (which may control several groups if it
supports heterogeneous groups), or to a frozen policy loaded from a trained run that acts but
never updates. Scripted groups (role "scripted" in the environment) are played by the
environment itself and need no entry.

    vimarl train team tag algo.members="{predators: masac, prey: maddpg}"
    vimarl train team tag algo.members="{predators: vpp}" algo.frozen="{prey: runs/prey-run}"
    vimarl train team tag algo.members="{predators: vpp, prey: isac}" algo.configs="{vpp: {lr: 0.001}}"

Groups that neither `members` nor `frozen` list go to `default` (vpp). Every member sees the
whole replay batch and reads its own groups; its update is its own (separate optimisers,
targets and metrics, logged as `<algorithm>/<metric>`). Checkpoints hold every member, frozen
ones included; the runs named in `frozen` must still exist when a team run is resumed or
evaluated, because building the team loads them (their saved copies are then restored over them).

Structure-matched critics. Paper 003 defines agent i's critic Q_i(s, a) over ALL agents, as MADDPG
does; a team must not shrink it to the member's own groups, or {predators: masac, prey: maddpg}
would compare predators whose critics see only the predators with {predators: maddpg, prey:
maddpg}, one MADDPG whose critics see all four agents. So every member whose algorithm has
centralised critics (`Capabilities.team_critic`: masac, maddpg, maddpg_s) gets a `TeamView`: its
critics read every group's observations and actions, opponents included, in the environment's
group order, and the two arms differ only in the algorithm of the team under test. The member
learns only for its own agents (critic rows, rewards, actors); the other groups' actions are
  - in Q(x, a): the replayed ones, as the acting member stored them (`replay_fields`, e.g. a
    maddpg member's soft samples, `nn.centralized.replayed_critic_inputs`);
  - in the target look-ahead a': what the other member's own look-ahead uses for its agents (its
    target policy, or the current one where that algorithm does so), and
  - in an actor loss: as the member's algorithm treats non-own agents (MADDPG: the replayed
    actions; MA-SAC Eq. 9: samples of their current policies),
both asked of the member that plays them through `Team.others_actions` (`Algorithm.critic_actions`;
a frozen policy or an algorithm without centralised critics answers with its exploring `act`).
PIC's graph critic reads nodes of one size, so it keeps to its own group. The extra replay fields
of all learners are stored, each for its own groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from vimarl.algos.base import Algorithm, Capabilities, get_algorithm, register
from vimarl.buffer import ExtraFields, Transition
from vimarl.envs.base import GroupSpec
from vimarl.errors import VimarlError, did_you_mean
from vimarl.fields import config_for
from vimarl.nn.centralized import TeamView


@dataclass
class TeamConfig:
    members: dict[str, str] = field(default_factory=dict)
    """Group -> the registered algorithm that learns it, e.g. {predators: masac, prey: maddpg}."""
    default: str = "vpp"
    """Algorithm for the learned groups that neither members nor frozen list ('' = none: list them all)."""
    frozen: dict[str, str] = field(default_factory=dict)
    """Group -> a run directory or checkpoint whose trained policy plays the group without learning."""
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Algorithm -> its hyperparameter overrides, e.g. {masac: {lr: 0.001}}."""


@register("team", "Mixed teams (003 Fig. 2): a registered algorithm or a frozen trained policy per group",
          Capabilities(discrete=True, continuous=True, needs_graph=False, heterogeneous=True))
class Team(Algorithm):
    Config = TeamConfig

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: TeamConfig, device="cpu"):
        super().__init__(groups, state_dim, config, device)
        members = {g: config.members.get(g, config.default) for g in groups
                   if g not in config.frozen and (g in config.members or config.default)}
        self.check_assignment(groups, config, members)
        by_algorithm: dict[str, dict[str, GroupSpec]] = {}
        for group, name in members.items():
            by_algorithm.setdefault(name, {})[group] = groups[group]
        self.learners = nn.ModuleDict()
        for name, member_groups in by_algorithm.items():
            cls = get_algorithm(name)
            cls.check_env(f"team member for {sorted(member_groups)}", member_groups, state_dim)
            member_config = config_for(cls, None, config.configs.get(name, {}), f"algo.configs.{name}", name)
            # 003's Q_i(s, a) over all agents: critics read every group, in the env's order.
            view = {"team": self.team_view(name)} if cls.capabilities.team_critic else {}
            self.learners[name] = cls(member_groups, state_dim, member_config, device=device, **view)
        self.frozen_members = nn.ModuleDict({group: self.load_frozen(group, path, groups[group])
                                             for group, path in config.frozen.items()})

    @staticmethod
    def check_assignment(groups: dict[str, GroupSpec], config: TeamConfig, members: dict[str, str]) -> None:
        assigned = list(config.members) + list(config.frozen)
        for group in assigned:
            if group not in groups:
                raise VimarlError(f"team assigns group '{group}', which is not a learned group of the env"
                                  f"{did_you_mean(group, groups)}; its learned groups: {', '.join(groups)}")
        twice = set(config.members) & set(config.frozen)
        if twice:
            raise VimarlError(f"team assigns {sorted(twice)} both to an algorithm and to a frozen policy; pick one")
        missing = [g for g in groups if g not in members and g not in config.frozen]
        if missing:
            raise VimarlError(f"team leaves groups {missing} without a policy; add them to algo.members "
                              f"(e.g. algo.members=\"{{{missing[0]}: vpp}}\") or algo.frozen")
        unused = set(config.configs) - set(members.values())
        if unused:
            raise VimarlError(f"algo.configs names {sorted(unused)}, which no member uses; "
                              f"members use {sorted(set(members.values()))}")

    def load_frozen(self, group: str, path: str, spec: GroupSpec) -> Algorithm:
        from vimarl.checkpoint import load_trained  # it imports the algorithms, this one among them

        run, algo, _ = load_trained(path, str(self.device))
        if group not in algo.groups:
            raise VimarlError(f"frozen policy {path} ({run.algo} on {run.env}) does not control group "
                              f"'{group}'; it controls {sorted(algo.groups)}")
        trained = algo.groups[group]
        if (trained.obs_dim, trained.n_agents, trained.action_space) != (spec.obs_dim, spec.n_agents, spec.action_space):
            raise VimarlError(f"frozen policy {path} was trained on group '{group}' with {trained.n_agents} agents, "
                              f"obs {trained.obs_dim}, {trained.action_space}; this env's group has "
                              f"{spec.n_agents}, obs {spec.obs_dim}, {spec.action_space}")
        return algo.requires_grad_(False).eval()

    def team_view(self, name: str) -> TeamView:
        """Every group for learner `name`'s critics, and the others' actions asked of their members."""
        return TeamView(self.groups, lambda batch, lookahead: self.others_actions(name, batch, lookahead))

    def others_actions(self, name: str, batch: Transition, lookahead: bool) -> dict[str, Tensor]:
        """The actions of the groups that learner `name` does not play, as critic inputs, each from
        the member that plays it (`Algorithm.critic_actions`)."""
        asking = self.learners[name]
        actions: dict[str, Tensor] = {}
        for algo, groups in self.members():
            if algo is not asking:
                given = algo.critic_actions(batch, lookahead)
                actions.update({g: given[g] for g in groups})
        return actions

    def critic_input_dims(self) -> dict[str, int]:
        """Width of each centralised-critic learner's critic input, by algorithm name."""
        return {name: algo.critic_input_dim for name, algo in self.learners.items()
                if hasattr(algo, "critic_input_dim")}

    @property
    def reads_state(self) -> bool:
        return any(algo.reads_state for algo in self.learners.values())

    def replay_fields(self) -> ExtraFields:
        fields: ExtraFields = {}
        for algo in self.learners.values():
            for key, by_group in algo.replay_fields().items():
                fields.setdefault(key, {}).update(by_group)
        return fields

    def replay_values(self, actions: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        values: dict[str, dict[str, Tensor]] = {}
        for algo in self.learners.values():
            for key, by_group in algo.replay_values({g: actions[g] for g in algo.groups}).items():
                values.setdefault(key, {}).update(by_group)
        return values

    def members(self) -> list[tuple[Algorithm, list[str]]]:
        """(algorithm, the groups whose actions it gives) for learners and frozen policies."""
        learners = [(algo, list(algo.groups)) for algo in self.learners.values()]
        return learners + [(algo, [group]) for group, algo in self.frozen_members.items()]

    def act(self, obs, graph, *, explore, action_mask=None, state=None):
        actions: dict[str, Tensor] = {}
        for algo, groups in self.members():
            # A frozen policy may have been trained on more groups: it reads all it knows, gives its own.
            sees = list(algo.groups)
            chosen = algo.act({g: obs[g] for g in sees}, {g: graph[g] for g in sees}, explore=explore,
                              action_mask={g: (action_mask or {}).get(g) for g in sees}, state=state)
            actions.update({g: chosen[g] for g in groups})
        return actions

    def update(self, batch: Transition) -> dict[str, Tensor]:
        metrics = {}
        for name, algo in self.learners.items():
            metrics.update({f"{name}/{key}": value for key, value in algo.update(batch).items()})
        return metrics

    def train(self, mode: bool = True) -> "Team":
        super().train(mode)
        self.frozen_members.eval()  # frozen policies keep their evaluation behaviour
        return self
