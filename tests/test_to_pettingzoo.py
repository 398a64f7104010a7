"""vimarl environments as PettingZoo ParallelEnvs: PettingZoo's API and seed tests, and values."""

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("pettingzoo", reason="the PettingZoo adapter needs pettingzoo: pip install 'vimarl[pettingzoo]'")

with warnings.catch_warnings():  # pettingzoo.test imports PettingZoo's deprecated classic envs
    warnings.simplefilter("ignore", DeprecationWarning)
    from pettingzoo.test import parallel_api_test, parallel_seed_test

from vimarl.envs.base import BatchedEnv, Discrete, GroupSpec, GroupStep
from vimarl.envs.external.to_pettingzoo import PettingZooParallelEnv, to_pettingzoo
from vimarl.envs.registry import ENVIRONMENTS, make_env
from vimarl.errors import VimarlError

API_ENVS = [
    ("grid_coordination", {}),
    ("spread", {}),
    ("speaker_listener", {}),  # two groups with different spaces
    ("treasure_n4", {}),  # continuous actions
    ("rover_tower", {}),
    ("prey_predator", {"n_predators": 3}),  # the prey group is scripted
]


class CountingEnv(BatchedEnv):
    """Two-step episodes whose observation is the step count, with action masks and a scripted group.

    Agent i of "agents" may not pick action (step + i) % 3; the reward is the action taken.
    """

    max_steps = 2

    def __init__(self, num_envs: int = 1, seed: int = 0):
        super().__init__(None, num_envs, seed)
        self.groups = {"agents": GroupSpec(2, 1, Discrete(3), has_action_mask=True),
                       "npc": GroupSpec(1, 1, Discrete(3), role="scripted")}

    def _reset_envs(self, env_mask):
        """Nothing to reset: the step count is the base class's episode_step."""

    def _step(self, actions):
        npc = torch.zeros(self.num_envs, 1)
        return ({"agents": actions["agents"].float(), "npc": npc},
                torch.zeros(self.num_envs, dtype=torch.bool))

    def _observe(self):
        count = self.episode_step.float().view(-1, 1, 1)
        forbidden = (self.episode_step.view(-1, 1) + torch.arange(2)) % 3
        mask = torch.arange(3) != forbidden.unsqueeze(-1)
        agents = GroupStep(obs=count.expand(-1, 2, 1).clone(), reward=torch.zeros(self.num_envs, 2),
                           action_mask=mask)
        npc = GroupStep(obs=count.clone(), reward=torch.zeros(self.num_envs, 1))
        return {"agents": agents, "npc": npc}, None


class LeavingEnv(CountingEnv):
    """CountingEnv in which agent 1 leaves the episode after its first step."""

    def __init__(self):
        super().__init__()
        self.groups["agents"] = GroupSpec(2, 1, Discrete(3), has_action_mask=True, can_leave=True)

    def _observe(self):
        groups, state = super()._observe()
        groups["agents"].alive = ~((self.episode_step.view(-1, 1) >= 1) & (torch.arange(2) == 1))
        return groups, state


@pytest.mark.parametrize("name, kwargs", API_ENVS, ids=[name for name, _ in API_ENVS])
def test_pettingzoo_api_and_seed_tests_pass(name, kwargs):
    assert name in ENVIRONMENTS
    parallel_api_test(to_pettingzoo(name, **kwargs), num_cycles=30)
    parallel_seed_test(lambda: to_pettingzoo(name, **kwargs), num_cycles=30)


def test_api_test_passes_with_action_masks_and_a_scripted_group():
    parallel_api_test(PettingZooParallelEnv(CountingEnv()), num_cycles=5)
    parallel_seed_test(lambda: PettingZooParallelEnv(CountingEnv()), num_cycles=5)


def test_an_agent_that_leaves_is_terminated_and_needs_no_more_actions():
    parallel_api_test(PettingZooParallelEnv(LeavingEnv()), num_cycles=5)
    env = PettingZooParallelEnv(LeavingEnv())
    env.reset(seed=0)
    _, rewards, terminations, truncations, _ = env.step({"agents_0": 1, "agents_1": 2})
    assert terminations == {"agents_0": False, "agents_1": True} and not any(truncations.values())
    assert rewards == {"agents_0": 1.0, "agents_1": 2.0} and env.agents == ["agents_0"]
    with pytest.raises(VimarlError, match="not in env.agents"):
        env.step({"agents_0": 0, "agents_1": 0})
    obs, rewards, terminations, truncations, infos = env.step({"agents_0": 0})
    assert set(obs) == set(rewards) == set(infos) == {"agents_0"}
    assert truncations == {"agents_0": True} and env.agents == []


def test_agents_and_spaces_follow_the_groups():
    env = to_pettingzoo("speaker_listener")
    assert env.possible_agents == ["speaker_0", "listener_0"]
    assert env.observation_space("speaker_0").shape == (3,)
    assert env.observation_space("listener_0").shape == (11,)
    assert env.action_space("speaker_0").n == 3 and env.action_space("listener_0").n == 5
    assert env.observation_space("listener_0").dtype == np.float32
    assert env.state_space.shape == (env.env.state_dim,)

    env = to_pettingzoo("treasure_n4")
    space = env.action_space("collectors_0")
    assert (space.shape, space.dtype, space.low.min(), space.high.max()) == ((2,), np.float32, -1.0, 1.0)

    env = to_pettingzoo("prey_predator", n_predators=3)
    assert env.possible_agents == ["predators_0", "predators_1", "predators_2"]  # scripted prey left out
    env = to_pettingzoo("prey_predator", n_predators=3, prey="learned")
    assert env.possible_agents[-1] == "prey_0"
    assert env.metadata["name"] == "prey_predator"


@pytest.mark.parametrize("name, steps", [("spread", 25), ("treasure_n4", 12)])
def test_trajectory_matches_the_batched_env(name, steps):
    """Same seed, same actions: the wrapper reports what the BatchedEnv reports, pre-reset at the end."""
    wrapper = to_pettingzoo(name)
    direct = make_env(name, num_envs=1)
    obs, _ = wrapper.reset(seed=3)
    timestep = direct.reset(seed=3)
    generator = torch.Generator().manual_seed(0)
    for t in range(steps):
        for group, names in wrapper.agent_groups.items():
            np.testing.assert_allclose(np.stack([obs[a] for a in names]), timestep.groups[group].obs[0], atol=1e-6)
        np.testing.assert_allclose(wrapper.state(), timestep.state[0], atol=1e-6)
        actions = {group: spec.action_space.sample((1, spec.n_agents), generator, "cpu")
                   for group, spec in direct.learned_groups().items()}
        obs, rewards, terminations, truncations, _ = wrapper.step(
            {agent: actions[group][0, i].numpy() for group, names in wrapper.agent_groups.items()
             for i, agent in enumerate(names)})
        timestep = direct.step(actions)
        for group, names in wrapper.agent_groups.items():
            np.testing.assert_allclose([rewards[a] for a in names], timestep.groups[group].reward[0], atol=1e-6)
        assert set(terminations.values()) == {bool(timestep.terminated[0])}
        assert set(truncations.values()) == {bool(timestep.truncated[0])}
        timestep = timestep.final_view()  # what the wrapper shows at an episode's end
    if name == "spread":  # the full episode: the last step truncates and ends the episode
        assert truncations["agents_0"] and wrapper.agents == []


def test_terminal_step_returns_the_final_obs_not_the_auto_reset_one():
    env = PettingZooParallelEnv(CountingEnv())
    obs, infos = env.reset(seed=0)
    assert env.possible_agents == ["agents_0", "agents_1"]
    assert obs["agents_0"].tolist() == [0.0] and obs["agents_0"].dtype == np.float32
    assert infos["agents_1"]["action_mask"].tolist() == [1, 0, 1]  # agent 1 may not pick (0 + 1) % 3
    obs, rewards, terminations, truncations, infos = env.step({"agents_0": 1, "agents_1": 2})
    assert obs["agents_1"].tolist() == [1.0] and rewards == {"agents_0": 1.0, "agents_1": 2.0}
    assert env.agents == ["agents_0", "agents_1"] and not any(truncations.values())
    obs, _, terminations, truncations, infos = env.step({"agents_0": 0, "agents_1": 0})
    assert obs["agents_0"].tolist() == [2.0]  # the env itself already shows step 0 of the next episode
    assert infos["agents_0"]["action_mask"].tolist() == [1, 1, 0]  # the mask at step 2, not step 0
    assert truncations == {"agents_0": True, "agents_1": True} and not any(terminations.values())
    assert env.agents == []
    assert env.step({}) == ({}, {}, {}, {}, {})  # as PettingZoo's own envs, once no agent is left
    with pytest.raises(VimarlError, match="call reset"):
        env.step({"agents_0": 0, "agents_1": 0})
    obs, _ = env.reset()
    assert env.agents == env.possible_agents and obs["agents_0"].tolist() == [0.0]
    with pytest.raises(NotImplementedError):
        env.state()
    assert not hasattr(env, "state_space")


def test_grid_coordination_terminates_after_one_step():
    env = to_pettingzoo("grid_coordination")
    env.reset(seed=0)
    _, rewards, terminations, truncations, _ = env.step(dict.fromkeys(env.agents, 1))
    assert all(terminations.values()) and not any(truncations.values())
    assert set(rewards.values()) == {0.0} and env.agents == []


def test_reset_with_a_seed_replays_and_without_one_starts_a_new_episode():
    env = to_pettingzoo("spread")
    first, _ = env.reset(seed=5)
    again, _ = env.reset(seed=5)
    new, _ = env.reset()
    np.testing.assert_array_equal(first["agents_0"], again["agents_0"])
    assert not np.array_equal(first["agents_0"], new["agents_0"])


def test_clear_errors():
    env = to_pettingzoo("spread")
    with pytest.raises(VimarlError, match="reset"):
        env.step({})
    env.reset(seed=0)
    with pytest.raises(VimarlError, match=r"missing: \['agents_2'\]"):
        env.step({"agents_0": 0, "agents_1": 0})
    with pytest.raises(VimarlError, match=r"\['agent_3'\], which are not in env.agents"):
        env.step({"agents_0": 0, "agents_1": 0, "agents_2": 0, "agent_3": 0})
    with pytest.raises(VimarlError, match=r"0\.\.4"):
        env.step({"agents_0": 0, "agents_1": 5, "agents_2": 0})
    with pytest.raises(VimarlError, match="num_envs=2"):
        to_pettingzoo(make_env("spread", num_envs=2))
    with pytest.raises(VimarlError, match="env name"):
        to_pettingzoo(make_env("spread"), n_agents=4)
    with pytest.raises(VimarlError, match="render_mode"):
        to_pettingzoo("spread", render_mode="human")


def test_render_gives_the_env_image():
    env = to_pettingzoo("spread", render_mode="rgb_array")
    env.reset(seed=0)
    image = env.render()
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
