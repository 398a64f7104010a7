"""What the replay stores (issue 22, item 1 in part): the global state only for algorithms that
read it, and static graphs (road networks, complete graphs) once instead of in every row. The
batches an algorithm sees are value for value those of the full layout (every field in every row)."""

from __future__ import annotations

import pytest
import torch

import vimarl
from vimarl.algos import ALGORITHMS
from vimarl.buffer import ReplayBuffer, Transition, TransitionCodec
from vimarl.envs.graph import Graph
from vimarl.train import act, replay_codec

SETTINGS = {"team": {"members": {"agents": "vpp"}}}
"""Algorithms that need settings to be built at all."""


def full_codec(algo, env) -> TransitionCodec:
    """The layout before: every field in every row, the state whether read or not."""
    return TransitionCodec(algo.groups, env.state_dim, algo.replay_fields())


def filled(env_name: str, algo_name: str, steps: int, capacity: int | None = None, **env_options):
    """The lean and the full buffer (and codecs) filled from the same trajectory of `algo_name`
    exploring, with the same sampling seed; `capacity` below steps * B makes the ring wrap."""
    env = vimarl.make_env(env_name, 3, seed=0, **env_options)
    algo = vimarl.make_algo(algo_name, env, **SETTINGS.get(algo_name, {}))
    step = env.reset(seed=0)
    lean, full = replay_codec(algo, env, step), full_codec(algo, env)
    capacity = capacity or steps * env.num_envs
    buffers = (ReplayBuffer(capacity, lean.fields(), seed=5, successors=lean.successors(), streams=env.num_envs),
               ReplayBuffer(capacity, full.fields(), seed=5))
    for _ in range(steps):
        actions = act(algo, step, explore=True)
        next_step = env.step(actions)
        for codec, buffer in zip((lean, full), buffers):
            buffer.add(codec.encode(step, actions, next_step, algo.replay_values(actions)))
        step = next_step
    return (lean, full), buffers


def same_batches(env_name: str, algo_name: str, steps: int = 6, **env_options) -> tuple[Transition, Transition]:
    """One batch from the lean and one from the full layout (see `filled`)."""
    codecs, buffers = filled(env_name, algo_name, steps, **env_options)
    return tuple(codec.decode(buffer.sample(16)) for codec, buffer in zip(codecs, buffers))


def assert_same(lean, full, path: str = "batch") -> None:
    if isinstance(full, Transition):
        for name in full.__dataclass_fields__:
            if name in ("state", "next_state") and getattr(lean, name) is None:
                continue  # not stored for an algorithm that does not read it
            assert_same(getattr(lean, name), getattr(full, name), f"{path}.{name}")
    elif isinstance(full, dict):
        assert lean.keys() == full.keys(), path
        for key in full:
            assert_same(lean[key], full[key], f"{path}[{key}]")
    elif isinstance(full, Graph):
        assert torch.equal(lean.neighbors, full.neighbors) and torch.equal(lean.mask, full.mask), path
    elif full is None:
        assert lean is None, path
    else:
        assert lean.dtype == full.dtype and torch.equal(lean, full), path


@pytest.mark.parametrize("algo_name", sorted(ALGORITHMS))
def test_every_algorithm_sees_the_batches_of_the_full_layout(algo_name):
    """grid_coordination: a static grid graph, and a one-step episode in every row (s' always final)."""
    lean, full = same_batches("grid_coordination", algo_name)
    assert_same(lean, full)


@pytest.mark.parametrize("algo_name", ["vpp", "dgn", "qmix"])
def test_traffic_batches_equal_the_full_layout(algo_name):
    lean, full = same_batches("traffic_grid_2x2", algo_name)
    assert_same(lean, full)


@pytest.mark.parametrize("capacity", [None, 100, 61])
def test_s_prime_from_the_next_row_equals_the_stored_one_across_episode_ends_and_wrap_around(capacity):
    """coop_nav episodes are truncated after 25 steps (s' is then the final observation, kept
    aside); 40 steps of 3 envs wrap a ring of 100 or 61 rows (not a multiple of 3). Uniform batches,
    windows of consecutive steps and the rollout in order all match the full layout."""
    (lean, full), (small, big) = filled("coop_nav_n6", "vpp", 40, capacity)
    assert "agents/next_obs" not in small.data and small.final_count == 3  # one episode end per env
    assert_same(lean.decode(small.sample(64)), full.decode(big.sample(64)))
    assert_same(lean.decode(small.ordered()), full.decode(big.ordered()))
    windows = [codec.decode(buffer.sample_sequences(8, 5, 3)) for codec, buffer in ((lean, small), (full, big))]
    assert_same(*windows)


def test_one_step_episodes_keep_every_final_observation():
    """grid_coordination ends every episode after one step: every row's s' is a final observation,
    the side table grows to hold them all, and a ring smaller than the run keeps the newest."""
    (lean, full), (small, big) = filled("grid_coordination", "vpp", 30, 50)
    assert small.final_capacity >= 50
    assert_same(lean.decode(small.ordered()), full.decode(big.ordered()))


def test_a_saved_replay_resumes_with_the_same_rows():
    """state_dict / load_state_dict of the lean buffer: the same batches as before saving."""
    (lean, _), (small, _) = filled("coop_nav_n6", "vpp", 40, 61)
    restored = ReplayBuffer(61, lean.fields(), seed=0, successors=lean.successors(), streams=3)
    restored.load_state_dict(small.state_dict())
    assert_same(lean.decode(restored.sample(32)), lean.decode(small.sample(32)))
    assert_same(lean.decode(restored.ordered()), lean.decode(small.ordered()))


def test_the_state_is_stored_only_for_algorithms_that_read_it():
    env = vimarl.make_env("traffic_grid_3x3", 2)
    step = env.reset(seed=0)
    fields = {name: replay_codec(vimarl.make_algo(name, env), env, step).fields() for name in ("vpp", "qmix")}
    assert "state" not in fields["vpp"] and fields["qmix"]["state"] == ((env.state_dim,), torch.float32)
    team = vimarl.make_algo("team", env, members={"agents": "qmix"})
    assert "state" in replay_codec(team, env, step).fields()  # a member that reads it


def test_static_graphs_are_not_stored_per_row_and_dynamic_ones_are():
    road = vimarl.make_env("traffic_grid_3x3", 2)
    vpp = vimarl.make_algo("vpp", road)
    fields = replay_codec(vpp, road, road.reset(seed=0)).fields()
    assert not any("neighbors" in name or name.endswith("mask") for name in fields)
    knn = vimarl.make_env("coop_nav_n6", 2)
    fields = replay_codec(vimarl.make_algo("vpp", knn), knn, knn.reset(seed=0)).fields()
    assert fields["agents/neighbors"][0] == (6, knn.groups["agents"].graph_k)


@pytest.mark.parametrize("env_name, options", [("traffic_grid_3x3", {}), ("traffic_grid_3x3", {"graph": "complete"}),
                                               ("grid_coordination", {}), ("grid_coordination", {"graph": "complete"}),
                                               ("two_agents_meet", {}), ("coop_nav_n6", {"graph": "complete"})])
def test_graphs_declared_static_stay_the_same_across_steps_and_resets(env_name, options):
    env = vimarl.make_env(env_name, 3, seed=1, **options)
    spec = next(iter(env.groups.values()))
    assert spec.static_graph
    step = env.reset(seed=1)
    first = next(iter(step.groups.values())).graph
    policy = vimarl.algos.base.UniformPolicy({g: s for g, s in env.groups.items() if s.role == "learned"}, seed=0)
    for _ in range(30):  # past episode ends and auto-resets
        step = env.step(act(policy, step, explore=True))
        for view in (step, step.final_view()):
            graph = next(iter(view.groups.values())).graph
            assert torch.equal(graph.neighbors, first.neighbors) and torch.equal(graph.mask, first.mask)
    assert torch.equal(first.neighbors, first.neighbors[:1].expand_as(first.neighbors))  # one graph for every env


def test_a_saved_replay_of_the_full_layout_loads_into_the_lean_one():
    """Checkpoints written before this layout (save_buffer=true) hold fields no longer stored
    (next observations, static graphs, an unread state): s' is rebuilt from them, and the rows are
    the same."""
    (lean, full), (_, big) = filled("coop_nav_n6", "vpp", 40, 61)
    new = ReplayBuffer(61, lean.fields(), seed=3, successors=lean.successors(), streams=3)
    new.load_state_dict(big.state_dict())
    assert_same(lean.decode(new.ordered()), full.decode(big.ordered()))


def test_a_full_buffer_is_saved_without_a_copy_of_its_rows():
    """The trainer's checkpoint hands the storage itself (copy=False) once the ring is full; a
    partly filled one, and the default, copy only the stored rows."""
    (lean, _), (small, _) = filled("coop_nav_n6", "vpp", 40, 61)  # 120 rows into 61: full
    shared = small.state_dict(copy=False)["data"]
    assert all(saved.data_ptr() == stored.data_ptr() for saved, stored in zip(shared.values(), small.data.values()))
    assert all(saved.data_ptr() != stored.data_ptr()
               for saved, stored in zip(small.state_dict()["data"].values(), small.data.values()))
    (_, _), (partial, _) = filled("coop_nav_n6", "vpp", 4, 61)
    assert all(saved.shape[0] == 12 for saved in partial.state_dict(copy=False)["data"].values())


def test_agents_that_leave_and_their_final_steps_match_the_full_layout():
    """pz_toys.LeavingEnv (tests/pz_toys.py): runner_1 leaves at step 2 of 5-step episodes (alive /
    next_alive per row); 20 steps of 3 envs wrap a ring of 37 rows."""
    pytest.importorskip("pettingzoo", reason="the toy env is a PettingZoo env: pip install 'vimarl[pettingzoo]'")
    (lean, full), (small, big) = filled("pettingzoo", "masac", 20, 37, env="pz_toys:LeavingEnv",
                                        kwargs={"leave_at": 2, "horizon": 5})
    assert "runner/next_alive" not in small.data and small.final_count == 12
    batches = [codec.decode(buffer.ordered()) for codec, buffer in ((lean, small), (full, big))]
    assert not bool(batches[1].next_alive["runner"].all())  # runner_1's departure is in the rows kept
    assert_same(*batches)
    assert_same(lean.decode(small.sample(64)), full.decode(big.sample(64)))


def test_on_policy_rollouts_reuse_the_side_table_after_each_clear():
    """A rollout buffer is cleared after every update: the final observations of earlier rollouts
    are no longer referred to, so the side table does not grow rollout after rollout."""
    env = vimarl.make_env("grid_coordination", 3, seed=0)  # every step ends an episode
    algo = vimarl.make_algo("mappo", env, rollout_length=4)
    step = env.reset(seed=0)
    codec = replay_codec(algo, env, step)
    buffer = ReplayBuffer(12, codec.fields(), successors=codec.successors(), streams=3)
    sizes = []
    for _ in range(5):
        for _ in range(4):
            actions = act(algo, step, explore=True)
            next_step = env.step(actions)
            buffer.add(codec.encode(step, actions, next_step))
            step = next_step
        sizes.append(buffer.final_capacity)
        buffer.clear()
    assert len(set(sizes)) == 1 and sizes[0] <= 24
