"""Counter-based random numbers for batched environments.

Every random draw of an environment is a pure function of (seed, sub-environment index,
episode index, step, element), computed with an integer hash. So sub-environment i with
seed s replays the same episodes whatever the batch size, whichever other sub-environments
reset at the same time, and after a checkpoint restore: there is no generator state to save.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """The 'lowbias32' integer hash on int64 tensors holding 32-bit values.

    Each product stays below 2**63 (a 32-bit value times a constant below 2**31), so int64
    arithmetic never overflows.
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def _key(seed: int | Tensor, *counters: Tensor | int) -> Tensor:
    """Fold a seed and a sequence of counters into one 32-bit key per element."""
    key = torch.as_tensor(seed, dtype=torch.int64)
    key = _hash32(key)
    for counter in counters:
        key = _hash32(key ^ _hash32(torch.as_tensor(counter, dtype=torch.int64) + 0x9E3779B9))
    return key


def uniform(seed: int, env_ids: Tensor, *counters: Tensor | int, shape: tuple[int, ...]) -> Tensor:
    """Uniform floats in [0, 1) of shape [len(env_ids), *shape].

    `counters` are extra per-environment ([E] tensors) or global (ints) indices, typically
    the episode index and the step within the episode.
    """
    device = env_ids.device
    env_ids = env_ids.to(torch.int64)
    broadcast = (-1,) + (1,) * len(shape)
    per_env = [c.to(device).view(broadcast) if isinstance(c, Tensor) else c for c in counters]
    key = _key(seed, env_ids.view(broadcast), *per_env)
    element = torch.arange(math.prod(shape), dtype=torch.int64, device=device).view(shape)
    bits = _hash32(key ^ _hash32(element + 0x7F4A7C15))
    # 24 random bits: exactly representable in float32, and never 1.0.
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


def integers(seed: int, env_ids: Tensor, *counters: Tensor | int) -> Tensor:
    """One non-negative 31-bit integer per environment (e.g. the seed of an external simulator's
    episode), a pure function of the seed, the environment index and the counters."""
    env_ids = env_ids.to(torch.int64)
    per_env = [c.to(env_ids.device) if isinstance(c, Tensor) else c for c in counters]
    return _key(seed, env_ids, *per_env) & 0x7FFFFFFF


def normal(seed: int, env_ids: Tensor, *counters: Tensor | int, shape: tuple[int, ...]) -> Tensor:
    """Standard normal floats of shape [len(env_ids), *shape] (Box-Muller on two uniforms)."""
    pair = uniform(seed, env_ids, *counters, shape=(2, *shape))
    u1 = 1.0 - pair[:, 0]  # in (0, 1], safe for log
    u2 = pair[:, 1]
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
