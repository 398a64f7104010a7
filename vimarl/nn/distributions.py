"""Action distributions with reparameterised samples for critics' inputs.

`sample()` returns a PolicySample: the action for the environment, the same action as a
differentiable critic input (straight-through Gumbel-softmax one-hot for Categorical, the
reparameterised squashed value for Gaussian), its log-probability, and an estimate of
E_q[log q] used by entropy-regularised losses (exact for Categorical, the sample's
log-density for Gaussian).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vimarl.envs.base import ActionSpace, Box, Discrete
from vimarl.nn.mlp import mlp


@dataclass
class PolicySample:
    action: Tensor
    """What the environment takes: [..] int64 or [.., A] float."""
    critic_input: Tensor
    """[.., A] float, differentiable w.r.t. the policy parameters."""
    log_prob: Tensor
    """[..] log q(a) of the sampled action."""
    log_prob_mean: Tensor
    """[..] estimate of E_q[log q] (= -entropy)."""
    pre_tanh: Tensor | None = None
    """[.., A] the Gaussian sample before the squash (TanhGaussian only), differentiable like critic_input."""


class Categorical:
    """A categorical distribution over n actions given logits [.., n] (masked logits = -inf)."""

    def __init__(self, logits: Tensor, action_mask: Tensor | None = None, temperature: float = 1.0):
        if action_mask is not None:
            logits = logits.masked_fill(~action_mask, torch.finfo(logits.dtype).min)
        self.logits = logits
        self.log_probs = torch.log_softmax(logits, dim=-1)
        self.temperature = temperature

    @property
    def probs(self) -> Tensor:
        return self.log_probs.exp()

    def entropy(self) -> Tensor:
        return -(self.probs * self.log_probs).sum(-1)

    def log_prob(self, action: Tensor) -> Tensor:
        """log q(a) of stored actions [..] (int64)."""
        return self.log_probs.gather(-1, action.unsqueeze(-1)).squeeze(-1)

    def sample(self) -> PolicySample:
        """Straight-through Gumbel-softmax: a hard one-hot forward, soft gradients backward."""
        uniform = torch.rand_like(self.logits).clamp_(1e-10, 1.0 - 1e-7)
        gumbel = -torch.log(-torch.log(uniform))
        soft = torch.softmax((self.log_probs + gumbel) / self.temperature, dim=-1)
        action = soft.argmax(-1)
        hard = F.one_hot(action, soft.shape[-1]).to(soft.dtype)
        # soft - soft.detach() is exactly 0 forward, so the value is exactly `hard`; as
        # (hard + soft) - soft it would be off by an ulp where soft is not a power of two.
        one_hot = hard + (soft - soft.detach())
        return PolicySample(action, one_hot, self.log_prob(action), -self.entropy())

    def mode(self) -> Tensor:
        return self.logits.argmax(-1)

    @staticmethod
    def as_critic_input(action: Tensor, n: int) -> Tensor:
        return F.one_hot(action, n).float()


def _standard_normal_log_prob(noise: Tensor, log_std: Tensor) -> Tensor:
    """log N(mean + std * noise; mean, std^2 I), summed over the last axis."""
    return (-0.5 * noise.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


class TanhGaussian:
    """A diagonal Gaussian squashed by tanh and scaled to [low, high] (SAC, App. C of Haarnoja 2018)."""

    def __init__(self, mean: Tensor, log_std: Tensor, low: float, high: float):
        self.mean, self.log_std = mean, log_std
        self.scale, self.offset = (high - low) / 2.0, (high + low) / 2.0

    def sample(self) -> PolicySample:
        noise = torch.randn_like(self.mean)
        pre_tanh = self.mean + self.log_std.exp() * noise
        action = self.offset + self.scale * torch.tanh(pre_tanh)
        log_prob = self._log_prob(noise, pre_tanh)
        return PolicySample(action, action, log_prob, log_prob, pre_tanh)

    def _log_prob(self, noise: Tensor, pre_tanh: Tensor) -> Tensor:
        # log |d action / d pre_tanh| = log scale + log(1 - tanh^2), written stably.
        log_det = (math.log(self.scale) + 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))).sum(-1)
        return _standard_normal_log_prob(noise, self.log_std) - log_det

    def log_prob(self, action: Tensor) -> Tensor:
        """log q(a) of stored actions [.., A], inverting the squash (actions on the bounds are moved
        1e-6 inside, where atanh is finite)."""
        unit = ((action - self.offset) / self.scale).clamp(-1.0 + 1e-6, 1.0 - 1e-6)
        pre_tanh = torch.atanh(unit)
        return self._log_prob((pre_tanh - self.mean) / self.log_std.exp(), pre_tanh)

    def log_prob_pre_tanh(self, pre_tanh: Tensor) -> Tensor:
        """log q(a) of the action a = squash(pre_tanh), from its pre-squash value [.., A] (no atanh of a
        saturated action)."""
        return self._log_prob((pre_tanh - self.mean) / self.log_std.exp(), pre_tanh)

    def entropy(self) -> Tensor:
        """Entropy of the Gaussian before the squash (the squashed one has no closed form)."""
        return (self.log_std + 0.5 * math.log(2 * math.pi * math.e)).sum(-1)

    def mode(self) -> Tensor:
        return self.offset + self.scale * torch.tanh(self.mean)

    @staticmethod
    def as_critic_input(action: Tensor) -> Tensor:
        return action


class Gaussian:
    """A diagonal Gaussian without squashing; samples are clipped to [low, high] for the env.

    The clip is straight-through (the critic input keeps the raw sample's gradient), and the
    log-probability is the unclipped Gaussian density, as in policies that leave clipping to
    the environment.
    """

    def __init__(self, mean: Tensor, log_std: Tensor, low: float, high: float):
        self.mean, self.log_std, self.low, self.high = mean, log_std, low, high

    def sample(self) -> PolicySample:
        noise = torch.randn_like(self.mean)
        raw = self.mean + self.log_std.exp() * noise
        action = raw + (raw.clamp(self.low, self.high) - raw).detach()
        log_prob = _standard_normal_log_prob(noise, self.log_std)
        return PolicySample(action.detach(), action, log_prob, log_prob)

    def mode(self) -> Tensor:
        return self.mean.clamp(self.low, self.high)


class PolicyHead(nn.Module):
    """Features -> a Categorical (softmax), or a TanhGaussian / plain Gaussian (mean, log std)."""

    LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0

    def __init__(self, in_dim: int, hidden: tuple[int, ...], action_space: ActionSpace, squash: bool = True):
        super().__init__()
        self.action_space, self.squash = action_space, squash
        out = action_space.n if isinstance(action_space, Discrete) else 2 * action_space.dim
        self.net = mlp(in_dim, hidden, out)

    def forward(self, features: Tensor, action_mask: Tensor | None = None) -> Categorical | TanhGaussian | Gaussian:
        out = self.net(features)
        if isinstance(self.action_space, Discrete):
            return Categorical(out, action_mask)
        mean, log_std = out.chunk(2, dim=-1)
        log_std = log_std.clamp(self.LOG_STD_MIN, self.LOG_STD_MAX)
        gaussian = TanhGaussian if self.squash else Gaussian
        return gaussian(mean, log_std, self.action_space.low, self.action_space.high)


def action_features(action: Tensor, action_space: ActionSpace) -> Tensor:
    """A stored action as a critic input: one-hot for Discrete, the value itself for Box."""
    if isinstance(action_space, Discrete):
        return Categorical.as_critic_input(action, action_space.n)
    assert isinstance(action_space, Box)
    return TanhGaussian.as_critic_input(action)


def action_dim(action_space: ActionSpace) -> int:
    """Width of `action_features` for this action space."""
    return action_space.n if isinstance(action_space, Discrete) else action_space.dim
