"""Scripted signal controllers, usable wherever `vimarl.train.evaluate` takes an algorithm.

Both read only the agents' observations (layout in `TrafficSignalEnv._observe`), so they work on
any traffic env instance and batch size, like `vimarl.algos.base.UniformPolicy`; by name
(`vimarl eval --policy fixed_time ENV`) through `vimarl.envs.controllers.SCRIPTED_POLICIES`:

    from vimarl.envs.traffic import MaxPressurePolicy
    returns = evaluate(MaxPressurePolicy(env.groups), env, seed=0)
    env.average_travel_time()  # or the last step's info["average_travel_time"]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from vimarl.envs.base import BatchedEnv, GroupSpec
from vimarl.envs.controllers import ScriptedPolicy, env_name
from vimarl.envs.traffic.env import ELAPSED_SCALE, OBS_DIM
from vimarl.envs.traffic.network import N_PHASES, RIGHT, STANDARD_PHASES, turn_direction
from vimarl.errors import VimarlError

PHASE, YELLOW, ELAPSED, QUEUE, OUT = slice(0, 8), 8, 9, slice(10, 22), slice(34, 38)
"""Observation fields the controllers read."""


class _Scripted(ScriptedPolicy):
    """A signal controller: one phase per intersection from its own observation."""

    @classmethod
    def check(cls, env: BatchedEnv, name: str) -> None:
        """Both controllers read the traffic observation layout and choose among its phases."""
        spec = env.groups.get("agents")
        if (len(env.groups) != 1 or spec is None or spec.obs_dim != OBS_DIM
                or getattr(spec.action_space, "n", None) != N_PHASES):
            raise VimarlError(f"policy '{name}' controls traffic signals; env '{env_name(env)}' is not a traffic env "
                              "(traffic_grid_NxN, traffic_cityflow, traffic_<city>, sumo_grid_NxN, sumo_<city>, "
                              "sumo_net)")

    def act(self, obs, graph, *, explore, action_mask=None, state=None) -> dict[str, Tensor]:
        return {g: self.choose(obs[g]) for g in self.groups}

    def choose(self, obs: Tensor) -> Tensor:
        raise NotImplementedError


class FixedTimePolicy(_Scripted):
    """Cycle through `phases` (action indices; default the four CoLight phases E-W through, N-S
    through, E-W left, N-S left), moving to the next one once the current phase has been held for
    `green_seconds` (the transition seconds included). The hold time is checked at decisions, so
    it is rounded up to whole decisions."""

    def __init__(self, groups: dict[str, GroupSpec], green_seconds: float = 30.0,
                 phases: Sequence[int] = (0, 1, 2, 3)):
        super().__init__(groups)
        if not phases or any(not 0 <= p < N_PHASES for p in phases):
            raise ValueError(f"phases must be action indices in 0..{N_PHASES - 1}, got {phases}")
        self.green_seconds = green_seconds
        following = torch.full((N_PHASES,), phases[0], dtype=torch.int64)
        for k, p in enumerate(phases):
            following[p] = phases[(k + 1) % len(phases)]
        self.register_buffer("following", following)
        self.register_buffer("in_cycle", torch.isin(torch.arange(N_PHASES), torch.tensor(list(phases))))

    def choose(self, obs: Tensor) -> Tensor:
        current = obs[..., PHASE].argmax(-1)
        held = torch.round(obs[..., ELAPSED] * ELAPSED_SCALE)
        due = (held >= self.green_seconds) | ~self.in_cycle.to(obs.device)[current]
        return torch.where(due, self.following.to(obs.device)[current], current)


class MaxPressurePolicy(_Scripted):
    """Max-pressure (Varaiya 2013): the phase maximising the sum over its green movements of
    (vehicles queued on the movement's lane - vehicles on the road it leads to). Right turns are
    green in every phase, so they are left out (they add the same to every phase). Uses the
    standard 8-phase table and grid turning geometry. An intersection keeps its phase until it
    has been held `min_green_seconds`; ties go to the lower phase index."""

    def __init__(self, groups: dict[str, GroupSpec], min_green_seconds: float = 0.0):
        super().__init__(groups)
        self.min_green_seconds = min_green_seconds
        upstream = torch.zeros(N_PHASES, 12)
        downstream = torch.zeros(N_PHASES, 4)
        for a in range(N_PHASES):
            for h in range(4):
                for m in range(3):
                    if m != RIGHT and STANDARD_PHASES[a + 1, h, m]:
                        upstream[a, 3 * h + m] += 1
                        downstream[a, turn_direction(h, m)] += 1
        self.register_buffer("upstream", upstream)
        self.register_buffer("downstream", downstream)

    def pressure(self, obs: Tensor) -> Tensor:
        """[..., 8] pressure of each phase (in observation units: counts x obs_scale)."""
        return obs[..., QUEUE] @ self.upstream.to(obs.device).T - obs[..., OUT] @ self.downstream.to(obs.device).T

    def choose(self, obs: Tensor) -> Tensor:
        best = self.pressure(obs).argmax(-1)
        if self.min_green_seconds <= 0:
            return best
        current = obs[..., PHASE].argmax(-1)
        held = torch.round(obs[..., ELAPSED] * ELAPSED_SCALE)
        return torch.where(held >= self.min_green_seconds, best, current)

