"""Rover-tower, as MAAC `multi_speaker_listener` (ENV_SPECS §3.2; MAMT 004 App. G: 8 agents).

Rovers (MAAC's listeners) move but cannot see the goals; towers (speakers) are immovable and
send one of 5 messages. Each episode pairs rovers and towers by a random permutation and gives
each tower a uniformly drawn goal landmark (towers may share one). Rovers: size 0.075, accel 1.5
(net 2.25 per unit action under MAAC's fork physics), mass 1, max speed 1. Nothing collides.
Reset: agents and landmarks U[-1, 1]^2, messages zero.

Pair reward, given to both members (MAAC's `share_rews = False`), with d2 = |p_rover - p_goal|^2:
r = -d2 + 10 * [d2 < 1.5 * (0.075 + 0.04)]. MAAC compares the squared distance with a
length (0.1725), so the bonus radius is sqrt(0.1725) ~ 0.415; kept as in the code.

A tower's message becomes its comm state during the step, so a rover's observation after the
step shows the message sent in it. Discrete mode: rovers Discrete(5) movement and towers
Discrete(5) one-hot messages. Continuous mode: rovers the 2-D unit force (maac.py) and towers a
message vector in [0, 1]^5 used as it is (clipped), as MPE does with a policy's soft output.
Observation of a rover: [one-hot(its tower), its tower's message, p, v], R + 5 + 4 = 13.
Observation of a tower: [one-hot(its rover), rover's p, goal's p], R + 4 = 8 (absolute positions).
The global state appends the pairing, each tower's goal (one-hots) and the messages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vimarl.envs.base import Box, Discrete
from vimarl.envs.particle.base import AgentGroup, ParticleEnv
from vimarl.envs.particle.maac import ForceControlConfig, maac_physics, movement_space
from vimarl.envs.particle.world import World

ROVER_SIZE, TOWER_SIZE, LANDMARK_SIZE = 0.075, 0.075, 0.04
ACCEL, MAX_SPEED = 1.5, 1.0
GOAL_BONUS = 10.0
GOAL_THRESHOLD = 1.5 * (ROVER_SIZE + LANDMARK_SIZE)
"""Compared with the squared rover-goal distance (MAAC's quirk)."""
POSITION_STREAM, PAIRING_STREAM, GOAL_STREAM = 0, 1, 2


@dataclass
class RoverTowerConfig(ForceControlConfig):
    n_pairs: int = 4
    """Rovers, and as many towers (MAAC and MAMT: 4 + 4 = 8 agents)."""
    n_landmarks: int = 6
    """Landmarks the goals are drawn from (MAAC: 6)."""
    message_dim: int = 5
    """Messages a tower can send (MAAC's dim_c: 5)."""

    def __post_init__(self):
        for name in ("n_pairs", "n_landmarks", "message_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


class RoverTower(ParticleEnv):
    Config = RoverTowerConfig
    action_convention = "mpe"
    state_fields = (*ParticleEnv.state_fields, "tower_rover", "rover_tower", "goal", "message")

    def __init__(self, config: RoverTowerConfig, num_envs: int, seed: int = 0, device="cpu"):
        super().__init__(config, num_envs, seed, device)
        r = config.n_pairs
        pairs = torch.arange(r, device=self.device).expand(num_envs, r)
        self.tower_rover = pairs.clone()  # the rover each tower talks to
        self.rover_tower = pairs.clone()  # its inverse: the tower each rover listens to
        self.goal = torch.zeros(num_envs, r, dtype=torch.int64, device=self.device)  # landmark per tower
        self.message = torch.zeros(num_envs, r, config.message_dim, device=self.device)
        self.state_dim += r * (r + config.n_landmarks + config.message_dim)

    def make_world(self) -> World:
        r, n_landmarks = self.config.n_pairs, self.config.n_landmarks
        return World(self.num_envs, size=[ROVER_SIZE] * r + [TOWER_SIZE] * r + [LANDMARK_SIZE] * n_landmarks,
                     movable=[True] * r + [False] * (r + n_landmarks), collide=[False] * (2 * r + n_landmarks),
                     n_agents=2 * r, accel=[ACCEL] * 2 * r, max_speed=[MAX_SPEED] * 2 * r + [None] * n_landmarks,
                     options=maac_physics(self.config.integration), device=self.device)

    def make_groups(self) -> list[AgentGroup]:
        config = self.config
        r, m = config.n_pairs, config.message_dim
        speaks = Discrete(m) if config.action_mode == "discrete" else Box(0.0, 1.0, m)
        return [AgentGroup("rovers", 0, r, obs_dim=r + m + 4, action_space=movement_space(config)),
                AgentGroup("towers", r, 2 * r, obs_dim=r + 4, action_space=speaks)]

    def reset_entities(self, env_ids: Tensor, episode_ids: Tensor) -> Tensor:
        return self.uniform(env_ids, episode_ids, (self.world.position.shape[1], 2), -1.0, 1.0,
                            stream=POSITION_STREAM)

    def _reset_envs(self, env_mask: Tensor) -> None:
        super()._reset_envs(env_mask)
        config = self.config
        env_ids = self.env_ids[env_mask]
        episodes = self.episode_index[env_ids]
        # A uniform random permutation: the order of independent uniform keys.
        keys = self.uniform(env_ids, episodes, (config.n_pairs,), 0.0, 1.0, stream=PAIRING_STREAM)
        order = keys.argsort(-1)
        self.tower_rover[env_mask] = order
        self.rover_tower[env_mask] = order.argsort(-1)
        goal = self.uniform(env_ids, episodes, (config.n_pairs,), 0.0, config.n_landmarks, stream=GOAL_STREAM)
        self.goal[env_mask] = goal.long().clamp_max(config.n_landmarks - 1)  # float rounding can reach n
        self.message[env_mask] = 0.0

    def movement(self, group: AgentGroup, action: Tensor) -> Tensor:
        if group.name == "towers":  # they cannot move, but world.step takes a force for every agent
            return torch.zeros(self.num_envs, group.n_agents, 2, device=self.device)
        return super().movement(group, action)

    def apply_actions(self, actions: dict[str, Tensor]) -> None:
        spoken = actions["towers"]
        if self.config.action_mode == "discrete":
            self.message = F.one_hot(spoken, self.config.message_dim).float()
        else:
            self.message = spoken.float().clamp(0.0, 1.0)

    def positions(self) -> tuple[Tensor, Tensor]:
        """Per tower [B, R, 2]: the position of its rover and of its goal landmark."""
        r = self.config.n_pairs
        position = self.world.position
        rover = position[:, :r].gather(1, self.tower_rover.unsqueeze(-1).expand(-1, -1, 2))
        goal = position[:, 2 * r:].gather(1, self.goal.unsqueeze(-1).expand(-1, -1, 2))
        return rover, goal

    def rewards(self) -> dict[str, Tensor]:
        rover, goal = self.positions()
        squared = (rover - goal).square().sum(-1)
        pair = -squared + GOAL_BONUS * (squared < GOAL_THRESHOLD).float()  # [B, R] by tower
        return {"rovers": pair.gather(1, self.rover_tower), "towers": pair}

    def observations(self) -> dict[str, Tensor]:
        r, world = self.config.n_pairs, self.world
        heard = self.message.gather(1, self.rover_tower.unsqueeze(-1).expand(-1, -1, self.config.message_dim))
        rovers = torch.cat([F.one_hot(self.rover_tower, r).float(), heard, world.position[:, :r],
                            world.velocity[:, :r]], -1)
        towers = torch.cat([F.one_hot(self.tower_rover, r).float(), *self.positions()], -1)
        return {"rovers": rovers, "towers": towers}

    def global_state(self) -> Tensor:
        pairing = F.one_hot(self.tower_rover, self.config.n_pairs).flatten(1).float()
        goals = F.one_hot(self.goal, self.config.n_landmarks).flatten(1).float()
        return torch.cat([super().global_state(), pairing, goals, self.message.flatten(1)], -1)
