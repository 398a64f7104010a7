"""vimarl.nn.loopy_bp against a brute-force reference written with plain Python loops.

The reference reads the module's own weights and computes every directed message edge by
edge, from the sets N_i of real neighbours (the mask), with the reverse edge left out by
"if l != i" (so it is absent exactly when i is not in N_k). Graphs include a path, a triangle,
a directed graph where some reverse edges are missing, a kNN graph, and random graphs with
padding interleaved between real slots and agents without neighbours.
"""

from __future__ import annotations

import math

import pytest
import torch

from vimarl.envs.graph import Graph, complete_graph, graph_from_adjacency, knn_graph
from vimarl.nn.loopy_bp import LoopyBPPropagation

from graph_helpers import hop_distances, line_graph, permute_slots, random_graph, real_neighbors, repoint_padding

torch.set_num_threads(1)
DOUBLE = torch.float64
IN, EMBED, STATE = 3, 4, 5


# 0 -> {1, 2}: 1 does not list 0 back, 2 does; 3 lists 4, which lists nobody; 1 and 3 list
# each other; agent 5 is isolated. Padding comes first in some rows.
DIRECTED = [[1, 2], [2, 3], [0, 3], [2, 4, 1], [], []]


def directed_graph(batch: int = 2) -> Graph:
    g = graph_from_adjacency(DIRECTED, batch, k=4)
    # Move every row's padding to the front, pointing at agent 0, to interleave it.
    order = torch.tensor([3, 0, 1, 2])
    neighbors, mask = g.neighbors[..., order], g.mask[..., order]
    return Graph(torch.where(mask, neighbors, 0), mask)


def knn(batch: int = 2) -> Graph:
    positions = torch.rand(batch, 7, 2, generator=torch.Generator().manual_seed(3))
    return knn_graph(positions, 2)  # directed: nearest-neighbour relations are not mutual


GRAPHS = {
    "path": lambda: line_graph(5, 2),
    "triangle": lambda: graph_from_adjacency([[1, 2], [0, 2], [0, 1]], 2),
    "directed": directed_graph,
    "knn": knn,
    "random": lambda: random_graph(2, 7, 4, seed=1, pad="random", isolated=((0, 0), (1, 3))),
}


# ---------------------------------------------------------------------------------------
# Module and reference.
# ---------------------------------------------------------------------------------------


def make(rounds: int, heads: int = 2, concat_hops: bool = False, renormalize: bool = True,
         seed: int = 0, embed: int = EMBED) -> LoopyBPPropagation:
    """A float64 module with positive biases and small weights, so that few ReLUs are dead, and
    larger query and key weights, so that attention is far from uniform: the comparisons then
    see non-trivial values."""
    torch.manual_seed(seed)
    module = LoopyBPPropagation(IN, embed, STATE, heads, rounds, concat_hops,
                                renormalize=renormalize).double()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.uniform_(0.0, 0.5)
            else:
                p.normal_(0.0, 1.0 if name.startswith(("query", "key")) else 0.3)
    return module


def inputs(graph: Graph, seed: int = 0) -> torch.Tensor:
    batch, n, _ = graph.neighbors.shape
    return torch.randn(batch, n, IN, generator=torch.Generator().manual_seed(seed), dtype=DOUBLE)


def linear(layer, v):
    out = layer.weight @ v
    return out + layer.bias if layer.bias is not None else out


@torch.no_grad()
def ref_states(module, x, graph):
    batch, n, _ = x.shape
    states = [x]
    for own, neighbors in zip(module.states.own, module.states.neighbors):
        s, new = states[-1], torch.zeros(batch, n, own.out_features, dtype=x.dtype)
        for b in range(batch):
            for i in range(n):
                total = sum((s[b, j] for j in real_neighbors(graph, b, i)), torch.zeros(s.shape[-1], dtype=x.dtype))
                new[b, i] = torch.relu(linear(own, s[b, i]) + neighbors.weight @ total)
        states.append(new)
    return states


@torch.no_grad()
def ref_loopy_bp(module: LoopyBPPropagation, x, graph, initial=None):
    """(messages [nu^0..nu^M] in the [B, N, K, E] slot layout, output), edge by edge."""
    batch, n, k = graph.neighbors.shape
    heads, d = module.heads, module.head_dim
    nbrs = {(b, i): real_neighbors(graph, b, i) for b in range(batch) for i in range(n)}
    edges = [(b, s, i) for (b, i), senders in nbrs.items() for s in senders]  # s -> i
    mu0 = {(b, i): torch.relu(linear(module.encoder, x[b, i])) for b in range(batch) for i in range(n)}
    mu0_tensor = torch.stack([torch.stack([mu0[b, i] for i in range(n)]) for b in range(batch)])
    if module.rounds == 0:
        return [], mu0_tensor
    states = ref_states(module, x, graph)

    def layout(nu):
        out = torch.zeros(batch, n, k, module.embed_dim, dtype=x.dtype)
        for b in range(batch):
            for i in range(n):
                for slot in range(k):
                    if graph.mask[b, i, slot]:
                        out[b, i, slot] = nu[b, int(graph.neighbors[b, i, slot]), i]
        return out

    if initial is None:
        nu = {(b, s, i): torch.relu(linear(module.edge_init, torch.cat([mu0[b, s], mu0[b, i]])))
              for b, s, i in edges}
    else:
        nu = {(b, s, i): initial[b, i, graph.neighbors[b, i].tolist().index(s)] for b, s, i in edges}
    history, outputs = [layout(nu)], [mu0_tensor]
    for m in range(module.rounds):
        new = {}
        for b, s, i in edges:  # the message from s (the paper's k) into i
            others = [l for l in nbrs[b, s] if l != i]  # N_s \ i: without nu_is, if it exists
            attended = others if module.renormalize else nbrs[b, s]
            aggregated = torch.zeros(module.embed_dim, dtype=x.dtype)
            for h in range(heads):
                chunk = slice(h * d, (h + 1) * d)
                query = module.query[m].weight[chunk] @ mu0[b, s]
                logits = {l: float(query @ (module.key[m].weight[chunk] @ nu[b, l, s])) / math.sqrt(d)
                          for l in attended}
                if not logits:
                    continue
                top = max(logits.values())
                norm = sum(math.exp(z - top) for z in logits.values())
                for l in others:
                    aggregated[chunk] += math.exp(logits[l] - top) / norm * nu[b, l, s][chunk]
            pair = torch.cat([states[m][b, s], states[m][b, i]])
            new[b, s, i] = torch.relu(linear(module.edge_state[m], pair) + aggregated)
        nu = new
        history.append(layout(nu))
        if m + 1 in module.readout_rounds:
            r = module.readout_rounds.index(m + 1)
            mu = torch.zeros(batch, n, module.embed_dim, dtype=x.dtype)
            for b in range(batch):
                for i in range(n):
                    incoming = sum((nu[b, s, i] for s in nbrs[b, i]), torch.zeros(module.embed_dim, dtype=x.dtype))
                    mu[b, i] = torch.relu(linear(module.readout_state[r], states[m + 1][b, i])
                                          + module.readout_messages[r].weight @ incoming)
            outputs.append(mu)
    return history, torch.cat(outputs, -1) if module.concat_hops else outputs[-1]


def slot_of(graph: Graph, b: int, i: int, j: int) -> int:
    """The real slot of agent i that holds j."""
    return next(s for s in range(graph.k) if graph.mask[b, i, s] and int(graph.neighbors[b, i, s]) == j)


# ---------------------------------------------------------------------------------------
# Against the reference.
# ---------------------------------------------------------------------------------------


# The default rule on every graph; the other one where reverse edges are sometimes missing.
CASES = [(name, True) for name in GRAPHS] + [(name, False) for name in ("directed", "knn", "random")]


@pytest.mark.parametrize(("name", "renormalize"), CASES)
@pytest.mark.parametrize("rounds", [0, 1, 2, 3])
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("concat_hops", [False, True])
def test_matches_edge_by_edge_reference(name, rounds, heads, concat_hops, renormalize):
    graph = GRAPHS[name]()
    module = make(rounds, heads, concat_hops, renormalize)
    x = inputs(graph)
    out = module(x, graph)
    messages = module.messages(x, graph)
    ref_messages, ref_out = ref_loopy_bp(module, x, graph)
    assert out.shape == (*x.shape[:2], module.out_dim)
    assert module.out_dim == EMBED * (rounds + 1 if concat_hops else 1)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=0)
    assert len(messages) == len(ref_messages) == (rounds + 1 if rounds else 0)
    for got, want in zip(messages, ref_messages):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    # The values compared are not trivially zero.
    assert (out != 0).double().mean() > 0.3
    for got in messages:
        assert (got[graph.mask] != 0).double().mean() > 0.3


def test_rounds_zero_is_the_node_embedding_and_ignores_the_graph():
    module = make(0)
    graph = GRAPHS["random"]()
    x = inputs(graph)
    expected = torch.relu(module.encoder(x))
    torch.testing.assert_close(module(x, graph), expected, atol=0, rtol=0)
    torch.testing.assert_close(module(x, complete_graph(7, 2)), expected, atol=0, rtol=0)
    assert module.messages(x, graph) == []


def test_float32_matches_float64():
    graph = GRAPHS["random"]()
    module = make(3, 2, concat_hops=True)
    x = inputs(graph)
    out32 = module.float()(x.float(), graph)
    module.double()
    torch.testing.assert_close(out32.double(), module(x, graph), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, DOUBLE])
def test_exclusion_is_stable_when_the_reverse_edge_dominates_attention(dtype):
    """Logit gaps of ~1e4 make every weight but the top one underflow to 0 after the shift:
    leaving out the top edge must then use the others, not divide 0 by 0."""
    graph = graph_from_adjacency([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]], 1)
    module = make(2, heads=2)
    with torch.no_grad():
        for m in range(2):
            module.query[m].weight.mul_(100.0)
            module.key[m].weight.mul_(100.0)
    x = inputs(graph, seed=5)
    ref_messages, ref_out = ref_loopy_bp(module, x, graph)
    out = module.to(dtype)(x.to(dtype), graph)
    messages = module.messages(x.to(dtype), graph)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())
    tol = 1e-10 if dtype == DOUBLE else 1e-3
    for got, want in zip(messages, ref_messages):
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------
# Properties.
# ---------------------------------------------------------------------------------------


def test_message_does_not_depend_on_the_reverse_message():
    """nu_ki^1 is a function of {nu_lk^0}_{l in N_k \\ i}: perturbing nu_ik^0 leaves it as it
    was, while it changes k's messages to its other neighbours. Without renormalisation,
    nu_ik^0 still reaches nu_ki^1 through the attention normaliser."""
    graph = complete_graph(4, 2)
    x = inputs(graph)
    b, i, k = 1, 2, 0
    for renormalize in (True, False):
        module = make(1, heads=2, renormalize=renormalize)
        nu0, nu1 = module.messages(x, graph)
        perturbed = nu0.clone()
        perturbed[b, k, slot_of(graph, b, k, i)] += torch.tensor([1.0, -0.3, 2.0, 0.7], dtype=DOUBLE)
        new0, new1 = module.messages(x, graph, initial=perturbed)
        torch.testing.assert_close(new0, perturbed, atol=0, rtol=0)
        torch.testing.assert_close(new1, ref_loopy_bp(module, x, graph, initial=perturbed)[0][1],
                                   atol=1e-10, rtol=0)
        k_to_i = (b, i, slot_of(graph, b, i, k))
        if renormalize:
            torch.testing.assert_close(new1[k_to_i], nu1[k_to_i], atol=1e-12, rtol=0)
        else:
            assert (new1[k_to_i] - nu1[k_to_i]).abs().max() > 1e-6
        for j in (1, 3):  # k's other receivers read nu_ik^0
            k_to_j = (b, j, slot_of(graph, b, j, k))
            assert (new1[k_to_j] - nu1[k_to_j]).abs().max() > 1e-6
        # Messages not sent by k do not read nu_ik^0 at all in round 1.
        for j in range(4):
            for slot in range(graph.k):
                if int(graph.neighbors[b, j, slot]) != k:
                    torch.testing.assert_close(new1[b, j, slot], nu1[b, j, slot], atol=1e-12, rtol=0)


def test_missing_reverse_edge_uses_every_incoming_message():
    """0 lists 1 but 1 does not list 0: the message 1 -> 0 reads all of 1's incoming messages,
    so perturbing any of them changes it."""
    graph = directed_graph(1)
    x = inputs(graph)
    module = make(1, heads=1)
    nu0, nu1 = module.messages(x, graph)
    target = (0, 0, slot_of(graph, 0, 0, 1))
    for sender in real_neighbors(graph, 0, 1):  # 2 and 3
        perturbed = nu0.clone()
        perturbed[0, 1, slot_of(graph, 0, 1, sender)] += 1.0
        assert (module.messages(x, graph, initial=perturbed)[1][target] - nu1[target]).abs().max() > 1e-6


@pytest.mark.parametrize("renormalize", [True, False])
def test_permutation_equivariance(renormalize):
    graph = GRAPHS["random"]()
    module = make(2, heads=2, concat_hops=True, renormalize=renormalize)
    x = inputs(graph)
    out = module(x, graph)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(4))
    inverse = torch.argsort(perm)
    # New agent a is old agent perm[a]; old indices are renamed by `inverse`.
    relabelled = Graph(inverse[graph.neighbors[:, perm]], graph.mask[:, perm])
    torch.testing.assert_close(module(x[:, perm], relabelled), out[:, perm], atol=1e-12, rtol=0)


@pytest.mark.parametrize("renormalize", [True, False])
def test_invariant_to_slot_order_and_padding_indices(renormalize):
    graph = GRAPHS["random"]()
    module = make(3, heads=2, concat_hops=True, renormalize=renormalize)
    x = inputs(graph)
    out = module(x, graph)
    torch.testing.assert_close(module(x, permute_slots(graph, 2)), out, atol=1e-12, rtol=0)
    repointed = repoint_padding(graph, 3)
    assert (repointed.neighbors != graph.neighbors).any()
    torch.testing.assert_close(module(x, repointed), out, atol=0, rtol=0)
    for got, want in zip(module.messages(x, repointed), module.messages(x, graph)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert (got[~graph.mask] == 0).all()


@pytest.mark.parametrize("rounds", [0, 1, 2, 3])
def test_receptive_field_is_rounds_plus_one_hops(rounds):
    """mu_0^M depends on agent d of a path iff d <= M + 1 (M >= 1), d = 0 for M = 0."""
    n = 7
    graph = line_graph(n)
    module = make(rounds, heads=2)
    x = inputs(graph)
    reach = rounds + 1 if rounds else 0
    assert hop_distances(graph, 0) == list(range(n))
    out = module(x, graph)[0, 0]
    for far in range(n):
        moved = x.clone()
        moved[0, far] += 0.5
        changed = (module(moved, graph)[0, 0] - out).abs().max() > 1e-9
        assert bool(changed) == (far <= reach), far


@pytest.mark.parametrize("concat_hops", [False, True])
@pytest.mark.parametrize("renormalize", [True, False])
def test_gradients_reach_every_parameter(concat_hops, renormalize):
    graph = GRAPHS["random"]()
    module = make(2, heads=2, concat_hops=concat_hops, renormalize=renormalize)
    module(inputs(graph), graph).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert (p.grad != 0).any(), name


@pytest.mark.parametrize("renormalize", [True, False])
def test_gradcheck(renormalize):
    graph = random_graph(1, 4, 3, seed=6, pad="random", isolated=((0, 3),))
    module = make(2, heads=2, concat_hops=True, renormalize=renormalize)
    x = inputs(graph).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: module(v, graph), (x,))
    nu0 = module.messages(x.detach(), graph)[0].requires_grad_()
    assert torch.autograd.gradcheck(lambda v: module.messages(x.detach(), graph, initial=v)[-1], (nu0,))


def test_rejects_indivisible_heads_and_negative_rounds():
    with pytest.raises(ValueError):
        LoopyBPPropagation(IN, 5, STATE, 2, 1)
    with pytest.raises(ValueError):
        LoopyBPPropagation(IN, 4, STATE, 2, -1)
