"""The "two agents meet" example of VM3-AC (paper 002, App. A, Fig. 8-10), and its linear policy.

Two agents move in the half-plane y > 0 by displacements: o^i = (x^i, y^i), a^i = (dx^i, dy^i),
(x, y)_{t+1} = (x, y)_t + a_t. Agent 1 starts at (-1, 1), agent 2 at (1, 1); the goal is to meet
while going upward, and the episode ends when they meet. The reward is built from "the distance
between the two agents' locations"; meeting means maximising its negative, so both agents receive
r_t = -|p^1_{t+1} - p^2_{t+1}|.

App. A's policy (Eq. 16-17) is linear with a common latent z_t:

    a^i_t = [[0, 0], [0, 0.1]] o^i_t + W^i z_t + n^i_t,   z^x_t, z^y_t ~ Unif[0, 0.1]  (Eq. 19-20),

with independent exploration noise n^i_t; only W^1, W^2 are learned, "by greedily maximizing the
instantaneous reward r_t by stochastic gradient descent with Adam, learning rate 3e-4". Fig. 9
shows w^1_11 and w^1_12 converging to positive values (agent 1 moves right when z is positive,
agent 2 mirrors it), so the agents meet, with z sampled and with z = E[z] = (0.05, 0.05)
(Fig. 10 a, b). `AppendixAPolicy` and `learn_meeting_weights` reproduce that; the environment is
also a registered task (`two_agents_meet`) for any continuous-action algorithm.

Left open by the paper, chosen here: the noise n^i ~ N(0, 0.1^2 I) (`noise_std`); "meet" means
closer than `meet_distance` = 0.25 (the learned W closes the gap by about 0.1 per step, and the
0.1 y upward drift amplifies any vertical offset, so a smaller radius can be stepped over);
episodes are cut at `episode_length` = 50 steps; the reward is taken after the move.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from vimarl.envs.base import BatchedEnv, Box, GroupSpec, GroupStep
from vimarl.envs.graph import complete_graph

START = ((-1.0, 1.0), (1.0, 1.0))
OBSERVATION_WEIGHT = ((0.0, 0.0), (0.0, 0.1))
"""The fixed parameter for o^i in Eq. 16-17: the agents drift upward by 0.1 y."""
Z_LOW, Z_HIGH = 0.0, 0.1
"""z^x, z^y ~ Unif[0, 0.1] (Eq. 19-20)."""


@dataclass
class TwoAgentsMeetConfig:
    episode_length: int = 50
    """Steps before an episode is cut when the agents have not met."""
    meet_distance: float = 0.25
    """The agents meet (and the episode ends) when they are closer than this."""
    max_displacement: float = 1.0
    """Bound of each action coordinate (the Box action space); App. A's displacements stay far below."""

    def __post_init__(self):
        for name in ("episode_length", "meet_distance", "max_displacement"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def meeting_reward(position: Tensor) -> Tensor:
    """r = -|p^1 - p^2| for positions [..., 2 agents, 2] -> [...]."""
    return -(position[..., 0, :] - position[..., 1, :]).norm(dim=-1)


class TwoAgentsMeet(BatchedEnv):
    Config = TwoAgentsMeetConfig
    state_fields = ("position",)
    state_dim = 4

    def __init__(self, config: TwoAgentsMeetConfig, num_envs: int, seed: int = 0, device="cpu"):
        super().__init__(config, num_envs, seed, device)
        self.max_steps = config.episode_length
        bound = config.max_displacement
        self.groups = {"agents": GroupSpec(n_agents=2, obs_dim=2, action_space=Box(-bound, bound, 2), graph_k=1,
                                                   static_graph=True)}
        self.graph = complete_graph(2, num_envs, device=self.device)  # each agent's neighbour is the other
        self.start = torch.tensor(START, device=self.device)
        self.position = self.start.expand(num_envs, -1, -1).clone()

    def _reset_envs(self, env_mask: Tensor) -> None:
        self.position[env_mask] = self.start

    def _step(self, actions: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        bound = self.config.max_displacement
        self.position = self.position + actions["agents"].clamp(-bound, bound)
        reward = meeting_reward(self.position)
        met = -reward < self.config.meet_distance
        return {"agents": reward.unsqueeze(1).expand(-1, 2).clone()}, met

    def _observe(self) -> tuple[dict[str, GroupStep], Tensor | None]:
        zeros = torch.zeros(self.num_envs, 2, device=self.device)
        return {"agents": GroupStep(obs=self.position.clone(), reward=zeros, graph=self.graph)}, self.position.flatten(1)

    def render(self) -> np.ndarray:
        """Sub-environment 0 on [-2, 2] x [0, 4]: agent 1 blue, agent 2 orange."""
        size = 160
        image = np.full((size, size, 3), 255, dtype=np.uint8)
        for (x, y), colour in zip(self.position[0].tolist(), ((70, 130, 220), (240, 150, 40))):
            col, row = int((x + 2) / 4 * size), int((1 - y / 4) * size)
            image[max(row - 4, 0):max(row + 4, 0), max(col - 4, 0):max(col + 4, 0)] = colour
        return image


class AppendixAPolicy(nn.Module):
    """a^i = [[0, 0], [0, 0.1]] o^i + W^i z + n^i (Eq. 16-17) for both agents; W [2 agents, 2, 2]."""

    def __init__(self, noise_std: float = 0.1):
        super().__init__()
        self.noise_std = noise_std
        self.W = nn.Parameter(torch.zeros(2, 2, 2))
        self.register_buffer("observation_weight", torch.tensor(OBSERVATION_WEIGHT))

    def forward(self, obs: Tensor, z: Tensor, noise: bool = True) -> Tensor:
        """obs [B, 2, 2], z [B, 2] shared by both agents -> displacements [B, 2, 2]."""
        action = obs @ self.observation_weight.T + torch.einsum("ikl,bl->bik", self.W, z)
        return action + self.noise_std * torch.randn_like(action) if noise else action

    @staticmethod
    def sample_z(batch: int, generator: torch.Generator | None = None) -> Tensor:
        return Z_LOW + (Z_HIGH - Z_LOW) * torch.rand(batch, 2, generator=generator)


def learn_meeting_weights(steps: int = 20000, num_envs: int = 16, lr: float = 3e-4, seed: int = 0,
                          config: TwoAgentsMeetConfig | None = None) -> tuple[AppendixAPolicy, Tensor]:
    """App. A's experiment: Adam (lr 3e-4) on the instantaneous reward r_t, differentiated through
    the displacement, while the agents play episodes. Returns the policy and W after every step
    ([steps, 2, 2, 2], Fig. 9's curves)."""
    torch.manual_seed(seed)
    env = TwoAgentsMeet(config or TwoAgentsMeetConfig(), num_envs, seed)
    policy = AppendixAPolicy()
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    history = torch.empty(steps, 2, 2, 2)
    obs = env.reset().groups["agents"].obs
    for t in range(steps):
        action = policy(obs, AppendixAPolicy.sample_z(num_envs))
        reward = meeting_reward(obs + action)  # the reward of this step, as a function of W
        optimizer.zero_grad()
        (-reward.mean()).backward()
        optimizer.step()
        obs = env.step({"agents": action.detach()}).groups["agents"].obs
        history[t] = policy.W.detach()
    return policy, history


@torch.no_grad()
def play(policy: AppendixAPolicy, z_mean: bool, config: TwoAgentsMeetConfig | None = None,
         seed: int = 0) -> Tensor:
    """One execution episode (Fig. 10): positions [T + 1, 2, 2] up to the meeting or the time limit;
    z sampled from Eq. 19-20, or z = E[z] = (0.05, 0.05) when `z_mean`; no exploration noise."""
    env = TwoAgentsMeet(config or TwoAgentsMeetConfig(), 1, seed)
    generator = torch.Generator().manual_seed(seed)
    obs = env.reset().groups["agents"].obs
    path = [obs[0].clone()]
    for _ in range(env.max_steps):
        z = torch.full((1, 2), (Z_LOW + Z_HIGH) / 2) if z_mean else AppendixAPolicy.sample_z(1, generator)
        step = env.step({"agents": policy(obs, z, noise=False)})
        path.append(step.info["final_obs"]["agents"][0] if step.done[0] else step.groups["agents"].obs[0])
        if step.done[0]:
            break
        obs = step.groups["agents"].obs
    return torch.stack(path)
