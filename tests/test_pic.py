"""PIC: the graph critic against a dense reference, permutation invariance, targets and losses, N = 200, learning."""


import pytest
import torch

import vimarl
from vimarl.algos.maddpg import relaxed_sample
from vimarl.algos.pic import GraphCritic, GraphLayer
from vimarl.nn.centralized import CRITIC_ACTION
from vimarl.train import fill_replay


G = "agents"


def dense_layer(layer, x):
    """The reference's GraphConvLayer + nn_gc with an explicit adjacency (1 - I) / N."""
    n = x.shape[-2]
    adj = (torch.ones(n, n, dtype=x.dtype) - torch.eye(n, dtype=x.dtype)) / n
    feat = torch.relu(torch.matmul(adj, layer.neighbors(x)))
    feat = feat + torch.relu(layer.self_loop(x))
    return feat / n


def spread_batch(batch_size=8, env="spread", num_envs=4, **config):
    env = vimarl.make_env(env, num_envs)
    algo = vimarl.make_algo("pic", env, **config)
    codec, buffer = fill_replay(env, algo, 10, capacity=1000)
    batch = codec.decode(buffer.sample(batch_size))
    batch.terminated[: batch_size // 2] = 1.0
    return algo, batch


@pytest.mark.parametrize("pool", ["max", "mean"])
def test_graph_critic_matches_a_dense_adjacency(pool):
    torch.manual_seed(0)
    b, n, d, h = 5, 4, 7, 16
    critic = GraphCritic(d, h, pool).double()
    x = torch.randn(b, n, d, dtype=torch.float64)
    first, second = critic.layers
    h1 = dense_layer(first, x)
    assert torch.allclose(first(x), h1, atol=1e-12)
    h2 = dense_layer(second, h1)
    pooled = h2.max(1).values if pool == "max" else h2.mean(1)
    expected = critic.value(pooled).squeeze(-1)
    assert torch.allclose(critic(x[..., :3], x[..., 3:]), expected, atol=1e-12)
    # V is the 0.1-scaled nn.Linear init; W sums over the others only (no self loop)
    layer = GraphLayer(1, 1).double()
    with torch.no_grad():
        layer.neighbors.weight.fill_(1.0), layer.neighbors.bias.zero_()
        layer.self_loop.weight.zero_(), layer.self_loop.bias.zero_()
    ones = torch.tensor([[[1.0], [2.0], [3.0]]], dtype=torch.float64)
    assert torch.allclose(layer(ones).flatten(), torch.tensor([5.0, 4.0, 3.0], dtype=torch.float64) / 9)


@pytest.mark.parametrize("pool", ["max", "mean"])
def test_critic_is_invariant_to_permuting_the_agents(pool):
    algo, batch = spread_batch(pool=pool)
    obs = batch.obs[G]
    actions = torch.softmax(torch.randn(*obs.shape[:2], 5), -1)
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        q = algo.critics.q(obs, actions)
        permuted = algo.critics.q(obs[:, perm], actions[:, perm])
        other = algo.critics.q(obs, actions[:, perm])  # actions moved without their observations
    assert torch.allclose(q, permuted, atol=1e-6)
    assert not torch.allclose(q, other, atol=1e-6)


@pytest.mark.parametrize("next_actions", ["current", "target"])
def test_q_target_by_hand(next_actions):
    algo, batch = spread_batch(gamma=0.9, next_actions=next_actions)
    with torch.no_grad():  # make the target actor differ from the current one
        for p in algo.target_policy.parameters():
            p.add_(0.1 * torch.randn_like(p))
    y = algo.q_target(batch)
    with torch.no_grad():
        actor = algo.policy[G] if next_actions == "current" else algo.target_policy[G]
        soft = torch.softmax(actor(batch.next_obs[G]), -1)  # no Gumbel noise
        next_q = algo.critics.target_q(batch.next_obs[G], soft)
        expected = batch.reward[G].mean(-1) + 0.9 * (1 - batch.terminated) * next_q
    assert y.shape == (8,) and torch.allclose(y, expected, atol=1e-6)
    assert torch.allclose(y[:4], batch.reward[G][:4].mean(-1))  # terminal rows do not bootstrap


@pytest.mark.parametrize("replay_action", ["soft", "one_hot"])
def test_q_loss_uses_the_replayed_critic_inputs(replay_action):
    """"soft": the stored relaxed samples; "one_hot": the previous loss exactly."""
    algo, batch = spread_batch(replay_action=replay_action)
    expected = algo.q_target(batch)
    loss = algo.q_loss(batch)
    one_hot = torch.nn.functional.one_hot(batch.action[G], 5).float()
    if replay_action == "soft":
        replayed = batch.extra[CRITIC_ACTION][G]
        assert torch.equal(replayed.argmax(-1), batch.action[G]) and not torch.equal(replayed, one_hot)
    else:
        assert batch.extra == {}
        replayed = one_hot
    with torch.no_grad():
        q = algo.critics.q(batch.obs[G], replayed)
    assert torch.allclose(loss, (q - expected).square().mean(), atol=1e-6)


def test_the_stored_vector_is_the_relaxed_sample_acted_with():
    env = vimarl.make_env("spread", 3)
    algo = vimarl.make_algo("pic", env)
    step = env.reset(seed=0)
    obs = {G: step.groups[G].obs}
    torch.manual_seed(4)
    actions = algo.act(obs, {G: None}, explore=True)
    with torch.no_grad():
        torch.manual_seed(4)
        _, soft = relaxed_sample(algo.policy[G](obs[G]), algo.groups[G].action_space)
    stored = algo.replay_values(actions)[CRITIC_ACTION][G]
    assert torch.equal(stored, soft) and torch.equal(stored.argmax(-1), actions[G])
    greedy = algo.act(obs, {G: None}, explore=False)  # deterministic acting stores one-hots
    assert torch.equal(algo.replay_values(greedy)[CRITIC_ACTION][G], torch.nn.functional.one_hot(greedy[G], 5).float())


def test_actor_loss_and_update_order_by_hand():
    algo, batch = spread_batch()
    with torch.no_grad():
        logits = algo.policy[G](batch.obs[G])
        q = algo.critics.q(batch.obs[G], torch.softmax(logits, -1))
        expected = -q.mean() + 1e-3 * logits.square().mean()
    q_before = {k: v.clone() for k, v in algo.critics.state_dict().items()}
    metrics = algo.update(batch)
    # the actor step came first: its loss is on the critic before this update's critic step
    assert torch.allclose(metrics["loss_policy"], expected, atol=1e-6)
    # the critic target moved twice by tau: after the actor step and after the critic step
    after = algo.critics.state_dict()
    for name in ("layers.0.neighbors.weight", "value.bias"):
        once = 0.99 * q_before[f"target_q.{name}"] + 0.01 * q_before[f"q.{name}"]
        assert torch.allclose(after[f"target_q.{name}"], 0.99 * once + 0.01 * after[f"q.{name}"], atol=1e-6)


def test_actor_gradient_reaches_the_actor_only_and_clipping_holds():
    algo, batch = spread_batch()
    q, reg = algo.policy_terms(batch)
    (-q).backward()
    assert all(p.grad is None for p in algo.critics.parameters())
    assert any(p.grad.abs().sum() > 0 for p in algo.policy.parameters())
    algo.policy.zero_grad()
    q, _ = algo.policy_terms(batch)
    optimizer = algo.optimizers["policy"]
    seen = []
    original = optimizer.step
    optimizer.step = lambda *a, **k: (seen.append(torch.cat([p.grad.flatten() for p in algo.policy.parameters()])
                                                  .norm()), original(*a, **k))[1]
    algo.step("policy", -1e4 * q, algo.policy)
    assert abs(seen[0].item() - 0.5) < 1e-4


def test_exploration_samples_and_evaluation_is_argmax():
    algo, batch = spread_batch()
    obs = batch.obs[G][:1].expand(4000, -1, -1)
    torch.manual_seed(0)
    actions = algo.act({G: obs}, {G: None}, explore=True)[G][:, 0]
    probs = torch.softmax(algo.policy[G](obs[0, 0]), -1).detach()
    assert torch.allclose(torch.bincount(actions, minlength=5).float() / 4000, probs, atol=0.03)
    greedy = algo.act({G: obs[:1]}, {G: None}, explore=False)[G]
    assert torch.equal(greedy, algo.policy[G](obs[:1]).argmax(-1))


def test_runs_at_200_agents():
    torch.set_num_threads(1)
    env = vimarl.make_env("coop_nav", 2, n_agents=200)
    algo = vimarl.make_algo("pic", env)
    codec, buffer = fill_replay(env, algo, 5, capacity=100)
    batch = codec.decode(buffer.sample(8))
    assert batch.obs[G].shape[:2] == (8, 200)
    metrics = algo.update(batch)
    assert all(torch.isfinite(v) for v in metrics.values())
