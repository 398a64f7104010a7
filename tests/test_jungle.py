"""DGN's Jungle on MAgent2: reward rules, actions, observations, graph, episodes, seeding."""

import pytest
import torch

magent2 = pytest.importorskip("magent2", reason="jungle needs MAgent2: pip install 'vimarl[magent]'")

from vimarl.envs.external.jungle import Jungle, JungleConfig
from vimarl.envs.registry import make_env
from vimarl.errors import VimarlError

N = 20
STAY, ATTACK_UP, ATTACK_LEFT, ATTACK_RIGHT, ATTACK_DOWN = 2, 5, 6, 7, 8
MOVES = {0: (0, -1), 1: (-1, 0), 2: (0, 0), 3: (1, 0), 4: (0, 1)}
"""Action -> (dx, dy), spec §4.2."""


def jungle(num_envs=1, seed=0, **config):
    env = Jungle(JungleConfig(**config), num_envs=num_envs, seed=seed)
    env.reset(seed=seed)
    return env


def actions_of(env, per_agent, default=STAY):
    """[B, N] actions: `per_agent` {slot: action} in every sub-environment, `default` elsewhere."""
    action = torch.full((env.num_envs, N), default, dtype=torch.int64)
    for slot, value in per_agent.items():
        action[:, slot] = value
    return {"agents": action}


def test_reward_rules_on_hand_placed_agents():
    env = jungle(num_envs=2)
    env.place(1, agent_cells=[(5, 5), (10, 10), (11, 10), (15, 15), (20, 20), (5, 20)],
              food_cells=[(5, 4), (5, 21)])
    step = env.step(actions_of(env, {0: ATTACK_UP,      # the food above it
                                     1: ATTACK_RIGHT,   # agent 2
                                     3: ATTACK_LEFT,    # an empty cell
                                     4: 3,              # a move right
                                     5: ATTACK_LEFT}))  # empty; its food is below, not left
    reward = step.groups["agents"].reward[1]
    expected = torch.zeros(N)
    expected[:6] = torch.tensor([1 - 0.01, 2 - 0.01, -4.0, -0.01, 0.0, -0.01])
    torch.testing.assert_close(reward, expected)
    assert env.agent_cells[1, 4].tolist() == [21, 20]


def test_move_actions_follow_the_spec_and_walls_block():
    env = jungle()
    start = [(10, 10), (14, 10), (18, 10), (22, 10), (10, 14)]
    env.place(0, agent_cells=start + [(1, 1), (28, 28)], food_cells=[])
    # Agents 0..4 take moves 0..4; the corner agents push into the border wall.
    env.step(actions_of(env, {**{slot: slot for slot in range(5)}, 5: 0, 6: 3}))
    cells = env.agent_cells[0]
    for action, (x, y) in enumerate(start):
        dx, dy = MOVES[action]
        assert cells[action].tolist() == [x + dx, y + dy]
    env.step(actions_of(env, {5: 1, 6: 4}))
    assert cells[5].tolist() == env.agent_cells[0, 5].tolist() == [1, 1]
    assert cells[6].tolist() == env.agent_cells[0, 6].tolist() == [28, 28]


def test_observation_window_and_coordinates():
    env = jungle(map_size=30)
    obs = env.place(0, agent_cells=[(6, 9), (6, 7)], food_cells=[(8, 9), (20, 20)]).obs[0, 0]
    view = obs[:121].view(11, 11)  # rows are y, columns x, the agent at the centre (5, 5)
    expected = torch.zeros(11, 11)
    expected[5, 5] = 1.0    # itself (index 60)
    expected[3, 5] = 1.0    # agent 1, two rows up
    expected[5, 7] = -1.0   # the near food, two columns right; the far one is out of view
    torch.testing.assert_close(view, expected)
    assert obs[60] == 1.0
    torch.testing.assert_close(obs[121:], torch.tensor([9 / 30, 6 / 30]))  # [y / H, x / W]


def test_graph_links_the_three_nearest_other_agents():
    env = jungle()
    cells = [(10, 10), (11, 10), (13, 10), (10, 14), (20, 20), (20, 26)]
    graph = env.place(0, agent_cells=cells, food_cells=[]).graph
    assert env.groups["agents"].graph_k == 3
    assert graph.neighbors[0, 0].tolist() == [1, 2, 3]
    # Squared distances from agent 4: 36 to agent 5, 136 to agent 3, 149 to agent 2.
    assert graph.neighbors[0, 4].tolist() == [5, 3, 2]
    assert graph.mask[0, :6].all()
    # The 14 empty slots are no one's neighbours and have none.
    assert not graph.mask[0, 6:].any()
    assert graph.neighbors[0, 6:].tolist() == [[slot] * 3 for slot in range(6, N)]


def test_random_layouts_are_distinct_free_cells_and_graph_is_knn():
    env = jungle(num_envs=3)
    cells = env.agent_cells
    assert ((cells >= 1) & (cells <= 28)).all()
    for env_index in range(3):
        assert len({tuple(c) for c in cells[env_index].tolist()}) == N
    graph = env._observe()[0]["agents"].graph
    distances = torch.cdist(cells.float(), cells.float())
    distances.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    nearest = distances.gather(2, graph.neighbors)
    third_nearest = distances.sort(dim=-1).values[..., 2:3]
    assert graph.mask.all() and (nearest <= third_nearest).all()


def test_dead_agent_keeps_its_slot_out_of_the_graph():
    env = jungle()
    # Four attackers around agent 0 take 4 of its 400 hp per step.
    env.place(0, agent_cells=[(10, 10), (10, 9), (9, 10), (11, 10), (10, 11)], food_cells=[])
    attack = actions_of(env, {1: ATTACK_DOWN, 2: ATTACK_RIGHT, 3: ATTACK_LEFT, 4: ATTACK_UP})
    for _ in range(110):
        step = env.step(attack)
        if not env.alive[0, 0]:
            break
    assert not env.alive[0, 0] and env.alive[0, 1:5].all()
    step = env.step(attack)
    agents = step.groups["agents"]
    assert (agents.obs[0, 0] == 0).all()
    assert agents.reward[0, 0] == 0
    assert not agents.graph.mask[0, 0].any()
    pointing_at_dead = (agents.graph.neighbors[0] == 0) & agents.graph.mask[0]
    assert not pointing_at_dead.any()


@pytest.mark.parametrize("name, length", [("jungle", 120), ("jungle_t25", 25)])
def test_episodes_truncate_and_auto_reset(name, length):
    env = make_env(name, num_envs=2, seed=3)
    assert env.max_steps == length
    spec = env.groups["agents"]
    assert (spec.n_agents, spec.obs_dim, spec.action_space.n, spec.graph_k) == (20, 123, 9, 3)
    first = env.reset(seed=3)
    assert first.state is None and first.groups["agents"].obs.shape == (2, 20, 123)
    generator = torch.Generator().manual_seed(0)
    for t in range(1, length + 1):
        step = env.step({"agents": torch.randint(0, 9, (2, N), generator=generator)})
        assert not step.terminated.any()
        assert step.truncated.all() == (t == length) and step.truncated.any() == (t == length)
    assert env.episode_index.tolist() == [1, 1] and env.episode_step.tolist() == [0, 0]
    # The new episode's layout is episode 1's, not episode 0's again.
    assert not torch.equal(step.groups["agents"].obs, first.groups["agents"].obs)
    assert not torch.equal(step.info["final_obs"]["agents"], step.groups["agents"].obs)


def rollout(num_envs, seed, steps=30):
    """Observations, rewards and graphs of sub-environments 0 and 1 under fixed actions."""
    env = jungle(num_envs=num_envs, seed=seed, episode_length=12)
    generator = torch.Generator().manual_seed(1)
    trace = []
    for _ in range(steps):
        action = torch.randint(0, 9, (3, N), generator=generator)[:num_envs]
        agents = env.step({"agents": action}).groups["agents"]
        trace.append((agents.obs[:2], agents.reward[:2], agents.graph.neighbors[:2]))
    return trace


def test_seeded_episodes_replay_whatever_the_batch_size():
    reference = rollout(num_envs=2, seed=5)
    assert any(reward.any() for _, reward, _ in reference)  # the comparison sees real rewards
    for other in (rollout(num_envs=2, seed=5), rollout(num_envs=3, seed=5)):
        for expected, actual in zip(reference, other):
            for a, b in zip(expected, actual):
                assert torch.equal(a, b)
    different = rollout(num_envs=2, seed=6, steps=1)
    assert not torch.equal(different[0][0], reference[0][0])


def test_loading_a_checkpoint_restarts_the_episodes_in_progress():
    env = jungle(num_envs=2, seed=4)
    stay = actions_of(env, {})
    for _ in range(13):
        env.step(stay)
    state = env.state_dict()
    start_of_episode = env.reset().groups["agents"].obs  # episode 1 of each sub-environment
    env.step({"agents": torch.full((2, N), ATTACK_UP)})
    env.load_state_dict(state)
    assert env.episode_step.tolist() == [0, 0] and env.episode_index.tolist() == [0, 0]
    assert not torch.equal(env._observe()[0]["agents"].obs, start_of_episode)
    assert torch.equal(env._observe()[0]["agents"].obs, jungle(num_envs=2, seed=4)._observe()[0]["agents"].obs)


def test_render_draws_walls_agents_and_food():
    env = jungle()
    env.place(0, agent_cells=[(3, 4)], food_cells=[(7, 2)])
    image = env.render()
    assert image.shape == (240, 240, 3) and image.dtype.name == "uint8"
    assert image[0, 0].tolist() == [128, 128, 128]
    assert image[4 * 8 + 4, 3 * 8 + 4].tolist() == [40, 90, 220]  # row y, column x
    assert image[2 * 8 + 4, 7 * 8 + 4].tolist() == [40, 170, 60]
    assert image[10 * 8 + 4, 10 * 8 + 4].tolist() == [255, 255, 255]


def test_bad_config_and_actions_give_one_line_errors():
    with pytest.raises(ValueError, match="graph_k must be in 1..19"):
        JungleConfig(graph_k=20)
    with pytest.raises(ValueError, match="do not fit"):
        JungleConfig(map_size=6, n_agents=10, n_food=10)
    with pytest.raises((ValueError, VimarlError)) as error:
        make_env("jungle", n_agents=1)
    assert "\n" not in str(error.value)
    env = jungle()
    with pytest.raises(VimarlError, match="in 0..8"):
        env.step({"agents": torch.full((1, N), 9)})
