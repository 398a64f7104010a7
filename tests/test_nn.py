"""vimarl.nn against brute-force references written with plain Python loops.

Every reference reads the module's own weights and loops over environments, agents, heads
and neighbour slots, so a test compares values, not just shapes. Graphs come with padding
slots (mask False) scattered between the real ones, pointing at arbitrary agents, and with
agents that have no neighbour at all.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import AffineTransform, Normal, TanhTransform, TransformedDistribution

from vimarl.envs.base import Box, Discrete
from vimarl.envs.graph import Graph, complete_graph, graph_from_adjacency, grid_graph, knn_graph
from vimarl.nn import mlp
from vimarl.nn.critics import NeighborQ, StateValue
from vimarl.nn.distributions import (
    Categorical,
    PolicyHead,
    TanhGaussian,
    action_dim,
    action_features,
)
from vimarl.nn.graph_ops import (
    NeighborAttention,
    gather_neighbors,
    neighbor_mean,
    neighbor_sum,
    weighted_neighbor_sum,
)
from vimarl.nn.propagation import MeanFieldPropagation, StatePropagation

from graph_helpers import hop_distances, line_graph, permute_slots, random_graph, real_neighbors, repoint_padding

torch.set_num_threads(1)
DOUBLE = torch.float64


# ---------------------------------------------------------------------------------------
# References.
# ---------------------------------------------------------------------------------------


def ref_gather(x, graph):
    batch, n, k = graph.neighbors.shape
    out = torch.zeros(batch, n, k, *x.shape[2:], dtype=x.dtype)
    for b in range(batch):
        for i in range(n):
            for s in range(k):
                out[b, i, s] = x[b, graph.neighbors[b, i, s]]
    return out


def ref_weighted_sum(x, graph, weights):
    batch, n, k = graph.neighbors.shape
    out = torch.zeros_like(x)
    for b in range(batch):
        for i in range(n):
            for s in range(k):
                out[b, i] += weights[b, i, s] * x[b, graph.neighbors[b, i, s]]
    return out


def ref_sum(x, graph):
    batch, n, _ = graph.neighbors.shape
    out = torch.zeros_like(x)
    for b in range(batch):
        for i in range(n):
            for j in real_neighbors(graph, b, i):
                out[b, i] += x[b, j]
    return out


def ref_mean(x, graph):
    batch, n, _ = graph.neighbors.shape
    out = torch.zeros_like(x)
    for b in range(batch):
        for i in range(n):
            js = real_neighbors(graph, b, i)
            for j in js:
                out[b, i] += x[b, j] / len(js)
    return out


def dense_adjacency(graph: Graph, dtype=DOUBLE):
    """A[b, i, j] = number of real slots of agent i that hold j."""
    batch, n, _ = graph.neighbors.shape
    adjacency = torch.zeros(batch, n, n, dtype=dtype)
    for b in range(batch):
        for i in range(n):
            for j in real_neighbors(graph, b, i):
                adjacency[b, i, j] += 1
    return adjacency


@torch.no_grad()
def ref_attention(module: NeighborAttention, x, graph):
    """Per environment, agent and head: softmax of q_i.k_j / sqrt(d) over {i} u N_i (or N_i),
    the weighted sum of v_j, heads concatenated; zero when there is nothing to attend to."""
    batch, n, _ = x.shape
    h, d = module.heads, module.head_dim
    q, k, v = x @ module.query.weight.T, x @ module.key.weight.T, x @ module.value.weight.T
    out = torch.zeros(batch, n, h * d, dtype=x.dtype)
    for b in range(batch):
        for i in range(n):
            candidates = ([i] if module.include_self else []) + real_neighbors(graph, b, i)
            if not candidates:
                continue
            for head in range(h):
                cols = slice(head * d, (head + 1) * d)
                logits = [float(q[b, i, cols] @ k[b, j, cols]) / math.sqrt(d) for j in candidates]
                top = max(logits)
                exps = [math.exp(z - top) for z in logits]
                for j, e in zip(candidates, exps):
                    out[b, i, cols] += e / sum(exps) * v[b, j, cols]
    return out


@torch.no_grad()
def ref_state_propagation(module: StatePropagation, obs, graph):
    batch, n, _ = obs.shape
    states = [obs]
    for own, neighbors in zip(module.own, module.neighbors):
        s = states[-1]
        new = torch.zeros(batch, n, own.out_features, dtype=obs.dtype)
        for b in range(batch):
            for i in range(n):
                total = torch.zeros(s.shape[-1], dtype=obs.dtype)
                for j in real_neighbors(graph, b, i):
                    total = total + s[b, j]
                new[b, i] = torch.relu(own.weight @ s[b, i] + own.bias + neighbors.weight @ total)
        states.append(new)
    return states


@torch.no_grad()
def ref_mean_field(module: MeanFieldPropagation, obs, graph):
    embedding = torch.relu(obs @ module.encoder.weight.T + module.encoder.bias)
    states = ref_state_propagation(module.states, obs, graph)
    for m in range(module.rounds):
        state_in = module.state_in[m]
        embedding = torch.relu(states[m] @ state_in.weight.T + state_in.bias
                               + ref_attention(module.attention[m], embedding, graph))
    return embedding


@torch.no_grad()
def ref_neighbor_q(module: NeighborQ, obs, action, graph, mean: bool):
    batch, n, _ = obs.shape
    state = ref_state_propagation(module.agent_state.states, obs, graph)[-1]
    linear = module.neighbor_embed[0]
    embed = [[torch.relu(linear.weight @ action[b, j] + linear.bias) for j in range(n)]
             for b in range(batch)]
    q = torch.zeros(batch, n, dtype=obs.dtype)
    for b in range(batch):
        for i in range(n):
            js = real_neighbors(graph, b, i)
            aggregate = torch.zeros(linear.out_features, dtype=obs.dtype)
            for j in js:
                aggregate = aggregate + embed[b][j]
            if mean and js:
                aggregate = aggregate / len(js)
            q[b, i] = module.head(torch.cat([state[b, i], action[b, i], aggregate]))[0]
    return q


def log_cosh(x: float) -> float:
    """log cosh x without overflow: |x| + log1p(exp(-2|x|)) - log 2."""
    return abs(x) + math.log1p(math.exp(-2 * abs(x))) - math.log(2.0)


def ref_tanh_gaussian_log_prob(mean, log_std, noise, low, high):
    """log N(x; m, s) - log scale - log(1 - tanh(x)^2) at x = m + s * noise, the last term
    as -2 log cosh x, summed over the action dimensions, in Python floats. (Taking the noise
    rather than x keeps the reference exact where x = m + s * noise rounds to m.)"""
    scale = (high - low) / 2.0
    out = []
    for m_row, ls_row, z_row in zip(mean.tolist(), log_std.tolist(), noise.tolist()):
        total = 0.0
        for m, ls, z in zip(m_row, ls_row, z_row):
            x = m + math.exp(ls) * z
            gaussian = -0.5 * z**2 - ls - 0.5 * math.log(2 * math.pi)
            total += gaussian - math.log(scale) + 2.0 * log_cosh(x)
        out.append(total)
    return torch.tensor(out, dtype=DOUBLE)


def seeded_noise_and_sample(dist: TanhGaussian, seed: int):
    """The sample drawn with `seed` and the standard normal noise behind it."""
    torch.manual_seed(seed)
    noise = torch.randn_like(dist.mean)
    torch.manual_seed(seed)
    return noise, dist.sample()


# ---------------------------------------------------------------------------------------
# graph_ops: gather, sums and means.
# ---------------------------------------------------------------------------------------

FEATURE_SHAPES = [(), (3,), (2, 3)]


@pytest.mark.parametrize("features", FEATURE_SHAPES)
def test_gather_neighbors_matches_loop(features):
    graph = random_graph(3, 6, 4, seed=0)
    x = torch.randn(3, 6, *features, dtype=DOUBLE)
    out = gather_neighbors(x, graph)
    assert out.shape == (3, 6, 4, *features)
    assert torch.equal(out, ref_gather(x, graph))
    # Padded slots hold the agent itself by the Graph convention: gathering them is valid.
    pad = ~graph.mask
    own = x.unsqueeze(2).expand_as(out)
    assert torch.equal(out[pad], own[pad])


@pytest.mark.parametrize("pad", ["self", "random"])
@pytest.mark.parametrize("features", FEATURE_SHAPES)
def test_neighbor_sum_and_mean_match_loops(features, pad):
    graph = random_graph(3, 7, 4, seed=1, pad=pad, isolated=((0, 0), (2, 5)))
    x = torch.randn(3, 7, *features, dtype=DOUBLE)
    torch.testing.assert_close(neighbor_sum(x, graph), ref_sum(x, graph))
    torch.testing.assert_close(neighbor_mean(x, graph), ref_mean(x, graph))
    # Agents without neighbours: sum and mean are exactly zero.
    for b, i in ((0, 0), (2, 5)):
        assert graph.degree()[b, i] == 0
        assert torch.all(neighbor_sum(x, graph)[b, i] == 0)
        assert torch.all(neighbor_mean(x, graph)[b, i] == 0)


def test_neighbor_sum_in_float32_matches_loop():
    graph = random_graph(2, 9, 5, seed=2, pad="random")
    x = torch.randn(2, 9, 4)
    out = neighbor_sum(x, graph)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref_sum(x.double(), graph).float())


@pytest.mark.parametrize("features", FEATURE_SHAPES)
def test_weighted_neighbor_sum_matches_loop(features):
    graph = random_graph(2, 6, 3, seed=3, pad="random")
    x = torch.randn(2, 6, *features, dtype=DOUBLE)
    weights = torch.randn(2, 6, 3, dtype=DOUBLE)
    torch.testing.assert_close(weighted_neighbor_sum(x, graph, weights), ref_weighted_sum(x, graph, weights))
    # With the mask as weights it is the neighbour sum.
    torch.testing.assert_close(weighted_neighbor_sum(x, graph, graph.mask), ref_sum(x, graph))


def test_sums_and_means_on_builder_graphs():
    torch.manual_seed(0)
    # Complete graph: the sum over the others is the total minus oneself.
    x = torch.randn(2, 5, 3, dtype=DOUBLE)
    graph = complete_graph(5, 2)
    total = x.sum(1, keepdim=True)
    torch.testing.assert_close(neighbor_sum(x, graph), total - x)
    torch.testing.assert_close(neighbor_mean(x, graph), (total - x) / 4)
    # Grid (padding for border cells) and knn (padding when N - 1 < k).
    for graph, n in ((grid_graph(3, 4, 2), 12), (knn_graph(torch.randn(2, 4, 2), 5), 4)):
        x = torch.randn(2, n, 2, dtype=DOUBLE)
        torch.testing.assert_close(neighbor_sum(x, graph), ref_sum(x, graph))
        torch.testing.assert_close(neighbor_mean(x, graph), ref_mean(x, graph))
    # A lone agent of a complete graph has a single, padded slot.
    x = torch.randn(3, 1, 2, dtype=DOUBLE)
    assert torch.all(neighbor_sum(x, complete_graph(1, 3)) == 0)
    assert torch.all(neighbor_mean(x, complete_graph(1, 3)) == 0)


def test_neighbor_sum_gradcheck():
    graph = random_graph(2, 4, 3, seed=4, pad="random")
    x = torch.randn(2, 4, 2, dtype=DOUBLE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: neighbor_sum(t, graph), (x,))
    assert torch.autograd.gradcheck(lambda t: neighbor_mean(t, graph), (x,))
    weights = torch.randn(2, 4, 3, dtype=DOUBLE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, w: weighted_neighbor_sum(t, graph, w), (x, weights))


def test_neighbor_sum_gradient_matches_dense_reference():
    graph = random_graph(3, 8, 4, seed=5, pad="random", isolated=((1, 2),))
    adjacency = dense_adjacency(graph)
    x = torch.randn(3, 8, 5, dtype=DOUBLE, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_()
    upstream = torch.randn(3, 8, 5, dtype=DOUBLE)
    out = neighbor_sum(x, graph)
    dense = adjacency @ x_dense
    torch.testing.assert_close(out, dense)
    (out * upstream).sum().backward()
    (dense * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_dense.grad)
    # The transpose: agent j receives the upstream gradient of every agent listing it.
    torch.testing.assert_close(x.grad, adjacency.transpose(1, 2) @ upstream)


# ---------------------------------------------------------------------------------------
# NeighborAttention.
# ---------------------------------------------------------------------------------------


def attention(in_dim, out_dim, heads, include_self, seed=0):
    torch.manual_seed(seed)
    return NeighborAttention(in_dim, out_dim, heads, include_self=include_self).double()


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("include_self", [True, False])
def test_attention_matches_loop(heads, include_self):
    module = attention(5, 8, heads, include_self)
    graph = random_graph(2, 6, 4, seed=6, isolated=((0, 0), (1, 3)))
    x = torch.randn(2, 6, 5, dtype=DOUBLE)
    out = module(x, graph)
    assert out.shape == (2, 6, 8)
    torch.testing.assert_close(out, ref_attention(module, x, graph))


def test_attention_weights_are_a_distribution_over_self_and_real_neighbours():
    for include_self in (True, False):
        module = attention(4, 6, 3, include_self)
        graph = random_graph(2, 7, 4, seed=7, pad="random", isolated=((0, 1),))
        neighbor_weights, own_weight = module.weights(torch.randn(2, 7, 4, dtype=DOUBLE), graph)
        assert neighbor_weights.shape == (2, 7, 4, 3)
        assert torch.all(neighbor_weights[~graph.mask] == 0)
        total = neighbor_weights.sum(2)
        if include_self:
            assert own_weight.shape == (2, 7, 3)
            total = total + own_weight
            torch.testing.assert_close(total, torch.ones_like(total))
        else:
            assert own_weight is None
            has_neighbors = (graph.degree() > 0).unsqueeze(-1).expand_as(total)
            torch.testing.assert_close(total[has_neighbors], torch.ones_like(total[has_neighbors]))
            assert torch.all(total[~has_neighbors] == 0)


def test_attention_isolated_agent_without_self_is_zero_and_nan_free():
    module = attention(3, 4, 2, include_self=False)
    graph = graph_from_adjacency([[1, 2], [], [0]], 2, k=3)
    x = torch.randn(2, 3, 3, dtype=DOUBLE, requires_grad=True)
    out = module(x, graph)
    assert torch.all(out[:, 1] == 0)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for parameter in module.parameters():
        assert torch.isfinite(parameter.grad).all()
    # Float32 as well: the masked fill must not overflow into NaN.
    module32 = NeighborAttention(3, 4, 2, include_self=False)
    x32 = torch.randn(2, 3, 3, requires_grad=True) * 100
    out32 = module32(x32, graph)
    out32.sum().backward()
    assert torch.isfinite(out32).all() and torch.all(out32[:, 1] == 0)
    assert all(torch.isfinite(p.grad).all() for p in module32.parameters())


def test_attention_isolated_agent_with_self_attends_only_to_itself():
    module = attention(3, 4, 2, include_self=True)
    graph = graph_from_adjacency([[1, 2], [], [0]], 1, k=3)
    x = torch.randn(1, 3, 3, dtype=DOUBLE)
    torch.testing.assert_close(module(x, graph)[0, 1], module.value(x)[0, 1])


@pytest.mark.parametrize("include_self", [True, False])
def test_attention_gradcheck(include_self):
    module = attention(3, 4, 2, include_self)
    graph = random_graph(1, 4, 3, seed=8, pad="random", isolated=((0, 2),))
    x = torch.randn(1, 4, 3, dtype=DOUBLE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: module(t, graph), (x,))


@pytest.mark.parametrize("include_self", [True, False])
def test_attention_is_invariant_to_slot_order_and_padding(include_self):
    module = attention(4, 6, 2, include_self)
    graph = random_graph(2, 8, 5, seed=9, isolated=((0, 0), (1, 4)))
    x = torch.randn(2, 8, 4, dtype=DOUBLE)
    out = module(x, graph)
    torch.testing.assert_close(module(x, permute_slots(graph, seed=1)), out)
    torch.testing.assert_close(module(x, repoint_padding(graph, seed=2)), out)


@pytest.mark.parametrize("include_self", [True, False])
def test_attention_output_depends_only_on_self_and_real_neighbours(include_self):
    """d out_i / d x_j = 0 unless j = i or j is a real neighbour, with padded slots pointing
    at arbitrary agents (so their features would leak if the mask were ignored)."""
    module = attention(3, 4, 2, include_self)
    graph = random_graph(1, 6, 4, seed=10, pad="random", isolated=((0, 1),))
    x = torch.randn(1, 6, 3, dtype=DOUBLE)
    jacobian = torch.autograd.functional.jacobian(lambda t: module(t, graph), x)  # [1,6,4,1,6,3]
    for i in range(6):
        allowed = set(real_neighbors(graph, 0, i)) | {i}
        for j in range(6):
            block = jacobian[0, i, :, 0, j]
            if j not in allowed:
                assert torch.all(block == 0), (i, j)
            elif j != i:
                assert block.abs().sum() > 0, (i, j)


def test_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError):
        NeighborAttention(4, 6, 4)


# ---------------------------------------------------------------------------------------
# Categorical.
# ---------------------------------------------------------------------------------------


def test_categorical_probs_and_entropy_by_hand():
    rows = [[0.5, -1.0, 2.0, 0.0], [3.0, 3.0, 3.0, 3.0], [-10.0, 10.0, 0.0, 1.0]]
    dist = Categorical(torch.tensor(rows, dtype=DOUBLE))
    for r, row in enumerate(rows):
        z = sum(math.exp(v) for v in row)
        probs = [math.exp(v) / z for v in row]
        torch.testing.assert_close(dist.probs[r], torch.tensor(probs, dtype=DOUBLE))
        log_probs = torch.tensor([math.log(p) for p in probs], dtype=DOUBLE)
        torch.testing.assert_close(dist.log_probs[r], log_probs)
        entropy = -sum(p * math.log(p) for p in probs)
        torch.testing.assert_close(dist.entropy()[r], torch.tensor(entropy, dtype=DOUBLE))
    assert dist.entropy()[1].item() == pytest.approx(math.log(4))
    assert dist.mode().tolist() == [2, 0, 1]


@pytest.mark.parametrize("dtype", [torch.float32, DOUBLE])
def test_categorical_action_mask(dtype):
    logits = torch.tensor([[10.0, 0.0, 1.0, -2.0], [0.0, 5.0, 0.0, 0.0]], dtype=dtype)
    mask = torch.tensor([[False, True, True, False], [True, False, True, True]])
    dist = Categorical(logits, mask)
    assert torch.all(dist.probs[~mask] == 0)
    for r in range(2):
        allowed = [v for v, ok in zip(logits[r].tolist(), mask[r].tolist()) if ok]
        z = sum(math.exp(v) for v in allowed)
        expected = [math.exp(v) / z if ok else 0.0 for v, ok in zip(logits[r].tolist(), mask[r].tolist())]
        torch.testing.assert_close(dist.probs[r], torch.tensor(expected, dtype=dtype))
        entropy = -sum(p * math.log(p) for p in expected if p > 0)
        assert dist.entropy()[r].item() == pytest.approx(entropy, rel=1e-5)
    assert torch.isfinite(dist.entropy()).all()
    assert dist.mode().tolist() == [2, 0]
    # Never sampled, even with the largest logit.
    torch.manual_seed(0)
    many = Categorical(logits.repeat(2500, 1), mask.repeat(2500, 1)).sample()
    assert mask.repeat(2500, 1).gather(-1, many.action.unsqueeze(-1)).all()
    assert torch.isfinite(many.log_prob).all()


def test_categorical_entropy_gradient_is_finite_under_a_mask():
    logits = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    dist = Categorical(logits, torch.tensor([[True, False, True]]))
    dist.entropy().sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0, 1] == 0


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_categorical_straight_through_sample(temperature):
    torch.manual_seed(1)
    logits = torch.randn(6, 5, requires_grad=True)
    dist = Categorical(logits, temperature=temperature)
    torch.manual_seed(2)
    sample = dist.sample()
    # Forward: exactly the one-hot of the action.
    assert torch.equal(sample.critic_input, F.one_hot(sample.action, 5).float())
    assert sample.action.dtype == torch.int64 and sample.action.shape == (6,)
    # Backward: the soft Gumbel-softmax gradient, non-zero.
    upstream = torch.randn(6, 5)
    (sample.critic_input * upstream).sum().backward()
    assert logits.grad.abs().sum() > 0
    # Reference: the same uniforms through softmax((log_softmax(logits) + g) / T).
    torch.manual_seed(2)
    uniform = torch.rand(6, 5).clamp_(1e-10, 1.0 - 1e-7)
    reference_logits = logits.detach().clone().requires_grad_()
    soft = torch.softmax((torch.log_softmax(reference_logits, -1) - torch.log(-torch.log(uniform)))
                         / temperature, -1)
    assert torch.equal(soft.argmax(-1), sample.action)
    (soft * upstream).sum().backward()
    torch.testing.assert_close(logits.grad, reference_logits.grad)


def test_categorical_sample_log_prob_and_log_prob_mean():
    torch.manual_seed(3)
    logits = torch.randn(4, 3, 6, dtype=DOUBLE)
    dist = Categorical(logits)
    sample = dist.sample()
    log_softmax = torch.log_softmax(logits, -1)
    for idx in torch.cartesian_prod(torch.arange(4), torch.arange(3)).tolist():
        b, n = idx
        assert sample.log_prob[b, n] == log_softmax[b, n, sample.action[b, n]]
    torch.testing.assert_close(sample.log_prob_mean, -dist.entropy())
    torch.testing.assert_close(sample.log_prob_mean, (log_softmax.exp() * log_softmax).sum(-1))


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_categorical_sampling_frequencies_match_probabilities(temperature):
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0])
    draws = 20000
    torch.manual_seed(4)
    actions = Categorical(logits.expand(draws, 5), temperature=temperature).sample().action
    frequencies = torch.bincount(actions, minlength=5).double() / draws
    torch.testing.assert_close(frequencies, torch.softmax(logits.double(), -1), atol=0.015, rtol=0)


def test_categorical_as_critic_input():
    out = Categorical.as_critic_input(torch.tensor([[2, 0], [1, 1]]), 3)
    assert out.dtype == torch.float32
    assert out.tolist() == [[[0, 0, 1], [1, 0, 0]], [[0, 1, 0], [0, 1, 0]]]


# ---------------------------------------------------------------------------------------
# TanhGaussian.
# ---------------------------------------------------------------------------------------

MODERATE = [(m, s) for m in (-2.0, -0.7, 0.0, 0.4, 1.5) for s in (-2.0, -0.5, 0.0, 0.3)]
LARGE = [(m, s) for m in (-300.0, -40.0, -9.0, 7.0, 15.0, 60.0, 500.0) for s in (-20.0, -3.0, 0.0, 1.0, 2.0)]


def gaussian(params, low, high, dtype=DOUBLE, dims=3):
    """A TanhGaussian of one row per (mean, log_std) pair, repeated over `dims` dimensions
    with small offsets so that the dimensions differ."""
    shift = torch.linspace(-0.2, 0.2, dims, dtype=dtype)
    mean = torch.tensor([m for m, _ in params], dtype=dtype).unsqueeze(-1) + shift
    log_std = torch.tensor([s for _, s in params], dtype=dtype).unsqueeze(-1) - shift
    return TanhGaussian(mean, log_std, low, high)


@pytest.mark.parametrize("low, high", [(-1.0, 1.0), (-2.0, 3.0), (0.0, 0.5)])
def test_tanh_gaussian_log_prob_matches_transformed_distribution(low, high):
    dist = gaussian(MODERATE, low, high)
    noise, sample = seeded_noise_and_sample(dist, seed=5)
    pre_tanh = dist.mean + dist.log_std.exp() * noise
    scale, offset = (high - low) / 2, (high + low) / 2
    torch.testing.assert_close(sample.action, offset + scale * torch.tanh(pre_tanh))
    reference = TransformedDistribution(
        Normal(dist.mean, dist.log_std.exp()), [TanhTransform(), AffineTransform(offset, scale)])
    expected = reference.log_prob(sample.action).sum(-1)
    torch.testing.assert_close(sample.log_prob, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        sample.log_prob, ref_tanh_gaussian_log_prob(dist.mean, dist.log_std, noise, low, high))
    assert torch.equal(sample.log_prob_mean, sample.log_prob)


@pytest.mark.parametrize("dtype, atol", [(DOUBLE, 1e-6), (torch.float32, 1e-4)])
def test_tanh_gaussian_log_prob_is_stable_for_large_pre_tanh(dtype, atol):
    low, high = -2.0, 3.0
    dist = gaussian(LARGE, low, high, dtype=dtype)
    mean = dist.mean.clone().requires_grad_()
    log_std = dist.log_std.clone().requires_grad_()
    dist = TanhGaussian(mean, log_std, low, high)
    noise, sample = seeded_noise_and_sample(dist, seed=6)
    assert torch.isfinite(sample.log_prob).all()
    expected = ref_tanh_gaussian_log_prob(mean.detach(), log_std.detach(), noise, low, high)
    # |log_prob| reaches ~3,000 here (2|x| per dimension), hence the relative tolerance.
    torch.testing.assert_close(sample.log_prob.double(), expected, atol=atol, rtol=1e-6)
    (sample.log_prob.sum() + sample.critic_input.sum()).backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_std.grad).all()


def test_tanh_gaussian_samples_stay_in_bounds_and_mode():
    low, high = -2.0, 3.0
    torch.manual_seed(7)
    mean = torch.cat([torch.randn(5000, 2) * 3, torch.full((100, 2), 50.0), torch.full((100, 2), -50.0)])
    log_std = torch.randn(5200, 2).clamp(-3, 1)
    dist = TanhGaussian(mean, log_std, low, high)
    sample = dist.sample()
    assert sample.action.shape == (5200, 2) and sample.log_prob.shape == (5200,)
    assert sample.action.min() >= low and sample.action.max() <= high
    assert sample.action.min() < low + 0.1 and sample.action.max() > high - 0.1
    expected_mode = torch.tensor([[0.5 + 2.5 * math.tanh(v) for v in row] for row in mean.tolist()])
    torch.testing.assert_close(dist.mode(), expected_mode)
    assert TanhGaussian.as_critic_input(sample.action) is sample.action


def test_tanh_gaussian_sample_is_reparameterised():
    mean = torch.zeros(4, 2, requires_grad=True)
    log_std = torch.full((4, 2), -1.0, requires_grad=True)
    sample = TanhGaussian(mean, log_std, -1.0, 1.0).sample()
    assert sample.critic_input is sample.action
    sample.critic_input.sum().backward()
    assert torch.all(mean.grad > 0)  # d tanh(mean + std * noise) / d mean = 1 - tanh^2 > 0
    assert log_std.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------
# PolicyHead and action helpers.
# ---------------------------------------------------------------------------------------


def test_policy_head_discrete():
    torch.manual_seed(8)
    head = PolicyHead(6, (16,), Discrete(5))
    features = torch.randn(3, 4, 6)
    dist = head(features)
    assert isinstance(dist, Categorical)
    assert dist.logits.shape == (3, 4, 5)
    torch.testing.assert_close(dist.logits, head.net(features))
    sample = dist.sample()
    assert sample.action.shape == (3, 4) and sample.action.dtype == torch.int64
    assert sample.critic_input.shape == (3, 4, 5)
    assert sample.log_prob.shape == (3, 4) and sample.log_prob_mean.shape == (3, 4)
    mask = torch.zeros(3, 4, 5, dtype=torch.bool)
    mask[..., 3] = True
    masked = head(features, mask)
    assert torch.all(masked.sample().action == 3) and torch.all(masked.mode() == 3)
    torch.testing.assert_close(masked.probs[..., 3], torch.ones(3, 4))


def test_policy_head_box():
    torch.manual_seed(9)
    space = Box(low=-1.0, high=2.0, dim=3)
    head = PolicyHead(6, (16, 8), space)
    features = torch.randn(3, 4, 6)
    dist = head(features)
    assert isinstance(dist, TanhGaussian)
    out = head.net(features)
    assert out.shape == (3, 4, 6)
    torch.testing.assert_close(dist.mean, out[..., :3])
    torch.testing.assert_close(dist.log_std, out[..., 3:].clamp(-20, 2))
    assert dist.scale == 1.5 and dist.offset == 0.5
    sample = dist.sample()
    assert sample.action.shape == (3, 4, 3) and sample.critic_input.shape == (3, 4, 3)
    assert sample.log_prob.shape == (3, 4)
    assert sample.action.min() >= -1.0 and sample.action.max() <= 2.0
    # log std is clamped to [LOG_STD_MIN, LOG_STD_MAX].
    last = head.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 100.0, -100.0, 0.5]))
    dist = head(features)
    assert dist.log_std[..., 0].eq(PolicyHead.LOG_STD_MAX).all()
    assert dist.log_std[..., 1].eq(PolicyHead.LOG_STD_MIN).all()
    assert dist.log_std[..., 2].eq(0.5).all()


def test_action_features_and_dim():
    discrete, box = Discrete(4), Box(-1.0, 1.0, 2)
    actions = torch.tensor([[0, 3, 1]])
    features = action_features(actions, discrete)
    assert features.shape == (1, 3, 4) and features.dtype == torch.float32
    assert features.tolist() == [[[1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0]]]
    continuous = torch.randn(1, 3, 2)
    assert torch.equal(action_features(continuous, box), continuous)
    assert action_dim(discrete) == 4 and action_dim(box) == 2


# ---------------------------------------------------------------------------------------
# StatePropagation and MeanFieldPropagation.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rounds", [0, 1, 2])
def test_state_propagation_matches_loop(rounds):
    torch.manual_seed(10)
    module = StatePropagation(4, 5, rounds).double()
    graph = random_graph(2, 6, 3, seed=11, pad="random", isolated=((1, 1),))
    obs = torch.randn(2, 6, 4, dtype=DOUBLE)
    states = module(obs, graph)
    assert len(states) == rounds + 1
    assert states[0] is obs
    assert module.out_dim == (5 if rounds else 4)
    for got, expected in zip(states, ref_state_propagation(module, obs, graph)):
        torch.testing.assert_close(got, expected)
    for s in states[1:]:
        assert s.shape == (2, 6, 5) and torch.all(s >= 0)


def test_mean_field_with_zero_rounds_is_the_encoder_and_ignores_the_graph():
    torch.manual_seed(11)
    module = MeanFieldPropagation(4, 8, 5, heads=2, rounds=0)
    obs = torch.randn(2, 6, 4)
    expected = torch.relu(obs @ module.encoder.weight.T + module.encoder.bias)
    torch.testing.assert_close(module(obs, random_graph(2, 6, 3, seed=12)), expected)
    torch.testing.assert_close(module(obs, complete_graph(6, 2)), expected)
    assert module.out_dim == 8


@pytest.mark.parametrize("rounds", [1, 2])
@pytest.mark.parametrize("attend_self", [True, False])
def test_mean_field_matches_loop(rounds, attend_self):
    torch.manual_seed(12)
    module = MeanFieldPropagation(4, 6, 5, heads=2, rounds=rounds, attend_self=attend_self).double()
    graph = random_graph(2, 6, 3, seed=13, pad="random", isolated=((0, 2),))
    obs = torch.randn(2, 6, 4, dtype=DOUBLE)
    torch.testing.assert_close(module(obs, graph), ref_mean_field(module, obs, graph))


@pytest.mark.parametrize("graph", [line_graph(7), grid_graph(3, 4, 1)], ids=["line", "grid"])
@pytest.mark.parametrize("rounds", [1, 2])
@pytest.mark.parametrize("attend_self", [True, False])
def test_mean_field_receptive_field_is_rounds_hops(graph, rounds, attend_self):
    """Perturbing agent j's observation changes agent i's embedding iff hop(i, j) <= rounds."""
    torch.manual_seed(13)
    module = MeanFieldPropagation(3, 16, 8, heads=2, rounds=rounds, attend_self=attend_self).double()
    n = graph.neighbors.shape[1]
    obs = torch.randn(1, n, 3, dtype=DOUBLE)
    base = module(obs, graph)
    for source in range(n):
        perturbed = obs.clone()
        perturbed[0, source] += torch.tensor([1.5, -2.0, 1.0], dtype=DOUBLE)
        out = module(perturbed, graph)
        for i, hops in enumerate(hop_distances(graph, source)):
            changed = not torch.allclose(out[0, i], base[0, i], rtol=0, atol=1e-9)
            assert changed == (hops <= rounds), (source, i, hops)
            if hops > rounds:
                assert torch.equal(out[0, i], base[0, i])


# ---------------------------------------------------------------------------------------
# Critics.
# ---------------------------------------------------------------------------------------


def neighbor_q(aggregation="sum", seed=14, rounds=1):
    torch.manual_seed(seed)
    return NeighborQ(4, 3, 5, rounds, (16,), aggregation=aggregation, action_embed_dim=8).double()


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
@pytest.mark.parametrize("rounds", [0, 2])
def test_neighbor_q_matches_loop(aggregation, rounds):
    module = neighbor_q(aggregation, rounds=rounds)
    graph = random_graph(2, 6, 4, seed=15, pad="random", isolated=((1, 0),))
    obs, action = torch.randn(2, 6, 4, dtype=DOUBLE), torch.randn(2, 6, 3, dtype=DOUBLE)
    q = module(obs, action, graph)
    assert q.shape == (2, 6)
    torch.testing.assert_close(q, ref_neighbor_q(module, obs, action, graph, mean=aggregation == "mean"))


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_neighbor_q_ignores_slot_order_and_padding(aggregation):
    module = neighbor_q(aggregation)
    graph = random_graph(2, 7, 5, seed=16, isolated=((0, 3),))
    obs, action = torch.randn(2, 7, 4, dtype=DOUBLE), torch.randn(2, 7, 3, dtype=DOUBLE)
    q = module(obs, action, graph)
    torch.testing.assert_close(module(obs, action, permute_slots(graph, seed=3)), q)
    torch.testing.assert_close(module(obs, action, repoint_padding(graph, seed=4)), q)
    # Q_i does not depend on the action of an agent that is neither i nor a real neighbour.
    jacobian = torch.autograd.functional.jacobian(lambda a: module(obs, a, graph), action)  # [2,7,2,7,3]
    for b in range(2):
        for i in range(7):
            allowed = set(real_neighbors(graph, b, i)) | {i}
            for j in range(7):
                if j not in allowed:
                    assert torch.all(jacobian[b, i, b, j] == 0)


def test_neighbor_q_detached_neighbor_action_stops_only_the_neighbours_gradient():
    module = neighbor_q("sum")
    graph = line_graph(4, batch=2)  # agent 1 has neighbours 0 and 2; 3 is not one
    obs = torch.randn(2, 4, 4, dtype=DOUBLE)
    action = torch.randn(2, 4, 3, dtype=DOUBLE, requires_grad=True)

    q_default = module(obs, action, graph)
    q_detached = module(obs, action, graph, action.detach())
    torch.testing.assert_close(q_detached, q_default)

    (grad_default,) = torch.autograd.grad(q_default[:, 1].sum(), action)
    (grad_detached,) = torch.autograd.grad(q_detached[:, 1].sum(), action)
    for b in range(2):
        assert grad_default[b, 0].abs().sum() > 0 and grad_default[b, 2].abs().sum() > 0
        assert torch.all(grad_detached[b, 0] == 0) and torch.all(grad_detached[b, 2] == 0)
        # Own action: same gradient either way (it enters only through the head).
        assert grad_detached[b, 1].abs().sum() > 0
        torch.testing.assert_close(grad_detached[b, 1], grad_default[b, 1])
        assert torch.all(grad_default[b, 3] == 0)


def test_neighbor_q_sum_and_mean_differ_exactly_when_degree_exceeds_one():
    summed, averaged = neighbor_q("sum"), neighbor_q("mean")
    averaged.load_state_dict(summed.state_dict())
    graph = graph_from_adjacency([[1, 2, 3], [0], [], [0, 1]], 2, k=3)
    obs, action = torch.randn(2, 4, 4, dtype=DOUBLE), torch.randn(2, 4, 3, dtype=DOUBLE)
    q_sum, q_mean = summed(obs, action, graph), averaged(obs, action, graph)
    for i, degree in enumerate([3, 1, 0, 2]):
        if degree <= 1:
            torch.testing.assert_close(q_sum[:, i], q_mean[:, i])
        else:
            assert not torch.allclose(q_sum[:, i], q_mean[:, i])


def test_state_value_matches_loop():
    torch.manual_seed(17)
    module = StateValue(4, 5, 2, (8,)).double()
    graph = random_graph(2, 5, 3, seed=18, pad="random")
    obs = torch.randn(2, 5, 4, dtype=DOUBLE)
    value = module(obs, graph)
    assert value.shape == (2, 5)
    state = ref_state_propagation(module.agent_state.states, obs, graph)[-1]
    torch.testing.assert_close(value, module.head(state).squeeze(-1))


# ---------------------------------------------------------------------------------------
# mlp.
# ---------------------------------------------------------------------------------------


def test_mlp_layers_and_activations():
    net = mlp(4, (8, 6), 3)
    kinds = [type(layer) for layer in net]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    sizes = [(layer.in_features, layer.out_features) for layer in net if isinstance(layer, nn.Linear)]
    assert sizes == [(4, 8), (8, 6), (6, 3)]
    x = torch.randn(5, 4)
    h = torch.relu(net[0](x))
    h = torch.relu(net[2](h))
    torch.testing.assert_close(net(x), net[4](h))

    single = mlp(4, (), 2)
    assert [type(layer) for layer in single] == [nn.Linear]
    assert (single[0].in_features, single[0].out_features) == (4, 2)

    custom = mlp(3, (5,), 2, activation=nn.Tanh, output_activation=nn.Sigmoid)
    assert [type(layer) for layer in custom] == [nn.Linear, nn.Tanh, nn.Linear, nn.Sigmoid]
    y = custom(torch.randn(7, 3))
    assert y.shape == (7, 2) and torch.all((y > 0) & (y < 1))
