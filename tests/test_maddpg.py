"""MADDPG and MADDPG-S: critic target, agent shuffling, actor gradient and regulariser, clipping, learning."""

import pytest
import torch

import vimarl
from vimarl import checkpoint
from vimarl.algos.maddpg import clip_per_variable, critic_input, relaxed_sample, slot_index
from vimarl.envs.base import Box, Discrete
from vimarl.nn.centralized import CRITIC_ACTION, BatchedLinear
from vimarl.train import act, fill_replay


G = "agents"


def spread_batch(name="maddpg", batch_size=8, **config):
    env = vimarl.make_env("spread", 4)
    algo = vimarl.make_algo(name, env, **config)
    codec, buffer = fill_replay(env, algo, 10, capacity=1000)
    batch = codec.decode(buffer.sample(batch_size))
    batch.terminated[: batch_size // 2] = 1.0
    return algo, batch


def per_agent_mlp(module, i, x):
    """Agent i's network of a non-shared AgentMLP, layer by layer with its weight slices."""
    for layer in module.net:
        if isinstance(layer, BatchedLinear):
            x = x @ layer.weight[i] + layer.bias[i]
        else:
            x = layer(x)
    return x


def test_q_target_by_hand():
    algo, batch = spread_batch(gamma=0.9)
    obs2, n = batch.next_obs[G], algo.groups[G].n_agents
    torch.manual_seed(5)
    y = algo.q_target(batch)
    with torch.no_grad():
        torch.manual_seed(5)
        logits = algo.target_policy[G](obs2)
        u = torch.rand_like(logits).clamp(1e-10, 1 - 1e-7)
        soft = torch.softmax(logits - torch.log(-torch.log(u)), dim=-1)  # SoftCategoricalPd.sample
        x = torch.cat([obs2.flatten(1), soft.flatten(1)], dim=-1)  # (o'_1..o'_N, a'_1..a'_N)
        for i in range(n):
            q = per_agent_mlp(algo.critics.target_q[0], i, x).squeeze(-1)
            expected = batch.reward[G][:, i] + 0.9 * (1 - batch.terminated) * q
            assert torch.allclose(y[:, i], expected, atol=1e-6)
    assert torch.equal(y[:4], batch.reward[G][:4])  # terminal rows do not bootstrap


@pytest.mark.parametrize("replay_action", ["soft", "one_hot"])
def test_q_loss_uses_the_replayed_critic_inputs(replay_action):
    """"soft": the stored relaxed samples (argmax: the env action); "one_hot": the previous loss exactly."""
    algo, batch = spread_batch(replay_action=replay_action)
    torch.manual_seed(2)
    loss = algo.q_loss(batch)
    torch.manual_seed(2)
    y = algo.q_target(batch)
    with torch.no_grad():
        one_hot = torch.nn.functional.one_hot(batch.action[G], 5).float()
        if replay_action == "soft":
            replayed = batch.extra[CRITIC_ACTION][G]
            assert torch.equal(replayed.argmax(-1), batch.action[G]) and not torch.equal(replayed, one_hot)
            assert torch.allclose(replayed.sum(-1), torch.ones(()))
        else:
            assert batch.extra == {} and algo.replay_fields() == {}
            replayed = one_hot
        x = torch.cat([batch.obs[G].flatten(1), replayed.flatten(1)], dim=-1)
        for i in range(3):
            q = per_agent_mlp(algo.critics.q[0], i, x).squeeze(-1)
            assert torch.allclose(loss[i], (q - y[:, i]).square().mean(), atol=1e-6)


@pytest.mark.parametrize("name", ["maddpg", "maddpg_s"])
def test_the_stored_vector_is_the_relaxed_sample_acted_with(name):
    env = vimarl.make_env("spread", 3)
    algo = vimarl.make_algo(name, env)
    step = env.reset(seed=0)
    torch.manual_seed(4)
    actions = act(algo, step, explore=True)
    with torch.no_grad():
        torch.manual_seed(4)
        _, soft = relaxed_sample(algo.policy[G](step.groups[G].obs), algo.groups[G].action_space)
    stored = algo.replay_values(actions)[CRITIC_ACTION][G]
    assert torch.equal(stored, soft) and torch.equal(stored.argmax(-1), actions[G])
    # Actions act did not give (warm-up, another policy's) and deterministic acting store one-hots.
    chosen = {G: actions[G].clone()}
    assert torch.equal(algo.replay_values(chosen)[CRITIC_ACTION][G], torch.nn.functional.one_hot(chosen[G], 5).float())
    greedy = act(algo, step, explore=False)
    assert torch.equal(algo.replay_values(greedy)[CRITIC_ACTION][G], torch.nn.functional.one_hot(greedy[G], 5).float())


def test_actor_loss_sees_the_replayed_soft_vectors_of_the_other_agents():
    algo, batch = spread_batch()
    torch.manual_seed(3)
    q, _ = algo.policy_terms(batch)
    with torch.no_grad():
        torch.manual_seed(3)
        _, fresh = relaxed_sample(algo.policy[G](batch.obs[G]), algo.groups[G].action_space)
        replayed = batch.extra[CRITIC_ACTION][G]
        for i in range(3):
            actions = replayed.clone()
            actions[:, i] = fresh[:, i]
            x = torch.cat([batch.obs[G].flatten(1), actions.flatten(1)], dim=-1)
            assert torch.allclose(q[i], per_agent_mlp(algo.critics.q[0], i, x).mean(), atol=1e-6)


def test_warm_up_rows_store_one_hots_and_the_buffer_resumes(tmp_path):
    run = vimarl.train("maddpg", "spread", total_steps=64, warmup_steps=32, eval_every=64, eval_episodes=2,
                       batch_size=8, num_envs=1, save_buffer=True, progress=False, tensorboard=False,
                       out=str(tmp_path / "run"))
    data = checkpoint.load(checkpoint.latest(run))["buffer"]["data"]
    soft, action = data[f"{G}/extra/{CRITIC_ACTION}"], data[f"{G}/action"]
    warm_up = slice(0, 32)  # one sub-environment: a row per env step
    assert torch.equal(soft[warm_up], torch.nn.functional.one_hot(action[warm_up], 5).float())
    acted = soft[32:]
    assert torch.equal(acted.argmax(-1), action[32:]) and bool((acted.amax(-1) < 1).all())
    vimarl.train(resume=run, total_steps=96)
    resumed = checkpoint.load(checkpoint.latest(run))["buffer"]["data"]
    assert torch.equal(resumed[f"{G}/extra/{CRITIC_ACTION}"][:64], soft)


def test_shuffle_permutes_obs_and_actions_consistently():
    b, n, o, a = 4, 3, 2, 5
    obs, actions = torch.randn(b, n, o), torch.randn(b, n, a)
    perm = torch.tensor([2, 0, 1])
    rows = critic_input([obs], [actions], [perm])
    expected = torch.cat([obs[:, [2, 0, 1]].flatten(1), actions[:, [2, 0, 1]].flatten(1)], dim=-1)
    assert torch.equal(rows, expected.unsqueeze(1).expand(b, n, -1))
    # one permutation per batch row
    row_perm = torch.stack([torch.randperm(n) for _ in range(b)])
    rows = critic_input([obs], [actions], [row_perm])
    for r in range(b):
        p = row_perm[r]
        expected = torch.cat([obs[r, p].flatten(), actions[r, p].flatten()])
        assert torch.equal(rows[r], expected.expand(n, -1))
    # per-critic joint actions (actor loss): critic i sees agent i's fresh action, the others' replayed
    fresh = torch.randn(b, n, a)
    own = critic_input([obs], [actions], fresh=[fresh])[..., n * o:].unflatten(-1, (n, a))  # [B, critic, slot, A]
    for i in range(n):
        assert torch.equal(own[:, i, i], fresh[:, i])
        assert all(torch.equal(own[:, i, j], actions[:, j]) for j in range(n) if j != i)
    # ... and the slots of every critic's row move together, row i staying agent i's critic
    rows = critic_input([obs], [actions], [perm], fresh=[fresh])
    for i in range(n):
        assert torch.equal(rows[:, i], torch.cat([obs[:, perm].flatten(1), own[:, i, perm].flatten(1)], dim=-1))
    rows = critic_input([obs], [actions], [row_perm], fresh=[fresh])
    for r in range(b):
        for i in range(n):
            p = row_perm[r]
            assert torch.equal(rows[r, i], torch.cat([obs[r, p].flatten(), own[r, i, p].flatten()]))


def test_shuffle_stays_within_each_group():
    b = 3
    obs = [torch.randn(b, 2, 3), torch.randn(b, 3, 1)]
    actions = [torch.randn(b, 2, 2), torch.randn(b, 3, 4)]
    perms = [torch.tensor([1, 0]), torch.tensor([2, 0, 1])]
    rows = critic_input(obs, actions, perms)
    expected = torch.cat([obs[0][:, perms[0]].flatten(1), obs[1][:, perms[1]].flatten(1),
                          actions[0][:, perms[0]].flatten(1), actions[1][:, perms[1]].flatten(1)], dim=-1)
    assert rows.shape == (b, 5, expected.shape[1]) and torch.equal(rows, expected.unsqueeze(1).expand(b, 5, -1))
    assert slot_index([(2, 3), (3, 1)], perms).tolist() == [3, 4, 5, 0, 1, 2, 6 + 2, 6 + 0, 6 + 1]


def test_shuffle_leaves_a_permutation_invariant_critic_unchanged():
    b, n, o, a = 6, 4, 3, 2
    obs, actions = torch.randn(b, n, o), torch.randn(b, n, a)
    net = torch.nn.Linear(o + a, 1)

    def invariant_critic(rows):  # sum_k f(o_k, a_k) read back from the joint input
        obs_part, act_part = rows[..., : n * o], rows[..., n * o:]
        pairs = torch.cat([obs_part.unflatten(-1, (n, o)), act_part.unflatten(-1, (n, a))], dim=-1)
        return net(pairs).sum((-1, -2))

    plain = invariant_critic(critic_input([obs], [actions]))
    shuffled = invariant_critic(critic_input([obs], [actions], [torch.randperm(n)]))
    per_row = invariant_critic(critic_input([obs], [actions], [torch.rand(b, n).argsort(1)]))
    assert not torch.equal(critic_input([obs], [actions]), critic_input([obs], [actions], [torch.tensor([1, 0, 2, 3])]))
    assert torch.allclose(plain, shuffled, atol=1e-6) and torch.allclose(plain, per_row, atol=1e-6)


@pytest.mark.parametrize("shuffle", ["batch", "row"])
def test_maddpg_s_draws_a_fresh_permutation_every_update(shuffle, monkeypatch):
    algo, batch = spread_batch("maddpg_s", shuffle=shuffle)
    seen = []
    original = type(algo).permutation_for

    def record(self, batch):
        perms = original(self, batch)
        assert len(perms) == 1  # one group
        seen.append(perms[0])
        return perms

    monkeypatch.setattr(type(algo), "permutation_for", record)
    for _ in range(4):
        algo.update(batch)
    shape = (3,) if shuffle == "batch" else (8, 3)
    for perm in seen:
        assert perm.shape == shape and torch.equal(perm.sort(-1).values, torch.arange(3).expand(shape))
    assert len({tuple(p.flatten().tolist()) for p in seen}) > 1
    # the permutation reaches the critic: a fixed sigma != identity changes Q_i's target
    sigma = torch.tensor([1, 2, 0])
    torch.manual_seed(0)
    permuted = algo.q_target(batch, [sigma])
    torch.manual_seed(0)
    assert not torch.allclose(permuted, algo.q_target(batch))


@pytest.mark.parametrize("sharing", [False, True])
def test_actor_gradient_flows_through_the_critic_only_to_its_own_agent(sharing):
    algo, batch = spread_batch(parameter_sharing=sharing)
    q, reg = algo.policy_terms(batch)
    q[0].backward()  # agent 0's critic value
    assert all(p.grad is None for p in algo.critics.parameters())
    grads = [p.grad for p in algo.policy[G].parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    if not sharing:  # other agents' actions come from replay: only agent 0's actor gets a gradient
        weight = algo.policy[G].net.net[0].weight.grad
        assert weight[0].abs().sum() > 0 and weight[1:].abs().sum() == 0


def test_policy_loss_is_minus_q_plus_the_logit_regulariser():
    algo, batch = spread_batch(lr=1e-12)  # the critic step leaves the critics as they were, to 1e-12
    logits = algo.policy[G](batch.obs[G]).detach()
    torch.manual_seed(7)
    metrics = algo.update(batch)
    torch.manual_seed(7)
    algo.q_loss(batch)  # the same random draws as the update's critic step
    q, reg = algo.policy_terms(batch)
    assert torch.allclose(reg, logits.square().mean(dim=(0, 2)))
    expected = (-q + 1e-3 * logits.square().mean(dim=(0, 2))).sum()
    assert torch.allclose(metrics["loss_policy"], expected, atol=1e-6)


def test_per_variable_clipping_helper():
    weight = torch.nn.Parameter(torch.zeros(3, 4, 2))
    weight.grad = torch.stack([torch.full((4, 2), 5.0), torch.full((4, 2), 0.01), torch.full((4, 2), -2.0)])
    shared = torch.nn.Parameter(torch.zeros(5))
    shared.grad = torch.full((5,), 3.0)
    small_before = weight.grad[1].clone()
    clip_per_variable([(weight, True), (shared, False)], 0.5)
    norms = weight.grad.flatten(1).norm(dim=1)
    assert torch.allclose(norms[[0, 2]], torch.tensor([0.5, 0.5]))
    assert torch.equal(weight.grad[1], small_before)  # under the clip: unchanged
    assert torch.allclose(weight.grad[2], torch.full((4, 2), -0.5 / 8 ** 0.5))  # direction kept
    assert torch.allclose(shared.grad.norm(), torch.tensor(0.5))


@pytest.mark.parametrize("sharing", [False, True])
def test_optimizer_step_clips_every_variable(sharing):
    algo, batch = spread_batch(parameter_sharing=sharing)
    for name, module in (("policy", algo.policy), ("q", algo.critics.q)):
        variables = algo.clip[name]
        assert {id(p) for p, _ in variables} == {id(p) for p in module.parameters()}
        assert all(per_agent != sharing for _, per_agent in variables)
    q, reg = algo.policy_terms(batch)
    algo.step("policy", -1e4 * q.sum())  # a huge loss: every gradient is over the clip
    for p, per_agent in algo.clip["policy"]:
        norms = p.grad.flatten(1).norm(dim=1) if per_agent else p.grad.norm().view(1)
        assert (norms <= 0.5 + 1e-5).all() and (norms > 0.49).any()


@pytest.mark.parametrize("name", ["maddpg", "maddpg_s"])
@pytest.mark.parametrize("sharing", [False, True])
def test_both_sharing_modes_update(name, sharing):
    algo, batch = spread_batch(name, parameter_sharing=sharing)
    before = {k: v.clone() for k, v in algo.state_dict().items() if isinstance(v, torch.Tensor)}
    metrics = algo.update(batch)
    assert all(torch.isfinite(v) for v in metrics.values())
    after = algo.state_dict()
    assert not torch.equal(before["policy.agents.net.net.0.weight"], after["policy.agents.net.net.0.weight"])
    # targets moved by tau = 0.01 toward the new critic
    key = "critics.q.0.net.0.weight"
    target = "critics.target_q.0.net.0.weight"
    assert torch.allclose(after[target], 0.99 * before[target] + 0.01 * after[key], atol=1e-6)


def test_relaxed_sample_and_deterministic_actions():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 0.0, -1.0]]).expand(20000, 3)
    action, soft = relaxed_sample(logits, Discrete(3))
    assert torch.allclose(soft.sum(-1), torch.ones(20000)) and torch.equal(action, soft.argmax(-1))
    frequencies = torch.bincount(action, minlength=3).float() / 20000  # Gumbel-max: softmax(logits)
    assert torch.allclose(frequencies, torch.softmax(logits[0], -1), atol=0.01)
    mask = torch.tensor([[False, True, True]]).expand(20000, 3)
    assert (relaxed_sample(logits, Discrete(3), mask)[0] != 0).all()
    params = torch.tensor([[3.0, -0.5, 0.0, 0.0]]).expand(1000, 4)  # mean (3, -0.5), log std 0
    action, critic = relaxed_sample(params, Box(-1, 1, 2))
    assert ((action >= -1) & (action <= 1)).all() and torch.equal(action, critic.detach())
