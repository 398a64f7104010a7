"""PettingZoo ParallelEnv -> BatchedEnv adapter: layout, values against the wrapped envs, agents
that leave, masks, auto-reset, seeding, worker processes, round trips and bad input."""

import importlib.util

import numpy as np
import pytest
import torch

pytest.importorskip("pettingzoo", reason="the adapter needs PettingZoo: pip install 'vimarl[pettingzoo]'")

import vimarl  # noqa: E402
from vimarl.envs import rng  # noqa: E402
from vimarl.envs.external.from_pettingzoo import PettingZooEnv  # noqa: E402
from vimarl.errors import VimarlError  # noqa: E402


def toy(factory: str, num_envs: int = 1, seed: int = 0, kwargs=None, **config) -> PettingZooEnv:
    return vimarl.make_env("pettingzoo", num_envs=num_envs, seed=seed, env=f"pz_toys:{factory}",
                           kwargs=kwargs or {}, **config)


def episode_seed(seed: int, copy: int, episode: int) -> int:
    return int(rng.integers(seed, torch.tensor([copy]), torch.tensor([episode]))[0])


def test_layout_groups_agents_by_name_and_flattens_observations():
    env = toy("MaskedEnv")
    boxer, kicker = env.groups["boxer"], env.groups["kicker"]
    assert (boxer.n_agents, boxer.obs_dim, boxer.action_space.n, boxer.has_action_mask) == (2, 4, 4, True)
    assert (kicker.n_agents, kicker.obs_dim, kicker.has_action_mask) == (1, 5, True)  # Discrete(5): one-hot
    step = env.reset(seed=0)
    assert step.groups["kicker"].obs[0, 0].tolist() == [1, 0, 0, 0, 0]
    assert step.groups["boxer"].obs[0].tolist() == [[0] * 4, [1] * 4]
    assert step.groups["boxer"].action_mask[0, 0].tolist() == [True, False, False, False]
    step = env.step({"boxer": torch.tensor([[0, 0]]), "kicker": torch.tensor([[0]])})
    assert step.groups["kicker"].obs[0, 0].tolist() == [0, 1, 0, 0, 0]
    assert step.groups["boxer"].action_mask[0, 1].tolist() == [True, True, False, False]
    assert step.groups["kicker"].action_mask[0, 0].tolist() == [True, True, False, False]  # from infos


def test_agents_that_leave_keep_their_slots():
    env = toy("LeavingEnv", kwargs={"leave_at": 2, "horizon": 4})
    step = env.reset(seed=3)
    runners = env.groups["runner"]
    assert runners.can_leave and runners.graph_k == 2
    assert step.groups["runner"].alive.tolist() == [[True, True, True]]
    step = env.step({"runner": torch.tensor([[1, 2, 0]])})
    assert step.groups["runner"].reward.tolist() == [[1.0, 12.0, 20.0]]
    step = env.step({"runner": torch.tensor([[0, 1, 2]])})  # runner_1 leaves: final obs, reward, not alive
    group = step.groups["runner"]
    assert group.alive.tolist() == [[True, False, True]]
    assert group.obs[0, 1].tolist() == [2, 1, episode_seed(3, 0, 0) % 7]
    assert group.reward.tolist() == [[0.0, 11.0, 22.0]]
    assert group.graph.neighbors[0].tolist() == [[0, 2], [1, 1], [0, 2]]  # complete, padding points at self
    assert group.graph.mask[0].tolist() == [[False, True], [False, False], [True, False]]  # no edges to 1
    step = env.step({"runner": torch.tensor([[2, 2, 2]])})  # runner_1's action is not passed on
    assert env.copies.envs[0].actions_seen[-1] == {"runner_0": 2, "runner_2": 2}
    group = step.groups["runner"]
    assert group.obs[0, 1].tolist() == [0, 0, 0] and group.reward[0, 1] == 0.0
    assert not step.done.any()
    step = env.step({"runner": torch.tensor([[0, 0, 0]])})  # the last two are truncated
    assert step.truncated.tolist() == [True] and step.terminated.tolist() == [False]
    final = step.final_view().groups["runner"]
    assert final.obs[0, 0, 0] == 4 and final.alive.tolist() == [[False, False, False]]
    assert step.groups["runner"].alive.tolist() == [[True, True, True]]  # the next episode
    assert step.groups["runner"].obs[0, :, 2].tolist() == [episode_seed(3, 0, 1) % 7] * 3


def test_an_episode_ends_terminated_when_an_agent_terminated():
    env = toy("LeavingEnv", kwargs={"leave_at": 9, "horizon": 3, "all_terminate": True})
    env.reset(seed=0)
    for _ in range(3):
        step = env.step({"runner": torch.zeros(1, 3, dtype=torch.long)})
    assert step.terminated.tolist() == [True] and step.truncated.tolist() == [False]


def test_episode_length_cuts_episodes_and_seeds_do_not_depend_on_batch_size():
    single, batched = (toy("LeavingEnv", b, seed=5, kwargs={"horizon": 50}, episode_length=3)
                                          for b in (1, 3))
    first = single.reset(seed=5).groups["runner"].obs
    assert torch.equal(batched.reset(seed=5).groups["runner"].obs[0], first[0])
    seeds = [episode_seed(5, copy, 0) % 7 for copy in range(3)]
    assert batched.reset(seed=5).groups["runner"].obs[:, 0, 2].tolist() == seeds
    for _ in range(3):
        step = batched.step({"runner": torch.zeros(3, 3, dtype=torch.long)})
    assert step.truncated.all() and step.groups["runner"].obs[:, 0, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize("factory,message", [
    ("OddSpacesEnv", "action space"), ("MixedGroupEnv", "share the group 'runner'"),
    ("missing_factory", "has no attribute"),
])
def test_unsupported_envs_get_one_line_errors(factory, message):
    with pytest.raises(VimarlError, match=message) as error:
        toy(factory)
    assert "\n" not in str(error.value)


def test_config_errors_name_the_fix():
    with pytest.raises(VimarlError, match="module:function"):
        vimarl.make_env("pettingzoo", env="")
    with pytest.raises(VimarlError, match="graph=knn needs agent positions"):
        toy("LeavingEnv", graph="knn")
    with pytest.raises(VimarlError, match="cannot be imported"):
        vimarl.make_env("pettingzoo", env="no_such_module:env")


needs_mpe2 = pytest.mark.skipif(importlib.util.find_spec("mpe2") is None,
                                reason="the mpe2 tests need mpe2: pip install 'vimarl[mpe]'")


@needs_mpe2
def test_mpe2_values_equal_the_wrapped_env():
    from mpe2 import simple_tag_v3
    env = vimarl.make_env("mpe2_tag", num_envs=2, seed=1)
    reference = simple_tag_v3.parallel_env()
    observations, _ = reference.reset(seed=episode_seed(1, 1, 0))
    step = env.reset(seed=1)
    generator = torch.Generator().manual_seed(0)
    for t in range(30):  # past the 25-step limit: a truncation and an auto-reset
        assert np.allclose(step.groups["adversary"].obs[1].numpy(),
                           np.stack([observations[f"adversary_{i}"] for i in range(3)]), atol=1e-6)
        assert np.allclose(step.groups["agent"].obs[1, 0].numpy(), observations["agent_0"], atol=1e-6)
        actions = {g: s.action_space.sample((2, s.n_agents), generator, "cpu") for g, s in env.groups.items()}
        step = env.step(actions)
        observations, rewards, _, truncations, _ = reference.step(
            {f"{g}_{i}": int(actions[g][1, i]) for g in ("adversary", "agent") for i in range(env.groups[g].n_agents)})
        assert step.groups["adversary"].reward[1].tolist() == pytest.approx([rewards[f"adversary_{i}"] for i in range(3)])
        if t == 24:
            assert step.truncated.tolist() == [True, True] and all(truncations.values())
            final = step.final_view()
            assert np.allclose(final.groups["agent"].obs[1, 0].numpy(), observations["agent_0"], atol=1e-6)
            assert np.allclose(final.state[1].numpy(), reference.state(), atol=1e-6)
            observations, _ = reference.reset(seed=episode_seed(1, 1, 1))
    positions = np.stack([a.state.p_pos for a in reference.unwrapped.world.agents[:3]])
    nearest = np.argsort(((positions[:, None] - positions[None]) ** 2).sum(-1), axis=1)[:, 1:3]
    assert step.groups["adversary"].graph.neighbors[1].tolist() == nearest.tolist()


@needs_mpe2
def test_worker_processes_give_the_same_trajectories():
    def trajectory(workers: int) -> list[torch.Tensor]:
        env = vimarl.make_env("mpe2_spread", num_envs=3, seed=2, num_workers=workers)
        out = [env.reset(seed=2).groups["agent"].obs]
        for t in range(30):
            step = env.step({"agent": torch.arange(9).view(3, 3).add(t) % 5})
            out += [step.groups["agent"].obs, step.groups["agent"].reward, step.done]
        env.close()
        return out
    assert all(torch.equal(a, b) for a, b in zip(trajectory(0), trajectory(2)))


def test_round_trip_through_pettingzoo_gives_the_native_trajectory():
    """spread -> PettingZoo -> vimarl equals native spread. The adapter resets copy i's wrapped
    env with its own episode seed, so each copy is compared with a native env reset to it."""
    adapted = vimarl.make_env("pettingzoo", num_envs=2, seed=4, env="vimarl.envs.external.to_pettingzoo:to_pettingzoo",
                              kwargs={"name_or_env": "spread"})
    step = adapted.reset(seed=4)
    singles = [vimarl.make_env("spread", num_envs=1, seed=0) for _ in range(2)]
    for copy, single in enumerate(singles):
        first = single.reset(seed=episode_seed(4, copy, 0)).groups["agents"].obs[0]
        assert torch.allclose(step.groups["agents"].obs[copy], first, atol=1e-6)
    for t in range(25):
        actions = torch.arange(6).view(2, 3).add(t) % 5
        step = adapted.step({"agents": actions})
        for copy, single in enumerate(singles):
            expected = single.step({"agents": actions[copy:copy + 1]})
            assert torch.allclose(step.final_view().groups["agents"].obs[copy],
                                  expected.final_view().groups["agents"].obs[0], atol=1e-5)
            assert torch.allclose(step.groups["agents"].reward[copy], expected.groups["agents"].reward[0], atol=1e-5)
    assert step.truncated.all()


@pytest.mark.parametrize("fault, expected", [
    ("nan", "returned a non-finite observation for agent runner_2 (at index 0)"),
    ("shape", "returned an observation of 5 values for agent runner_2, whose observation space has 3"),
    ("reward", "returned reward inf for agent runner_2"),
])
def test_a_faulty_wrapped_env_is_a_one_line_error_naming_the_agent(fault, expected):
    """Issue 21 item 3: what a wrapped env gets wrong is reported where it enters, by agent."""
    env = toy("FaultyEnv", kwargs={"fault": fault})
    env.reset(seed=0)
    actions = {"runner": torch.zeros(1, 3, dtype=torch.int64)}
    env.step(actions)
    with pytest.raises(VimarlError) as error:
        env.step(actions)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_an_action_outside_the_wrapped_space_is_named():
    env = toy("LeavingEnv")
    env.reset(seed=0)
    with pytest.raises(VimarlError) as error:
        env.step({"runner": torch.tensor([[0, 7, 0]])})
    assert "action 7 for agent runner_1 is outside its action space Discrete(3)" in str(error.value)
