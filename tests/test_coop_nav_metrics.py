"""coop_nav's episode metrics (team_return, coverage_distance, collisions in each step's info): by
hand on a fixed layout, against the returns of the team and local reward modes, and as the
trainer's eval_<name> columns."""

from __future__ import annotations

import math

import pytest
import torch

from vimarl.algos.base import UniformPolicy
from vimarl.envs.registry import make_env
from vimarl.train import evaluate

torch.set_num_threads(1)

# Agents 0 and 1 collide (0.2 < 0.3: two ordered pairs); landmark 0 is 0.1 from agent 0, landmark 1
# sits on agent 2, landmark 2 is sqrt(3^2 + 5^2) from agent 2.
AGENTS = [[0.0, 0.0], [0.2, 0.0], [2.0, 0.0]]
LANDMARKS = [[0.0, 0.1], [2.0, 0.0], [5.0, 5.0]]
FAR = math.sqrt(34.0)


def frozen_layout(env) -> None:
    """Put every sub-environment at AGENTS + LANDMARKS and switch the physics off, so that the
    layout holds whatever the actions (the metrics are read after each step)."""
    env.position = torch.tensor(AGENTS + LANDMARKS).expand(env.num_envs, -1, -1).clone()
    env.velocity = torch.zeros_like(env.position)
    env.world.step = lambda force: None


def test_metrics_by_hand_on_a_fixed_layout_accumulate_and_restart_with_each_episode():
    env = make_env("coop_nav_n3", num_envs=2, episode_length=3)
    env.reset(seed=0)
    frozen_layout(env)
    no_op = {"agents": torch.zeros(2, 3, dtype=torch.int64)}
    team_reward = -(0.1 + 0.0 + FAR) - 2  # R = -sum_l d(l) - C per step
    for t in range(1, 4):
        step = env.step(no_op)
        assert step.done.tolist() == [t == 3] * 2
        assert torch.allclose(step.info["team_return"], torch.full((2,), 3 * t * team_reward))
        assert torch.allclose(step.info["coverage_distance"], torch.full((2,), (0.1 + FAR) / 3))
        assert step.info["collisions"].tolist() == [2.0 * t] * 2
        for key in ("team_return", "coverage_distance", "collisions"):
            assert step.info[key].dtype == torch.float32 and step.info[key].shape == (2,)
    # The auto-reset restarted the sums: the next episode's first step counts alone.
    frozen_layout(env)
    step = env.step(no_op)
    assert torch.allclose(step.info["team_return"], torch.full((2,), 3 * team_reward))
    assert step.info["collisions"].tolist() == [2.0, 2.0]


def test_a_collision_free_layout_counts_no_collisions():
    env = make_env("coop_nav_n3", num_envs=1)
    env.reset(seed=0)
    frozen_layout(env)
    env.position[0, 1] = torch.tensor([-3.0, 0.0])  # agent 1 away from the others; it covers nothing
    step = env.step({"agents": torch.zeros(1, 3, dtype=torch.int64)})
    assert step.info["collisions"].tolist() == [0.0]
    assert step.info["team_return"].item() == pytest.approx(3 * -(0.1 + FAR), abs=1e-5)
    assert step.info["coverage_distance"].item() == pytest.approx((0.1 + FAR) / 3, abs=1e-6)


@pytest.mark.parametrize("n", [3, 6])
def test_team_return_is_the_team_mode_return_and_n_times_the_local_one(n):
    envs = {mode: make_env(f"coop_nav_n{n}", num_envs=3, seed=4, episode_length=4, reward=mode)
            for mode in ("team", "local")}
    envs["violation"] = make_env(f"coop_nav_n{n}", num_envs=3, seed=4, episode_length=4, violation=True)
    for env in envs.values():
        env.reset(seed=4)
    generator = torch.Generator().manual_seed(n)
    returns = {mode: torch.zeros(3) for mode in envs}
    episodes_checked = 0
    for _ in range(8):  # two episodes of four steps
        actions = {"agents": torch.randint(0, 5, (3, n), generator=generator)}
        steps = {mode: env.step(actions) for mode, env in envs.items()}
        for mode, step in steps.items():
            returns[mode] += step.groups["agents"].reward.sum(-1)
        team = steps["team"]
        for mode, step in steps.items():  # the same actions give the same metrics in every mode
            for key in ("team_return", "coverage_distance", "collisions"):
                assert torch.allclose(step.info[key], team.info[key], rtol=1e-5, atol=1e-4), (mode, key)
        if bool(team.done.all()):
            metric = team.info["team_return"]
            assert torch.allclose(metric, returns["team"], rtol=1e-5, atol=1e-3)
            assert torch.allclose(metric, n * returns["local"], rtol=1e-5, atol=1e-3)
            assert not torch.allclose(metric, returns["violation"], atol=1.0)  # the violation term is left out
            returns = {mode: torch.zeros(3) for mode in envs}
            episodes_checked += 1
    assert episodes_checked == 2


def test_evaluate_collects_the_metrics_of_each_episodes_last_step():
    team, local = (make_env("coop_nav_n6", num_envs=4, seed=0, reward=mode) for mode in ("team", "local"))
    team_metrics, local_metrics = {}, {}
    team_returns = evaluate(UniformPolicy(team.groups, 1), team, seed=7, metrics=team_metrics)["agents"]
    local_returns = evaluate(UniformPolicy(local.groups, 1), local, seed=7, metrics=local_metrics)["agents"]
    assert set(team_metrics) == {"team_return", "coverage_distance", "collisions"}
    assert torch.allclose(team_metrics["team_return"], team_returns, rtol=1e-5)
    assert torch.allclose(local_metrics["team_return"], 6 * local_returns, rtol=1e-5)
    for key in ("coverage_distance", "collisions"):  # the same actions in both modes
        assert torch.allclose(team_metrics[key], local_metrics[key])


def test_coverage_distance_is_read_from_the_final_state():
    env = make_env("coop_nav_n6", num_envs=2, seed=1, episode_length=3)
    step = env.reset(seed=1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        step = env.step({"agents": torch.randint(0, 5, (2, 6), generator=generator)})
    assert bool(step.done.all())
    position = step.info["final_state"][:, :24].view(2, 12, 2)
    expected = torch.cdist(position[:, 6:], position[:, :6]).min(-1).values.mean(-1)
    assert torch.allclose(step.info["coverage_distance"], expected, atol=1e-5)


def test_checkpointed_sums_continue_after_load():
    env = make_env("coop_nav_n3", num_envs=2, seed=0, episode_length=5)
    env.reset(seed=0)
    actions = {"agents": torch.ones(2, 3, dtype=torch.int64)}
    env.step(actions)
    state = env.state_dict()
    expected = env.step(actions).info
    other = make_env("coop_nav_n3", num_envs=2, seed=9, episode_length=5)
    other.load_state_dict(state)
    continued = other.step(actions).info
    for key in ("team_return", "coverage_distance", "collisions"):
        assert torch.equal(continued[key], expected[key])
