"""MAAC (Iqbal & Sha 2019, official code): counterfactual baseline, attention over the other (present)
agents, the code and paper soft targets, reward standardisation from observed rewards, the policy loss,
gradient processing, target networks, acting with several groups, and updates on real envs."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import vimarl
from vimarl.algos.maac import (
    AttentionCritic,
    AttentionSAC,
    AttentionSACConfig,
    clip_per_agent,
    counterfactual_baseline,
)
from vimarl.buffer import Transition
from vimarl.envs.base import Discrete, GroupSpec
from vimarl.logging import read_metrics
from vimarl.nn.distributions import Categorical
from vimarl.train import fill_replay

from helpers import random_discrete_transition

N, OBS, A = 3, 2, 3
SPEC = {"agents": GroupSpec(n_agents=N, obs_dim=OBS, action_space=Discrete(A))}


def tiny(**config) -> AttentionSAC:
    return AttentionSAC(SPEC, 0, AttentionSACConfig(critic_hidden_dim=8, attend_heads=2, policy_hidden_dim=4, **config))


def batch_of(b: int, terminated=None, next_alive=None) -> Transition:
    return random_discrete_transition(b, N, OBS, A, terminated, next_alive)


@torch.no_grad()
def set_logits(policy, logits):
    """pi_i(. | o) = softmax(logits[i]) whatever o."""
    layers = [m for m in policy.net.net if hasattr(m, "weight")]
    layers[-1].weight.zero_()
    layers[-1].bias.copy_(torch.tensor(logits))


@torch.no_grad()
def set_q(critic: AttentionCritic, q):
    """Q_i(o, (a, a_-i)) = q[i][a] whatever the inputs."""
    last = critic.head.net[-1]
    last.weight.zero_()
    last.bias.copy_(torch.tensor(q))


def test_counterfactual_baseline_is_the_policy_weighted_all_action_q():
    probs = torch.tensor([[[0.2, 0.8, 0.0], [0.5, 0.25, 0.25]]])
    all_q = torch.tensor([[[1.0, 3.0, 100.0], [-2.0, 4.0, 8.0]]])
    # 0.2 * 1 + 0.8 * 3 (+ 0 * 100);  0.5 * -2 + 0.25 * 4 + 0.25 * 8
    assert torch.allclose(counterfactual_baseline(probs, all_q), torch.tensor([[2.6, 2.0]]))


def test_policy_loss_is_reinforce_with_soft_advantage_over_the_baseline_and_logit_penalty():
    algo = tiny(reward_scale=10.0, logit_reg=0.01)
    batch = batch_of(64)
    batch.action["agents"].zero_()  # replay actions: a loss that used them would differ
    obs = batch.obs["agents"]
    torch.manual_seed(4)
    logits = algo.policy(obs)
    distribution = Categorical(logits)
    sample = distribution.sample()
    with torch.no_grad():
        q, all_q, _ = algo.critic(obs, F.one_hot(sample.action, A).float())
        probs = logits.softmax(-1)
        baseline = (probs * all_q).sum(-1)
        advantage = q - baseline
        log_pi = probs.log().gather(-1, sample.action.unsqueeze(-1)).squeeze(-1)
        expected = sum((log_pi[:, i] * (0.1 * log_pi[:, i] - advantage[:, i])).mean()
                       + 0.01 * logits[:, i].square().mean() for i in range(N))
    torch.manual_seed(4)
    loss, entropy = algo.policy_loss(batch)
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(entropy, distribution.entropy().mean(), atol=1e-6)
    loss.backward()
    assert all(p.grad is None for p in algo.critics.parameters())  # the critic is not trained here
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in algo.policy.parameters())


def critic_and_inputs(b=8, present=None):
    torch.manual_seed(2)
    critic = AttentionCritic(4, OBS, A, hidden=8, heads=2)
    obs = torch.randn(b, 4, OBS)
    actions = F.one_hot(torch.randint(A, (b, 4)), A).float()
    return critic, obs, actions


def test_attention_excludes_self_so_all_action_q_ignores_the_own_action():
    critic, obs, actions = critic_and_inputs()
    e, s = critic.encode(obs, actions)
    _, weights, logits, _ = critic.attend(e, s)
    assert (weights.diagonal(dim1=-2, dim2=-1) == 0).all()
    # Softmax over j != i of the logits scaled by sqrt(head size).
    others = ~torch.eye(4, dtype=torch.bool)
    expected = (logits / math.sqrt(4)).masked_fill(~others, -math.inf).softmax(-1)
    assert torch.allclose(weights, expected, atol=1e-6)

    _, all_q, _ = critic(obs, actions)
    changed = actions.clone()
    changed[:, 1] = changed[:, 1].roll(1, dims=-1)  # agent 1 takes another action in every row
    q, all_q_changed, _ = critic(obs, changed)
    assert torch.allclose(all_q[:, 1], all_q_changed[:, 1], atol=1e-6)  # Q_1(o, (., a_-1)) needs no a_1
    for j in (0, 2, 3):
        assert not torch.allclose(all_q[:, j], all_q_changed[:, j])
    assert torch.allclose(q[:, 1], all_q[:, 1].gather(-1, changed[:, 1].argmax(-1, keepdim=True)).squeeze(-1), atol=1e-6)


def test_attention_respects_absent_agents():
    critic, obs, actions = critic_and_inputs()
    present = torch.ones(8, 4, dtype=torch.bool)
    present[:4, 2] = False  # agent 2 has left in the first four rows
    present[0] = torch.tensor([True, False, False, False])  # agent 0 alone: nobody to attend to
    e, s = critic.encode(obs, actions)
    x, weights, logits, _ = critic.attend(e, s, present)
    assert (weights[:4, :, :, 2] == 0).all() and (weights[0, :, :, 1:] == 0).all()
    assert (weights[0, :, 0] == 0).all() and (x[0, 0] == 0).all()  # agent 0 has nobody to attend to
    rows = weights.sum(-1)  # the weights sum to 1 over the present others
    assert torch.allclose(rows[1:], torch.ones_like(rows[1:])) and torch.isfinite(x).all()
    allowed = (~torch.eye(4, dtype=torch.bool)) & present[1].view(1, 4)
    expected = (logits[1] / 2.0).masked_fill(~allowed, -math.inf).softmax(-1)
    assert torch.allclose(weights[1], expected, atol=1e-6)

    # What an absent agent does changes nobody else's Q values (BN statistics are per agent).
    _, all_q, regulariser = critic(obs[1:4], actions[1:4], present[1:4])
    moved_obs, moved_actions = obs[1:4].clone(), actions[1:4].clone()
    moved_obs[:, 2] += 3.0
    moved_actions[:, 2] = moved_actions[:, 2].roll(1, dims=-1)
    _, all_q_moved, regulariser_moved = critic(moved_obs, moved_actions, present[1:4])
    assert torch.allclose(all_q[:, [0, 1, 3]], all_q_moved[:, [0, 1, 3]], atol=1e-6)
    assert torch.allclose(regulariser, regulariser_moved, atol=1e-7)


def test_attention_regulariser_is_squared_unscaled_logits_over_the_others():
    critic, obs, actions = critic_and_inputs()
    critic.attention_reg = 0.5
    e, s = critic.encode(obs, actions)
    _, _, logits, _ = critic.attend(e, s)
    others = ~torch.eye(4, dtype=torch.bool)
    expected = 0.5 * sum(logits[:, h][:, i][:, others[i]].square().mean() for i in range(4) for h in range(2))
    assert torch.allclose(critic(obs, actions)[2], expected, atol=1e-6)


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_soft_target_matches_the_formula_on_hand_set_networks(variant):
    algo = tiny(gamma=0.9, reward_scale=10.0, soft_target=variant)
    logits = [[0.0, math.log(3.0), 0.0], [0.0, 0.0, 0.0], [1.0, -1.0, 0.5]]
    q_table = [[1.0, 2.0, 3.0], [-2.0, 0.0, 4.0], [0.5, 0.5, -1.0]]
    set_logits(algo.target_policy, logits)
    set_q(algo.target_critic, q_table)
    next_alive = torch.ones(64, N, dtype=torch.bool)
    next_alive[::3, 1] = False  # agent 1 leaves in some transitions
    batch = batch_of(64, terminated=(torch.arange(64) % 4 == 0).float(), next_alive=next_alive)

    with torch.no_grad():
        hand_set = algo.target_policy(batch.next_obs["agents"])  # its memory layout fixes the sample
    assert torch.allclose(hand_set, torch.tensor(logits).expand(64, N, A))
    torch.manual_seed(3)
    next_action = Categorical(hand_set).sample().action
    torch.manual_seed(3)
    y = algo.q_target(batch)

    log_pi = torch.log_softmax(torch.tensor(logits), -1)
    for i in range(N):
        a = next_action[:, i]
        assert len(a.unique()) > 1
        q_next = torch.tensor(q_table[i])[a]
        logp = log_pi[i][a]
        c = (1 - batch.terminated) * next_alive[:, i].float()
        r = batch.reward["agents"][:, i]  # nothing observed yet: raw rewards
        expected = r + 0.9 * c * q_next - 0.1 * logp if variant == "code" else r + 0.9 * c * (q_next - 0.1 * logp)
        assert torch.allclose(y[:, i], expected, atol=1e-5)


def test_rewards_are_standardised_by_the_observed_statistics():
    algo = tiny()
    batch = batch_of(16)
    assert torch.equal(algo.rewards(batch), batch.reward["agents"])  # nothing observed yet: raw
    seen = [batch_of(40), batch_of(24)]
    for b in seen:
        b.reward["agents"] = b.reward["agents"] * torch.tensor([1.0, 5.0, 0.0]) + torch.tensor([0.0, -3.0, 2.0])
        algo.count_rewards(b.reward["agents"])
    everything = torch.cat([b.reward["agents"] for b in seen]).double()
    mean, std = algo.reward_statistics()
    assert torch.allclose(mean, everything.mean(0)) and torch.allclose(std, everything.std(0, unbiased=False))
    assert algo.reward_count.tolist() == [64.0] * N
    r = batch.reward["agents"]
    got = algo.rewards(batch)
    assert torch.allclose(got[:, :2], ((r.double()[:, :2] - mean[:2]) / std[:2]).float(), atol=1e-5)
    assert torch.allclose(got[:, 2], r[:, 2] - 2.0, atol=1e-6)  # agent 2's reward was constant: std 0 -> 1

    # The critic target reads the standardised rewards.
    set_logits(algo.target_policy, [[0.0] * A] * N)
    torch.manual_seed(5)
    y = algo.q_target(batch)
    algo.config.normalize_rewards = False
    torch.manual_seed(5)
    y_raw = algo.q_target(batch)
    assert torch.allclose(y - y_raw, got - r, atol=1e-5)

    # The statistics travel with the state dict (checkpoints).
    other = tiny()
    other.load_state_dict(algo.state_dict())
    assert torch.equal(other.reward_sum, algo.reward_sum) and torch.equal(other.reward_sq_sum, algo.reward_sq_sum)


def test_policy_gradients_are_clipped_per_agent():
    algo = tiny()
    for p in algo.policy.parameters():
        p.grad = torch.zeros_like(p)
    layer = algo.policy.net.net[0]
    layer.weight.grad[0] = 3.0   # agent 0 far above the limit
    layer.weight.grad[1] = 0.01  # agent 1 below it
    before = layer.weight.grad.clone()
    clip_per_agent(algo.policy, 0.5, N)
    norms = torch.stack([sum(p.grad[i].square().sum() for p in algo.policy.parameters()) for i in range(N)]).sqrt()
    assert norms[0] == pytest.approx(0.5, rel=1e-4)
    assert torch.equal(layer.weight.grad[1], before[1])


@pytest.mark.parametrize("mode, encoder_scale", [("code", 1 / N), ("attention", 1.0)])
def test_shared_critic_gradients_are_scaled_by_one_over_n(mode, encoder_scale):
    batch = batch_of(32)
    grads = {}
    for scale in ("none", mode):
        torch.manual_seed(0)
        algo = tiny(scale_shared_grads=scale, critic_grad_clip=1e9)
        torch.manual_seed(1)
        loss, reg = algo.critic_loss(batch)
        algo._critic_step(loss + reg)
        grads[scale] = {k: p.grad.clone() for k, p in algo.critic.named_parameters()}
    for name, g in grads[mode].items():
        factor = 1 / N if name.split(".")[0] in ("key", "selector", "value") else (
            encoder_scale if name.startswith("sa_encoder") else 1.0)
        assert torch.allclose(g, factor * grads["none"][name], atol=1e-7), name


def test_targets_follow_polyak():
    algo = tiny(tau=0.25)
    target_policy = copy.deepcopy(algo.target_policy.state_dict())
    target_critic = {k: v.clone() for k, v in algo.target_critic.named_parameters()}
    algo.update(batch_of(16))
    for name, p in algo.target_policy.named_parameters():
        expected = 0.75 * target_policy[name] + 0.25 * dict(algo.policy.named_parameters())[name]
        assert torch.allclose(p, expected, atol=1e-6)
    for name, p in algo.target_critic.named_parameters():
        expected = 0.75 * target_critic[name] + 0.25 * dict(algo.critic.named_parameters())[name]
        assert torch.allclose(p, expected, atol=1e-6)


def test_groups_of_different_sizes_share_one_agent_axis_and_padded_actions_never_play():
    groups = {"a": GroupSpec(n_agents=2, obs_dim=3, action_space=Discrete(2)),
              "b": GroupSpec(n_agents=1, obs_dim=5, action_space=Discrete(4), has_action_mask=True)}
    algo = AttentionSAC(groups, 0, AttentionSACConfig())
    obs = {"a": torch.randn(500, 2, 3), "b": torch.randn(500, 1, 5)}
    mask = {"a": None, "b": torch.tensor([True, False, True, False]).expand(500, 1, 4)}
    running = algo.policy.norm.norm.running_mean.clone()
    actions = algo.act(obs, {}, explore=True, action_mask=mask)
    assert actions["a"].shape == (500, 2) and actions["b"].shape == (500, 1)
    assert (actions["a"] < 2).all() and set(actions["b"].unique().tolist()) == {0, 2}
    assert torch.equal(algo.policy.norm.norm.running_mean, running)  # acting uses the running statistics
    greedy = algo.act(obs, {}, explore=False, action_mask=mask)
    algo.policy.eval()
    logits = algo.policy(algo.joint_obs(obs))
    assert torch.equal(greedy["a"], logits[:, :2, :2].argmax(-1))
    # The first layer of an agent with a smaller observation ignores the padded columns.
    assert (algo.policy.net.net[0].weight[:2, 3:] == 0).all()


@pytest.mark.parametrize("env_name, parameter_sharing", [("rover_tower", False), ("treasure", False),
                                                         ("spread", False), ("spread", True)])
def test_update_on_a_real_env_moves_every_parameter(env_name, parameter_sharing):
    env = vimarl.make_env(env_name, 4)
    algo = vimarl.make_algo("maac", env, parameter_sharing=parameter_sharing)
    codec, buffer = fill_replay(env, algo, 20, capacity=1000)
    assert algo.reward_count.tolist() == [80.0] * algo.n_agents  # fill_replay, as the trainer, calls observe
    before = {k: v.clone() for k, v in algo.named_parameters()}
    metrics = algo.update(codec.decode(buffer.sample(32)))
    assert set(metrics) == {"loss_q", "attention_reg", "loss_policy", "entropy"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in metrics.values())
    unmoved = [k for k, v in algo.named_parameters() if torch.equal(v, before[k])]
    assert not unmoved


@pytest.mark.learning
@pytest.mark.parametrize("algo", ["maac", "mamd", "mamt"])
def test_maac_family_learns_spread_n2(algo, tmp_path, report):
    # 004's Spread (N = 2) at a small budget: 1,000 updates of batch 128 (one every 2 env steps), tau 0.01 (the
    # reference's 0.001 barely moves the targets in that many updates); everything else the algorithm's defaults.
    out = vimarl.train(algo, "spread_n2", out=str(tmp_path / "run"), total_steps=3_000, num_envs=8,
                       warmup_steps=1_000, update_every=2, gradient_steps=1, batch_size=128, eval_every=1_000,
                       eval_episodes=20, progress=False, tensorboard=False, algo_config={"tau": 0.01})
    returns = [row["eval_return_mean"] for row in read_metrics(out / "metrics.csv")]
    report(f"spread N=2, 3k env steps, seed 0: {algo} {returns[-1]:.1f} (curve {[round(r, 1) for r in returns]})")
    assert returns[-1] >= returns[0] + 20
