"""A scripted oracle for cooperative navigation (`coop_nav`, `coop_nav_nN`): a reference return
for learned policies at every N (`vimarl eval --policy oracle coop_nav_n15`).

    from vimarl.envs.particle.controllers import CoopNavOracle
    returns = evaluate(CoopNavOracle(env), env, seed=0)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from vimarl.envs.base import BatchedEnv, Box
from vimarl.envs.controllers import ScriptedPolicy, env_name
from vimarl.envs.particle.geometry import pairwise_distance
from vimarl.envs.particle.scenarios.coop_nav import CoopNav
from vimarl.envs.particle.world import ACTION_TO_FORCE
from vimarl.errors import VimarlError


def optimal_assignment(agents: Tensor, landmarks: Tensor) -> Tensor:
    """[B, N] index of the landmark given to each agent: the one-to-one assignment of agents
    [B, N, 2] to landmarks [B, N, 2] with the least total distance, in each batch element
    (Hungarian method, scipy's linear_sum_assignment, one call per batch element)."""
    from scipy.optimize import linear_sum_assignment  # scipy comes with rliable; only the oracle needs it

    cost = pairwise_distance(agents.double(), landmarks.double()).cpu().numpy()
    assignment = np.empty(cost.shape[:2], dtype=np.int64)
    for b, matrix in enumerate(cost):
        rows, cols = linear_sum_assignment(matrix)
        assignment[b, rows] = cols
    return torch.from_numpy(assignment).to(agents.device)


class CoopNavOracle(ScriptedPolicy):
    """Each agent drives to its own landmark, the landmarks dealt out by a minimum-total-distance
    assignment at the start of every episode.

    Privileged information: the oracle reads the global state (`TimeStep.state`, the `state`
    argument of `act`: every agent's and landmark's true position and every agent's velocity),
    not the agents' observations, which hold only the k + 1 nearest landmarks (k <= 5, in PIC's
    possibly buggy order) and so cannot see every landmark once N > 6. It also uses the env's
    physics constants (dt, damping, force per unit control), read when it is built.

    A new episode is recognised by its landmarks, which never move within one: wherever they
    differ from the last step's (and for every sub-environment in a new `evaluate` call, which
    enters `execution`), the agents are reassigned from their current positions. Steering tracks
    the desired velocity v* = (landmark - position) / `time_constant`, capped at the agents' top
    speed: the control u* that would reach v* in one step, u* = (v* - (1 - damping) v) / gain,
    is applied clipped to [-1, 1] per axis with continuous actions, and as the nearest of the
    five discrete forces (no-op, one axis each way) with discrete actions. Braking is built in:
    near the landmark v* is small, so a moving agent gets the opposing force, and within about
    `time_constant * gain / 2` of it, at rest, the no-op. Collisions are not avoided.

    The controller is the same for every reward variant (team, local, violation): it covers the
    landmarks; it does not read rewards.
    """

    def __init__(self, env: BatchedEnv, time_constant: float = 0.2):
        self.check(env, "oracle")
        super().__init__(env.groups)
        if time_constant <= 0:
            raise ValueError(f"time_constant must be positive, got {time_constant}")
        world, n = env.world, env.config.n_agents
        self.n_agents, self.time_constant = n, time_constant
        self.dt, self.damping = world.options.dt, world.options.damping
        self.continuous = isinstance(env.groups["agents"].action_space, Box)
        force = world.action_force(torch.ones(1, n, 2, device=world.device))[0, :, 0]
        gain = force / world.mass[:n] * self.dt  # velocity change per step from a unit control
        self.register_buffer("gain", gain.view(n, 1))
        self.register_buffer("top_speed", (gain / self.damping).view(n, 1))  # the speed at full force
        self.register_buffer("forces", torch.tensor(ACTION_TO_FORCE[env.action_convention], device=world.device))
        self.landmarks: Tensor | None = None
        """[B, N, 2] the landmarks the current assignment was made for."""
        self.targets: Tensor | None = None
        """[B, N, 2] each agent's landmark."""

    @classmethod
    def check(cls, env: BatchedEnv, name: str) -> None:
        if not isinstance(env, CoopNav):
            raise VimarlError(f"policy '{name}' steers cooperative navigation's agents to landmarks; env "
                              f"'{env_name(env)}' is not a coop_nav env (coop_nav, coop_nav_n6, coop_nav_n15, "
                              f"coop_nav_n30, ..., coop_nav_n1225)")

    @classmethod
    def for_env(cls, env: BatchedEnv, name: str) -> CoopNavOracle:
        cls.check(env, name)
        return cls(env)

    @contextmanager
    def execution(self, mode: str | None = None) -> Iterator[None]:
        self.landmarks = self.targets = None  # each evaluation starts with fresh assignments
        yield

    def assign(self, agents: Tensor, landmarks: Tensor) -> Tensor:
        """[B, N, 2] each agent's landmark, reassigned where the landmarks changed (a new episode)."""
        cached = self.landmarks
        if cached is None or cached.shape != landmarks.shape or cached.device != landmarks.device:
            self.landmarks, self.targets = landmarks.clone(), torch.empty_like(landmarks)
            due = torch.ones(landmarks.shape[0], dtype=torch.bool, device=landmarks.device)
        else:
            due = (landmarks != self.landmarks).flatten(1).any(-1)
        if bool(due.any()):  # one host sync per step; the assignment itself only at episode starts
            index = optimal_assignment(agents[due], landmarks[due])
            self.targets[due] = landmarks[due].gather(1, index.unsqueeze(-1).expand(-1, -1, 2))
            self.landmarks[due] = landmarks[due]
        return self.targets

    def controls(self, state: Tensor) -> Tensor:
        """Unit controls u* [B, N, 2] (unclipped) from the global state [B, 6N]."""
        n, batch = self.n_agents, state.shape[0]
        if state.shape[1] != 6 * n:
            raise VimarlError(f"the coop_nav oracle expects the global state of {n} agents ({6 * n} values), "
                              f"got {state.shape[1]}; evaluate it on the env it was built for")
        position = state[:, :4 * n].view(batch, 2 * n, 2)
        agents, landmarks = position[:, :n], position[:, n:]
        velocity = state[:, 4 * n:].view(batch, n, 2)
        desired = (self.assign(agents, landmarks) - agents) / self.time_constant
        speed = desired.norm(dim=-1, keepdim=True)
        desired = desired * (self.top_speed / speed.clamp_min(1e-9)).clamp(max=1.0)
        return (desired - (1 - self.damping) * velocity) / self.gain

    def act(self, obs, graph, *, explore, action_mask=None, state=None) -> dict[str, Tensor]:
        if state is None:
            raise VimarlError("the coop_nav oracle reads the global state: call act(..., state=step.state), "
                              "as vimarl.train.evaluate does")
        u = self.controls(state)
        if self.continuous:  # the 5-vector whose decoding (a @ forces) is u clipped to [-1, 1]^2
            push = (u.clamp(-1.0, 1.0) @ self.forces[1:].T).clamp_min(0.0)
            return {"agents": torch.cat([torch.zeros_like(push[..., :1]), push], dim=-1)}
        return {"agents": (u.unsqueeze(-2) - self.forces).square().sum(-1).argmin(-1)}
