"""The PIC large-scale scenarios (ENV_SPECS §1): hand-computed reward terms, observation layouts
and sizes, graphs, PIC's contact quirk, resets, local rewards, the scripted prey and scale."""

from __future__ import annotations

import math

import pytest
import torch

from vimarl.envs.graph import knn_graph
from vimarl.envs.particle.geometry import pairwise_distance
from vimarl.envs.registry import make_env
from vimarl.errors import VimarlError

TOLERANCE = 1e-5


def place(env, positions, velocities=None) -> None:
    """Put every entity of every sub-environment at the given positions (and velocities)."""
    as_state = lambda values: torch.tensor(values, dtype=torch.float32).expand(env.num_envs, -1, -1).clone()
    env.position = as_state(positions)
    env.velocity = as_state(velocities) if velocities is not None else torch.zeros_like(env.position)


def close(actual, expected) -> bool:
    return torch.allclose(actual, torch.as_tensor(expected, dtype=torch.float32), atol=TOLERANCE)


def no_op(env) -> dict[str, torch.Tensor]:
    return {name: torch.zeros(env.num_envs, group.n_agents, dtype=torch.int64)
            for name, group in env.learned_groups().items()}


# -- cooperative navigation --------------------------------------------------------------------

# Agents 0 and 1 collide (0.2 < 0.3); landmark 0 is nearest agent 0 (0.1), landmark 1 sits on
# agent 2, landmark 2 is nearest agent 2 (sqrt(3^2 + 5^2)).
NAV_AGENTS = [[0.0, 0.0], [0.2, 0.0], [2.0, 0.0]]
NAV_LANDMARKS = [[0.0, 0.1], [2.0, 0.0], [5.0, 5.0]]
FAR = math.sqrt(34.0)


def test_coop_nav_team_reward_is_coverage_minus_ordered_collisions_for_every_agent():
    env = make_env("coop_nav_n3", num_envs=2)
    place(env, NAV_AGENTS + NAV_LANDMARKS)
    team = -(0.1 + 0.0 + FAR) - 2
    assert close(env.rewards()["agents"], [[team] * 3] * 2)


def test_coop_nav_local_rewards_split_the_team_reward_by_nearest_agent_and_own_collisions():
    env = make_env("coop_nav_n3", num_envs=1, reward="local")
    place(env, NAV_AGENTS + NAV_LANDMARKS)
    local = env.rewards()["agents"]
    assert close(local, [[-0.1 - 1, -1.0, -FAR]])
    assert local.sum() == pytest.approx(-(0.1 + FAR) - 2, abs=TOLERANCE)


def test_coop_nav_violation_adds_the_log_distances_to_all_other_agents():
    env = make_env("coop_nav_n3", num_envs=1, reward="local", violation=True, violation_weight=2.0)
    place(env, NAV_AGENTS + NAV_LANDMARKS)
    logs = [math.log(0.2) + math.log(2.0), math.log(0.2) + math.log(1.8), math.log(2.0) + math.log(1.8)]
    expected = [-1.1 + 2 * logs[0], -1.0 + 2 * logs[1], -FAR + 2 * logs[2]]
    assert close(env.rewards()["agents"], [expected])
    team = make_env("coop_nav_n3", num_envs=1, violation=True, violation_weight=2.0)
    place(team, NAV_AGENTS + NAV_LANDMARKS)
    assert close(team.rewards()["agents"], [[sum(expected)] * 3])


@pytest.mark.parametrize("violation", [False, True])
def test_coop_nav_local_rewards_sum_to_the_team_reward(violation):
    team = make_env("coop_nav_n30", num_envs=3, seed=5, violation=violation)
    local = make_env("coop_nav_n30", num_envs=3, seed=5, violation=violation, reward="local")
    team.reset(), local.reset()
    for _ in range(3):
        actions = torch.randint(0, 5, (3, 30))
        team_step, local_step = team.step({"agents": actions}), local.step({"agents": actions})
        assert torch.allclose(local_step.groups["agents"].reward.sum(-1), team_step.groups["agents"].reward[:, 0],
                              rtol=1e-5, atol=1e-3)


def test_actions_follow_the_original_mpe_convention_and_integration():
    env = make_env("coop_nav_n6", num_envs=1)
    place(env, [[2.0 * i, 0.0] for i in range(6)] + [[0.0, 5.0]] * 6)
    env.step({"agents": torch.tensor([[0, 1, 2, 3, 4, 1]])})
    # u = (a1 - a2, a3 - a4) x 5; v = 0.5 u after one step of dt 0.1, and p moves by the new v.
    velocity = [[0.0, 0.0], [0.5, 0.0], [-0.5, 0.0], [0.0, 0.5], [0.0, -0.5], [0.5, 0.0]]
    assert close(env.velocity[0, :6], velocity)
    assert close(env.position[0, :6], [[2.0 * i + 0.1 * vx, 0.1 * vy] for i, (vx, vy) in enumerate(velocity)])


# Agent 0 at (1, 0): the other agents at distances 3, 0.5, 1, 2, 2.5, 4.47 and landmarks at
# 6.4, 0.1, 0.4, 1, 1.5, 1.7, 1.9.
OBS_AGENTS = [[1.0, 0.0], [1.0, 3.0], [1.5, 0.0], [1.0, -1.0], [1.0, -2.0], [1.0, 2.5], [3.0, -4.0]]
OBS_LANDMARKS = [[5.0, 5.0], [1.0, 0.1], [1.0, 0.4], [0.0, 0.0], [1.0, -1.5], [1.0, 1.7], [1.0, -1.9]]
OTHERS_NEAREST_FIRST = [0.5, 0.0, 0.0, -1.0, 0.0, -2.0, 0.0, 2.5, 0.0, 3.0]


def test_coop_nav_observation_is_velocity_position_then_nearest_landmarks_and_agents():
    env = make_env("coop_nav", num_envs=1, n_agents=7, sort_key="correct")
    velocities = [[0.3, -0.2]] + [[0.0, 0.0]] * 13
    place(env, OBS_AGENTS + OBS_LANDMARKS, velocities)
    obs = env.observations()["agents"]
    assert obs.shape == (1, 7, 26)
    landmarks = [0.0, 0.1, 0.0, 0.4, -1.0, 0.0, 0.0, -1.5, 0.0, 1.7, 0.0, -1.9]
    assert close(obs[0, 0], [0.3, -0.2, 1.0, 0.0] + landmarks + OTHERS_NEAREST_FIRST)


def test_coop_nav_pic_bug_ranks_by_distance_to_twice_the_own_position():
    env = make_env("coop_nav", num_envs=1, n_agents=7, sort_key="pic_bug")
    place(env, OBS_AGENTS + OBS_LANDMARKS)
    # Keys |l - (2, 0)|: 1.005, 1.077, 1.80, 1.97, 2.0, 2.147 for landmarks 1, 2, 4, 5, 3, 6;
    # the values observed are still l - p.
    landmarks = [0.0, 0.1, 0.0, 0.4, 0.0, -1.5, 0.0, 1.7, -1.0, 0.0, 0.0, -1.9]
    assert close(env.observations()["agents"][0, 0, 4:16], landmarks)


def test_coop_nav_orders_follow_pic_files():
    orders = {n: make_env("coop_nav", n_agents=n).orders for n in (3, 6, 10, 15, 30, 100)}
    assert orders[15] == orders[30] == ("pic_bug", "pic_bug")
    assert orders[3] == orders[10] == orders[100] == ("distance", "distance")
    assert orders[6] == ("index", "lexicographic")


def test_coop_nav_n6_lists_landmarks_by_index_and_other_agents_by_dx_then_dy():
    env = make_env("coop_nav_n6", num_envs=1)
    agents = [[0.0, 0.0], [1.0, 0.0], [-1.0, 2.0], [-1.0, -3.0], [0.5, 0.5], [0.5, -1.0]]
    landmarks = [[3.0, 3.0], [0.1, 0.0], [-2.0, 1.0], [0.0, 0.2], [1.0, 1.0], [-1.0, -1.0]]
    place(env, agents + landmarks)
    others = [-1.0, -3.0, -1.0, 2.0, 0.5, -1.0, 0.5, 0.5, 1.0, 0.0]
    assert close(env.observations()["agents"][0, 0], [0.0] * 4 + sum(landmarks, []) + others)


@pytest.mark.parametrize("n, dim", [(3, 14), (4, 18), (6, 26), (15, 26), (30, 26), (200, 26)])
def test_coop_nav_observation_sizes(n, dim):
    env = make_env("coop_nav", num_envs=2, n_agents=n)
    assert env.groups["agents"].obs_dim == dim
    assert env.reset().groups["agents"].obs.shape == (2, n, dim)


def test_coop_nav_landmarks_keep_the_poisson_disc_separation():
    env = make_env("coop_nav_n200", num_envs=3, seed=2)
    env.reset()
    landmarks = env.position[:, 200:]
    between = pairwise_distance(landmarks, landmarks) + torch.eye(200) * 100
    assert between.min() >= 4.5 * 0.15 - TOLERANCE
    assert landmarks.abs().max() <= 7.0


def test_poisson_disc_holds_its_separation_near_the_sampler_limit():
    env = make_env("coop_nav_n15", num_envs=4)
    ids = torch.arange(4)
    points = env.poisson_disc(ids, torch.zeros(4, dtype=torch.long), n=120, side=10.0, min_distance=0.75, stream=0)
    between = pairwise_distance(points, points) + torch.eye(120) * 100
    assert between.min() >= 0.75 - TOLERANCE
    assert points.min() >= 0 and points.max() < 10.0


def test_resets_are_reproducible_per_sub_environment():
    four = make_env("coop_nav_n15", num_envs=4, seed=3)
    two = make_env("coop_nav_n15", num_envs=2, seed=3)
    other_seed = make_env("coop_nav_n15", num_envs=2, seed=4)
    four.reset(), two.reset(), other_seed.reset()
    assert torch.equal(four.position[:2], two.position)
    assert not torch.equal(four.position[0], four.position[1])
    assert not torch.equal(two.position, other_seed.position)


@pytest.mark.parametrize("name, kwargs, group, k", [("coop_nav_n15", {}, "agents", 4),
                                                    ("coop_nav_n100", {}, "agents", 8),
                                                    ("prey_predator", {"n_predators": 30}, "predators", 4)])
def test_graph_is_the_knn_graph_of_the_group_positions(name, kwargs, group, k):
    env = make_env(name, num_envs=2, **kwargs)
    step = env.reset(seed=1)
    for _ in range(5):  # the graph is rebuilt every 5 steps: compare right after a rebuild
        step = env.step(no_op(env))
    spec = env.groups[group]
    expected = knn_graph(env.position[:, :spec.n_agents], k)
    assert spec.graph_k == k
    assert torch.equal(step.groups[group].graph.neighbors, expected.neighbors)
    assert torch.equal(step.groups[group].graph.mask, expected.mask)


def test_coop_nav_1225_agents_step():
    env = make_env("coop_nav_n1225", num_envs=2)
    step = env.reset()
    for _ in range(2):
        step = env.step({"agents": torch.randint(0, 5, (2, 1225))})
    assert step.groups["agents"].obs.shape == (2, 1225, 26)
    assert torch.isfinite(step.groups["agents"].reward).all()


# -- heterogeneous navigation --------------------------------------------------------------------


def test_hetero_nav_mixed_collisions_cost_ten_times_more():
    env = make_env("hetero_nav", num_envs=1, n_agents=4)  # big 0.10, small 0.05
    # big-big at 0.15 (< 0.2), small-small at 0.06 (< 0.1), big 0 - small 2 at 0.14 (< 0.15);
    # every other pair is apart. Landmark 3 is 0.5 from its nearest agent, the others on agents.
    agents = [[0.0, 0.0], [0.15, 0.0], [0.0, 0.14], [0.0, 0.2]]
    landmarks = [[0.0, 0.0], [0.15, 0.0], [0.0, 0.14], [0.0, 0.7]]
    place(env, agents + landmarks)
    assert close(env.rewards()["agents"], [[-0.5 - (4 + 10 * 2)] * 4])


def test_hetero_nav_pic_contact_pushes_every_pair_apart_at_twice_the_first_agent_size():
    pushed = {}
    for pic_contact in (True, False):
        env = make_env("hetero_nav", num_envs=1, n_agents=4, pic_contact=pic_contact)
        # big 0 and small 2 at 0.18: inside 2 x 0.10, outside 0.10 + 0.05.
        place(env, [[0.0, 0.0], [3.0, 3.0], [0.18, 0.0], [-3.0, -3.0]] + [[9.0, 9.0]] * 4)
        env.step(no_op(env))
        pushed[pic_contact] = env.velocity[0, 2, 0].item()
    assert pushed[True] > 0.1
    assert abs(pushed[False]) < 1e-6


def test_hetero_nav_groups_by_type_share_the_team_reward():
    env = make_env("hetero_nav", num_envs=2, n_agents=8, groups="by_type")
    env.reset()
    step = env.step(no_op(env))
    assert set(env.groups) == {"big", "small"} and env.groups["big"].obs_dim == 22
    assert torch.equal(step.groups["big"].reward, step.groups["small"].reward)
    assert step.groups["small"].obs.shape == (2, 4, 22)
    with pytest.raises(VimarlError, match="even"):
        make_env("hetero_nav", n_agents=7)


@pytest.mark.parametrize("n, dim", [(4, 14), (8, 22), (16, 22), (100, 22), (300, 22)])
def test_hetero_nav_observation_sizes(n, dim):
    assert make_env("hetero_nav", n_agents=n).groups["agents"].obs_dim == dim


# -- cooperative push ----------------------------------------------------------------------------


def test_coop_push_reward_pulls_the_ball_to_the_target_with_a_touch_bonus():
    env = make_env("coop_push", num_envs=1, n_agents=3)  # agent 0.06, ball 0.10
    agents = [[0.1, 0.0], [0.0, 0.15], [1.0, 0.0]]
    place(env, agents + [[0.0, 0.0], [0.3, 0.4]])
    # -2 |ball - target| - 0.1 min distance + 0.1 x 2 agents within 0.16 of the ball.
    assert close(env.rewards()["agents"], [[-2 * 0.5 - 0.1 * 0.1 + 0.1 * 2] * 3])


def test_coop_push_agents_move_the_ball_only_within_twice_their_size():
    moved = {}
    for pic_contact in (True, False):
        env = make_env("coop_push", num_envs=1, n_agents=3, pic_contact=pic_contact)
        # 0.14 from the ball: inside 0.06 + 0.10, outside 2 x 0.06.
        place(env, [[-0.14, 0.0], [0.9, 0.9], [-0.9, 0.9], [0.0, 0.0], [0.5, -0.5]])
        env.step(no_op(env))
        moved[pic_contact] = env.velocity[0, 3, 0].item()
    assert abs(moved[True]) < 1e-6
    assert moved[False] > 0.01


def test_coop_push_observation_layout():
    env = make_env("coop_push", num_envs=1, n_agents=15)
    agents = [[0.0, 0.0]] + [[0.1 * i, 1.0] for i in range(1, 15)]
    place(env, agents + [[0.5, 0.5], [-1.0, 1.0]], [[0.2, 0.1]] + [[0.0, 0.0]] * 16)
    obs = env.observations()["agents"][0, 0]
    nearest_ten = sum([[0.1 * i, 1.0] for i in range(1, 11)], [])
    assert close(obs, [0.2, 0.1, 0.0, 0.0, 0.5, 0.5, -1.0, 1.0] + nearest_ten)


@pytest.mark.parametrize("n, dim", [(3, 12), (6, 18), (15, 28), (30, 18), (100, 28)])
def test_coop_push_observation_sizes(n, dim):
    assert make_env("coop_push", n_agents=n).groups["agents"].obs_dim == dim


# -- prey and predator ---------------------------------------------------------------------------

# 3 predators, 1 prey, 2 landmarks (sizes 0.075 / 0.05: capture within 0.125).
CAPTURE = [[0.0, 0.0], [0.1, 0.0], [1.0, 1.0], [0.05, 0.05], [-0.8, 0.8], [-0.8, -0.8]]


def test_predators_share_the_capture_reward_and_prey_pay_for_it():
    env = make_env("prey_predator", num_envs=1, n_predators=3)
    place(env, CAPTURE)
    rewards = env.rewards()
    near = math.hypot(0.05, 0.05)
    chase = -0.1 * (near + near + math.hypot(0.95, 0.95)) + 10 * 2
    assert close(rewards["predators"], [[chase] * 3])
    assert close(rewards["prey"], [[-20.0]])


def test_prey_boundary_penalty_grows_past_the_edge():
    env = make_env("prey_predator", num_envs=1, n_predators=3)
    place(env, [[0.0, 0.0], [0.1, 0.0], [0.2, 0.0], [0.95, 1.2], [-0.8, 0.8], [-0.8, -0.8]])
    assert close(env.rewards()["prey"], [[-(10 * 0.05 + math.exp(0.4))]])


def test_predator_and_prey_observations_list_nearest_first_with_prey_velocities():
    env = make_env("prey_predator", num_envs=1, n_predators=6, sort_key="correct")
    predators = [[0.0, 0.0], [0.5, 0.0], [0.0, -0.3], [0.9, 0.0], [0.0, 0.7], [-0.1, 0.0]]
    prey = [[0.4, 0.4], [-0.2, 0.1]]
    landmarks = [[1.0, 1.0], [0.0, 0.25], [-0.6, 0.0]]
    velocities = [[0.05, -0.05]] + [[0.0, 0.0]] * 5 + [[0.1, 0.2], [-0.3, 0.0]] + [[0.0, 0.0]] * 3
    place(env, predators + prey + landmarks, velocities)
    obs = env.observations()
    expected = ([0.05, -0.05, 0.0, 0.0] + [0.0, 0.25, -0.6, 0.0, 1.0, 1.0]
                + [-0.1, 0.0, 0.0, -0.3, 0.5, 0.0, 0.0, 0.7, 0.9, 0.0]
                + [-0.2, 0.1, 0.4, 0.4] + [-0.3, 0.0, 0.1, 0.2])
    assert close(obs["predators"][0, 0], expected)
    # The second prey's nearest other prey is the first, at (0.6, 0.3), moving at (0.1, 0.2).
    assert close(obs["prey"][0, 1, -4:], [0.6, 0.3, 0.1, 0.2])


@pytest.mark.parametrize("n, predator_dim, prey_dim", [(3, 16, 14), (6, 28, 26), (15, 34, 26), (30, 44, 26),
                                                       (100, 44, 26)])
def test_prey_predator_observation_sizes(n, predator_dim, prey_dim):
    env = make_env("prey_predator", n_predators=n)
    assert (env.groups["predators"].obs_dim, env.groups["prey"].obs_dim) == (predator_dim, prey_dim)
    assert env.groups["prey"].role == "scripted" and set(env.learned_groups()) == {"predators"}


def test_scripted_prey_flee_predators_and_turn_back_from_the_edge():
    env = make_env("prey_predator", num_envs=1, n_predators=3)
    place(env, [[0.3, 0.0], [0.4, 0.0], [0.5, 0.0], [0.0, 0.0], [-0.8, 0.8], [-0.8, -0.8]])
    env.step(no_op(env))
    assert env.velocity[0, 3, 0] < -0.1 and abs(env.velocity[0, 3, 1]) < 1e-6
    place(env, [[0.3, 0.95], [0.4, 0.95], [0.5, 0.95], [0.0, 0.95], [-0.8, 0.8], [-0.8, -0.8]])
    env.step(no_op(env))
    assert env.velocity[0, 3, 0] < 0 and env.velocity[0, 3, 1] < 0


def test_learned_prey_need_actions():
    env = make_env("prey_predator_n100", num_envs=2, prey="learned")
    assert set(env.learned_groups()) == {"predators", "prey"}
    env.reset()
    step = env.step(no_op(env))
    assert step.groups["prey"].reward.shape == (2, 30)


@pytest.mark.parametrize("name, kwargs", [("coop_nav", {"n_agents": 1}), ("coop_push", {"n_neighbors": 100}),
                                          ("prey_predator", {"n_prey": 0}), ("coop_nav", {"violation_weight": -1})])
def test_bad_settings_are_rejected(name, kwargs):
    with pytest.raises(VimarlError):
        make_env(name, **kwargs)
