"""ReplayBuffer ring semantics, sampling and checkpoints; TransitionCodec round trips."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import CounterEnv

from vimarl.buffer import ReplayBuffer, TransitionCodec, available_memory
from vimarl.envs.base import Box, Discrete, GroupSpec
from vimarl.envs.registry import make_env
from vimarl.errors import VimarlError

torch.set_num_threads(1)

FIELDS = {
    "x": ((3,), torch.float32),
    "id": ((), torch.int64),
    "flag": ((), torch.bool),
    "m": ((2, 2), torch.int32),
}


def rows(ids) -> dict[str, torch.Tensor]:
    """Rows whose every field is a function of the row id, so a mixed-up row is detectable."""
    ids = torch.as_tensor(ids, dtype=torch.int64)
    return {
        "x": ids.float().unsqueeze(-1) * torch.tensor([1.0, 2.0, 3.0]),
        "id": ids,
        "flag": ids % 3 == 0,
        "m": (ids.view(-1, 1, 1) * 10 + torch.arange(4).view(1, 2, 2)).int(),
    }


def assert_rows_consistent(sample: dict[str, torch.Tensor]):
    """Each sampled row's fields all come from the same written row."""
    expected = rows(sample["id"])
    for name, value in sample.items():
        assert value.dtype == FIELDS[name][1]
        assert torch.equal(value, expected[name]), name


def ring_order(buffer: ReplayBuffer, name: str = "id") -> torch.Tensor:
    """A full buffer's field from the oldest row (at `position`) to the newest."""
    return buffer.data[name].roll(-buffer.position, dims=0)


# -- ReplayBuffer -------------------------------------------------------------------------------


def test_partial_buffer_samples_only_written_rows():
    buffer = ReplayBuffer(10, FIELDS, seed=0)
    assert len(buffer) == 0
    buffer.add(rows([100, 101, 102, 103]))
    assert len(buffer) == 4 and buffer.position == 4
    sample = buffer.sample(1000)
    assert sample["id"].shape == (1000,) and sample["x"].shape == (1000, 3)
    assert set(sample["id"].tolist()) == {100, 101, 102, 103}
    assert_rows_consistent(sample)


def test_wrap_around_keeps_exactly_the_newest_rows():
    capacity = 8
    buffer = ReplayBuffer(capacity, FIELDS, seed=0)
    written = 0
    while written < 20:  # 2.5 x capacity in chunks of 3 (the last one of 2)
        chunk = list(range(written, min(written + 3, 20)))
        buffer.add(rows(chunk))
        written += len(chunk)
        assert len(buffer) == min(written, capacity)
        assert buffer.position == written % capacity
    assert len(buffer) == capacity
    assert torch.equal(ring_order(buffer), torch.arange(12, 20))
    for name, value in rows(range(12, 20)).items():
        assert torch.equal(ring_order(buffer, name), value), name
    sample = buffer.sample(2000)
    assert set(sample["id"].tolist()) == set(range(12, 20))
    assert_rows_consistent(sample)


def test_chunk_larger_than_capacity_keeps_the_newest_rows():
    buffer = ReplayBuffer(5, FIELDS, seed=0)
    buffer.add(rows([0, 1]))
    buffer.add(rows(range(2, 14)))
    assert len(buffer) == 5
    assert torch.equal(ring_order(buffer), torch.arange(9, 14))
    # The next row overwrites the oldest one.
    buffer.add(rows([14]))
    assert torch.equal(ring_order(buffer), torch.arange(10, 15))
    assert_rows_consistent(buffer.sample(100))


def test_values_are_cast_to_the_field_dtype():
    buffer = ReplayBuffer(4, {"a": ((2,), torch.float32), "b": ((), torch.int32)})
    buffer.add({"a": torch.tensor([[1, 2], [3, 4]]), "b": torch.tensor([5, 6], dtype=torch.int64)})
    assert buffer.data["a"].dtype == torch.float32 and buffer.data["b"].dtype == torch.int32
    assert torch.equal(buffer.data["a"][:2], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert buffer.data["b"][:2].tolist() == [5, 6]


def test_sampling_is_reproducible_and_uniform():
    def filled(seed):
        buffer = ReplayBuffer(16, FIELDS, seed=seed)
        buffer.add(rows(range(16)))
        return buffer

    a, b, c = filled(3), filled(3), filled(4)
    draws_a = [a.sample(64)["id"] for _ in range(3)]
    draws_b = [b.sample(64)["id"] for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(draws_a, draws_b))
    assert not torch.equal(c.sample(64)["id"], draws_a[0])
    # 16,000 draws over 16 rows: 1,000 expected each, standard deviation ~31.
    hits = torch.bincount(a.sample(16_000)["id"], minlength=16)
    assert hits.min().item() > 850 and hits.max().item() < 1150


def test_memory_bytes_by_hand():
    buffer = ReplayBuffer(100, FIELDS)
    # x: 100*3 float32, id: 100 int64, flag: 100 bool, m: 100*4 int32.
    assert buffer.memory_bytes() == 100 * 3 * 4 + 100 * 8 + 100 * 1 + 100 * 4 * 4 == 3700


def save_and_load(state):
    """Through torch.save / torch.load, as a checkpoint does."""
    file = io.BytesIO()
    torch.save(state, file)
    file.seek(0)
    return torch.load(file, weights_only=False)


@pytest.mark.parametrize("wrapped", [False, True])
def test_state_dict_round_trip_gives_identical_future_samples(wrapped):
    original = ReplayBuffer(8, FIELDS, seed=1)
    original.add(rows(range(11 if wrapped else 5)))
    original.sample(7)  # move the generator on
    restored = ReplayBuffer(8, FIELDS, seed=99)
    restored.load_state_dict(save_and_load(original.state_dict(include_data=True)))
    assert len(restored) == len(original) and restored.position == original.position
    for _ in range(3):
        a, b = original.sample(32), restored.sample(32)
        assert all(torch.equal(a[name], b[name]) for name in FIELDS)
    # Also after more rows arrive.
    original.add(rows([50, 51, 52]))
    restored.add(rows([50, 51, 52]))
    a, b = original.sample(64), restored.sample(64)
    assert all(torch.equal(a[name], b[name]) for name in FIELDS)
    assert_rows_consistent(b)


def test_state_dict_without_data_restores_an_empty_buffer():
    original = ReplayBuffer(8, FIELDS, seed=1)
    original.add(rows(range(6)))
    state = save_and_load(original.state_dict(include_data=False))
    assert "data" not in state
    restored = ReplayBuffer(8, FIELDS, seed=99)
    restored.add(rows([70, 71]))
    restored.load_state_dict(state)
    assert len(restored) == 0 and restored.position == 0
    restored.add(rows([80, 81, 82]))
    assert set(restored.sample(200)["id"].tolist()) == {80, 81, 82}


# -- TransitionCodec --------------------------------------------------------------------------


def test_codec_fields_dtypes_and_shapes():
    groups = {
        "grid": GroupSpec(n_agents=9, obs_dim=1, action_space=Discrete(2), graph_k=4),
        "cars": GroupSpec(n_agents=3, obs_dim=5, action_space=Box(-1.0, 1.0, 2), has_action_mask=False),
        "masked": GroupSpec(n_agents=2, obs_dim=4, action_space=Discrete(6), has_action_mask=True),
    }
    fields = TransitionCodec(groups, state_dim=7).fields()
    assert fields == {
        "terminated": ((), torch.bool), "truncated": ((), torch.bool),
        "state": ((7,), torch.float32), "next_state": ((7,), torch.float32),
        "grid/action": ((9,), torch.int64), "grid/reward": ((9,), torch.float32),
        "grid/obs": ((9, 1), torch.float32), "grid/next_obs": ((9, 1), torch.float32),
        "grid/neighbors": ((9, 4), torch.int32), "grid/next_neighbors": ((9, 4), torch.int32),
        "grid/mask": ((9, 4), torch.bool), "grid/next_mask": ((9, 4), torch.bool),
        "cars/action": ((3, 2), torch.float32), "cars/reward": ((3,), torch.float32),
        "cars/obs": ((3, 5), torch.float32), "cars/next_obs": ((3, 5), torch.float32),
        "masked/action": ((2,), torch.int64), "masked/reward": ((2,), torch.float32),
        "masked/obs": ((2, 4), torch.float32), "masked/next_obs": ((2, 4), torch.float32),
        "masked/action_mask": ((2, 6), torch.bool), "masked/next_action_mask": ((2, 6), torch.bool),
    }
    assert "state" not in TransitionCodec(groups, state_dim=0).fields()


def test_codec_round_trip_with_the_grid_game():
    env = make_env("grid_coordination", num_envs=4, agent_ids=True)
    codec = TransitionCodec(env.groups, env.state_dim)
    buffer = ReplayBuffer(16, codec.fields(), seed=0)
    step = env.reset(seed=0)
    actions = {"agents": torch.tensor([[0] * 9, [1] * 9, [(i % 2) for i in range(9)], [1] + [0] * 8])}
    next_step = env.step(actions)
    buffer.add(codec.encode(step, actions, next_step))
    assert buffer.data["agents/neighbors"].dtype == torch.int32

    batch = codec.decode({name: value[:4] for name, value in buffer.data.items()})
    graph = step.groups["agents"].graph
    assert torch.equal(batch.obs["agents"], step.groups["agents"].obs)
    assert torch.equal(batch.action["agents"], actions["agents"])
    assert torch.equal(batch.reward["agents"], next_step.groups["agents"].reward)
    assert batch.reward["agents"].sum(-1).tolist() == [0.0, 0.0, -12.0, -2.0]
    assert torch.equal(batch.next_obs["agents"], next_step.info["final_obs"]["agents"])
    for decoded in (batch.graph["agents"], batch.next_graph["agents"]):
        assert decoded.neighbors.dtype == torch.int64
        assert torch.equal(decoded.neighbors, graph.neighbors)
        assert torch.equal(decoded.mask, graph.mask)
    assert torch.equal(batch.state, torch.ones(4, 1)) and torch.equal(batch.next_state, torch.ones(4, 1))
    assert batch.terminated.dtype == torch.float32
    assert batch.terminated.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert batch.action_mask == {"agents": None} and batch.next_action_mask == {"agents": None}


def test_extra_fields_are_stored_decoded_flattened_and_saved():
    """An algorithm's extra per-group fields (Algorithm.replay_fields) ride along, checkpoints included."""
    env = make_env("grid_coordination", num_envs=4, agent_ids=True)
    codec = TransitionCodec(env.groups, env.state_dim, {"critic_action": {"agents": ((9, 2), torch.float32)}})
    assert codec.fields()["agents/extra/critic_action"] == ((9, 2), torch.float32)
    buffer = ReplayBuffer(16, codec.fields(), seed=0)
    step = env.reset(seed=0)
    actions = {"agents": torch.ones(4, 9, dtype=torch.int64)}
    soft = torch.softmax(torch.randn(4, 9, 2), -1)
    buffer.add(codec.encode(step, actions, env.step(actions), {"critic_action": {"agents": soft}}))
    batch = codec.decode(buffer.ordered())
    assert torch.equal(batch.extra["critic_action"]["agents"], soft)
    saved = io.BytesIO()
    torch.save(buffer.state_dict(), saved)
    saved.seek(0)
    restored = ReplayBuffer(16, codec.fields(), seed=0)
    restored.load_state_dict(torch.load(saved))
    assert torch.equal(codec.decode(restored.ordered()).extra["critic_action"]["agents"], soft)
    windows = codec.decode(restored.sample_sequences(2, 1, streams=4))
    assert windows.flatten().extra["critic_action"]["agents"].shape == (2, 9, 2)
    assert TransitionCodec(env.groups, env.state_dim).decode(buffer.ordered()).extra == {}


def test_codec_next_obs_is_the_pre_reset_final_step():
    env = CounterEnv(num_envs=3)
    codec = TransitionCodec(env.groups, env.state_dim)
    buffer = ReplayBuffer(32, codec.fields(), seed=0)
    step = env.reset(seed=0)
    steps = []
    # Env 0 terminates at once, env 1 is truncated on the 3rd step, env 2 terminates on the 2nd.
    for plan in ([2, 0, 0], [0, 0, 2], [0, 0, 0]):
        actions = {"agents": torch.tensor(plan).view(3, 1).expand(3, 2).contiguous()}
        next_step = env.step(actions)
        buffer.add(codec.encode(step, actions, next_step))
        steps.append((step, actions, next_step))
        step = next_step

    batch = codec.decode({name: value[:9] for name, value in buffer.data.items()})
    # Row t * 3 + b is the transition of env b at step t.
    assert batch.terminated.tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0]
    counts = batch.obs["agents"][:, 0, 0].tolist()
    next_counts = batch.next_obs["agents"][:, 0, 0].tolist()
    assert counts == [0, 0, 0, 0, 1, 1, 1, 2, 0]
    assert next_counts == [1, 1, 1, 1, 2, 2, 2, 3, 1]  # never a reset observation of 0
    for t, (before, actions, after) in enumerate(steps):
        rows_t = slice(3 * t, 3 * t + 3)
        final = after.final_view().groups["agents"]
        assert torch.equal(batch.obs["agents"][rows_t], before.groups["agents"].obs)
        assert torch.equal(batch.next_obs["agents"][rows_t], final.obs)
        assert torch.equal(batch.next_graph["agents"].mask[rows_t], final.graph.mask)
        assert torch.equal(batch.next_graph["agents"].neighbors[rows_t], final.graph.neighbors)
        assert torch.equal(batch.graph["agents"].mask[rows_t], before.groups["agents"].graph.mask)
        assert torch.equal(batch.action_mask["agents"][rows_t], before.groups["agents"].action_mask)
        assert torch.equal(batch.next_action_mask["agents"][rows_t], final.action_mask)
        assert torch.equal(batch.next_state[rows_t], after.info["final_state"])
        assert torch.equal(batch.state[rows_t], before.state)
        assert torch.equal(batch.action["agents"][rows_t], actions["agents"])
        assert torch.equal(batch.reward["agents"][rows_t], actions["agents"].float())
    # Done envs: s' differs from the observation the next transition starts from.
    assert not torch.equal(batch.next_obs["agents"][0], batch.obs["agents"][3])
    assert torch.equal(batch.next_obs["agents"][1], batch.obs["agents"][4])


def test_int32_neighbours_decode_to_equal_int64():
    big = 2**31 - 1  # the largest index int32 storage can hold
    groups = {"g": GroupSpec(n_agents=2, obs_dim=1, action_space=Discrete(2), graph_k=3)}
    codec = TransitionCodec(groups, state_dim=0)
    neighbors = torch.tensor([[[1, 0, big], [0, 1, 5]]], dtype=torch.int64)
    buffer = ReplayBuffer(2, codec.fields())
    row = {name: torch.zeros((1, *shape), dtype=dtype) for name, (shape, dtype) in codec.fields().items()}
    row["g/neighbors"] = neighbors
    row["g/next_neighbors"] = neighbors.flip(-1)
    buffer.add(row)
    assert buffer.data["g/neighbors"].dtype == torch.int32
    batch = codec.decode(buffer.sample(1))
    assert batch.graph["g"].neighbors.dtype == torch.int64
    assert torch.equal(batch.graph["g"].neighbors, neighbors)
    assert torch.equal(batch.next_graph["g"].neighbors, neighbors.flip(-1))
    assert batch.state is None and batch.next_state is None


def test_a_buffer_too_large_for_memory_is_a_one_line_error():
    available = available_memory(torch.device("cpu"))
    assert available and available > 0
    row = {"obs": ((1000,), torch.float32)}  # 4 kB a row
    with pytest.raises(VimarlError) as error:
        ReplayBuffer(int(available / 4000 * 2), row)
    message = str(error.value)
    assert "does not fit" in message and "lower buffer_size (e.g. buffer_size=" in message and "\n" not in message
