"""MAMT (paper 004, Sec. 5.3): coordination coefficients (Eq. 14), action models, D_ns (Eq. 12), TRD-Net's
loss (Eq. 13), the two-timescale clipped trust regions (Eq. 15, Table 1), updates on real envs, checkpoints."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vimarl
from vimarl.algos.maac import AttentionCritic
from vimarl.algos.mamt import (TrustRegionDecompositionConfig, TrustRegionDecompositionSAC, coordination_coefficients,
                               counterfactual_actions, counterfactual_q, non_stationarity, replaced_action_q)
from vimarl.buffer import Transition
from vimarl.nn.distributions import TanhGaussian
from vimarl.envs.base import Discrete, GroupSpec
from vimarl.train import fill_replay

from helpers import assert_same_state, random_discrete_transition

N, OBS, A = 3, 2, 3
SPEC = {"agents": GroupSpec(n_agents=N, obs_dim=OBS, action_space=Discrete(A))}
SMALL = dict(critic_hidden_dim=8, attend_heads=2, policy_hidden_dim=4, model_hidden_dim=8, trd_hidden_dim=8,
             trd_epsilon_embedding=4)


def tiny(**config) -> TrustRegionDecompositionSAC:
    return TrustRegionDecompositionSAC(SPEC, 0, TrustRegionDecompositionConfig(**SMALL, **config))


def batch_of(b: int) -> Transition:
    return random_discrete_transition(b, N, OBS, A)


class LinearCritic(nn.Module):
    """Q_i(o, a) = sum_j W_ij value(a_j): agent j matters to agent i exactly where W_ij != 0."""

    def __init__(self, coupling: torch.Tensor, action_values: torch.Tensor):
        super().__init__()
        self.coupling, self.action_values, self.calls = coupling, action_values, 0

    def forward(self, obs, actions, present=None):
        self.calls += 1
        return torch.einsum("ij,bj->bi", self.coupling, actions @ self.action_values), None, None


@pytest.mark.parametrize("variant", ["marginal", "mean_action"])
def test_coordination_weighs_the_opponent_whose_action_moves_the_critic(variant):
    # Agent 0's Q depends on agent 1 only; agent 1's on agent 0 and (weakly) on agent 2; agent 2's on nobody.
    coupling = torch.tensor([[0.0, 10.0, 0.0], [10.0, 0.0, 0.5], [0.0, 0.0, 0.0]])
    critic = LinearCritic(coupling, torch.tensor([0.0, 1.0, 2.0]))
    actions = F.one_hot(torch.tensor([[2, 2, 0]]), A).float()       # a_0 = a_1 = 2, a_2 = 0
    probs = torch.full((1, N, A), 1 / 3)                              # expected value(a_j) = 1 under pi_j
    q, counterfactual = counterfactual_q(critic, torch.zeros(1, N, OBS), actions, probs, None, variant)
    assert critic.calls == 1  # every (i, j) from one batched forward
    # Q_i(a_\j) - Q_i(a) = W_ij (E_pi value - value(a_j)) for a critic linear in a_j (both variants agree).
    assert torch.allclose(counterfactual - q.unsqueeze(-1), coupling * torch.tensor([-1.0, -1.0, 1.0]))
    c = coordination_coefficients(q, counterfactual, 0.2, None)[0]
    assert torch.all(c.diagonal() == 0)
    assert c[0, 1] == pytest.approx(1 / (1 + math.exp(-10))) and c[0, 2] == 0.0   # e^-10 / (1 + e^-10) < delta
    assert c[1, 0] == pytest.approx(1 / (1 + math.exp(-9.5))) and c[1, 2] == 0.0
    # No opponent matters to agent 2: the softmax of equal gaps is uniform (Eq. 14 as printed), above delta.
    assert torch.allclose(c[2, :2], torch.tensor([0.5, 0.5]))
    # An absent agent is no opponent and has no row; a high delta sparsifies everything.
    present = torch.tensor([[True, True, False]])
    c = coordination_coefficients(q, counterfactual, 0.2, present)[0]
    assert torch.all(c[2] == 0) and torch.all(c[:, 2] == 0) and c[0, 1] == 1.0
    assert torch.all(coordination_coefficients(q, counterfactual, 0.51, None)[0, 2] == 0)


@pytest.mark.parametrize("continuous", [False, True])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("variant", ["marginal", "mean_action"])
def test_the_attention_critics_shortcut_equals_one_forward_per_copy(continuous, shared, variant):
    """Issue 22: the analytic renormalisation gives the values of the stacked forward (to 1e-5), with
    several heads, trained BatchNorm statistics, absent agents and an agent that attends to nobody."""
    torch.manual_seed(7)
    n, obs_dim, a, b = 5, 4, 3, 16
    critic = AttentionCritic(n, obs_dim, a, hidden=16, heads=4, shared=shared, continuous=continuous)
    critic.train()
    for _ in range(3):  # move the running statistics away from (0, 1)
        critic(torch.randn(64, n, obs_dim) * 3 + 1, torch.rand(64, n, a))
    critic.eval()
    obs = torch.randn(b, n, obs_dim)
    present = torch.rand(b, n) > 0.3
    present[0] = torch.tensor([True, False, False, False, False])  # agent 0 alone
    if continuous:
        actions = torch.rand(b, n, a) * 2 - 1
        policy = TanhGaussian(torch.randn(b, n, a), torch.full((b, n, a), -0.5), -1.0, 1.0)
    else:
        actions = F.one_hot(torch.randint(a, (b, n)), a).float()
        policy = torch.softmax(torch.randn(b, n, a), -1)
    replacements, weights = counterfactual_actions(policy, variant, samples=6)
    fast_q, fast = critic.replaced_action_q(obs, actions, replacements, weights, present)
    q, reference = replaced_action_q(critic, obs, actions, replacements, weights, present)
    assert torch.allclose(fast_q, q, atol=1e-5) and torch.allclose(fast, reference, atol=1e-5, rtol=1e-5)
    assert (fast - fast_q.unsqueeze(-1)).abs().amax() > 1e-3  # the copies do change Q


def test_non_stationarity_is_zero_when_the_action_models_are_the_policies():
    torch.manual_seed(0)
    algo = tiny()
    log_pi = torch.log_softmax(torch.randn(5, N, A), -1)
    coordination = torch.rand(5, N, N) * (1 - torch.eye(N))
    dns = non_stationarity(log_pi[:, algo.target], log_pi, coordination, algo.observer, algo.target, None, 1.0)
    assert dns.shape == (5, N) and torch.allclose(dns, torch.zeros(5, N), atol=1e-7)
    # Eq. 12 otherwise: sum_j C_ij KL[h_i^j || pi_j], clipped by Pi_ns.
    log_h = torch.log_softmax(torch.randn(5, N * (N - 1), A), -1)
    kl = (log_h.exp() * (log_h - log_pi[:, algo.target])).sum(-1)
    expected = torch.zeros(5, N).index_add_(1, algo.observer, coordination[:, algo.observer, algo.target] * kl)
    assert torch.allclose(non_stationarity(log_h, log_pi, coordination, algo.observer, algo.target, None, 1e9),
                          expected, atol=1e-6)
    assert non_stationarity(log_h, log_pi, 100 * coordination, algo.observer, algo.target, None, 0.3).max() <= 0.3


def test_action_models_learn_the_replayed_actions():
    torch.manual_seed(0)
    algo = tiny(md_delay=1)
    batch = batch_of(64)
    batch.action["agents"] = torch.arange(N).expand(64, N) % A  # every agent j always plays j: predictable
    losses = [algo.update(batch)["loss_action_model"] for _ in range(40)]
    assert losses[-1] < 0.85 * losses[0]
    assert algo.action_models.net.net[0].weight.shape[0] == N * (N - 1)  # one model per ordered pair i != j


def test_trd_net_fits_eq13_on_a_fixed_batch():
    torch.manual_seed(0)
    algo = tiny()
    batch = batch_of(64)
    obs, actions = batch.obs["agents"], F.one_hot(batch.action["agents"], A).float()
    coordination = algo.coordination(obs, actions, torch.full((64, N, A), 1 / 3), None)
    dns = torch.full((64, N), 0.8)  # a fixed supervision signal, well above the initial KL^
    losses = []
    for _ in range(60):
        loss = (algo.trd(obs, actions, algo.log_epsilon.detach(), coordination).sum(-1) - dns.sum(-1)).square().mean()
        algo.optimize("trd", loss, 10.0 * N)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_epsilon_moves_on_the_slow_timescale_and_stays_clipped():
    torch.manual_seed(0)
    algo = tiny(epsilon_delay=3, epsilon_lr=3.0, md_delay=1)  # a huge step: the clip is reached
    assert torch.allclose(algo.epsilon_i, torch.full((N,), 1.0 / N))  # MAMD's equal split to start
    batch = batch_of(32)
    previous = algo.epsilon_i
    for update in range(1, 13):
        metrics = algo.update(batch)
        current = algo.epsilon_i
        assert torch.all(current >= 0.01 * (1 - 1e-6)) and torch.all(current <= 100 * (1 + 1e-6))
        assert (not torch.equal(current, previous)) == (update % 3 == 0), update
        assert torch.equal(torch.stack([metrics[f"epsilon_{i}"] for i in range(N)]), current)
        previous = current
    assert torch.any((current - 0.01).abs() < 1e-6) or torch.any((current - 100).abs() < 1e-3)
    algo.epsilon_i = 1e6  # setting clips too
    assert torch.allclose(algo.epsilon_i, torch.full((N,), 100.0))


def test_lookahead_alignment_is_the_inner_product_of_score_and_penalty_gradients():
    torch.manual_seed(0)
    algo = tiny(epsilon_delay=1, md_delay=100)
    batch = batch_of(32)
    algo.update(batch)
    algo.update(batch)  # the policy left its old copy: the penalty has a gradient
    torch.manual_seed(3)
    algo.epsilon_due = True
    loss, _ = algo.policy_loss(batch)
    alignment = algo.policy_alignment
    assert alignment.shape == (N,) and torch.all(alignment != 0)
    # Recomputed from the policy loss and the penalty rows: grad S = grad loss - grad P / epsilon (per agent).
    params = list(algo.policy.parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    penalty = torch.autograd.grad(algo.last_penalty_rows.mean(0).sum(), params)
    score = [g - p / algo.epsilon_i.view(-1, *[1] * (p.dim() - 1)) for g, p in zip(grads, penalty)]
    expected = sum((s * p).reshape(N, -1).sum(1) for s, p in zip(score, penalty))
    assert torch.allclose(alignment, expected)


@pytest.mark.parametrize("env_name", ["spread_n2", "spread3", "rover_tower"])
def test_update_on_a_real_env_moves_every_parameter(env_name):
    env = vimarl.make_env(env_name, 4)
    algo = vimarl.make_algo("mamt", env, md_delay=1, epsilon_delay=1)
    codec, buffer = fill_replay(env, algo, 20, capacity=1000)
    before = {k: v.clone() for k, v in algo.named_parameters()}
    metrics = algo.update(codec.decode(buffer.sample(32)))
    n = algo.n_agents
    pairs = {f"coord_{i}_{j}" for i in range(n) for j in range(n) if i != j}
    assert set(metrics) == {"loss_q", "attention_reg", "loss_policy", "entropy", "kl", "epsilon_i", "dns", "coord",
                            "loss_action_model", "loss_ns", "kl_hat", *pairs,
                            *(f"{key}_{i}" for key in ("kl", "epsilon", "dns") for i in range(n))}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in metrics.values())
    assert all(0 <= metrics[p] <= 1 for p in pairs)
    unmoved = [k for k, v in algo.named_parameters() if torch.equal(v, before[k])]
    assert not unmoved


def test_many_agents_log_only_the_mean_coordination():
    torch.manual_seed(0)
    algo = tiny(coordination_metrics_max_agents=2)
    metrics = algo.update(batch_of(16))
    assert "coord" in metrics and not any(k.startswith("coord_") for k in metrics)


def test_parameter_sharing_is_refused():
    with pytest.raises(ValueError, match="per-agent policies"):
        tiny(parameter_sharing=True)


def test_state_dict_round_trip_continues_exactly():
    torch.manual_seed(0)
    first = tiny(epsilon_delay=2, md_delay=3)
    batch = batch_of(32)
    for _ in range(3):
        first.update(batch)
    second = tiny(epsilon_delay=2, md_delay=3)
    second.load_state_dict(first.state_dict())
    assert torch.equal(second.epsilon_i, first.epsilon_i) and not torch.allclose(second.epsilon_i,
                                                                                 torch.full((N,), 1.0 / N))
    for _ in range(2):  # the 4th update also steps epsilon: its Adam moments were restored
        torch.manual_seed(1)
        first.update(batch)
        torch.manual_seed(1)
        second.update(batch)
    assert_same_state(first, second)
