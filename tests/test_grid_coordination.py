"""The n x n grid coordination game against hand-computed values and a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vimarl.envs.base import Discrete
from vimarl.envs.graph import grid_graph
from vimarl.envs.registry import make_env
from vimarl.errors import VimarlError

torch.set_num_threads(1)

BLUE, ORANGE, GREY, RED = (70, 130, 220), (240, 150, 40), (170, 170, 170), (220, 30, 30)


def grid_edges(n: int) -> list[tuple[int, int]]:
    """Every edge (i, j), i < j, of the n x n 4-neighbourhood grid, listed by hand."""
    edges = []
    for r in range(n):
        for c in range(n):
            if c + 1 < n:
                edges.append((r * n + c, r * n + c + 1))
            if r + 1 < n:
                edges.append((r * n + c, (r + 1) * n + c))
    return edges


def reference_rewards(action: list[int], n: int) -> tuple[list[float], float]:
    """Local rewards (each edge's cost split between its ends) and the team reward, by loops."""
    local = [0.0] * (n * n)
    team = 0.0
    for i, j in grid_edges(n):
        cost = float((action[i] - action[j]) ** 2)
        team -= cost
        local[i] -= cost / 2
        local[j] -= cost / 2
    return local, team


def play(actions: list[list[int]] | torch.Tensor, n: int = 3):
    """One step of len(actions) sub-environments; returns the TimeStep."""
    actions = torch.as_tensor(actions, dtype=torch.int64)
    env = make_env("grid_coordination", num_envs=actions.shape[0], n=n)
    env.reset(seed=0)
    return env.step({"agents": actions})


def checkerboard(n: int) -> list[int]:
    return [(r + c) % 2 for r in range(n) for c in range(n)]


def test_specs_and_graph():
    env = make_env("grid_coordination", num_envs=4)
    spec = env.groups["agents"]
    assert spec.n_agents == 9 and env.n_agents == 9
    assert spec.action_space == Discrete(2)
    assert spec.obs_dim == 1 and spec.graph_k == 4 and not spec.has_action_mask
    assert env.state_dim == 1 and env.max_steps == 1
    step = env.reset(seed=0)
    expected = grid_graph(3, 3, 4)
    graph = step.groups["agents"].graph
    assert torch.equal(graph.neighbors, expected.neighbors)
    assert torch.equal(graph.mask, expected.mask)
    assert torch.equal(step.groups["agents"].obs, torch.ones(4, 9, 1))
    assert torch.equal(step.state, torch.ones(4, 1))
    assert torch.equal(step.groups["agents"].reward, torch.zeros(4, 9))


@pytest.mark.parametrize("value", [0, 1])
def test_all_equal_actions_cost_nothing(value):
    step = play([[value] * 9])
    assert torch.equal(step.groups["agents"].reward, torch.zeros(1, 9))


def test_hand_computed_cases():
    centre = [0] * 9
    centre[4] = 1
    corner = [1] + [0] * 8
    step = play([centre, corner, checkerboard(3)])
    reward = step.groups["agents"].reward
    # Centre differs: it pays 1/2 on each of its 4 edges, each neighbour 1/2 on one edge.
    assert reward[0].tolist() == [0.0, -0.5, 0.0, -0.5, -2.0, -0.5, 0.0, -0.5, 0.0]
    # A corner has 2 edges.
    assert reward[1].tolist() == [-1.0, -0.5, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0]
    # Checkerboard: every edge disagrees; an agent pays half its degree.
    assert reward[2].tolist() == [-1.0, -1.5, -1.0, -1.5, -2.0, -1.5, -1.0, -1.5, -1.0]
    assert reward.sum(-1).tolist() == [-4.0, -2.0, -12.0]


def test_all_512_joint_actions_match_the_edge_list_reference():
    joint = torch.arange(512)
    actions = (joint.unsqueeze(-1) >> torch.arange(9)) & 1  # [512, 9], every joint action once
    reward = play(actions).groups["agents"].reward
    for b in range(512):
        local, team = reference_rewards(actions[b].tolist(), 3)
        assert reward[b].tolist() == local, actions[b].tolist()
        assert reward[b].sum().item() == team
    # Uniform random actions: each of the 12 edges disagrees with probability 1/2.
    assert reward.sum(-1).mean().item() == -6.0
    # Only the two consensus actions reach the optimum 0.
    assert (reward.sum(-1) == 0).sum().item() == 2


def test_every_step_ends_the_episode_and_auto_resets():
    env = make_env("grid_coordination", num_envs=3)
    start = env.reset(seed=0)
    for t in range(1, 4):
        step = env.step({"agents": torch.tensor([checkerboard(3), [0] * 9, [1] * 9])})
        assert step.terminated.all() and not step.truncated.any()
        assert torch.equal(env.episode_index, torch.full((3,), t))
        assert torch.equal(env.episode_step, torch.zeros(3, dtype=torch.int64))
        assert torch.equal(step.groups["agents"].obs, start.groups["agents"].obs)
        assert torch.equal(step.info["final_obs"]["agents"], start.groups["agents"].obs)
        assert step.groups["agents"].reward.sum(-1).tolist() == [-12.0, 0.0, 0.0]


def test_agent_ids_append_a_one_hot_index():
    env = make_env("grid_coordination", num_envs=2, agent_ids=True)
    assert env.groups["agents"].obs_dim == 10
    obs = env.reset(seed=0).groups["agents"].obs
    assert obs.shape == (2, 9, 10)
    assert torch.equal(obs[..., 0], torch.ones(2, 9))
    assert torch.equal(obs[0, :, 1:], torch.eye(9)) and torch.equal(obs[1, :, 1:], torch.eye(9))


def test_n4_has_24_edges():
    env = make_env("grid_coordination", num_envs=1, n=4)
    assert env.groups["agents"].n_agents == 16
    graph = env.reset(seed=0).groups["agents"].graph
    assert graph.mask.sum().item() == 2 * 24 == 2 * len(grid_edges(4))
    step = play([checkerboard(4)], n=4)
    assert step.groups["agents"].reward.sum().item() == -24.0
    generator = torch.Generator().manual_seed(0)
    actions = torch.randint(0, 2, (64, 16), generator=generator)
    reward = play(actions, n=4).groups["agents"].reward
    for b in range(64):
        local, team = reference_rewards(actions[b].tolist(), 4)
        assert reward[b].tolist() == local


@pytest.mark.parametrize("n", [1, 0, -3])
def test_n_below_2_is_rejected(n):
    with pytest.raises(VimarlError, match="n must be at least 2"):
        make_env("grid_coordination", n=n)


def cell_colour(image: np.ndarray, r: int, c: int, cell: int = 48) -> tuple[int, ...]:
    return tuple(int(v) for v in image[r * cell + cell // 2, c * cell + cell // 2])


def test_render_colours_follow_the_actions():
    env = make_env("grid_coordination", num_envs=2)
    env.reset(seed=0)
    blank = env.render()
    assert blank.dtype == np.uint8 and blank.shape == (144, 144, 3)
    assert all(cell_colour(blank, r, c) == GREY for r in range(3) for c in range(3))

    env.step({"agents": torch.tensor([[0] * 9, [1] * 9])})
    agreed = env.render()  # sub-environment 0 only
    assert all(cell_colour(agreed, r, c) == BLUE for r in range(3) for c in range(3))
    assert not (agreed == np.array(RED, dtype=np.uint8)).all(-1).any()

    board = checkerboard(3)
    env.step({"agents": torch.tensor([board, [0] * 9])})
    image = env.render()
    for r in range(3):
        for c in range(3):
            assert cell_colour(image, r, c) == (ORANGE if board[r * 3 + c] else BLUE)
    # A red bar marks the disagreement between cells (0, 0) and (0, 1).
    assert tuple(int(v) for v in image[24, 48]) == RED
    assert not np.array_equal(image, agreed)
