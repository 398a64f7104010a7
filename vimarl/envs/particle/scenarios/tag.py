"""Predator-prey, as mpe2 `simple_tag_v3` (MPE `simple_tag`, ENV_SPECS §2.2), default settings.

The world holds the predators (mpe2's adversaries: size 0.075, accel 3, max speed 1.0) first,
then the prey (mpe2's good agents: size 0.05, accel 4, max speed 1.3), then the obstacles
(size 0.2, immovable). Everything collides. Reset: agents U[-1, 1]^2, obstacles U[-0.9, 0.9]^2.

Rewards (mpe2's `shape=False`; caught(g, a) = |p_g - p_a| < size_g + size_a = 0.125):
- every predator: r = 10 * #{(prey g, predator a) : caught(g, a)}, over all pairs (the same for all);
- prey g: r_g = -10 * #{a : caught(g, a)} - sum_{x in p_g} bound(|x|), where
  bound(x) = 0 if x < 0.9, 10 (x - 0.9) if x < 1, else min(exp(2x - 2), 10).
Observation of agent i: [v_i, p_i, obstacles - p_i, other agents - p_i (in world order),
velocities of the other prey], 4 + 2L + 2(N - 1) + 2G values for a predator and
4 + 2L + 2(N - 1) + 2(G - 1) for a prey (N = A + G agents, L obstacles): 16 and 14 by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from vimarl.envs.particle.base import AgentGroup, ParticleConfig, ParticleEnv
from vimarl.envs.particle.geometry import boundary_penalty, pairwise_distance, without_self
from vimarl.envs.particle.world import PhysicsOptions, World

PREDATOR_SIZE, PREY_SIZE, OBSTACLE_SIZE = 0.075, 0.05, 0.2
CATCH_REWARD = 10.0


@dataclass
class TagConfig(ParticleConfig):
    num_good: int = 1
    """Prey (mpe2's good agents)."""
    num_adversaries: int = 3
    """Predators (mpe2's adversaries)."""
    num_obstacles: int = 2
    """Immovable obstacles (mpe2's landmarks)."""

    def __post_init__(self):
        if self.num_good < 1 or self.num_adversaries < 1:
            raise ValueError(f"tag needs at least one prey and one predator, got num_good={self.num_good}, "
                             f"num_adversaries={self.num_adversaries}")
        if self.num_obstacles < 0:
            raise ValueError(f"num_obstacles must be non-negative, got {self.num_obstacles}")


class Tag(ParticleEnv):
    Config = TagConfig

    def make_world(self) -> World:
        config = self.config
        predators, prey, obstacles = config.num_adversaries, config.num_good, config.num_obstacles
        n_agents = predators + prey
        # mpe2 colours (x 255): red predators, green prey, dark grey obstacles.
        self.colors = np.array([[217, 89, 89]] * predators + [[89, 217, 89]] * prey + [[64, 64, 64]] * obstacles)
        return World(self.num_envs,
                     size=[PREDATOR_SIZE] * predators + [PREY_SIZE] * prey + [OBSTACLE_SIZE] * obstacles,
                     movable=[True] * n_agents + [False] * obstacles, collide=[True] * (n_agents + obstacles),
                     n_agents=n_agents, accel=[3.0] * predators + [4.0] * prey,
                     max_speed=[1.0] * predators + [1.3] * prey + [None] * obstacles,
                     options=PhysicsOptions(integration=self.config.integration), device=self.device)

    def make_groups(self) -> list[AgentGroup]:
        predators, prey = self.config.num_adversaries, self.config.num_good
        shared = 4 + 2 * self.config.num_obstacles + 2 * (predators + prey - 1)
        return [AgentGroup("predators", 0, predators, obs_dim=shared + 2 * prey),
                AgentGroup("prey", predators, predators + prey, obs_dim=shared + 2 * (prey - 1))]

    def reset_entities(self, env_ids: Tensor, episode_ids: Tensor) -> Tensor:
        positions = self.uniform(env_ids, episode_ids, (self.world.position.shape[1], 2), -1.0, 1.0)
        positions[:, self.world.n_agents:] *= 0.9  # obstacles start in U[-0.9, 0.9]^2
        return positions

    def rewards(self) -> dict[str, Tensor]:
        n_predators = self.config.num_adversaries
        predators = self.world.position[:, :n_predators]
        prey = self.world.position[:, n_predators:self.world.n_agents]
        caught = pairwise_distance(prey, predators) < PREY_SIZE + PREDATOR_SIZE  # [B, G, A]
        catches = caught.sum(-1).float()  # [B, G]: predators touching each prey
        predator_reward = CATCH_REWARD * catches.sum(-1, keepdim=True).expand(-1, n_predators)
        prey_reward = -CATCH_REWARD * catches - boundary_penalty(prey).sum(-1)
        return {"predators": predator_reward, "prey": prey_reward}

    def observations(self) -> dict[str, Tensor]:
        n_predators, n_agents = self.config.num_adversaries, self.world.n_agents
        n_prey = n_agents - n_predators
        position, velocity = self.world.position[:, :n_agents], self.world.velocity[:, :n_agents]
        to_obstacles = self.world.position[:, n_agents:].unsqueeze(1) - position.unsqueeze(2)
        to_others = without_self(position.unsqueeze(1) - position.unsqueeze(2))
        shared = torch.cat([velocity, position, to_obstacles.flatten(2), to_others.flatten(2)], -1)
        prey_velocity = velocity[:, n_predators:]  # [B, G, 2]
        predators_see = prey_velocity.flatten(1).unsqueeze(1).expand(-1, n_predators, -1)
        prey_see = without_self(prey_velocity.unsqueeze(1).expand(-1, n_prey, -1, -1)).flatten(2)
        return {"predators": torch.cat([shared[:, :n_predators], predators_see], -1),
                "prey": torch.cat([shared[:, n_predators:], prey_see], -1)}
