"""VM3-AC's App. A toy: the environment, the linear policy of Eq. 16-17, and the learned W of Fig. 9-10."""

import pytest
import torch

import vimarl
from vimarl.envs.toy.two_agents_meet import AppendixAPolicy, TwoAgentsMeetConfig, learn_meeting_weights, play


def test_displacements_move_the_agents_and_the_reward_is_minus_their_distance():
    env = vimarl.make_env("two_agents_meet", 2)
    step = env.reset(seed=0)
    assert step.groups["agents"].obs[0].tolist() == [[-1.0, 1.0], [1.0, 1.0]]
    step = env.step({"agents": torch.tensor([[[0.5, 0.0], [-0.2, 0.4]], [[0.0, 0.0], [0.0, 0.0]]])})
    assert torch.allclose(step.groups["agents"].obs[0], torch.tensor([[-0.5, 1.0], [0.8, 1.4]]))
    expected = -(1.3 ** 2 + 0.4 ** 2) ** 0.5
    assert step.groups["agents"].reward[0].tolist() == pytest.approx([expected, expected])
    assert step.groups["agents"].reward[1].tolist() == pytest.approx([-2.0, -2.0])
    assert not step.done.any()


def test_the_episode_ends_when_the_agents_meet_or_at_the_time_limit():
    env = vimarl.make_env("two_agents_meet", 2, episode_length=3)
    env.reset(seed=0)
    meet = torch.tensor([[[0.9, 0.0], [-0.9, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])  # 0.2 < 0.25 apart
    step = env.step({"agents": meet})
    assert step.terminated.tolist() == [True, False]
    assert torch.allclose(step.info["final_obs"]["agents"][0], torch.tensor([[-0.1, 1.0], [0.1, 1.0]]))
    assert step.groups["agents"].obs[0].tolist() == [[-1.0, 1.0], [1.0, 1.0]]  # auto-reset
    for _ in range(2):
        step = env.step({"agents": torch.zeros(2, 2, 2)})
    assert step.truncated.tolist() == [False, True]


def test_policy_is_eq_16_17_with_a_common_z():
    policy = AppendixAPolicy()
    with torch.no_grad():
        policy.W[0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        policy.W[1] = torch.tensor([[-1.0, 0.0], [0.0, 0.5]])
    obs = torch.tensor([[[-1.0, 2.0], [1.0, 3.0]]])
    z = torch.tensor([[0.1, 0.05]])
    action = policy(obs, z, noise=False)
    # [[0, 0], [0, 0.1]] o^i + W^i z
    assert torch.allclose(action[0], torch.tensor([[0.2, 0.2 + 0.5], [-0.1, 0.3 + 0.025]]))
    z = AppendixAPolicy.sample_z(1000, torch.Generator().manual_seed(0))
    assert 0.0 <= z.min() and z.max() <= 0.1 and z.mean().item() == pytest.approx(0.05, abs=0.005)


def test_greedy_learning_of_w_reproduces_fig_9_and_10():
    """App. A: w^1_11, w^1_12 become positive (agent 1 moves right with z), agent 2's mirror them, the
    vertical rows stay small, and the agents meet with z sampled and with z = E[z] (Fig. 10 a, b)."""
    config = TwoAgentsMeetConfig()
    policy, history = learn_meeting_weights(steps=3000, seed=0, config=config)
    W = policy.W.detach()
    assert (W[0, 0] > 0.3).all() and (W[1, 0] < -0.3).all()
    assert W[:, 1].abs().max() < 0.05
    assert history[0, 0, 0].abs().max() < 0.01 and (history[-1] == W).all()  # the curve starts at W = 0
    for z_mean in (False, True):
        for seed in range(3):
            path = play(policy, z_mean, config, seed)
            distance = (path[-1, 0] - path[-1, 1]).norm()
            assert len(path) - 1 < config.episode_length and distance < config.meet_distance
            assert path[-1, :, 1].min() > 1.0  # they went upward
    # Without the z part (W = 0) the agents only drift upward and never meet.
    path = play(AppendixAPolicy(), z_mean=True, config=config)
    assert len(path) - 1 == config.episode_length and (path[-1, 0] - path[-1, 1]).norm() == pytest.approx(2.0)
