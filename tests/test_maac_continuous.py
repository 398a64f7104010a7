"""Box actions in the MAAC family (maac, mamd, mamt): tanh-Gaussian policies, the own-action critic head, the
reparameterised policy loss with a frozen critic, the closed-form KL of MAMD, MAMT's K-sample counterfactual, and
training on continuous envs (spread_vm3ac, SISL multiwalker)."""

import importlib.util
import math

import pytest
import torch
from torch import nn

import vimarl
from vimarl.algos.maac import AttentionSAC, AttentionSACConfig
from vimarl.algos.mamd import MirrorDescentAttentionSAC, MirrorDescentConfig, gaussian_divergence, policy_divergence
from vimarl.algos.mamt import (TrustRegionDecompositionConfig, TrustRegionDecompositionSAC,
                               coordination_coefficients, counterfactual_q)
from vimarl.buffer import Transition
from vimarl.envs.base import Box, Discrete, GroupSpec
from vimarl.errors import VimarlError
from vimarl.logging import read_metrics
from vimarl.nn.distributions import TanhGaussian
from vimarl.train import fill_replay

from helpers import assert_same_state

N, OBS, A = 3, 2, 2
BOX = Box(-1.0, 1.0, A)
SPEC = {"agents": GroupSpec(n_agents=N, obs_dim=OBS, action_space=BOX)}
SMALL = dict(critic_hidden_dim=8, attend_heads=2, policy_hidden_dim=8)
MAMT_SMALL = dict(SMALL, model_hidden_dim=8, trd_hidden_dim=8, trd_epsilon_embedding=4)


def box_transition(b: int) -> Transition:
    """b random transitions of one group "agents" of N agents with Box(-1, 1, A) actions."""
    g = "agents"
    return Transition(obs={g: torch.randn(b, N, OBS)}, graph={g: None}, action_mask={g: None}, state=None,
                      action={g: torch.rand(b, N, A) * 2 - 1}, reward={g: torch.randn(b, N)},
                      next_obs={g: torch.randn(b, N, OBS)}, next_graph={g: None}, next_action_mask={g: None},
                      next_state=None, terminated=torch.zeros(b), next_alive={g: None})


def test_closed_form_kl_is_the_kl_of_the_tanh_gaussians():
    torch.manual_seed(0)
    mean, log_std = torch.tensor([0.3, -0.5]), torch.tensor([-0.2, 0.1])
    mean_old, log_std_old = torch.tensor([0.1, -0.2]), torch.tensor([0.0, -0.1])
    p, p_old = TanhGaussian(mean, log_std, -2.0, 3.0), TanhGaussian(mean_old, log_std_old, -2.0, 3.0)
    exact = policy_divergence(p, p_old, None)
    # Monte Carlo over the squashed, rescaled actions themselves (their densities include the tanh Jacobian).
    samples = TanhGaussian(mean.expand(400_000, 2), log_std.expand(400_000, 2), -2.0, 3.0).sample()
    monte_carlo = (samples.log_prob - p_old.log_prob(samples.action)).mean()
    assert exact.item() > 0.05 and exact.item() == pytest.approx(monte_carlo.item(), abs=1e-2)
    assert exact == gaussian_divergence(mean, log_std, mean_old, log_std_old)
    assert policy_divergence(p, p, None) == 0.0


def test_mamd_kl_is_zero_at_the_old_copy_and_positive_after_a_step_for_both_estimators():
    torch.manual_seed(0)
    batch = box_transition(64)
    for estimator in ("exact", "sample"):
        algo = MirrorDescentAttentionSAC(SPEC, 0, MirrorDescentConfig(**SMALL, md_delay=1000, kl_estimator=estimator,
                                                                      pi_lr=1e-2))
        assert algo.q_exponent == 1.0  # no Tsallis log of densities
        assert algo.update(batch)["kl"] == 0.0  # pi == pi_old before the first step
        assert algo.update(batch)["kl"] > 0.0  # the closed-form KL, whatever the estimator


def test_critic_reads_the_own_action_and_the_policy_step_leaves_it_untouched():
    torch.manual_seed(0)
    algo = AttentionSAC(SPEC, 0, AttentionSACConfig(**SMALL))
    batch = box_transition(32)
    obs = algo.joint_obs(batch.obs)
    actions = algo.joint_actions(batch.action).requires_grad_(True)
    q, all_q, _ = algo.critic(obs, actions.detach(), None, own_actions=actions)
    assert all_q is None and q.shape == (32, N)
    gradient, = torch.autograd.grad(q[:, 0].sum(), actions)
    assert gradient[:, 0].abs().sum() > 0 and torch.all(gradient[:, 1:] == 0)  # Q_0 moves with a~_0 alone
    critic_before = {k: v.clone() for k, v in algo.critic.state_dict().items()}
    policy_before = {k: v.clone() for k, v in algo.policy.named_parameters()}
    loss, _ = algo.policy_loss(batch)
    algo._policy_step(loss)
    assert all(p.grad is None and p.requires_grad for p in algo.critic.parameters())
    # Parameters identical; only BN running statistics followed the forward (as in the discrete policy step).
    assert all(torch.equal(v, critic_before[k]) for k, v in algo.critic.named_parameters())
    assert all(not torch.equal(v, policy_before[k]) for k, v in algo.policy.named_parameters())


class QuadraticCritic(nn.Module):
    """Q_i(o, a) = -|a_i - c|^2 of the own action alone."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c
        self.weight = nn.Parameter(torch.zeros(()))  # something for `frozen` to freeze

    def forward(self, obs, actions, present=None, own_actions=None):
        own = actions if own_actions is None else own_actions
        return -(own - self.c).square().sum(-1) + 0.0 * self.weight, None, torch.zeros(())


def test_reparameterised_policy_loss_moves_the_mean_action_to_the_critics_maximum():
    torch.manual_seed(0)
    algo = AttentionSAC(SPEC, 0, AttentionSACConfig(**SMALL, pi_lr=1e-2, reward_scale=1000.0))
    algo.critics["q"] = QuadraticCritic(0.5)
    batch = box_transition(64)
    obs = algo.joint_obs(batch.obs)
    for _ in range(300):
        loss, _ = algo.policy_loss(batch)
        algo._policy_step(loss)
    with torch.no_grad():
        _, policy = algo.distribution(algo.policy, obs, None)
    assert torch.allclose(policy.mode().mean((0, 1)), torch.full((A,), 0.5), atol=0.05)
    assert algo.critics["q"].weight.grad is None


class IgnoringCritic(nn.Module):
    """Q_i(o, a) = sum_j W_ij a_j[0]: agent j matters to agent i exactly where W_ij != 0."""

    def __init__(self, coupling: torch.Tensor):
        super().__init__()
        self.coupling, self.calls = coupling, 0

    def forward(self, obs, actions, present=None, own_actions=None):
        self.calls += 1
        return torch.einsum("ij,bj->bi", self.coupling, actions[..., 0]), None, None


def test_k_sample_counterfactual_gives_zero_coordination_to_an_ignored_agent():
    coupling = torch.tensor([[0.0, 10.0, 0.0], [10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    critic = IgnoringCritic(coupling)
    b, k = 4, 5
    actions = torch.ones(b, N, A)
    mean, log_std = torch.zeros(b, N, A), torch.full((b, N, A), -0.5)
    policy = TanhGaussian(mean, log_std, -1.0, 1.0)
    torch.manual_seed(3)
    q, counterfactual = counterfactual_q(critic, torch.zeros(b, N, OBS), actions, policy, None, "marginal", k)
    assert critic.calls == 1
    torch.manual_seed(3)
    draws = torch.tanh(mean + log_std.exp() * torch.randn(k, b, N, A))  # the same K draws of every pi_j
    expected_gap = coupling * (draws[..., 0].mean(0) - 1.0).unsqueeze(1)  # [B, i, j]: W_ij (mean_k a'_j - a_j)
    assert torch.allclose(counterfactual - q.unsqueeze(-1), expected_gap, atol=1e-6)
    c = coordination_coefficients(q, counterfactual, 0.2, None)
    assert torch.all(c[:, 0, 2] == 0) and torch.all(c[:, 1, 2] == 0) and torch.all(c[:, 0, 1] > 0.99)


def test_mixed_or_unequal_action_spaces_are_one_line_errors():
    mixed = {"a": GroupSpec(n_agents=2, obs_dim=OBS, action_space=BOX),
             "b": GroupSpec(n_agents=1, obs_dim=OBS, action_space=Discrete(3))}
    unequal = {"a": GroupSpec(n_agents=2, obs_dim=OBS, action_space=BOX),
               "b": GroupSpec(n_agents=1, obs_dim=OBS, action_space=Box(-1.0, 1.0, 3))}
    for groups in (mixed, unequal):
        with pytest.raises(VimarlError) as error:
            AttentionSAC(groups, 0, AttentionSACConfig(**SMALL))
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("algo_name", ["maac", "mamd", "mamt"])
def test_updates_on_a_continuous_env_move_every_parameter(algo_name):
    torch.manual_seed(0)
    env = vimarl.make_env("spread_vm3ac", 4)
    config = dict(maac={}, mamd=dict(md_delay=1), mamt=dict(md_delay=1, epsilon_delay=1))[algo_name]
    algo = vimarl.make_algo(algo_name, env, **config)
    codec, buffer = fill_replay(env, algo, 20, capacity=1000)
    before = {k: v.clone() for k, v in algo.named_parameters()}
    for _ in range(3):
        metrics = algo.update(codec.decode(buffer.sample(32)))
        assert all(torch.isfinite(v) and v.dim() == 0 for v in metrics.values())
    assert not [k for k, v in algo.named_parameters() if torch.equal(v, before[k])]


def test_state_dict_round_trip_reproduces_actions_and_updates():
    torch.manual_seed(0)
    config = TrustRegionDecompositionConfig(**MAMT_SMALL, epsilon_delay=2, md_delay=3)
    first = TrustRegionDecompositionSAC(SPEC, 0, config)
    batch = box_transition(32)
    for _ in range(3):
        first.update(batch)
    second = TrustRegionDecompositionSAC(SPEC, 0, config)
    second.load_state_dict(first.state_dict())
    obs = {"agents": torch.randn(5, N, OBS)}
    for explore in (False, True):
        torch.manual_seed(2)
        action = first.act(obs, {"agents": None}, explore=explore)["agents"]
        torch.manual_seed(2)
        assert torch.equal(action, second.act(obs, {"agents": None}, explore=explore)["agents"])
        assert action.shape == (5, N, A) and action.abs().max() <= 1.0
    for _ in range(2):
        torch.manual_seed(1)
        first.update(batch)
        torch.manual_seed(1)
        second.update(batch)
    assert_same_state(first, second)


def test_mamt_trains_on_multiwalker(tmp_path):
    if importlib.util.find_spec("pettingzoo") is None or importlib.util.find_spec("pymunk") is None:
        pytest.skip("multiwalker_n3 needs its simulator: pip install 'vimarl[sisl]'")
    budget = dict(total_steps=200, buffer_size=1000, warmup_steps=100, update_every=10, batch_size=32, num_envs=2,
                  eval_every=200, eval_episodes=1, final_eval_episodes=0, checkpoint_every=200,
                  progress=False, tensorboard=False)
    out = vimarl.train("mamt", "multiwalker_n3", out=str(tmp_path / "run"), seed=0, env_config={"episode_length": 50},
                       algo_config=dict(MAMT_SMALL, counterfactual_samples=4), **budget)
    rows = read_metrics(out / "metrics.csv")
    assert [row["env_steps"] for row in rows] == [0, 200]
    assert all(math.isfinite(row["eval_return_mean"]) for row in rows)
    losses = [key for key in rows[-1] if "loss" in key or key.startswith("epsilon_")]
    assert losses and all(math.isfinite(rows[-1][key]) for key in losses)
