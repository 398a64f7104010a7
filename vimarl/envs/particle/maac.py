"""Conventions shared by the scenarios of MAAC's code base and of the papers that train on them:
VM3-AC's predator-prey and treasure collection, MAAC's rover-tower, MAMT's Spread-3.

- Physics: Iqbal's MPE fork (ENV_SPECS §0.3), which MAAC and MAMT run on: the action force is
  mass * accel * u on top of MPE's sensitivity (so the net acceleration is accel^2 * u), contact
  forces between two movable entities are weighted by their mass ratio, and the velocity is
  damped and accelerated before the position moves ("mpe" integration).
- Actions: discrete is MPE's 5-way movement decoded in the original layout, u = (a1 - a2,
  a3 - a4), what MAAC trains with. Continuous is the unit force u itself, a 2-vector in
  [-1, 1]^2: VM3-AC's "two-dimensional physical action" (002 App. F). It spans the same forces
  as MPE's soft 5-vectors, since a1 - a2 and a3 - a4 lie in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


from vimarl.envs.base import Box, Discrete
from vimarl.envs.particle.base import ParticleConfig
from vimarl.envs.particle.world import PhysicsOptions

FORCE_ACTIONS = Box(-1.0, 1.0, 2)
"""The continuous action: the unit force (u_x, u_y), passed through by `decode_actions`."""


@dataclass
class ForceControlConfig(ParticleConfig):
    """ParticleConfig with this module's action and integration conventions."""

    action_mode: Literal["discrete", "continuous"] = "discrete"
    """discrete: 5 actions (no-op, +x, -x, +y, -y) as MAAC; continuous: the unit force, a 2-vector
    in [-1, 1]^2 (VM3-AC's two-dimensional physical action)."""
    integration: Literal["mpe2", "mpe"] = "mpe"
    """Order of the position and velocity updates: the original MPE's (its forks use it) or mpe2's."""


def movement_space(config: ForceControlConfig) -> Discrete | Box:
    """The action space of a moving group under `config.action_mode`."""
    return Discrete(5) if config.action_mode == "discrete" else FORCE_ACTIONS


def maac_physics(integration: Literal["mpe2", "mpe"]) -> PhysicsOptions:
    """The world options of Iqbal's MPE fork."""
    return PhysicsOptions(integration=integration, mass_weighted_contact=True, action_force="maac")
