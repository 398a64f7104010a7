"""Cooperative communication, as mpe2 `simple_speaker_listener_v4` (MPE `simple_speaker_listener`,
ENV_SPECS §2.3).

Agent 0, the speaker, is immovable and only speaks: Discrete(3) picks a one-hot message, or in
continuous mode Box(0, 1, 3) is the message itself (clipped to [0, 1], as mpe2's wrapper does).
Agent 1, the listener, only moves (the 5-way movement action). Both have size 0.075 and do not
collide; 3 landmarks of size 0.04, coloured red, green, blue. Reset: agents and landmarks
U[-1, 1]^2, the goal landmark drawn uniformly per episode, the message set to zero.

The speaker's message becomes its comm state during the step (mpe2 `update_agent_state`), so
the observation after a step shows the message sent in that step.
Reward, the same for both agents: r = -|p_listener - p_goal|^2. mpe2 does not add up the agents'
rewards (original MPE did, for -2 dist^2, through `world.collaborative`).
Observation of the speaker: the goal's colour (3 values). Observation of the listener:
[v_listener, landmarks - p_listener, message], 2 + 6 + 3 = 11 values. The global state appends
the goal's one-hot and the message to ParticleEnv's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vimarl.envs.base import Box, Discrete
from vimarl.envs.particle.base import AgentGroup, ParticleConfig
from vimarl.envs.particle.scenarios.adversary import GoalLandmarkEnv
from vimarl.envs.particle.world import PhysicsOptions, World

MESSAGE_DIM = 3
LANDMARK_COLORS = ((0.65, 0.15, 0.15), (0.15, 0.65, 0.15), (0.15, 0.15, 0.65))
"""mpe2's landmark colours, which are also what the speaker observes of the goal."""


@dataclass
class SpeakerListenerConfig(ParticleConfig):
    """mpe2's scenario has no parameters beyond the ones every particle scenario has."""


class SpeakerListener(GoalLandmarkEnv):
    Config = SpeakerListenerConfig
    state_fields = (*GoalLandmarkEnv.state_fields, "message")

    def __init__(self, config: SpeakerListenerConfig, num_envs: int, seed: int = 0, device="cpu"):
        super().__init__(config, num_envs, seed, device)
        self.message = torch.zeros(num_envs, MESSAGE_DIM, device=self.device)  # the speaker's comm state
        self.state_dim += MESSAGE_DIM
        self.landmark_colors = torch.tensor(LANDMARK_COLORS, device=self.device)

    def make_world(self) -> World:
        self.colors = np.array([[64, 64, 64]] * 2 + [[round(255 * c) for c in color] for color in LANDMARK_COLORS])
        return World(self.num_envs, size=[0.075] * 2 + [0.04] * 3, movable=[False, True] + [False] * 3,
                     collide=[False] * 5, n_agents=2,
                     options=PhysicsOptions(integration=self.config.integration), device=self.device)

    def make_groups(self) -> list[AgentGroup]:
        speaks = Discrete(MESSAGE_DIM) if self.config.action_mode == "discrete" else Box(0.0, 1.0, MESSAGE_DIM)
        return [AgentGroup("speaker", 0, 1, obs_dim=len(LANDMARK_COLORS[0]), action_space=speaks),
                AgentGroup("listener", 1, 2, obs_dim=2 + 2 * len(LANDMARK_COLORS) + MESSAGE_DIM)]

    def reset_entities(self, env_ids: Tensor, episode_ids: Tensor) -> Tensor:
        return self.uniform(env_ids, episode_ids, (5, 2), -1.0, 1.0)

    def _reset_envs(self, env_mask: Tensor) -> None:
        super()._reset_envs(env_mask)
        self.message[env_mask] = 0.0

    def movement(self, group: AgentGroup, action: Tensor) -> Tensor:
        if group.name == "speaker":  # it cannot move, but world.step takes a force for every agent
            return torch.zeros(self.num_envs, 1, 2, device=self.device)
        return super().movement(group, action)

    def apply_actions(self, actions: dict[str, Tensor]) -> None:
        spoken = actions["speaker"][:, 0]
        if self.config.action_mode == "discrete":
            self.message = F.one_hot(spoken, MESSAGE_DIM).float()
        else:
            self.message = spoken.float().clamp(0.0, 1.0)

    def rewards(self) -> dict[str, Tensor]:
        listener = self.world.position[:, 1]
        reward = -(listener - self.goal_position()).square().sum(-1, keepdim=True)  # [B, 1]
        return {"speaker": reward, "listener": reward.clone()}

    def observations(self) -> dict[str, Tensor]:
        world = self.world
        listener = world.position[:, 1:2]
        to_landmarks = (world.position[:, 2:] - listener).flatten(1)
        listener_obs = torch.cat([world.velocity[:, 1], to_landmarks, self.message], -1)
        return {"speaker": self.landmark_colors[self.goal].unsqueeze(1), "listener": listener_obs.unsqueeze(1)}

    def global_state(self) -> Tensor:
        return torch.cat([super().global_state(), self.message], -1)
