"""VM3-AC's continuous predator-prey (002 App. F; ENV_SPECS §6): N predators, M static prey on a
square lattice; a prey is captured when at least C predators are within the capture radius of
it at the same step.

What the paper fixes: predators start at random positions, the prey on a square lattice; the
team reward is R1 = 10 per captured prey, shared by every predator; a captured prey is removed,
and once all of them are captured they respawn at the same positions "and [we] increase the
value of R1"; T = 100; every agent observes the whole state; actions are 2-D physical actions.
Presets (N, M, C): (2, 16, 1), (3, 16, 1), (4, 16, 2).

What it leaves open, chosen here (config fields where a value matters):
- Physics: original MPE (VM3-AC builds on Lowe et al.'s MPE), with the predators of
  `simple_tag` (size 0.075, accel 3.0, max speed 1.0, colliding with each other). The prey do not
  move and do not collide. There are no walls.
- `capture_radius` 0.125: a predator "catches" a prey when they touch, |p - q| < 0.075 + 0.05
  (predator plus prey size, MPE's `is_collision` in simple_tag).
- `lattice_spacing` 0.5: the 4 x 4 lattice spans [-0.75, 0.75]^2, inside the predators' start box.
- `reward_increase` 10: the value of a capture grows by this much each time the prey respawn,
  R1 = capture_reward + reward_increase * rounds_cleared.
- `start_half_width` 1: predators start uniformly in [-w, w]^2. Section 5 (Fig. 5) starts them
  "at the center of the map": a small w (e.g. 0.1) reproduces that.
- A predator counts towards every prey within its radius, so one step may capture several.
  No per-step penalty or shaping.

Observation of predator i ("all information of the environment state"):
[v_i, p_i, other predators - p_i, other predators' v, prey - p_i, prey alive flags,
rounds cleared], 4 + 4(N - 1) + 3M + 1 values (56 + 1 = 57 for N = 2, M = 16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vimarl.envs.particle.base import AgentGroup, ParticleEnv
from vimarl.envs.particle.geometry import pairwise_distance, without_self
from vimarl.envs.particle.maac import ForceControlConfig, movement_space
from vimarl.envs.particle.world import PhysicsOptions, World

PREDATOR_SIZE, PREDATOR_ACCEL, PREDATOR_MAX_SPEED = 0.075, 3.0, 1.0  # simple_tag's adversaries
PREY_SIZE = 0.05  # simple_tag's good agent; only drawn, the capture radius is a config field


@dataclass
class PPCaptureConfig(ForceControlConfig):
    action_mode: Literal["discrete", "continuous"] = "continuous"
    """continuous: the unit force, a 2-vector in [-1, 1]^2 (the paper's 2-D physical action);
    discrete: 5 actions (no-op, +x, -x, +y, -y)."""
    episode_length: int = 100
    """Steps per episode (T = 100 in the paper)."""
    n_predators: int = 2
    """Predators N, the learned agents."""
    n_prey: int = 16
    """Prey M, placed on a sqrt(M) x sqrt(M) lattice (so M must be a perfect square)."""
    capture_threshold: int = 1
    """C: predators that must be within capture_radius of a prey at the same step to capture it."""
    capture_reward: float = 10.0
    """R1, the team reward per capture in the first round."""
    reward_increase: float = 10.0
    """Added to R1 each time all prey are captured and respawn (the paper: 'increase R1')."""
    capture_radius: float = 0.125
    """Predator-prey distance below which a predator catches a prey (touching in simple_tag)."""
    lattice_spacing: float = 0.5
    """Distance between neighbouring prey on the lattice, centred on the origin."""
    start_half_width: float = 1.0
    """Predators start uniformly in [-w, w]^2; small values start them at the centre (002 Fig. 5)."""

    def __post_init__(self):
        if self.n_predators < 1:
            raise ValueError(f"n_predators must be at least 1, got {self.n_predators}")
        if self.n_prey < 1 or math.isqrt(self.n_prey) ** 2 != self.n_prey:
            raise ValueError(f"n_prey must be a positive perfect square (a square lattice), got {self.n_prey}")
        if not 1 <= self.capture_threshold <= self.n_predators:
            raise ValueError(f"capture_threshold must be in [1, n_predators={self.n_predators}], "
                             f"got {self.capture_threshold}")
        for name in ("capture_radius", "lattice_spacing", "start_half_width"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.reward_increase < 0:
            raise ValueError(f"reward_increase must be non-negative, got {self.reward_increase}")


class PPCapture(ParticleEnv):
    Config = PPCaptureConfig
    action_convention = "mpe"
    state_fields = (*ParticleEnv.state_fields, "prey_alive", "rounds_cleared")

    def __init__(self, config: PPCaptureConfig, num_envs: int, seed: int = 0, device="cpu"):
        super().__init__(config, num_envs, seed, device)
        self.prey_alive = torch.ones(num_envs, config.n_prey, dtype=torch.bool, device=self.device)
        self.rounds_cleared = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self.state_dim += config.n_prey + 1

    def make_world(self) -> World:
        n, m = self.config.n_predators, self.config.n_prey
        return World(self.num_envs, size=[PREDATOR_SIZE] * n + [PREY_SIZE] * m,
                     movable=[True] * n + [False] * m, collide=[True] * n + [False] * m, n_agents=n,
                     accel=[PREDATOR_ACCEL] * n, max_speed=[PREDATOR_MAX_SPEED] * n + [None] * m,
                     options=PhysicsOptions(integration=self.config.integration), device=self.device)

    def make_groups(self) -> list[AgentGroup]:
        n, m = self.config.n_predators, self.config.n_prey
        return [AgentGroup("predators", 0, n, obs_dim=4 + 4 * (n - 1) + 3 * m + 1,
                           action_space=movement_space(self.config))]

    def lattice(self) -> Tensor:
        """[M, 2] prey positions, x-major: (x_0, y_0), (x_0, y_1), ..."""
        side = math.isqrt(self.config.n_prey)
        axis = (torch.arange(side, device=self.device) - (side - 1) / 2) * self.config.lattice_spacing
        return torch.cartesian_prod(axis, axis)

    def reset_entities(self, env_ids: Tensor, episode_ids: Tensor) -> Tensor:
        w = self.config.start_half_width
        predators = self.uniform(env_ids, episode_ids, (self.config.n_predators, 2), -w, w)
        return torch.cat([predators, self.lattice().expand(len(env_ids), -1, -1)], dim=1)

    def _reset_envs(self, env_mask: Tensor) -> None:
        super()._reset_envs(env_mask)
        self.prey_alive[env_mask] = True
        self.rounds_cleared[env_mask] = 0

    def captured(self) -> Tensor:
        """[B, M] alive prey with at least C predators within the capture radius now."""
        n = self.config.n_predators
        position = self.world.position
        near = pairwise_distance(position[:, n:], position[:, :n]) < self.config.capture_radius  # [B, M, N]
        return self.prey_alive & (near.sum(-1) >= self.config.capture_threshold)

    def rewards(self) -> dict[str, Tensor]:
        config = self.config
        value = config.capture_reward + config.reward_increase * self.rounds_cleared.float()  # R1 this round
        team = value * self.captured().sum(-1).float()
        return {"predators": team.unsqueeze(1).expand(-1, config.n_predators).clone()}

    def _step(self, actions: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        rewards, terminated = super()._step(actions)
        # Captured prey leave after being counted; when none is left, all respawn for a new round.
        self.prey_alive = self.prey_alive & ~self.captured()
        cleared = ~self.prey_alive.any(-1)
        self.prey_alive = self.prey_alive | cleared.unsqueeze(1)
        self.rounds_cleared = self.rounds_cleared + cleared.long()
        return rewards, terminated

    def observations(self) -> dict[str, Tensor]:
        n, world = self.config.n_predators, self.world
        own, velocity = world.position[:, :n], world.velocity[:, :n]
        to_others = without_self(own.unsqueeze(1) - own.unsqueeze(2))  # [B, N, N - 1, 2]
        others_velocity = without_self(velocity.unsqueeze(1).expand(-1, n, -1, -1))
        to_prey = world.position[:, n:].unsqueeze(1) - own.unsqueeze(2)  # [B, N, M, 2]
        shared = torch.cat([self.prey_alive.float(), self.rounds_cleared.float().unsqueeze(1)], -1)
        obs = torch.cat([velocity, own, to_others.flatten(2), others_velocity.flatten(2), to_prey.flatten(2),
                         shared.unsqueeze(1).expand(-1, n, -1)], -1)
        return {"predators": obs}

    def global_state(self) -> Tensor:
        return torch.cat([super().global_state(), self.prey_alive.float(),
                          self.rounds_cleared.float().unsqueeze(1)], -1)
