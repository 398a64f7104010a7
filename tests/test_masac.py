"""MA-SAC (003): Eq. 7 target, Eq. 9 actor loss, twin minimum, alpha, Gumbel-softmax, sharing, learning."""

import math

import pytest
import torch

import vimarl
from vimarl.algos.masac import MASAC, MASACConfig
from vimarl.buffer import Transition
from vimarl.envs.base import Discrete, GroupSpec
from vimarl.nn.centralized import joint_input
from vimarl.nn.distributions import Categorical
from vimarl.train import act, fill_replay


N, OBS = 2, 1
SPEC = {"agents": GroupSpec(n_agents=N, obs_dim=OBS, action_space=Discrete(2))}


def tiny(**config) -> MASAC:
    """Two agents, one observation feature, two actions, 2-unit hidden layers, own networks."""
    return MASAC(SPEC, 0, MASACConfig(hidden_dim=2, **config))


def batch_of(b: int, terminated=None) -> Transition:
    g = "agents"
    return Transition(obs={g: torch.randn(b, N, OBS)}, graph={g: None}, action_mask={g: None}, state=None,
                      action={g: torch.randint(2, (b, N))}, reward={g: torch.randn(b, N)},
                      next_obs={g: torch.randn(b, N, OBS)}, next_graph={g: None}, next_action_mask={g: None},
                      next_state=None,
                      terminated=torch.zeros(b) if terminated is None else terminated)


@torch.no_grad()
def set_q(twin, slot: int, w, b):
    """Q_i(x, a) = w_i (h + 0.5) + b_i with h the joint-input feature `slot` (through both ReLU layers)."""
    layers = [m for m in twin.net if hasattr(m, "weight")]
    for layer in layers:
        layer.weight.zero_()
        layer.bias.zero_()
    layers[0].weight[:, slot, 0] = 1.0
    layers[0].bias[:, 0] = 0.5  # keeps the ReLU active (a gradient for every one-hot value)
    layers[1].weight[:, 0, 0] = 1.0
    layers[2].weight[:, 0, 0] = torch.tensor(w)
    layers[2].bias[:, 0] = torch.tensor(b)


@torch.no_grad()
def set_logits(policy, logits):
    layers = [m for m in policy.net.net if hasattr(m, "weight")]
    for layer in layers:
        layer.weight.zero_()
        layer.bias.zero_()
    layers[-1].bias.copy_(torch.tensor(logits))


# Joint input of N = 2, OBS = 1, two actions: [o_1, o_2, a_1 (2), a_2 (2)].
A1_IS_1, A2_IS_1 = 3, 5
TWIN1 = ([1.0, 2.0], [0.0, 0.5])
TWIN2 = ([3.0, 1.0], [-2.0, 1.0])


def hand_q(w, b, a):
    return w * (a + 0.5) + b


def test_q_target_is_eq7_with_target_policies_and_twin_minimum():
    algo = tiny(gamma=0.9, alpha=0.1)
    critics = algo.critics
    set_q(critics.target_q[0], A1_IS_1, *TWIN1)  # both agents' target Q read agent 1's action
    set_q(critics.target_q[1], A1_IS_1, *TWIN2)
    set_logits(algo.target_policy["agents"], [[0.0, math.log(3.0)], [0.0, 0.0]])  # p_1 = (1/4, 3/4), p_2 = (1/2, 1/2)
    batch = batch_of(64, terminated=(torch.arange(64) % 4 == 0).float())

    torch.manual_seed(3)
    a1 = algo.target_policy["agents"](batch.next_obs["agents"]).sample().action[:, 0].float()
    torch.manual_seed(3)
    y = algo.q_target(batch)
    assert 0 < a1.sum() < 64  # both of agent 1's actions occur

    log_pi = torch.tensor([0.25 * math.log(0.25) + 0.75 * math.log(0.75), math.log(0.5)])  # E[log pi_i]
    for i in range(N):
        q1 = hand_q(TWIN1[0][i], TWIN1[1][i], a1)
        q2 = hand_q(TWIN2[0][i], TWIN2[1][i], a1)
        soft_v = torch.minimum(q1, q2) - 0.1 * log_pi[i]
        expected = batch.reward["agents"][:, i] + 0.9 * (1 - batch.terminated) * soft_v
        assert torch.allclose(y[:, i], expected, atol=1e-6)
    # The twins really disagree and the minimum picks each of them somewhere.
    assert (hand_q(1.0, 0.0, a1) < hand_q(3.0, -2.0, a1)).any() and (hand_q(1.0, 0.0, a1) > hand_q(3.0, -2.0, a1)).any()

    # The current policy (untouched random init) is not what samples a' by default; next_actions="current" uses it.
    torch.manual_seed(3)
    algo.config.next_actions = "current"
    assert not torch.allclose(algo.q_target(batch), y)


def test_q_loss_is_eq8_for_both_twins_on_the_stored_joint_action():
    algo = tiny(gamma=0.9)
    batch = batch_of(16)
    torch.manual_seed(5)
    y = algo.q_target(batch)
    stored = torch.nn.functional.one_hot(batch.action["agents"], 2).float()
    inputs = joint_input(batch.obs["agents"], stored)
    with torch.no_grad():
        expected = sum((q(inputs).squeeze(-1) - y).square().mean() for q in algo.critics.q)
    torch.manual_seed(5)
    assert torch.allclose(algo.q_loss(batch), expected, atol=1e-6)


def test_actor_loss_is_eq9_with_current_actions_of_all_agents_and_twin_minimum():
    algo = tiny(alpha=0.2)
    critics = algo.critics
    set_q(critics.q[0], A2_IS_1, *TWIN1)  # both Q_i read agent 2's action
    set_q(critics.q[1], A2_IS_1, *TWIN2)
    batch = batch_of(64)
    batch.action["agents"].zero_()  # replay actions all 0: a loss that used them would differ
    torch.manual_seed(7)
    distribution = algo.policy["agents"](batch.obs["agents"])
    sample = distribution.sample()
    a2 = sample.action[:, 1].float()
    assert 0 < a2.sum() < 64
    with torch.no_grad():
        q_min = torch.stack([torch.minimum(hand_q(TWIN1[0][i], TWIN1[1][i], a2), hand_q(TWIN2[0][i], TWIN2[1][i], a2))
                             for i in range(N)], dim=-1)
        q_first = torch.stack([hand_q(TWIN1[0][i], TWIN1[1][i], a2) for i in range(N)], dim=-1)
        log_pi = -distribution.entropy()
        expected = (0.2 * log_pi - q_min).mean()
    torch.manual_seed(7)
    loss, entropy = algo.policy_loss(batch)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert not torch.allclose(loss, (0.2 * log_pi - q_first).mean(), atol=1e-3)
    assert torch.allclose(entropy, -log_pi.mean(), atol=1e-6)


def test_losses_are_linear_in_alpha():
    algo = tiny()
    batch = batch_of(32)
    values = []
    for alpha in (0.1, 0.2, 0.4):
        algo.alpha("agents").fill_(alpha)
        torch.manual_seed(11)
        y = algo.q_target(batch)
        torch.manual_seed(11)
        loss, _ = algo.policy_loss(batch)
        values.append((y, loss.detach()))
    (y1, l1), (y2, l2), (y4, l4) = values
    assert torch.allclose(y4 - y1, 3 * (y2 - y1), atol=1e-5) and not torch.allclose(y2, y1)
    assert torch.allclose(l4 - l1, 3 * (l2 - l1), atol=1e-5) and not torch.allclose(l2, l1)


@pytest.mark.parametrize("others_action_gradient", [False, True])
def test_actor_gradient_reaches_other_agents_only_when_switched_on(others_action_gradient):
    algo = tiny(alpha=0.0, others_action_gradient=others_action_gradient)
    critics = algo.critics
    # Q_1 is constant, Q_2 reads agent 1's action: agent 1's policy can learn only through Q_2.
    for twin, (w, b) in zip(critics.q, (TWIN1, TWIN2)):
        set_q(twin, A1_IS_1, [0.0, w[1]], b)
    loss, _ = algo.policy_loss(batch_of(64))
    loss.backward()
    grad = algo.policy["agents"].net.net[0].weight.grad  # [N, obs, hidden]
    assert torch.isfinite(grad).all()
    assert (grad[0].abs().sum() > 0) == others_action_gradient
    assert grad[1].abs().sum() == 0  # agent 2's action enters no Q_i
    # The critics are frozen during the actor loss.
    assert all(p.grad is None for p in critics.parameters())


def test_gumbel_softmax_gradients_are_finite_and_reach_the_logits():
    logits = torch.randn(64, 3, 5, requires_grad=True)
    sample = Categorical(logits).sample()
    assert torch.equal(sample.critic_input, torch.nn.functional.one_hot(sample.action, 5).float())
    (sample.critic_input * torch.randn(5)).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("parameter_sharing", [False, True])
def test_deterministic_act_is_the_most_probable_action_and_update_runs(parameter_sharing):
    env = vimarl.make_env("spread", 4)
    algo = vimarl.make_algo("masac", env, parameter_sharing=parameter_sharing)
    step = env.reset(seed=0)
    obs = step.groups["agents"].obs
    greedy = act(algo, step, explore=False)["agents"]
    assert torch.equal(greedy, algo.policy["agents"](obs).logits.argmax(-1))
    codec, buffer = fill_replay(env, algo, 20, capacity=1000)
    metrics = algo.update(codec.decode(buffer.sample(32)))
    assert all(torch.isfinite(v) for v in metrics.values())


def test_shared_networks_tell_agents_apart_by_id():
    algo = MASAC(SPEC, 0, MASACConfig(parameter_sharing=True))
    obs = torch.ones(1, N, OBS)  # identical observations
    logits = algo.policy["agents"](obs).logits
    assert not torch.allclose(logits[0, 0], logits[0, 1])
    q = algo.critics.min_value(joint_input(obs, torch.ones(1, N, 2)))
    assert not torch.allclose(q[0, 0], q[0, 1])
    assert sum(p.numel() for p in algo.policy.parameters()) < sum(
        p.numel() for p in MASAC(SPEC, 0, MASACConfig()).policy.parameters())


def test_target_networks_follow_polyak():
    algo = tiny(tau=0.25)
    target_policy = {k: v.clone() for k, v in algo.target_policy.state_dict().items()}
    target_q = {k: v.clone() for k, v in algo.critics.target_q.state_dict().items()}
    algo.update(batch_of(16))
    for name, old in target_policy.items():
        expected = 0.75 * old + 0.25 * algo.policy.state_dict()[name]
        assert torch.allclose(algo.target_policy.state_dict()[name], expected, atol=1e-6)
    for name, old in target_q.items():
        expected = 0.75 * old + 0.25 * algo.critics.q.state_dict()[name]
        assert torch.allclose(algo.critics.target_q.state_dict()[name], expected, atol=1e-6)
