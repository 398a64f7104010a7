"""The classic particle scenarios against mpe2: same start, same actions, same observations and
rewards (skipped without mpe2); plus hand-computed reward terms, observation dims and config
validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vimarl.envs.particle.scenarios.adversary import AdversaryConfig
from vimarl.envs.particle.scenarios.tag import TagConfig
from vimarl.envs.registry import make_env

TOLERANCE = 1e-5
SEEDS = (0, 1, 2)

# name: (mpe2 module, mpe2 kwargs, our env name, our kwargs)
SCENARIOS = {
    "spread_n3": ("simple_spread_v3", {"N": 3}, "spread", {"n_agents": 3}),
    "spread_n6": ("simple_spread_v3", {"N": 6}, "spread", {"n_agents": 6}),
    "tag": ("simple_tag_v3", {}, "tag", {}),
    "tag_2_prey": ("simple_tag_v3", {"num_good": 2}, "tag", {"num_good": 2}),
    "speaker_listener": ("simple_speaker_listener_v4", {}, "speaker_listener", {}),
    "adversary": ("simple_adversary_v3", {}, "adversary", {}),
}


def sync_from_reference(env, reference) -> None:
    """Copy mpe2's initial state into sub-environment 0: every entity's position and velocity,
    the goal landmark and the speaker's comm state where the scenario has them."""
    world = reference.unwrapped.world
    as_tensor = lambda values: torch.tensor(np.stack(values), dtype=torch.float32)
    env.world.position[0] = as_tensor([e.state.p_pos for e in world.entities])
    env.world.velocity[0] = as_tensor([e.state.p_vel for e in world.entities])
    speaker = world.agents[0]
    if hasattr(env, "message"):
        env.goal[0] = world.landmarks.index(speaker.goal_b)
        env.message[0] = as_tensor(speaker.state.c)
    elif hasattr(env, "goal"):
        env.goal[0] = world.landmarks.index(speaker.goal_a)


def group_actions(env, actions: list) -> dict[str, torch.Tensor]:
    """Per-agent mpe2 actions (world order) as our per-group tensors. No agent here both moves
    and speaks, so mpe2's Box layout is ours: movement Box(5) and the speaker's Box(3) as they are."""
    start, groups = 0, {}
    for name, spec in env.groups.items():
        groups[name] = torch.tensor(np.stack(actions[start:start + spec.n_agents])).unsqueeze(0)
        start += spec.n_agents
    return groups


def run_against_mpe2(scenario: str, action_mode: str, seed: int) -> float:
    """Max abs difference of observations and rewards over one 25-step episode."""
    module, reference_kwargs, name, kwargs = SCENARIOS[scenario]
    module = pytest.importorskip(f"mpe2.{module}")  # only the comparisons need mpe2
    continuous = action_mode == "continuous"
    reference = module.parallel_env(max_cycles=25, continuous_actions=continuous, **reference_kwargs)
    reference.reset(seed=seed)
    env = make_env(name, 1, action_mode=action_mode, **kwargs)
    env.reset(seed=0)
    sync_from_reference(env, reference)
    agents = reference.agents
    spaces = [reference.action_space(agent) for agent in agents]
    our_spaces = [spec.action_space for spec in env.groups.values() for _ in range(spec.n_agents)]
    for agent, space, ours in zip(agents, spaces, our_spaces):  # world order is mpe2's agent order
        assert (ours.dim,) == space.shape if continuous else ours.n == space.n, agent
    sampler = np.random.RandomState(seed)
    error = 0.0
    for _ in range(25):
        actions = [sampler.rand(*space.shape).astype(np.float32) if continuous else sampler.randint(space.n)
                   for space in spaces]
        observations, rewards, *_ = reference.step(dict(zip(agents, actions)))
        step = env.step(group_actions(env, actions))
        final = step.final_view()  # the 25th step auto-resets; compare the pre-reset observation
        our_obs = [row.numpy() for g in env.groups for row in final.groups[g].obs[0]]
        our_rewards = torch.cat([step.groups[g].reward[0] for g in env.groups]).numpy()
        for i, agent in enumerate(agents):
            assert our_obs[i].shape == observations[agent].shape, agent
            error = max(error, float(np.abs(our_obs[i] - observations[agent]).max()),
                        abs(float(our_rewards[i]) - rewards[agent]))
    assert bool(step.truncated[0])
    return error


@pytest.mark.parametrize("action_mode", ["discrete", "continuous"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_matches_mpe2_step_by_step(scenario, action_mode):
    errors = [run_against_mpe2(scenario, action_mode, seed) for seed in SEEDS]
    assert max(errors) < TOLERANCE, errors


def test_original_mpe_integration_order_moves_differently():
    positions = {}
    for integration in ("mpe2", "mpe"):
        env = make_env("tag", 1, seed=3, integration=integration)
        env.reset()
        for action in (2, 4, 4):
            env.step({"predators": torch.full((1, 3), action), "prey": torch.full((1, 1), action)})
        positions[integration] = env.world.position.clone()
    assert (positions["mpe2"] - positions["mpe"]).abs().max() > 1e-2


# -- hand-computed rewards and observation layouts ----------------------------------------------


def placed(name: str, positions: list[tuple[float, float]], **kwargs):
    env = make_env(name, 1, **kwargs)
    env.reset(seed=0)
    env.world.position[0] = torch.tensor(positions)
    env.world.velocity.zero_()
    return env


FAR = [(5.0, 5.0), (-5.0, 5.0)]  # obstacles out of the way


def test_tag_a_catch_rewards_every_predator_and_costs_the_prey():
    # Predator 0 touches the prey (distance 0.1 < 0.075 + 0.05); the others are far away.
    env = placed("tag", [(0.0, 0.0), (0.5, 0.5), (-0.5, 0.5), (0.1, 0.0), *FAR])
    rewards = env.rewards()
    assert torch.allclose(rewards["predators"], torch.full((1, 3), 10.0))
    assert torch.allclose(rewards["prey"], torch.tensor([[-10.0]]))
    # Two predators on the prey: +20 to every predator, -20 to the prey.
    env.world.position[0, 1] = torch.tensor([0.1, 0.1])
    rewards = env.rewards()
    assert torch.allclose(rewards["predators"], torch.full((1, 3), 20.0))
    assert torch.allclose(rewards["prey"], torch.tensor([[-20.0]]))


@pytest.mark.parametrize("prey_position, penalty", [
    ((0.5, -0.85), 0.0),
    ((0.95, 0.0), 0.5),  # 10 * (0.95 - 0.9)
    ((-1.2, 0.0), math.exp(0.4)),  # exp(2 * 1.2 - 2)
    ((-1.2, 0.95), math.exp(0.4) + 0.5),  # both coordinates count
    ((3.0, 0.0), 10.0),  # capped
])
def test_tag_boundary_penalty(prey_position, penalty):
    env = placed("tag", [(0.0, 3.0), (0.5, 3.0), (-0.5, 3.0), prey_position, *FAR])
    rewards = env.rewards()
    assert rewards["prey"].item() == pytest.approx(-penalty, abs=1e-5)
    assert torch.equal(rewards["predators"], torch.zeros(1, 3))


def test_speaker_listener_reward_is_minus_squared_distance_for_both():
    # Speaker, listener, then three landmarks; the goal is landmark 1 at the origin.
    env = placed("speaker_listener", [(0.9, 0.9), (0.3, 0.4), (1.0, 0.0), (0.0, 0.0), (-1.0, 0.0)])
    env.goal[0] = 1
    rewards = env.rewards()
    assert rewards["speaker"].item() == pytest.approx(-0.25) and rewards["listener"].item() == pytest.approx(-0.25)


def test_speaker_listener_listener_hears_the_message_of_the_same_step():
    env = make_env("speaker_listener", 2)
    first = env.reset(seed=0)
    assert torch.equal(first.groups["listener"].obs[..., -3:], torch.zeros(2, 1, 3))
    step = env.step({"speaker": torch.tensor([[2], [0]]), "listener": torch.zeros(2, 1, dtype=torch.int64)})
    assert torch.equal(step.groups["listener"].obs[:, 0, -3:], torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    assert torch.equal(env.world.position[:, 0], first.state[:, :2])  # the speaker never moves
    goal_colors = env.landmark_colors[env.goal]
    assert torch.equal(step.groups["speaker"].obs[:, 0], goal_colors)


def test_adversary_rewards_on_a_placed_configuration():
    # Adversary at distance 1 from the goal (landmark 0 at the origin); good agents at 0.5 and 2.
    env = placed("adversary", [(1.0, 0.0), (0.0, 0.5), (0.0, -2.0), (0.0, 0.0), (3.0, 3.0)])
    env.goal[0] = 0
    rewards = env.rewards()
    assert rewards["adversary"].item() == pytest.approx(-1.0)
    assert torch.allclose(rewards["agents"], torch.tensor([[-0.5 + 1.0, -0.5 + 1.0]]))
    observations = env.observations()
    assert torch.allclose(observations["agents"][0, 0, :2], torch.tensor([0.0, -0.5]))  # goal - p


@pytest.mark.parametrize("name, kwargs, dims", [
    ("tag", {}, {"predators": 16, "prey": 14}),
    ("tag", {"num_good": 2, "num_adversaries": 4, "num_obstacles": 1}, {"predators": 20, "prey": 18}),
    ("speaker_listener", {}, {"speaker": 3, "listener": 11}),
    ("adversary", {}, {"adversary": 8, "agents": 10}),
    ("adversary", {"num_good": 4}, {"adversary": 16, "agents": 18}),
])
def test_observation_dims_and_global_state(name, kwargs, dims):
    env = make_env(name, 3, **kwargs)
    first = env.reset(seed=1)
    assert {group: spec.obs_dim for group, spec in env.groups.items()} == dims
    for group, spec in env.groups.items():
        assert first.groups[group].obs.shape == (3, spec.n_agents, spec.obs_dim)
        assert first.groups[group].graph.neighbors.shape == (3, spec.n_agents, spec.graph_k)
    assert first.state.shape == (3, env.state_dim)


def test_speaker_action_spaces():
    assert make_env("speaker_listener", 1).groups["speaker"].action_space.n == 3
    continuous = make_env("speaker_listener", 1, action_mode="continuous").groups
    assert continuous["speaker"].action_space.dim == 3 and continuous["listener"].action_space.dim == 5


@pytest.mark.parametrize("name", ["speaker_listener", "adversary"])
def test_goal_is_drawn_per_episode_and_replayable(name):
    env = make_env(name, 64)
    env.reset(seed=5)
    goals = env.goal.clone()
    n_landmarks = env.n_landmarks
    assert set(goals.tolist()) == set(range(n_landmarks))
    env.reset()
    assert not torch.equal(env.goal, goals)  # a new episode draws again
    env.reset(seed=5)
    assert torch.equal(env.goal, goals)
    # The goal is in the global state, as a one-hot at its end (before the message, if any).
    state = env.global_state()
    one_hot_at = state.shape[1] - n_landmarks - (3 if name == "speaker_listener" else 0)
    assert torch.equal(state[:, one_hot_at:one_hot_at + n_landmarks].argmax(-1), goals)


@pytest.mark.parametrize("config_class, kwargs", [
    (TagConfig, {"num_good": 0}), (TagConfig, {"num_adversaries": 0}), (TagConfig, {"num_obstacles": -1}),
    (AdversaryConfig, {"num_good": 0}),
])
def test_bad_config_values_raise(config_class, kwargs):
    with pytest.raises(ValueError):
        config_class(**kwargs)
