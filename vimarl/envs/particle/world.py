"""MPE physics batched over environments and entities: positions and velocities are [B, E, 2].

Entities are agents first, then the other entities (landmarks, balls), as in MPE's
`world.entities`. One step (ENV_SPECS §0): action forces, pairwise soft contact forces,
damping, integration and a speed cap. Where the references differ, a named option picks
the behaviour of the reference a scenario comes from:

- `integration`: "mpe2" moves the position with the old velocity first and then updates the
  velocity (mpe2 `World.integrate_state`); "mpe" damps and accelerates first and then moves
  with the new velocity (original MPE, PIC, MAAC).
- `contact_radius`: "pairwise" uses size_a + size_b (MPE, mpe2, MAAC); "first_agent" uses
  2 * size of agent 0 for every pair (PIC's vectorised core, a quirk that matters for
  heterogeneous sizes, balls and obstacles).
- `mass_weighted_contact`: MAAC's fork scales the force on a by m_b / m_a when both move.
- `action_force`: "sensitivity" applies u * sensitivity (MPE); "maac" applies
  mass * accel * u * sensitivity (MAAC's fork, so the net acceleration is accel^2 * u).

Contact is computed only among colliding entities: over every pair for up to
`dense_contact_limit` of them, and through a cell list above that (see `contact_forces`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vimarl.envs.spatial import cell_candidates

# Maps a 5-way action (no-op, then two signed pairs) to (u_x, u_y).
ACTION_TO_FORCE = {
    # mpe2: action 1 -> -x, 2 -> +x, 3 -> -y, 4 -> +y; continuous u = (a2 - a1, a4 - a3).
    "mpe2": ((0.0, 0.0), (-1.0, 0.0), (1.0, 0.0), (0.0, -1.0), (0.0, 1.0)),
    # original MPE: u = (a1 - a2, a3 - a4).
    "mpe": ((0.0, 0.0), (1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0)),
}


@dataclass(frozen=True)
class PhysicsOptions:
    """The reference-dependent choices of one world (see the module docstring)."""

    integration: Literal["mpe2", "mpe"] = "mpe2"
    contact_radius: Literal["pairwise", "first_agent"] = "pairwise"
    mass_weighted_contact: bool = False
    action_force: Literal["sensitivity", "maac"] = "sensitivity"
    dt: float = 0.1
    damping: float = 0.25
    contact_force: float = 100.0
    contact_margin: float = 1e-3
    dense_contact_limit: int = 64


class World:
    """Physical state and constants of B worlds with the same E entities."""

    def __init__(self, num_envs: int, size: list[float], movable: list[bool], collide: list[bool],
                 n_agents: int, mass: list[float] | None = None, accel: list[float | None] | None = None,
                 max_speed: list[float | None] | None = None, options: PhysicsOptions = PhysicsOptions(),
                 device: str | torch.device = "cpu"):
        n_entities = len(size)
        self.options, self.n_agents, self.device = options, n_agents, torch.device(device)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.float32, device=self.device)
        self.size = as_tensor(size)
        self.mass = as_tensor(mass or [1.0] * n_entities)
        self.movable = torch.tensor(movable, dtype=torch.bool, device=self.device)
        accel = accel or [None] * n_agents
        self.accel = as_tensor([1.0 if a is None else a for a in accel])
        self.sensitivity = as_tensor([5.0 if a is None else a for a in accel])  # MPE's default 5
        max_speed = max_speed or [None] * n_entities
        self.max_speed = as_tensor([float("inf") if s is None else s for s in max_speed])
        self.position = torch.zeros(num_envs, n_entities, 2, device=self.device)
        self.velocity = torch.zeros(num_envs, n_entities, 2, device=self.device)

        # Contact is only computed among colliders (C of them).
        self.colliders = torch.tensor([i for i, c in enumerate(collide) if c], dtype=torch.long,
                                      device=self.device)
        self.first_agent_size = size[0]
        everyone = torch.arange(len(self.colliders), device=self.device)
        self.contact_distance, self.contact_weight = self._pair_constants(everyone.unsqueeze(1), everyone)
        # Beyond this distance the soft penetration is below 1e-3 * e^-40: no force in float32.
        self.contact_cutoff = float(self.contact_distance.max()) + 40 * options.contact_margin if len(
            self.colliders) else 0.0

    def _pair_constants(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Contact distance and force weight of collider pairs (a, b) (broadcast index tensors).

        The weight of the force on a from b is zero when a cannot move or a is b, the mass
        ratio m_b / m_a with MAAC's mass weighting when both move, and one otherwise.
        """
        size, mass = self.size[self.colliders], self.mass[self.colliders]
        movable = self.movable[self.colliders]
        if self.options.contact_radius == "first_agent":
            distance = torch.full(torch.broadcast_shapes(a.shape, b.shape), 2 * self.first_agent_size,
                                  device=self.device)
        else:
            distance = size[a] + size[b]
        weight = movable[a].float().expand(distance.shape)
        if self.options.mass_weighted_contact:
            weight = torch.where(movable[a] & movable[b], mass[b] / mass[a], weight)
        return distance, torch.where(a == b, 0.0, weight)

    # -- forces ----------------------------------------------------------------------------------
    def action_force(self, u: Tensor, noise: Tensor | None = None) -> Tensor:
        """Force [B, A, 2] on the agents from unit controls u [B, A, 2] (MPE `_set_action`)."""
        force = u * self.sensitivity.view(1, -1, 1)
        if self.options.action_force == "maac":
            force = force * (self.mass[: self.n_agents] * self.accel).view(1, -1, 1)
        return force if noise is None else force + noise

    def contact_forces(self) -> Tensor:
        """Soft contact force [B, C, 2] on each collider (ENV_SPECS §0.1 step 3).

        Up to `dense_contact_limit` colliders every pair is computed; above it a cell list
        restricts each collider to the others within `contact_cutoff`, O(C) instead of O(C^2),
        with the same result to float32 precision.
        """
        positions = self.position[:, self.colliders]
        if positions.shape[1] <= self.options.dense_contact_limit:
            delta = positions.unsqueeze(2) - positions.unsqueeze(1)  # [B, C, C, 2]
            return self._pair_forces(delta, self.contact_distance, self.contact_weight)
        candidates, valid = cell_candidates(positions, positions, self.contact_cutoff)
        batch, n, _ = candidates.shape
        offsets = torch.arange(0, batch * n, n, device=self.device).view(batch, 1, 1)
        delta = positions.unsqueeze(2) - positions.reshape(batch * n, 2)[candidates + offsets]
        own = torch.arange(n, device=self.device).view(1, n, 1)
        distance, weight = self._pair_constants(own, candidates)
        return self._pair_forces(delta, distance, weight * valid)

    def _pair_forces(self, delta: Tensor, contact_distance: Tensor, weight: Tensor) -> Tensor:
        """sum_b weight_ab * contact_force * delta_ab / |delta_ab| * softplus penetration."""
        options = self.options
        distance = delta.square().sum(-1).sqrt()
        margin = options.contact_margin
        penetration = margin * F.softplus(-(distance - contact_distance) / margin)
        # where(...) keeps a zero distance (an entity and itself) from producing NaN.
        scale = torch.where(distance > 0, penetration / distance.clamp_min(1e-30), 0.0)
        return (delta * (options.contact_force * scale * weight).unsqueeze(-1)).sum(2)

    # -- one step --------------------------------------------------------------------------------
    def step(self, agent_force: Tensor) -> None:
        """Advance every world by dt given the agents' action forces [B, A, 2]."""
        options = self.options
        force = torch.zeros_like(self.position)
        force[:, : self.n_agents] = agent_force
        if len(self.colliders):
            force[:, self.colliders] += self.contact_forces()
        movable = self.movable.view(1, -1, 1)
        acceleration = force / self.mass.view(1, -1, 1)
        velocity = self.velocity
        if options.integration == "mpe2":
            self.position = torch.where(movable, self.position + velocity * options.dt, self.position)
        velocity = velocity * (1 - options.damping) + acceleration * options.dt
        speed = velocity.square().sum(-1, keepdim=True).sqrt()
        limit = self.max_speed.view(1, -1, 1)
        velocity = torch.where(speed > limit, velocity / speed * limit, velocity)
        self.velocity = torch.where(movable, velocity, self.velocity)
        if options.integration == "mpe":
            self.position = torch.where(movable, self.position + self.velocity * options.dt, self.position)


def decode_actions(action: Tensor, convention: Literal["mpe2", "mpe"] = "mpe2") -> Tensor:
    """Unit controls u [..., 2] from 5-way actions: indices [...] (int) or vectors [..., 5]
    (one-hot, soft or continuous in [0, 1]); 2-vectors [..., 2] pass through unchanged."""
    table = torch.tensor(ACTION_TO_FORCE[convention], dtype=torch.float32, device=action.device)
    if not action.is_floating_point():
        return table[action]
    if action.shape[-1] == 2:
        return action
    return action @ table

