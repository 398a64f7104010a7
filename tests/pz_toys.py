"""Small PettingZoo ParallelEnvs with known dynamics, for the adapter tests.

Imported by name ('pz_toys:leaving_env') by the adapter, also in spawned worker processes.
"""

from __future__ import annotations

import gymnasium
import numpy as np
from pettingzoo import ParallelEnv


class LeavingEnv(ParallelEnv):
    """Three runners. obs_i = [t, i, seed % 7]; r_i = action + 10 i. Runner 1 terminates at step
    `leave_at`; the others are truncated at step `horizon`. Acting for an agent that has left
    is an error, as in PettingZoo envs that remove agents."""

    metadata = {"name": "leaving", "render_modes": []}

    def __init__(self, leave_at: int = 2, horizon: int = 5, all_terminate: bool = False):
        self.possible_agents = [f"runner_{i}" for i in range(3)]
        self.leave_at, self.horizon, self.all_terminate = leave_at, horizon, all_terminate
        self.actions_seen: list[dict] = []

    def observation_space(self, agent):
        return gymnasium.spaces.Box(-np.inf, np.inf, (3,), np.float32)

    def action_space(self, agent):
        return gymnasium.spaces.Discrete(3)

    def _obs(self, agent):
        return np.array([self.t, int(agent[-1]), self.seed % 7], np.float32)

    def reset(self, seed=None, options=None):
        self.t, self.seed = 0, seed or 0
        self.agents = list(self.possible_agents)
        return {a: self._obs(a) for a in self.agents}, {a: {} for a in self.agents}

    def step(self, actions):
        if set(actions) != set(self.agents):
            raise ValueError(f"actions for {sorted(actions)}, live agents {self.agents}")
        self.actions_seen.append(dict(actions))
        self.t += 1
        observations = {a: self._obs(a) for a in self.agents}
        rewards = {a: float(actions[a]) + 10.0 * int(a[-1]) for a in self.agents}
        terminations = {a: a == "runner_1" and self.t >= self.leave_at for a in self.agents}
        end = self.t >= self.horizon
        truncations = {a: end and not self.all_terminate for a in self.agents}
        if end and self.all_terminate:
            terminations = {a: True for a in self.agents}
        self.agents = [a for a in self.agents if not (terminations[a] or truncations[a])]
        return observations, rewards, terminations, truncations, {a: {} for a in observations}


class MaskedEnv(ParallelEnv):
    """Two groups with action masks: 'boxer' masks in a Dict observation, 'kicker' in infos.
    The mask allows actions 0..t % 4 at step t."""

    metadata = {"name": "masked", "render_modes": []}

    def __init__(self):
        self.possible_agents = ["boxer_0", "boxer_1", "kicker_0"]

    def observation_space(self, agent):
        plain = gymnasium.spaces.Box(0, 10, (2, 2), np.float32)
        if agent.startswith("boxer"):
            return gymnasium.spaces.Dict({"observation": plain,
                                          "action_mask": gymnasium.spaces.MultiBinary(4)})
        return gymnasium.spaces.Discrete(5)

    def action_space(self, agent):
        return gymnasium.spaces.Discrete(4)

    def _mask(self):
        return (np.arange(4) <= self.t % 4).astype(np.int8)

    def _step_result(self):
        observations = {a: {"observation": np.full((2, 2), self.t + i, np.float32), "action_mask": self._mask()}
                        for i, a in enumerate(["boxer_0", "boxer_1"])}
        observations["kicker_0"] = self.t % 5
        return observations, {"boxer_0": {}, "boxer_1": {}, "kicker_0": {"action_mask": self._mask()}}

    def reset(self, seed=None, options=None):
        self.t = 0
        self.agents = list(self.possible_agents)
        return self._step_result()

    def step(self, actions):
        self.t += 1
        observations, infos = self._step_result()
        rewards = {a: float(actions[a]) for a in self.agents}
        flags = {a: False for a in self.agents}
        return observations, rewards, flags, dict(flags), infos


class OddSpacesEnv(LeavingEnv):
    """LeavingEnv with a MultiDiscrete action space, which vimarl does not take."""

    def action_space(self, agent):
        return gymnasium.spaces.MultiDiscrete([2, 2])


class MixedGroupEnv(LeavingEnv):
    """LeavingEnv whose runner_2 has a different observation space from its group."""

    def observation_space(self, agent):
        return gymnasium.spaces.Box(-np.inf, np.inf, (4 if agent == "runner_2" else 3,), np.float32)


class FaultyEnv(LeavingEnv):
    """LeavingEnv that goes wrong at step `at`: a NaN observation ('nan'), an observation of the
    wrong size ('shape') or an infinite reward ('reward') for runner_2; or a Box action space
    whose bounds vimarl's Discrete actions cannot break, for the action check ('actions')."""

    def __init__(self, fault: str = "nan", at: int = 2):
        super().__init__(leave_at=10, horizon=10)
        self.fault, self.at = fault, at

    def step(self, actions):
        observations, rewards, terminations, truncations, infos = super().step(actions)
        if self.t == self.at:
            if self.fault == "nan":
                observations["runner_2"] = np.array([np.nan, 0, 0], np.float32)
            elif self.fault == "shape":
                observations["runner_2"] = np.zeros(5, np.float32)
            elif self.fault == "reward":
                rewards["runner_2"] = float("inf")
        return observations, rewards, terminations, truncations, infos
