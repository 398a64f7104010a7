"""VM3-AC's cooperative navigation (002 App. F): `spread` with a bigger collision penalty, a bonus
when every landmark is occupied, 50-step episodes and two-dimensional force actions.

What the paper fixes: N agents and L = N landmarks (N = 3); every agent receives the shared reward
R1 = -sum_l min_a |p_a - l|, each agent in a collision receives -R2 = -10, and all agents receive
R3 = 1 when every landmark is occupied; observations hold the other agents' and the landmarks'
locations; actions are two-dimensional physical actions; T = 50. So agent i's reward is

    r_i = -sum_l min_a |p_a - l| - R2 #{a != i : |p_a - p_i| < 0.3} + R3 1[all landmarks occupied].

What it leaves open, chosen here: "occupied" means an agent touches the landmark (|p_a - l| below
the sum of their sizes, 0.15 + 0.05, MPE's `is_collision`); one collision penalty per other agent
touched, as mpe2 counts them; the rest (sizes, physics, observation layout, starts in [-1, 1]^2)
is `spread`'s, with the unit-force actions and MPE integration of the other VM3-AC particle tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vimarl.envs.particle.base import AgentGroup
from vimarl.envs.particle.geometry import pairwise_distance
from vimarl.envs.particle.maac import movement_space
from vimarl.envs.particle.scenarios.spread import AGENT_SIZE, Spread, SpreadConfig

LANDMARK_SIZE = 0.05


@dataclass
class SpreadVM3ACConfig(SpreadConfig):
    action_mode: Literal["discrete", "continuous"] = "continuous"
    """continuous: the unit force, a 2-vector in [-1, 1]^2 (the paper's 2-D physical action);
    discrete: 5 actions (no-op, +x, -x, +y, -y)."""
    episode_length: int = 50
    """T = 50 (002 App. F)."""
    integration: Literal["mpe2", "mpe"] = "mpe"
    """Original MPE update order (VM3-AC builds on Lowe et al.'s MPE)."""
    collision_penalty: float = 10.0
    """R2: subtracted from an agent's reward for each other agent it touches."""
    occupied_bonus: float = 1.0
    """R3: added to every agent's reward at a step where all landmarks are occupied."""


class SpreadVM3AC(Spread):
    Config = SpreadVM3ACConfig
    action_convention = "mpe"

    def make_groups(self) -> list[AgentGroup]:
        (group,) = super().make_groups()
        return [AgentGroup(group.name, group.start, group.stop, group.obs_dim,
                           action_space=movement_space(self.config))]

    def rewards(self) -> dict[str, Tensor]:
        config, position = self.config, self.world.position
        n = config.n_agents
        agents, landmarks = position[:, :n], position[:, n:]
        to_nearest_agent = pairwise_distance(landmarks, agents).min(-1).values  # [B, L]
        coverage = -to_nearest_agent.sum(-1, keepdim=True)
        occupied = (to_nearest_agent < AGENT_SIZE + LANDMARK_SIZE).all(-1, keepdim=True).float()
        colliding = pairwise_distance(agents, agents) < 2 * AGENT_SIZE
        colliding &= ~torch.eye(n, dtype=torch.bool, device=self.device)
        collisions = colliding.sum(-1).float()  # [B, N]
        return {"agents": coverage - config.collision_penalty * collisions + config.occupied_bonus * occupied}
