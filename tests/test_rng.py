"""The counter-based hash RNG: distribution, determinism, and independence of the batch."""

from __future__ import annotations

import math

import pytest
import torch

from vimarl.envs.rng import normal, uniform

torch.set_num_threads(1)


def ids(n: int) -> torch.Tensor:
    return torch.arange(n)


def correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    return torch.corrcoef(torch.stack([x, y]))[0, 1].item()


# -- distribution ----------------------------------------------------------------------------


def test_uniform_range_dtype_and_shape():
    u = uniform(0, ids(64), 0, 0, shape=(4096,))
    assert u.shape == (64, 4096)
    assert u.dtype == torch.float32
    assert u.min().item() >= 0.0
    assert u.max().item() < 1.0
    # Close to both ends of the interval.
    assert u.min().item() < 1e-4 and u.max().item() > 1 - 1e-4


def test_uniform_shapes():
    assert uniform(1, ids(5), shape=()).shape == (5,)
    assert uniform(1, ids(5), 3, shape=(2, 3)).shape == (5, 2, 3)
    assert uniform(1, ids(0), shape=(4,)).shape == (0, 4)


def test_uniform_moments_and_histogram():
    u = uniform(123, ids(64), 7, shape=(4096,)).double()  # 262,144 samples
    assert u.mean().item() == pytest.approx(0.5, abs=0.003)
    assert u.var().item() == pytest.approx(1 / 12, abs=0.001)
    counts = torch.histc(u, bins=10, min=0.0, max=1.0)
    fractions = counts / u.numel()
    assert torch.allclose(fractions, torch.full_like(fractions, 0.1), atol=0.003)


def test_normal_moments():
    z = normal(5, ids(64), 3, shape=(4096,))
    assert z.shape == (64, 4096)
    assert z.dtype == torch.float32
    assert torch.isfinite(z).all()
    z = z.double()
    assert z.mean().item() == pytest.approx(0.0, abs=0.01)
    assert z.std().item() == pytest.approx(1.0, abs=0.01)
    # Tails of a standard normal: P(|z| > 2) = 0.0455, and symmetric.
    assert (z.abs() > 2).double().mean().item() == pytest.approx(0.0455, abs=0.003)
    assert (z > 0).double().mean().item() == pytest.approx(0.5, abs=0.005)


# -- determinism and what the values depend on ------------------------------------------------


def test_same_arguments_give_identical_values():
    episode = torch.tensor([0, 3, 1, 4])
    a = uniform(42, ids(4), episode, 9, shape=(3, 5))
    b = uniform(42, ids(4), episode.clone(), 9, shape=(3, 5))
    assert torch.equal(a, b)
    assert torch.equal(normal(42, ids(4), episode, shape=(7,)), normal(42, ids(4), episode, shape=(7,)))


@pytest.mark.parametrize("changed", ["seed", "env_ids", "episode", "step"])
def test_every_key_part_changes_the_values(changed):
    args = {"seed": 1, "env_ids": ids(8), "episode": 0, "step": 0}
    base = uniform(args["seed"], args["env_ids"], args["episode"], args["step"], shape=(256,))
    args[changed] = args[changed] + 1
    other = uniform(args["seed"], args["env_ids"], args["episode"], args["step"], shape=(256,))
    # Independent 24-bit draws: essentially no element may coincide.
    assert (base == other).double().mean().item() < 0.01
    assert abs(correlation(base, other)) < 0.05


def test_counter_order_matters():
    a = uniform(0, ids(4), 1, 2, shape=(64,))
    b = uniform(0, ids(4), 2, 1, shape=(64,))
    assert not torch.equal(a, b)


def test_rows_of_different_env_ids_differ():
    u = uniform(0, ids(16), 0, shape=(64,))
    for i in range(16):
        for j in range(i + 1, 16):
            assert not torch.equal(u[i], u[j])


def test_sub_environment_values_do_not_depend_on_the_other_env_ids():
    episode = torch.tensor([4, 0, 2, 7])
    full = uniform(11, ids(4), episode, 5, shape=(6,))
    alone = uniform(11, torch.tensor([2]), episode[2:3], 5, shape=(6,))
    assert torch.equal(full[2], alone[0])
    # Any subset, in any order, and within a larger batch.
    subset = torch.tensor([3, 0])
    assert torch.equal(uniform(11, subset, episode[subset], 5, shape=(6,)), full[subset])
    bigger = uniform(11, ids(10), torch.cat([episode, torch.zeros(6, dtype=torch.int64)]), 5, shape=(6,))
    assert torch.equal(bigger[:4], full)
    # The same for normal draws.
    z_full = normal(11, ids(4), episode, shape=(6,))
    assert torch.equal(z_full[1], normal(11, torch.tensor([1]), episode[1:2], shape=(6,))[0])


def test_per_env_counters_broadcast_like_int_counters():
    env_ids = ids(5)
    as_int = uniform(3, env_ids, 6, 2, shape=(4,))
    as_tensor = uniform(3, env_ids, torch.full((5,), 6), torch.full((5,), 2), shape=(4,))
    assert torch.equal(as_int, as_tensor)
    # Mixed per-env counters: row i equals a call with row i's values as ints.
    episode = torch.tensor([0, 5, 2, 2, 9])
    mixed = uniform(3, env_ids, episode, 2, shape=(2, 3))
    for i in range(5):
        single = uniform(3, env_ids[i:i + 1], int(episode[i]), 2, shape=(2, 3))
        assert torch.equal(mixed[i], single[0])


def test_int32_env_ids_are_accepted():
    assert torch.equal(uniform(0, ids(3).int(), 1, shape=(5,)), uniform(0, ids(3), 1, shape=(5,)))


# -- sanity of the stream ------------------------------------------------------------------------


def test_no_two_consecutive_elements_are_identical():
    u = uniform(0, ids(4), 0, shape=(65536,)).flatten()
    assert not (u[1:] == u[:-1]).any()
    # And few repeats overall: 262,144 draws of 2**24 values give ~2,000 expected collisions.
    distinct = torch.unique(u).numel()
    assert distinct > u.numel() - 3 * 2048


def test_neighbouring_elements_are_uncorrelated():
    u = uniform(9, ids(64), 0, 0, shape=(4096,))
    assert abs(correlation(u[:, 1:], u[:, :-1])) < 0.01  # consecutive elements
    assert abs(correlation(u[1:], u[:-1])) < 0.01  # consecutive env ids
    next_episode = uniform(9, ids(64), 1, 0, shape=(4096,))
    next_step = uniform(9, ids(64), 0, 1, shape=(4096,))
    assert abs(correlation(u, next_episode)) < 0.01
    assert abs(correlation(u, next_step)) < 0.01
    next_seed = uniform(10, ids(64), 0, 0, shape=(4096,))
    assert abs(correlation(u, next_seed)) < 0.01


def test_low_bits_are_balanced():
    # The top 24 bits are used; check the lowest of them is a fair coin per element index.
    u = uniform(2, ids(4096), 0, shape=(8,))
    low_bit = (u * (1 << 24)).long() & 1
    assert low_bit.double().mean().item() == pytest.approx(0.5, abs=0.02)
    assert math.isclose(low_bit.double().mean(0).min().item(), 0.5, abs_tol=0.04)
