"""VPP / IP / ISAC (vimarl/algos/vpp.py, ip.py, isac.py) checked on values.

Equivariance and masking of the policy and critics, gradients reaching every network, the
action distributions' normalisation, Eq. 8's losses recomputed by hand, twin critics, the
entropy weight, the independent ablation, heterogeneous groups, continuous actions, and the
`ip` defaults and paper preset.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from graph_helpers import random_graph, real_neighbors, repoint_padding
from helpers import CounterConfig, CounterEnv
from torch.distributions import Normal
from toy_envs import register_test_envs

import vimarl
from vimarl.config import resolve
from vimarl.envs.base import Box, Discrete
from vimarl.envs.graph import Graph
from vimarl.errors import VimarlError
from vimarl.nn.critics import NeighborQ
from vimarl.nn.distributions import (
    Categorical,
    Gaussian,
    PolicyHead,
    TanhGaussian,
    action_features,
)
from vimarl.nn.loopy_bp import LoopyBPPropagation
from vimarl.nn.propagation import MeanFieldPropagation
from vimarl.train import act, fill_replay

torch.set_num_threads(1)
register_test_envs()

G = "agents"
# (algo name, config overrides): the policy variants every structural test runs on.
VARIANTS = {
    "vpp_mean_field": ("vpp", {}),
    "vpp_loopy_bp": ("vpp", {"inference": "loopy_bp"}),
    "vpp_loopy_bp_concat": ("vpp", {"inference": "loopy_bp", "concat_hops": True}),
    "ip": ("ip", {}),
    "vpp_pair_critic": ("vpp", {"critic_neighbors": "pair", "critic_reads_obs": True}),
}
SMALL = {"embed_dim": 16, "state_dim": 16, "hidden_dim": 32}


def grid_env(batch=4):
    return vimarl.make_env("grid_coordination", batch, agent_ids=True)


def make(variant, env, **overrides):
    name, config = VARIANTS[variant]
    return vimarl.make_algo(name, env, **{**config, **overrides})


def sample_batch(env, algo, size=16, steps=4):
    codec, buffer = fill_replay(env, algo, steps, capacity=steps * env.num_envs)
    return codec.decode(buffer.sample(size))


def random_inputs(batch, n, obs_dim, k, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    obs = torch.randn(batch, n, obs_dim, generator=gen, dtype=dtype)
    graph = random_graph(batch, n, k, seed=seed, isolated=((0, 0), (1, 3)))
    return obs, graph


def relabel(obs, graph, perm):
    """New agent a is old agent perm[a]; neighbour indices are renamed by argsort(perm)."""
    inverse = torch.argsort(perm)
    return obs[:, perm], Graph(inverse[graph.neighbors[:, perm]], graph.mask[:, perm].clone())


def critic_outputs(critics, obs, graph, n_actions, seed):
    gen = torch.Generator().manual_seed(seed)
    actions = torch.randint(0, n_actions, obs.shape[:2], generator=gen)
    one_hot = F.one_hot(actions, n_actions).to(obs.dtype)
    neighbor = F.one_hot(torch.randint(0, n_actions, obs.shape[:2], generator=gen), n_actions).to(obs.dtype)
    return {"v": critics.value(obs, graph), "target_v": critics.target_value(obs, graph),
            "q": critics.q_value(obs, one_hot, graph),
            "q_split": critics.q_value(obs, one_hot, graph, neighbor),
            "q_all": critics.q_all_actions(obs, graph, neighbor)}, (actions, neighbor)


# ---------------------------------------------------------------------------------------
# 1. Permutation equivariance.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_policy_and_critics_are_permutation_equivariant(variant):
    env = grid_env(1)
    algo = make(variant, env).double()
    obs, graph = random_inputs(3, 9, 10, 4, seed=1)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(perm, torch.arange(9))
    new_obs, new_graph = relabel(obs, graph, perm)
    with torch.no_grad():
        logits = algo.policy(G, obs, graph).logits
        new_logits = algo.policy(G, new_obs, new_graph).logits
        torch.testing.assert_close(new_logits, logits[:, perm], atol=1e-10, rtol=0)
        assert logits[:, 1:].std(1).min() > 1e-3  # agents really differ: the check is not vacuous

        critics = algo.critics[G]
        old, (actions, neighbor) = critic_outputs(critics, obs, graph, 2, seed=3)
        one_hot = F.one_hot(actions[:, perm], 2).double()
        new = {"v": critics.value(new_obs, new_graph), "target_v": critics.target_value(new_obs, new_graph),
               "q": critics.q_value(new_obs, one_hot, new_graph),
               "q_split": critics.q_value(new_obs, one_hot, new_graph, neighbor[:, perm]),
               "q_all": critics.q_all_actions(new_obs, new_graph, neighbor[:, perm])}
    for key, value in old.items():
        torch.testing.assert_close(new[key], value[:, perm], atol=1e-10, rtol=0, msg=key)


# ---------------------------------------------------------------------------------------
# 2. Padding slots carry nothing.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_padding_slots_change_no_policy_or_critic_output(variant, aggregation):
    env = grid_env(1)
    algo = make(variant, env, critic_aggregation=aggregation).double()
    obs, graph = random_inputs(3, 9, 10, 4, seed=4)
    assert (~graph.mask).any()
    repointed = repoint_padding(graph, seed=5)
    assert not torch.equal(repointed.neighbors, graph.neighbors)
    with torch.no_grad():
        torch.testing.assert_close(algo.policy(G, obs, repointed).logits, algo.policy(G, obs, graph).logits,
                                   atol=1e-12, rtol=0)
        before, _ = critic_outputs(algo.critics[G], obs, graph, 2, seed=6)
        after, _ = critic_outputs(algo.critics[G], obs, repointed, 2, seed=6)
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-12, rtol=0, msg=key)


def test_padding_on_the_real_grid_graph_changes_nothing():
    env = grid_env(2)
    algo = make("vpp_mean_field", env)
    step = env.reset(seed=0)
    obs, graph = step.groups[G].obs, step.groups[G].graph
    assert (~graph.mask).any()  # corner and edge agents of the 3x3 grid have padding
    repointed = repoint_padding(graph, seed=0)
    with torch.no_grad():
        assert torch.equal(algo.policy(G, obs, repointed).logits, algo.policy(G, obs, graph).logits)
        assert torch.equal(algo.critics[G].value(obs, repointed), algo.critics[G].value(obs, graph))


# ---------------------------------------------------------------------------------------
# 3. One update moves every network's every parameter.
# ---------------------------------------------------------------------------------------


UPDATE_CASES = [(v, mode) for v in ("vpp_mean_field", "vpp_loopy_bp", "ip", "vpp_pair_critic")
                for mode in ("expectation", "neighbor_expectation", "straight_through")]


@pytest.mark.parametrize("variant, mode", UPDATE_CASES)
def test_one_update_changes_every_parameter(variant, mode):
    env = grid_env(4)
    algo = make(variant, env, discrete_gradient=mode, tau=0.1, **SMALL)
    batch = sample_batch(env, algo)
    before = copy.deepcopy(algo.state_dict())
    metrics = algo.update(batch)
    assert all(torch.isfinite(v) for v in metrics.values())
    after = algo.state_dict()
    learned = [f"policy.{n}" for n, _ in algo.policy.named_parameters()]
    for g, critics in algo.critics.items():
        learned += [f"critics.{g}.value.{n}" for n, _ in critics.value.named_parameters()]
        learned += [f"critics.{g}.q.{n}" for n, _ in critics.q.named_parameters()]
    assert len(algo.critics[G].q) == (2 if variant == "ip" else 1)
    unchanged = [name for name in learned if torch.equal(before[name], after[name])]
    assert not unchanged, f"no gradient step on {unchanged}"
    # The target V moves by Polyak averaging only: (1 - tau) old + tau new V.
    for name, value in algo.critics[G].value.state_dict().items():
        old = before[f"critics.{G}.target_value.{name}"]
        torch.testing.assert_close(after[f"critics.{G}.target_value.{name}"], 0.9 * old + 0.1 * value,
                                   atol=1e-7, rtol=0)
    assert torch.equal(after[f"log_alpha.{G}"], before[f"log_alpha.{G}"])


# ---------------------------------------------------------------------------------------
# 4. Distributions.
# ---------------------------------------------------------------------------------------


def test_categorical_probabilities_normalise_with_and_without_mask():
    logits = torch.randn(4, 3, 5) * 3
    mask = torch.rand(4, 3, 5) > 0.4
    mask[..., 2] = True  # at least one allowed action per agent
    for action_mask in (None, mask):
        dist = Categorical(logits, action_mask)
        torch.testing.assert_close(dist.probs.sum(-1), torch.ones(4, 3), atol=1e-6, rtol=0)
        torch.testing.assert_close(dist.log_probs.exp(), dist.probs)
        sample = dist.sample()
        assert torch.equal(sample.critic_input, F.one_hot(sample.action, 5).float())
        torch.testing.assert_close(sample.log_prob, dist.log_probs.gather(-1, sample.action.unsqueeze(-1))[..., 0])
        torch.testing.assert_close(sample.log_prob_mean, (dist.probs * dist.log_probs).sum(-1))
        assert torch.isfinite(sample.log_prob_mean).all()
    masked = Categorical(logits, mask)
    assert (masked.probs[~mask] == 0).all()
    torch.testing.assert_close(masked.probs, torch.softmax(logits.masked_fill(~mask, -math.inf), -1))
    for _ in range(20):
        assert mask.gather(-1, masked.sample().action.unsqueeze(-1)).all()
    assert mask.gather(-1, masked.mode().unsqueeze(-1)).all()


def grid_density(dist_cls, mean, log_std, low, high, monkeypatch):
    """(values, densities) of a 1-D distribution, its sample() driven by a grid of noises."""
    noise = torch.linspace(-9, 9, 40001, dtype=torch.float64).view(-1, 1)
    monkeypatch.setattr(torch, "randn_like", lambda x: noise.expand_as(x).clone())
    shape = (noise.shape[0], 1)
    dist = dist_cls(torch.full(shape, mean, dtype=torch.float64), torch.full(shape, log_std, dtype=torch.float64),
                    low, high)
    sample = dist.sample()
    monkeypatch.undo()
    if dist_cls is Gaussian:
        value = mean + math.exp(log_std) * noise[:, 0]  # the raw (unclipped) sample
    else:
        value = sample.action[:, 0]
    return value, sample.log_prob.exp()


@pytest.mark.parametrize("dist_cls", [Gaussian, TanhGaussian])
@pytest.mark.parametrize("mean, log_std", [(0.3, math.log(0.8)), (-1.2, math.log(0.3)), (0.0, math.log(2.0))])
def test_gaussian_densities_integrate_to_one(dist_cls, mean, log_std, monkeypatch):
    value, density = grid_density(dist_cls, mean, log_std, -2.0, 3.0, monkeypatch)
    assert (value[1:] >= value[:-1]).all()
    if dist_cls is TanhGaussian:
        assert value.min() >= -2.0 and value.max() <= 3.0
    torch.testing.assert_close(torch.trapezoid(density, value).item(), 1.0, atol=2e-4, rtol=0)


def test_plain_gaussian_log_prob_clip_and_straight_through_gradient():
    torch.manual_seed(0)
    mean = (torch.randn(64, 3) * 1.5).requires_grad_()
    log_std = torch.full((64, 3), math.log(0.9))
    low, high = -0.5, 1.0
    dist = Gaussian(mean, log_std, low, high)
    torch.manual_seed(7)
    sample = dist.sample()
    torch.manual_seed(7)
    raw = mean.detach() + log_std.exp() * torch.randn_like(mean)
    expected = Normal(mean.detach(), log_std.exp()).log_prob(raw).sum(-1)
    torch.testing.assert_close(sample.log_prob.detach(), expected, atol=1e-5, rtol=1e-6)
    assert torch.equal(sample.log_prob, sample.log_prob_mean)
    clipped = (raw < low) | (raw > high)
    assert clipped.any() and (~clipped).any()
    assert not sample.action.requires_grad
    assert torch.equal(sample.action, raw.clamp(low, high))
    assert sample.action.min() >= low and sample.action.max() <= high
    assert torch.equal(sample.critic_input.detach(), sample.action)
    (grad,) = torch.autograd.grad(sample.critic_input.sum(), mean)
    assert torch.equal(grad, torch.ones_like(grad))  # also where the action was clipped
    assert torch.equal(dist.mode(), mean.detach().clamp(low, high))


def test_policy_head_picks_gaussian_by_squash():
    box = Box(0.0, 1.0, 2)
    features = torch.randn(5, 4, 8)
    assert isinstance(PolicyHead(8, (16,), box, squash=True)(features), TanhGaussian)
    plain = PolicyHead(8, (16,), box, squash=False)(features)
    assert isinstance(plain, Gaussian) and (plain.low, plain.high) == (0.0, 1.0)
    assert isinstance(PolicyHead(8, (16,), Discrete(3))(features), Categorical)


# ---------------------------------------------------------------------------------------
# 5. NeighborQ.all_actions.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_neighbor_q_all_actions_equals_forward_per_own_action(aggregation):
    q = NeighborQ(6, 4, 8, 2, (16, 16), aggregation).double()
    obs, graph = random_inputs(3, 7, 6, 3, seed=8)
    neighbor = F.one_hot(torch.randint(0, 4, (3, 7)), 4).double()
    with torch.no_grad():
        all_actions = q.all_actions(obs, graph, neighbor)
        assert all_actions.shape == (3, 7, 4)
        for a in range(4):
            own = F.one_hot(torch.full((3, 7), a), 4).double()
            torch.testing.assert_close(all_actions[..., a], q(obs, own, graph, neighbor), atol=1e-12, rtol=0)
        # Without neighbor_action, forward's neighbours read the agents' own actions.
        own_choice = all_actions.gather(-1, neighbor.argmax(-1, keepdim=True))[..., 0]
        torch.testing.assert_close(q(obs, neighbor, graph), own_choice, atol=1e-12, rtol=0)


def test_neighbor_q_sum_counts_neighbours_and_mean_does_not():
    obs, graph = random_inputs(1, 7, 6, 3, seed=9)
    action = F.one_hot(torch.zeros(1, 7, dtype=torch.int64), 2).double()
    pooled = {}
    for aggregation in ("sum", "mean"):
        torch.manual_seed(0)
        q = NeighborQ(6, 2, 8, 1, (16,), aggregation).double()
        pooled[aggregation] = q.context(obs, graph, action)[1]
    degree = graph.degree()[0].double()
    assert degree.max() > 1
    for i in range(7):
        expected = pooled["mean"][0, i] * degree[i]
        torch.testing.assert_close(pooled["sum"][0, i], expected, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------
# 6. Expectation-mode J_pi and V target by hand.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["vpp_mean_field", "ip"])
def test_expectation_policy_loss_and_value_target_by_hand(variant):
    env = vimarl.make_env("coop_nav_n6", 4)
    algo = make(variant, env, **SMALL)
    batch = sample_batch(env, algo)
    alpha = torch.tensor(0.3)
    obs, graph = batch.obs[G], batch.graph[G]
    torch.manual_seed(11)
    terms = algo.policy_terms(G, batch, alpha)
    loss, value_target, entropy = terms.loss, terms.value_target, terms.entropy
    assert loss.requires_grad and not value_target.requires_grad and not entropy.requires_grad
    with torch.no_grad():
        torch.manual_seed(11)
        dist = algo.policy(G, obs, graph, batch.action_mask[G])
        neighbor_action = F.one_hot(dist.sample().action, 5).float()
        p, log_p = dist.probs, dist.log_probs
        # Q_i(s, a, a_Ni) for every own action a, each Q net separately, then their minimum.
        q = torch.stack([torch.stack([net(obs, F.one_hot(torch.full(obs.shape[:2], a), 5).float(), graph,
                                          neighbor_action) for a in range(5)], -1)
                         for net in algo.critics[G].q]).amin(0)
        expected_loss = (alpha * (p * log_p).sum(-1) - (p * q).sum(-1)).mean()
        expected_target = (p * (q - alpha * log_p)).sum(-1)
        expected_entropy = -(p * log_p).sum(-1).mean()
    torch.testing.assert_close(loss.detach(), expected_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(value_target, expected_target, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy)
    assert value_target.shape == (16, 6)


def nav_policy_batch():
    """VPP on coop_nav N = 6, a batch of 8, its policy's distribution and the logits as a leaf."""
    env = vimarl.make_env("coop_nav_n6", 2)
    algo = make("vpp_mean_field", env, **SMALL)
    batch = sample_batch(env, algo, size=8, steps=4)
    torch.manual_seed(3)
    dist = algo.policy(G, batch.obs[G], batch.graph[G])
    return algo, batch, dist, dist.logits.detach().requires_grad_()


def test_expectation_gradient_is_analytic_with_neighbour_actions_fixed():
    """In expectation mode the policy gradient is exactly d/dtheta sum_a p(a) (alpha log p(a) - Q(a)):
    the sampled neighbour actions are constants, so the gradient w.r.t. the logits is analytic."""
    algo, batch, dist, logits = nav_policy_batch()
    obs, graph = batch.obs[G], batch.graph[G]
    alpha = torch.tensor(0.2)
    original = inject_logits(algo, logits)
    try:
        torch.manual_seed(3)
        loss = algo.policy_terms(G, batch, alpha).loss
        (grad,) = torch.autograd.grad(loss, logits)
        torch.manual_seed(3)
        neighbor_action = F.one_hot(Categorical(logits.detach()).sample().action, 5).float()
    finally:
        algo.policy.forward = original
    with torch.no_grad():
        q = algo.critics[G].q[0].all_actions(obs, graph, neighbor_action)
        p, log_p = dist.probs, dist.log_probs
        f = alpha * log_p - q  # d/dlogits sum_a p_a f_a (with f's own log p term) = p (f + alpha - E_p[f + alpha])
        g = f + alpha
        expected = p * (g - (p * g).sum(-1, keepdim=True)) / (8 * 6)
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-4)


def inject_logits(algo, logits):
    """Make the policy return Categorical(logits) whatever its input (restore with the result)."""
    original = algo.policy.forward
    algo.policy.forward = lambda g, o, gr, m=None: Categorical(logits, m)
    return original


def test_straight_through_neighbour_action_gradient_switch():
    """Straight-through J_pi: Q_i's neighbour slots pass gradient to the neighbours' policies
    only with neighbor_action_gradient; an agent nobody lists gets the same gradient either way."""
    env = vimarl.make_env("coop_nav_n6", 2)
    batch = None
    grads, losses = {}, {}
    for flag in (True, False):
        torch.manual_seed(0)
        algo = make("vpp_mean_field", env, discrete_gradient="straight_through",
                    neighbor_action_gradient=flag, **SMALL)
        if batch is None:
            batch = sample_batch(env, algo, size=8, steps=4)
            # Agents list only agents 1..4: agents 0 and 5 are nobody's neighbour.
            gen = torch.Generator().manual_seed(1)
            neighbors = torch.stack([torch.stack([torch.tensor([j for j in range(1, 5) if j != i][:3] + [i])
                                                  for i in range(6)]) for _ in range(8)])
            mask = torch.rand(8, 6, 4, generator=gen) > 0.2
            mask[..., 3] = False
            batch.graph[G] = Graph(neighbors, mask)
            logits = torch.randn(8, 6, 5, generator=gen)
        leaf = logits.clone().requires_grad_()
        original = inject_logits(algo, leaf)
        try:
            torch.manual_seed(4)
            loss = algo.policy_terms(G, batch, torch.tensor(0.2)).loss
            (grads[flag],) = torch.autograd.grad(loss, leaf)
        finally:
            algo.policy.forward = original
        losses[flag] = loss.detach()
    torch.testing.assert_close(losses[True], losses[False], atol=0, rtol=0)
    for j in (0, 5):
        torch.testing.assert_close(grads[True][:, j], grads[False][:, j], atol=1e-8, rtol=1e-6)
    listed = grads[True][:, 1:5] - grads[False][:, 1:5]
    assert (listed.abs().amax(-1) > 0).float().mean() > 0.9  # listed agents get the extra term


def test_masked_actions_in_policy_terms_and_updates():
    env = CounterEnv(CounterConfig(n_agents=3), num_envs=4)
    algo = vimarl.make_algo("vpp", env, **SMALL)
    batch = sample_batch(env, algo, size=16, steps=6)
    mask = batch.action_mask[G]
    assert (~mask).any()
    assert mask.gather(-1, batch.action[G].unsqueeze(-1)).all()  # exploration respects the mask
    alpha = torch.tensor(0.2)
    torch.manual_seed(6)
    terms = algo.policy_terms(G, batch, alpha)
    loss, value_target, entropy = terms.loss, terms.value_target, terms.entropy
    with torch.no_grad():
        torch.manual_seed(6)
        dist = algo.policy(G, batch.obs[G], batch.graph[G], mask)
        sample = dist.sample()
        assert mask.gather(-1, sample.action.unsqueeze(-1)).all()
        q = algo.critics[G].q[0].all_actions(batch.obs[G], batch.graph[G], F.one_hot(sample.action, 3).float())
        p = dist.probs
        assert (p[~mask] == 0).all()
        allowed_log_p = torch.where(mask, dist.log_probs, 0.0)
        expected_target = (p * (q - alpha * allowed_log_p)).sum(-1)
        expected_loss = (alpha * (p * allowed_log_p).sum(-1) - (p * q).sum(-1)).mean()
    torch.testing.assert_close(value_target, expected_target, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss.detach(), expected_loss, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(entropy)
    for mode in ("expectation", "straight_through"):
        algo = vimarl.make_algo("vpp", env, discrete_gradient=mode, **SMALL)
        before = copy.deepcopy(algo.policy.state_dict())
        metrics = algo.update(batch)
        assert all(torch.isfinite(v) for v in metrics.values()), mode
        assert all(torch.isfinite(v).all() for v in algo.state_dict().values() if isinstance(v, torch.Tensor))
        assert any(not torch.equal(before[k], v) for k, v in algo.policy.state_dict().items())


# ---------------------------------------------------------------------------------------
# 7. Twin critics.
# ---------------------------------------------------------------------------------------


def test_twin_critics_take_the_minimum_and_sum_both_losses():
    env = grid_env(4)
    algo = vimarl.make_algo("ip", env, gamma=0.9, **SMALL)
    critics = algo.critics[G]
    assert len(critics.q) == 2
    batch = sample_batch(env, algo)
    batch.terminated[:8] = 0.0
    batch.terminated[8:] = 1.0
    obs, graph = batch.obs[G], batch.graph[G]
    stored = action_features(batch.action[G], Discrete(2))
    neighbor = F.one_hot(torch.randint(0, 2, obs.shape[:2]), 2).float()
    with torch.no_grad():
        # Shift Q_2 so that each network is the smaller one for about half the agents.
        shift = (critics.q[0](obs, stored, graph) - critics.q[1](obs, stored, graph)).median()
        critics.q[1].head[-1].bias.add_(shift)
        q0, q1 = (net(obs, stored, graph) for net in critics.q)
        assert (q0 < q1).any() and (q1 < q0).any()  # the minimum really picks from both
        assert torch.equal(critics.q_value(obs, stored, graph), torch.minimum(q0, q1))
        split = [net(obs, stored, graph, neighbor) for net in critics.q]
        assert torch.equal(critics.q_value(obs, stored, graph, neighbor), torch.minimum(*split))
        all0, all1 = (net.all_actions(obs, graph, neighbor) for net in critics.q)
        assert torch.equal(critics.q_all_actions(obs, graph, neighbor), torch.minimum(all0, all1))

        next_v = critics.target_value(batch.next_obs[G], batch.next_graph[G])
        target = batch.reward[G] + 0.9 * (1 - batch.terminated).unsqueeze(-1) * next_v
        expected = 0.5 * (q0 - target).square().mean() + 0.5 * (q1 - target).square().mean()
        torch.testing.assert_close(algo.q_loss(G, batch), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(algo.update(batch)["loss_q"], expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# 8. The entropy weight.
# ---------------------------------------------------------------------------------------


def test_fixed_alpha_is_constant_and_scales_the_entropy_term_linearly():
    env = grid_env(4)
    runs = {}
    for alpha in (0.2, 0.4):
        torch.manual_seed(0)
        algo = vimarl.make_algo("vpp", env, alpha=alpha, **SMALL)
        assert not algo.log_alpha[G].requires_grad and "alpha" not in algo.optimizers
        torch.manual_seed(1)
        batch = sample_batch(env, algo)
        torch.manual_seed(2)
        runs[alpha] = (algo, algo.update(batch))
    (a2, m2), (a4, m4) = runs[0.2], runs[0.4]
    torch.testing.assert_close(m2["loss_q"], m4["loss_q"])  # same nets, same batch
    torch.testing.assert_close(m2["entropy"], m4["entropy"])
    # J_pi(0.4) - J_pi(0.2) = 0.2 * mean sum_a p log p = -0.2 * mean entropy.
    torch.testing.assert_close(m4["loss_policy"] - m2["loss_policy"], -0.2 * m2["entropy"], atol=1e-6, rtol=1e-5)
    assert m2["alpha"].item() == pytest.approx(0.2) and m4["alpha"].item() == pytest.approx(0.4)
    for algo, alpha in ((a2, 0.2), (a4, 0.4)):
        assert algo.log_alpha[G].item() == pytest.approx(math.log(alpha))

    # The same through policy_terms directly, on one set of networks.
    algo = a2
    values = {}
    for alpha in (0.2, 0.4):
        torch.manual_seed(5)
        values[alpha] = algo.policy_terms(G, batch, torch.tensor(alpha))
    torch.testing.assert_close(values[0.4].loss - values[0.2].loss, -0.2 * values[0.2].entropy, atol=1e-6, rtol=1e-5)
    # V target = E_p[Q] - alpha sum_a p log p, so it moves by 0.2 * sum_a p log p per agent.
    with torch.no_grad():
        dist = algo.policy(G, batch.obs[G], batch.graph[G])
        p_log_p = (dist.probs * dist.log_probs).sum(-1)
    torch.testing.assert_close(values[0.2].value_target - values[0.4].value_target, 0.2 * p_log_p, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target_entropy, direction", [(100.0, 1), (-100.0, -1)])
def test_auto_alpha_moves_towards_the_target_entropy(target_entropy, direction):
    env = grid_env(4)
    algo = vimarl.make_algo("vpp", env, auto_alpha=True, target_entropy=target_entropy, lr=0.01, **SMALL)
    assert algo.log_alpha[G].requires_grad and "alpha" in algo.optimizers
    assert algo.target_entropy == {G: target_entropy}
    before = algo.log_alpha[G].item()
    metrics = algo.update(sample_batch(env, algo))
    assert 0 <= metrics["entropy"] <= math.log(2) + 1e-6
    assert metrics["alpha"].item() == pytest.approx(math.exp(before))  # the alpha used in this step
    step = algo.log_alpha[G].item() - before
    assert step * direction > 0
    assert abs(step) == pytest.approx(0.01, rel=1e-3)  # Adam's first step is lr * sign(gradient)


def test_default_target_entropy():
    env = grid_env(1)
    assert vimarl.make_algo("vpp", env, auto_alpha=True).target_entropy == {G: 0.5 * math.log(2)}
    cont = vimarl.make_env("coop_nav_n3", 1, action_mode="continuous")
    assert vimarl.make_algo("vpp", cont, auto_alpha=True).target_entropy == {G: -5.0}


# ---------------------------------------------------------------------------------------
# 9. The independent ablation and concatenated hops.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, overrides, independent", [
    ("vpp", {"independent": True}, True),
    ("vpp", {"independent": True, "inference": "loopy_bp"}, True),
    ("isac", {}, True),
    ("vpp", {}, False),
    ("vpp", {"inference": "loopy_bp"}, False),
    ("ip", {}, False),
])
def test_independent_policy_ignores_other_agents(name, overrides, independent):
    env = grid_env(1)
    algo = vimarl.make_algo(name, env, **overrides).double()
    assert algo.config.independent == independent
    obs, graph = random_inputs(2, 9, 10, 4, seed=12, dtype=torch.float64)
    graph = Graph(graph.neighbors.clone(), graph.mask.clone())
    graph.neighbors[:, 0, 0], graph.mask[:, 0, 0] = 1, True  # agent 1 is a neighbour of agent 0
    graph.neighbors[:, 0, 1:], graph.mask[:, 0, 1:] = 0, False
    assert real_neighbors(graph, 0, 0) == [1]
    changed = obs.clone()
    changed[:, 1:] += torch.randn_like(changed[:, 1:])
    with torch.no_grad():
        before = algo.policy(G, obs, graph).logits[:, 0]
        after = algo.policy(G, changed, graph).logits[:, 0]
        v_before = algo.critics[G].value(obs, graph)[:, 0]
        v_after = algo.critics[G].value(changed, graph)[:, 0]
        # Another graph changes nothing either for an independent policy.
        rewired = algo.policy(G, obs, random_graph(2, 9, 4, seed=99)).logits[:, 0]
    if independent:
        assert torch.equal(before, after) and torch.equal(before, rewired)
    else:
        assert (before - after).abs().max() > 1e-6
    assert (v_before - v_after).abs().max() > 1e-6  # the critics keep their propagation


@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_mean_field_concat_hops_layout(rounds):
    torch.manual_seed(rounds)
    concat = MeanFieldPropagation(7, 8, 6, heads=2, rounds=rounds, concat_hops=True).double()
    last = MeanFieldPropagation(7, 8, 6, heads=2, rounds=rounds, concat_hops=False).double()
    last.load_state_dict(concat.state_dict())  # same parameters; only the output differs
    assert concat.out_dim == 8 * (rounds + 1) and last.out_dim == 8
    obs, graph = random_inputs(2, 5, 7, 3, seed=13)
    with torch.no_grad():
        out = concat(obs, graph)
        assert out.shape == (2, 5, 8 * (rounds + 1))
        torch.testing.assert_close(out[..., :8], torch.relu(concat.encoder(obs)), atol=0, rtol=0)
        torch.testing.assert_close(out[..., -8:], last(obs, graph), atol=0, rtol=0)


def test_loopy_bp_concat_hops_layout():
    module = LoopyBPPropagation(7, 8, 6, heads=2, rounds=2, concat_hops=True).double()
    assert module.out_dim == 24
    obs, graph = random_inputs(2, 5, 7, 3, seed=14)
    with torch.no_grad():
        out = module(obs, graph)
        torch.testing.assert_close(out[..., :8], torch.relu(module.encoder(obs)), atol=0, rtol=0)


def test_policy_head_reads_concatenated_width():
    env = grid_env(1)
    for variant, width in (("ip", 128 * 3), ("vpp_loopy_bp_concat", 32 * 3), ("vpp_mean_field", 32)):
        algo = make(variant, env)
        assert algo.policy.propagation.out_dim == width
        assert algo.policy.heads[G].net[0].in_features == width


# ---------------------------------------------------------------------------------------
# 10. Heterogeneous groups.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hetero():
    env = vimarl.make_env("hetero_nav", 4, n_agents=8, groups="by_type")
    assert {g for g, s in env.groups.items() if s.role == "learned"} == {"big", "small"}
    return env


def test_heterogeneous_groups_share_only_the_propagation(hetero):
    algo = vimarl.make_algo("vpp", hetero, **SMALL).double()
    policy = algo.policy
    assert set(policy.encoders) == set(policy.heads) == {"big", "small"}
    ids = {g: {p.data_ptr() for p in list(policy.encoders[g].parameters()) + list(policy.heads[g].parameters())}
           for g in ("big", "small")}
    assert ids["big"] and ids["small"] and not ids["big"] & ids["small"]
    shared = {p.data_ptr() for p in policy.propagation.parameters()}
    assert not shared & (ids["big"] | ids["small"])
    assert algo.critics["big"] is not algo.critics["small"]

    step = hetero.reset(seed=0)
    inputs = {g: (step.groups[g].obs.double(), step.groups[g].graph) for g in ("big", "small")}

    def logits():
        with torch.no_grad():
            return {g: policy(g, *inputs[g]).logits.clone() for g in inputs}

    base = logits()
    with torch.no_grad():
        policy.encoders["big"][0].weight.add_(0.5)
    after_encoder = logits()
    assert not torch.allclose(after_encoder["big"], base["big"])
    assert torch.equal(after_encoder["small"], base["small"])
    with torch.no_grad():
        policy.propagation.state_in[0].weight.add_(0.5)
    after_propagation = logits()
    for g in ("big", "small"):
        assert (after_propagation[g] - after_encoder[g]).abs().max() > 1e-6, g


def test_heterogeneous_act_and_update(hetero):
    algo = vimarl.make_algo("vpp", hetero, **SMALL)
    step = hetero.reset(seed=0)
    for explore in (True, False):
        actions = act(algo, step, explore=explore)
        assert set(actions) == {"big", "small"}
        for a in actions.values():
            assert a.shape == (4, 4) and a.dtype == torch.int64 and ((a >= 0) & (a < 5)).all()
    batch = sample_batch(hetero, algo)
    before = copy.deepcopy(algo.state_dict())
    metrics = algo.update(batch)
    assert all(torch.isfinite(v) for v in metrics.values())
    after = algo.state_dict()
    for g in ("big", "small"):
        for net in ("value", "q", "target_value"):
            names = [k for k in after if k.startswith(f"critics.{g}.{net}.")]
            assert names and all(not torch.equal(before[k], after[k]) for k in names), (g, net)
        for part in ("encoders", "heads"):
            names = [k for k in after if k.startswith(f"policy.{part}.{g}.")]
            assert names and all(not torch.equal(before[k], after[k]) for k in names), (g, part)
    names = [k for k in after if k.startswith("policy.propagation.")]
    assert all(not torch.equal(before[k], after[k]) for k in names)


# ---------------------------------------------------------------------------------------
# 11. Continuous actions.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_name, kwargs", [("test_continuous_consensus", {}),
                                              ("coop_nav_n3", {"action_mode": "continuous"})])
@pytest.mark.parametrize("squash", [True, False])
@pytest.mark.parametrize("name", ["vpp", "ip"])
def test_continuous_actions_in_bounds_and_finite_update(env_name, kwargs, squash, name):
    env = vimarl.make_env(env_name, 4, **kwargs)
    algo = vimarl.make_algo(name, env, squash=squash, **SMALL)
    space = env.groups[G].action_space
    assert isinstance(space, Box)
    step = env.reset(seed=0)
    with torch.no_grad():  # a wide policy, so that plain Gaussian samples leave the box
        algo.policy.heads[G].net[-1].bias[space.dim:] = 1.5
    for explore in (True, False):
        action = act(algo, step, explore=explore)[G]
        assert action.shape == (4, env.groups[G].n_agents, space.dim)
        assert (action >= space.low).all() and (action <= space.high).all()
    if not squash:
        dist = algo.policy(G, step.groups[G].obs, step.groups[G].graph)
        torch.manual_seed(0)
        sample = dist.sample()
        assert ((sample.action == space.low) | (sample.action == space.high)).any()  # the clip was used
    batch = sample_batch(env, algo)
    before = copy.deepcopy(algo.state_dict())
    metrics = algo.update(batch)
    assert all(torch.isfinite(v) for v in metrics.values())
    changed = [k for k, v in algo.state_dict().items() if isinstance(v, torch.Tensor) and not torch.equal(v, before[k])]
    assert any(k.startswith("policy.") for k in changed) and any(".q." in k for k in changed)


# ---------------------------------------------------------------------------------------
# 12. `ip` defaults and presets.
# ---------------------------------------------------------------------------------------


def test_ip_defaults():
    env = vimarl.make_env("coop_nav_n6", 1)
    algo = vimarl.make_algo("ip", env)
    config = algo.config
    assert (config.embed_dim, config.state_dim, config.hidden_dim) == (128, 128, 128)
    assert config.concat_hops and config.twin_critics and config.inference == "mean_field"
    assert (config.lr, config.gamma, config.tau, config.alpha, config.rounds) == (0.01, 0.95, 0.01, 0.2, 2)
    assert len(algo.critics[G].q) == 2
    assert algo.policy.propagation.concat_hops and algo.policy.propagation.out_dim == 128 * 3
    vpp = vimarl.make_algo("vpp", env)
    assert len(vpp.critics[G].q) == 1 and not vpp.policy.propagation.concat_hops
    assert vpp.config.embed_dim == 32


def test_ip_paper_preset():
    run = resolve("ip", "coop_nav_n6", preset="paper")
    assert run.train.batch_size == 1024 and run.train.gradient_steps == 8
    assert run.algo_config.lr == 0.01 and run.algo_config.twin_critics and run.algo_config.concat_hops
    assert run.train.buffer_size == 1_000_000
    assert run.env_config.n_agents == 6
    # Without the preset the env's own budget applies.
    plain = resolve("ip", "coop_nav_n6")
    assert plain.train.batch_size == 256 and plain.train.gradient_steps == 1


def test_unknown_preset_is_a_one_line_error_naming_the_presets():
    with pytest.raises(VimarlError) as error:
        resolve("ip", "coop_nav_n6", preset="papr")
    message = str(error.value)
    assert "\n" not in message and "papr" in message and "paper" in message


# ---------------------------------------------------------------------------------------
# Critic options of issue 20: pair critics, heads reading o_i, neighbour credit, stabilisers.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_pair_critic_matches_a_loop_over_edges(aggregation):
    torch.manual_seed(21)
    q = NeighborQ(6, 3, 8, 1, (16,), aggregation, action_embed_dim=5, neighbor_input="pair", read_obs=True).double()
    obs, graph = random_inputs(2, 6, 6, 3, seed=22)
    action = F.one_hot(torch.randint(0, 3, (2, 6)), 3).double()
    with torch.no_grad():
        out = q(obs, action, graph)
        state = q.agent_state.states(obs, graph)[-1]
        for b in range(2):
            for i in range(6):
                js = real_neighbors(graph, b, i)
                pooled = torch.zeros(5, dtype=torch.float64)
                for j in js:
                    pooled += q.neighbor_embed(torch.cat([obs[b, i], obs[b, j] - obs[b, i], action[b, j]]))
                if aggregation == "mean" and js:
                    pooled /= len(js)
                expected = q.head(torch.cat([obs[b, i], state[b, i], action[b, i], pooled]))[0]
                torch.testing.assert_close(out[b, i], expected, atol=1e-12, rtol=0)


def test_pair_critic_sees_where_a_neighbour_is_and_the_action_critic_does_not():
    torch.manual_seed(23)
    obs, graph = random_inputs(1, 5, 6, 3, seed=24)
    action = F.one_hot(torch.randint(0, 3, (1, 5)), 3).double()
    i = next(i for i in range(5) if real_neighbors(graph, 0, i))
    j = real_neighbors(graph, 0, i)[0]
    moved = obs.clone()
    moved[0, j] += 1.0
    for neighbor_input, sees in (("pair", True), ("action", False)):
        q = NeighborQ(6, 3, 8, 0, (16,), neighbor_input=neighbor_input).double()  # no state propagation
        with torch.no_grad():
            changed = not torch.allclose(q(obs, action, graph)[0, i], q(moved, action, graph)[0, i])
        assert changed == sees, neighbor_input


def test_read_obs_widens_the_heads_only_with_propagation():
    assert NeighborQ(6, 3, 8, 2, (16,), read_obs=True).head[0].in_features == 6 + 8 + 3 + 32
    assert NeighborQ(6, 3, 8, 0, (16,), read_obs=True).head[0].in_features == 6 + 3 + 32  # s^0 is o_i
    assert NeighborQ(6, 3, 8, 2, (16,)).head[0].in_features == 8 + 3 + 32


@pytest.mark.parametrize("neighbor_input", ["action", "pair"])
@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_neighbor_all_actions_replaces_one_slot_at_a_time(neighbor_input, aggregation):
    torch.manual_seed(25)
    q = NeighborQ(6, 4, 8, 1, (16,), aggregation, neighbor_input=neighbor_input, read_obs=True).double()
    obs, graph = random_inputs(2, 7, 6, 3, seed=26)
    action = F.one_hot(torch.randint(0, 4, (2, 7)), 4).double()
    with torch.no_grad():
        slots = q.neighbor_all_actions(obs, action, graph)
        assert slots.shape == (2, 7, 3, 4)
        base = q(obs, action, graph)
        for b in range(2):
            for i in range(7):
                for k in range(3):
                    if not graph.mask[b, i, k]:
                        torch.testing.assert_close(slots[b, i, k], base[b, i].expand(4), atol=1e-12, rtol=0)
                        continue
                    j = graph.neighbors[b, i, k].item()
                    for a in range(4):
                        neighbor_action = action.clone()
                        neighbor_action[b, j] = F.one_hot(torch.tensor(a), 4).double()
                        expected = q(obs, action, graph, neighbor_action)[b, i]
                        torch.testing.assert_close(slots[b, i, k, a], expected, atol=1e-12, rtol=0)


def test_neighbor_expectation_gradient_adds_each_neighbours_credit():
    """d loss / d logits_j = (own expectation term) - 1/(B N) sum_{(i, k): N_i[k] = j} p_j (Q_ik - E_pj[Q_ik]),
    with Q_ik(a) = Q_i with slot k's action set to a; the loss value is the expectation mode's."""
    algo, batch, _, logits = nav_policy_batch()
    obs, graph = batch.obs[G], batch.graph[G]
    alpha = torch.tensor(0.2)
    original = inject_logits(algo, logits)
    grads, losses = {}, {}
    try:
        for mode in ("expectation", "neighbor_expectation"):
            algo.config.discrete_gradient = mode
            torch.manual_seed(3)
            losses[mode] = algo.policy_terms(G, batch, alpha).loss
            (grads[mode],) = torch.autograd.grad(losses[mode], logits)
        torch.manual_seed(3)
        sampled = F.one_hot(Categorical(logits.detach()).sample().action, 5).float()
    finally:
        algo.policy.forward = original
    torch.testing.assert_close(losses["neighbor_expectation"], losses["expectation"])
    with torch.no_grad():
        q_slots = algo.critics[G].q[0].neighbor_all_actions(obs, sampled, graph)
        p = torch.softmax(logits, -1)
        expected = torch.zeros_like(p)
        for b in range(8):
            for i in range(6):
                for k in range(graph.k):
                    if graph.mask[b, i, k]:
                        j, q_ik = graph.neighbors[b, i, k], q_slots[b, i, k]
                        expected[b, j] -= p[b, j] * (q_ik - (p[b, j] * q_ik).sum()) / (8 * 6)
    assert expected.abs().max() > 0
    torch.testing.assert_close(grads["neighbor_expectation"] - grads["expectation"], expected, atol=1e-6, rtol=1e-4)


def test_gradient_clipping_bounds_every_step_and_is_logged():
    env = grid_env(4)
    torch.manual_seed(0)
    algo = vimarl.make_algo("vpp", env, **SMALL)
    batch = sample_batch(env, algo)
    clipped = copy.deepcopy(algo)
    clipped.config = dataclasses.replace(algo.config, max_grad_norm=1e-3)
    norms = {}
    for name, model in (("plain", algo), ("clipped", clipped)):
        torch.manual_seed(1)
        norms[name] = model.update(batch)
        # The gradients each optimiser stepped on are still in .grad: clipped to the norm, or not.
        for optimizer in ("q", "policy", "value"):
            params = [p for group in model.optimizers[optimizer].param_groups for p in group["params"]]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])).item()
            if name == "clipped":
                assert norm == pytest.approx(1e-3, rel=1e-4)
            else:
                assert norm == pytest.approx(norms[name][f"grad_norm_{optimizer}"].item(), rel=1e-5) and norm > 1e-3
    # The logged norm is the one before clipping: equal on the first (identical) step.
    assert norms["plain"]["grad_norm_q"].item() == pytest.approx(norms["clipped"]["grad_norm_q"].item(), rel=1e-5)


def test_reward_scaling_and_running_normalisation_scale_the_q_target():
    env = grid_env(4)
    torch.manual_seed(0)
    algo = vimarl.make_algo("vpp", env, **SMALL)
    batch = sample_batch(env, algo, size=32)
    batch.reward[G] = torch.randn_like(batch.reward[G]) * 3 + 1
    assert algo.reward_multiplier(batch) == 1.0
    algo.config.reward_scale = 0.5
    assert algo.reward_multiplier(batch) == 0.5
    algo.config.normalize_rewards = True
    first = algo.reward_multiplier(batch)
    std = batch.reward[G].double().std(unbiased=False).item()
    assert first == pytest.approx(0.5 / std, rel=1e-9)
    # A second batch: the running moments are those of both batches together.
    other = copy.copy(batch)
    other.reward = {G: batch.reward[G] * 2}
    second = algo.reward_multiplier(other)
    both = torch.cat([batch.reward[G].flatten(), other.reward[G].flatten()]).double()
    assert second == pytest.approx(0.5 / both.std(unbiased=False).item(), rel=1e-9)
    assert algo.state_dict()["reward_moments"][0].item() == both.numel()
    # J_Q uses the scaled reward: with V_target = 0 the loss is that of Q towards scale * r.
    with torch.no_grad():
        for p in algo.critics[G].target_value.parameters():
            p.zero_()
        stored = F.one_hot(batch.action[G], 2).float()
        q = algo.critics[G].q[0](batch.obs[G], stored, batch.graph[G])
        expected = (0.5 * (q - 0.25 * batch.reward[G]).square()).mean()
        torch.testing.assert_close(algo.q_loss(G, batch, 0.25), expected)


def test_auto_alpha_is_per_group():
    env = vimarl.make_env("hetero_nav", 2, groups="by_type")
    algo = vimarl.make_algo("vpp", env, auto_alpha=True, target_entropy=100.0, lr=0.01, **SMALL)
    assert set(algo.log_alpha) == set(env.groups) and len(env.groups) == 2
    algo.update(sample_batch(env, algo))
    for g in env.groups:  # each group's alpha took its own first Adam step up
        assert algo.log_alpha[g].item() == pytest.approx(math.log(0.2) + 0.01, rel=1e-3)


def test_update_logs_the_q_action_gap():
    env = grid_env(4)
    algo = vimarl.make_algo("vpp", env, **SMALL)
    metrics = algo.update(sample_batch(env, algo))
    assert metrics["q_action_gap"] >= 0 and torch.isfinite(metrics["q_action_gap"])
    cont = vimarl.make_env("coop_nav_n3", 2, action_mode="continuous")
    algo = vimarl.make_algo("vpp", cont, **SMALL)
    assert "q_action_gap" not in algo.update(sample_batch(cont, algo))
