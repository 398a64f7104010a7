"""The BatchedEnv contract (auto-reset, final_obs, counters, checkpoints), spaces and the registry."""

from __future__ import annotations

import pytest
import torch
from helpers import CounterConfig, CounterEnv, constant_actions

from vimarl.envs import rng
from vimarl.envs.base import Box, Discrete
from vimarl.envs.registry import ENVIRONMENTS, EnvEntry, make_env
from vimarl.envs.toy.grid_coordination import GridCoordinationConfig
from vimarl.errors import VimarlError

torch.set_num_threads(1)

T = CounterEnv.TERMINAL_ACTION


def per_env_actions(values: list[int], n_agents: int = 2) -> dict[str, torch.Tensor]:
    """Sub-environment i: every agent plays values[i]."""
    return {"agents": torch.tensor(values).view(-1, 1).expand(-1, n_agents).contiguous()}


def counts(step) -> torch.Tensor:
    return step.groups["agents"].obs[:, 0, 0].long()


def starts(step) -> torch.Tensor:
    return step.groups["agents"].obs[:, :, 1]


# -- spaces -------------------------------------------------------------------------------------


def test_discrete_sample_respects_the_action_mask_and_covers_allowed_actions():
    space = Discrete(5)
    generator = torch.Generator().manual_seed(0)
    allowed = torch.tensor([[True, False, True, False, False],
                            [False, False, False, False, True],
                            [True, True, True, True, True]])
    mask = allowed.expand(400, 3, 5)
    actions = space.sample((400, 3), generator, "cpu", action_mask=mask)
    assert actions.shape == (400, 3) and actions.dtype == torch.int64
    for agent in range(3):
        seen = set(actions[:, agent].tolist())
        assert seen == set(torch.nonzero(allowed[agent]).flatten().tolist())


def test_discrete_sample_without_mask_is_uniform_and_reproducible():
    space = Discrete(4)
    a = space.sample((4000,), torch.Generator().manual_seed(1), "cpu")
    b = space.sample((4000,), torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(a, b)
    frequencies = torch.bincount(a, minlength=4).double() / 4000
    assert torch.allclose(frequencies, torch.full((4,), 0.25, dtype=torch.float64), atol=0.03)


def test_box_sample_within_bounds():
    space = Box(low=-2.0, high=3.0, dim=4)
    actions = space.sample((100, 5), torch.Generator().manual_seed(0), "cpu")
    assert actions.shape == (100, 5, 4) and actions.dtype == torch.float32
    assert actions.min().item() >= -2.0 and actions.max().item() <= 3.0
    # Spread over the whole interval, not squeezed into [0, 1).
    assert actions.min().item() < -1.9 and actions.max().item() > 2.9
    assert actions.mean().item() == pytest.approx(0.5, abs=0.1)


# -- reset -----------------------------------------------------------------------------------


def test_reset_is_reproducible_and_keyed_on_env_and_episode():
    env = CounterEnv(num_envs=4)
    first = env.reset(seed=7)
    assert torch.equal(counts(first), torch.zeros(4, dtype=torch.int64))
    assert not first.terminated.any() and not first.truncated.any()
    assert torch.equal(first.groups["agents"].reward, torch.zeros(4, 2))
    expected = rng.uniform(7, torch.arange(4), torch.zeros(4, dtype=torch.int64), shape=(2,))
    assert torch.equal(starts(first), expected)
    assert torch.equal(starts(env.reset(seed=7)), starts(first))
    # Without a seed every sub-environment moves on to its next episode.
    second = env.reset()
    assert torch.equal(env.episode_index, torch.ones(4, dtype=torch.int64))
    assert torch.equal(starts(second), rng.uniform(7, torch.arange(4), 1, shape=(2,)))
    assert not torch.equal(starts(second), starts(first))
    # A different seed gives different episodes.
    assert not torch.equal(starts(env.reset(seed=8)), starts(first))


def test_sub_environment_initial_states_do_not_depend_on_the_batch_size():
    small, large = CounterEnv(num_envs=2), CounterEnv(num_envs=5)
    assert torch.equal(starts(small.reset(seed=3)), starts(large.reset(seed=3))[:2])
    # Also across auto-resets: sub-env i replays the same episodes for any batch size.
    # Sub-env 0 terminates every step; sub-env 1 runs to truncation.
    for t in range(7):
        a = small.step(per_env_actions([T, 0]))
        b = large.step(per_env_actions([T, 0, 0, T, 0]))
        assert torch.equal(a.groups["agents"].obs, b.groups["agents"].obs[:2]), t
        assert torch.equal(small.episode_index, large.episode_index[:2])
    assert torch.equal(small.episode_index, torch.tensor([7, 2]))


# -- step and auto-reset -----------------------------------------------------------------------------


def test_step_auto_resets_exactly_the_done_envs():
    env = CounterEnv(num_envs=3)
    start = env.reset(seed=0)
    step = env.step(per_env_actions([T, 0, 1]))
    assert torch.equal(step.terminated, torch.tensor([True, False, False]))
    assert torch.equal(step.truncated, torch.tensor([False, False, False]))
    assert torch.equal(counts(step), torch.tensor([0, 1, 1]))
    assert torch.equal(env.episode_index, torch.tensor([1, 0, 0]))
    assert torch.equal(env.episode_step, torch.tensor([0, 1, 1]))
    # Env 0 starts episode 1; the others keep their start values.
    assert torch.equal(starts(step)[0], rng.uniform(0, torch.tensor([0]), 1, shape=(2,))[0])
    assert torch.equal(starts(step)[1:], starts(start)[1:])
    # Rewards are those of the transition, also for the env that reset.
    assert torch.equal(step.groups["agents"].reward, torch.tensor([[2.0, 2.0], [0.0, 0.0], [1.0, 1.0]]))


def test_final_obs_holds_the_pre_reset_observation():
    env = CounterEnv(num_envs=3)
    start = env.reset(seed=0)
    step = env.step(per_env_actions([T, 0, 0]))
    final = step.info["final_obs"]["agents"]
    # Env 0 ended after one step: its final observation has count 1 and the old start values.
    assert torch.equal(final[0, :, 0], torch.ones(2))
    assert torch.equal(final[0, :, 1], starts(start)[0])
    assert not torch.equal(final[0], step.groups["agents"].obs[0])
    # The others did not finish: final obs == obs.
    assert torch.equal(final[1:], step.groups["agents"].obs[1:])
    # Final graph, action mask and state are the pre-reset ones too.
    assert torch.equal(step.info["final_graph"]["agents"].mask[:, 0, 0], torch.tensor([True, True, True]))
    assert torch.equal(step.groups["agents"].graph.mask[:, 0, 0], torch.tensor([False, True, True]))
    assert torch.equal(step.info["final_action_mask"]["agents"][:, 0, 1], torch.tensor([False] * 3))
    assert torch.equal(step.groups["agents"].action_mask[:, 0, 1], torch.tensor([True, False, False]))
    assert torch.equal(step.info["final_state"].flatten(), torch.tensor([1.0, 1.0, 1.0]))
    assert torch.equal(step.state.flatten(), torch.tensor([100.0, 1.0, 1.0]))


def test_no_done_env_means_final_obs_equals_obs():
    env = CounterEnv(num_envs=2)
    env.reset(seed=0)
    step = env.step(constant_actions(env, 0))
    assert not step.done.any()
    assert torch.equal(step.info["final_obs"]["agents"], step.groups["agents"].obs)
    view = step.final_view()
    assert torch.equal(view.groups["agents"].obs, step.groups["agents"].obs)
    assert torch.equal(view.state, step.state)


def test_truncation_only_at_max_steps_and_not_when_terminated():
    env = CounterEnv(num_envs=3)
    env.reset(seed=0)
    # Env 0 never terminates; env 1 terminates on the 3rd step (the time limit); env 2 on the 2nd.
    plan = [[0, 0, 0], [0, 0, T], [0, T, 0]]
    flags = []
    for actions in plan:
        step = env.step(per_env_actions(actions))
        flags.append((step.terminated.tolist(), step.truncated.tolist(), counts(step).tolist()))
    assert flags == [
        ([False, False, False], [False, False, False], [1, 1, 1]),
        ([False, False, True], [False, False, False], [2, 2, 0]),
        ([False, True, False], [True, False, False], [0, 0, 1]),
    ]
    assert torch.equal(env.episode_index, torch.tensor([1, 1, 1]))
    assert torch.equal(step.info["final_obs"]["agents"][:, 0, 0], torch.tensor([3.0, 3.0, 1.0]))
    assert torch.equal(step.done, torch.tensor([True, True, False]))


def test_episode_index_increments_per_env_on_auto_reset():
    env = CounterEnv(num_envs=3)
    env.reset(seed=0)
    for _ in range(6):
        env.step(per_env_actions([T, 0, 1]))
    # Env 0 ends every step, envs 1 and 2 every max_steps = 3 steps.
    assert torch.equal(env.episode_index, torch.tensor([6, 2, 2]))
    assert torch.equal(env.episode_step, torch.tensor([0, 0, 0]))


def test_final_view_swaps_obs_graph_mask_and_state_for_done_envs():
    env = CounterEnv(num_envs=2)
    env.reset(seed=0)
    step = env.step(per_env_actions([T, 0]))
    view = step.final_view()
    group, final_group = step.groups["agents"], view.groups["agents"]
    assert torch.equal(final_group.obs, step.info["final_obs"]["agents"])
    assert torch.equal(final_group.obs[:, 0, 0], torch.tensor([1.0, 1.0]))
    assert torch.equal(final_group.graph.mask, step.info["final_graph"]["agents"].mask)
    assert torch.equal(final_group.graph.mask[:, :, 0], torch.ones(2, 2, dtype=torch.bool))
    assert torch.equal(final_group.action_mask, step.info["final_action_mask"]["agents"])
    assert torch.equal(view.state, torch.tensor([[1.0], [1.0]]))
    # Rewards and flags stay; info is dropped; the original TimeStep is untouched.
    assert torch.equal(final_group.reward, group.reward)
    assert torch.equal(view.terminated, step.terminated) and view.info == {}
    assert torch.equal(group.obs[:, 0, 0], torch.tensor([0.0, 1.0]))
    # A reset TimeStep has no final observation: its final view is itself.
    start = env.reset(seed=0)
    assert start.final_view() is start


def test_step_without_actions_for_a_group_raises_a_one_line_error():
    env = CounterEnv(num_envs=2)
    env.reset(seed=0)
    with pytest.raises(VimarlError, match="agents") as error:
        env.step({})
    assert "\n" not in str(error.value)


def test_render_without_renderer_raises():
    with pytest.raises(VimarlError, match="no renderer"):
        CounterEnv(num_envs=1).render()


def test_n_agents_and_learned_groups():
    env = CounterEnv(CounterConfig(n_agents=3), num_envs=2)
    assert env.n_agents == 3
    assert list(env.learned_groups()) == ["agents"]


# -- checkpoints ------------------------------------------------------------------------------


def run(env, plan):
    return [env.step(per_env_actions(actions)) for actions in plan]


def assert_same_steps(steps_a, steps_b):
    for a, b in zip(steps_a, steps_b, strict=True):
        assert torch.equal(a.groups["agents"].obs, b.groups["agents"].obs)
        assert torch.equal(a.groups["agents"].reward, b.groups["agents"].reward)
        assert torch.equal(a.terminated, b.terminated) and torch.equal(a.truncated, b.truncated)
        assert torch.equal(a.state, b.state)
        assert torch.equal(a.info["final_obs"]["agents"], b.info["final_obs"]["agents"])


def test_state_dict_round_trip_continues_identically():
    plan = [[T, 0, 1], [0, 0, 0], [1, T, 0], [0, 0, 0], [T, 0, 0], [0, 1, 0]]
    original = CounterEnv(num_envs=3)
    original.reset(seed=5)
    run(original, plan[:2])
    state = original.state_dict()
    copy = CounterEnv(num_envs=3, seed=99)
    copy.reset(seed=99)
    copy.load_state_dict(state)
    assert copy.seed == 5
    assert_same_steps(run(original, plan), run(copy, plan))
    assert torch.equal(original.episode_index, copy.episode_index)


def test_load_state_dict_does_not_share_tensors_with_the_state():
    source = CounterEnv(num_envs=2)
    source.reset(seed=1)
    state = source.state_dict()
    a, b = CounterEnv(num_envs=2), CounterEnv(num_envs=2)
    a.load_state_dict(state)
    b.load_state_dict(state)
    plan = [[T, 0], [0, 0], [0, T]]
    steps_a = run(a, plan)  # must not move b (or the saved state) along with it
    assert torch.equal(state["episode_index"], torch.zeros(2, dtype=torch.int64))
    assert torch.equal(state["count"], torch.zeros(2, dtype=torch.int64))
    assert_same_steps(steps_a, run(b, plan))


# -- registry ------------------------------------------------------------------------------


def test_make_env_builds_from_kwargs_or_config():
    env = make_env("grid_coordination", num_envs=3, seed=4, n=4)
    assert env.num_envs == 3 and env.seed == 4 and env.config.n == 4 and env.name == "grid_coordination"
    env = make_env("grid_coordination", num_envs=2, config=GridCoordinationConfig(n=2))
    assert env.groups["agents"].n_agents == 4


def test_make_env_unknown_name_suggests_the_close_one():
    with pytest.raises(VimarlError, match="did you mean 'grid_coordination'") as error:
        make_env("grid_coordinaton")
    assert "\n" not in str(error.value)


def test_make_env_wrong_config_type():
    with pytest.raises(VimarlError, match="GridCoordinationConfig"):
        make_env("grid_coordination", config=CounterConfig())


def test_make_env_config_and_kwargs_together():
    with pytest.raises(VimarlError, match="not both"):
        make_env("grid_coordination", config=GridCoordinationConfig(), n=3)


def test_make_env_unknown_kwarg_names_the_key():
    with pytest.raises(VimarlError, match="'env.size'") as error:
        make_env("grid_coordination", size=3)
    assert "\n" not in str(error.value)


def test_make_env_bad_kwarg_type():
    with pytest.raises(VimarlError, match="env.n"):
        make_env("grid_coordination", n="three")


@pytest.mark.parametrize("num_envs", [0, -1])
def test_make_env_needs_at_least_one_env(num_envs):
    with pytest.raises(VimarlError, match="num_envs"):
        make_env("grid_coordination", num_envs=num_envs)


def test_env_with_missing_dependency_names_the_extra(monkeypatch):
    entry = EnvEntry("broken", "vimarl_no_such_module:Env", "test", requires="mpe")
    monkeypatch.setitem(ENVIRONMENTS, "broken", entry)
    with pytest.raises(VimarlError, match=r"pip install 'vimarl\[mpe\]'"):
        make_env("broken")
