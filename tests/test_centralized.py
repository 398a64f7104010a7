"""Centralised critics over several groups: the joint input by hand, and MA-SAC / MADDPG on
environments with two learned groups (speaker_listener, hetero_nav by type)."""

import copy

import pytest
import torch

import vimarl
from vimarl.nn.centralized import AgentMLP, CentralQ, flatten_agents, joint_input, own_segments
from vimarl.nn.distributions import action_features
from vimarl.train import act, fill_replay

B = 4
# Two groups: 2 agents with 2 obs / 2 action features, then 1 agent with 3 obs / 3 action features.
SIZES = [(2, 2, 2), (1, 3, 3)]


def two_groups(requires_grad=False):
    torch.manual_seed(0)
    obs = [torch.randn(B, n, o) for n, o, _ in SIZES]
    actions = [torch.randn(B, n, a, requires_grad=requires_grad) for n, _, a in SIZES]
    return obs, actions


def test_multi_group_joint_input_by_hand():
    obs, actions = two_groups()
    rows = joint_input(obs, actions)
    (o1, o2), (a1, a2) = obs, actions
    for b in range(B):
        expected = torch.cat([o1[b, 0], o1[b, 1], o2[b, 0], a1[b, 0], a1[b, 1], a2[b, 0]])
        assert expected.shape == (2 * 2 + 3 + 2 * 2 + 3,)
        assert rows.shape == (B, 3, expected.shape[0])
        for i in range(3):  # every controlled agent, group order, gets the same row
            assert torch.equal(rows[b, i], expected)
    mask = own_segments(actions)
    assert mask.tolist() == [[True, True, False, False, False, False, False],
                             [False, False, True, True, False, False, False],
                             [False, False, False, False, True, True, True]]
    assert torch.equal(flatten_agents(actions)[:, 4:], a2[:, 0])


def test_single_group_matches_the_one_group_layout():
    obs, actions = torch.randn(B, 3, 2), torch.randn(B, 3, 4, requires_grad=True)
    expected = torch.cat([obs.flatten(1), actions.flatten(1)], -1).unsqueeze(1).expand(B, 3, -1)
    for own in (False, True):
        assert torch.equal(joint_input(obs, actions, own), expected)
        assert torch.equal(joint_input([obs], [actions], own), expected)


def test_own_action_gradient_goes_to_each_row_from_its_own_agent_only():
    obs, actions = two_groups(requires_grad=True)
    owners = [(0, 0), (0, 1), (1, 0)]  # (group, agent) of rows 0, 1, 2
    for own_only in (False, True):
        rows = joint_input(obs, actions, own_action_gradient_only=own_only)
        assert torch.equal(rows, joint_input(obs, [a.detach() for a in actions]))  # values unchanged
        weights = torch.randn_like(rows)
        for i in range(3):
            grads = torch.autograd.grad((rows[:, i] * weights[:, i]).sum(), actions, retain_graph=True)
            for g, grad in enumerate(grads):
                for j in range(grad.shape[1]):
                    reached = grad[:, j].abs().sum() > 0
                    assert reached == (not own_only or owners[i] == (g, j)), (own_only, i, g, j)


def test_own_actions_replace_only_each_rows_own_segment():
    obs, actions = two_groups()
    fresh = [torch.randn_like(a) for a in actions]
    rows = joint_input(obs, actions, own_actions=fresh)[..., 2 * 2 + 3:]
    (a1, a2), (f1, f2) = actions, fresh
    assert torch.equal(rows[:, 0], torch.cat([f1[:, 0], a1[:, 1], a2[:, 0]], -1))
    assert torch.equal(rows[:, 1], torch.cat([a1[:, 0], f1[:, 1], a2[:, 0]], -1))
    assert torch.equal(rows[:, 2], torch.cat([a1[:, 0], a1[:, 1], f2[:, 0]], -1))


def test_central_q_has_a_row_per_controlled_agent():
    env = vimarl.make_env("speaker_listener", 2)
    for shared in (False, True):
        critics = CentralQ(env.groups, (8, 8), shared, twins=2)
        assert critics.q[0].n_agents == 2 and len(critics.q) == 2
        x = torch.randn(5, 2, 3 + 11 + 3 + 5)
        assert critics.min_value(x).shape == (5, 2)


ENVS = [("speaker_listener", {}), ("hetero_nav", dict(n_agents=8, groups="by_type"))]


@pytest.mark.parametrize("name", ["masac", "maddpg", "maddpg_s"])
@pytest.mark.parametrize("env_name, env_kwargs", ENVS)
@pytest.mark.parametrize("sharing", [False, True])
def test_centralised_critics_span_every_group(name, env_name, env_kwargs, sharing):
    torch.manual_seed(0)
    env = vimarl.make_env(env_name, 4, **env_kwargs)
    assert len(env.groups) == 2
    algo = vimarl.make_algo(name, env, parameter_sharing=sharing)
    n_total = sum(spec.n_agents for spec in env.groups.values())
    assert algo.critics.q[0].n_agents == n_total
    step = env.reset(seed=0)
    for explore in (True, False):
        actions = act(algo, step, explore=explore)
        assert set(actions) == set(env.groups)
        for g, spec in env.groups.items():
            assert actions[g].shape[:2] == (4, spec.n_agents)

    codec, buffer = fill_replay(env, algo, 20, capacity=1000)
    batch = codec.decode(buffer.sample(16))
    before = copy.deepcopy(algo.state_dict())
    metrics = algo.update(batch)
    assert all(torch.isfinite(v) for v in metrics.values())
    after = algo.state_dict()
    changed = {k for k, v in after.items() if isinstance(v, torch.Tensor) and not torch.equal(v, before[k])}
    for g in env.groups:
        assert any(k.startswith(f"policy.{g}.") for k in changed), g
    assert any(k.startswith("critics.q.") for k in changed)
    assert any(k.startswith("critics.target_q.") for k in changed)

    # The last agent's critic (the listener, or a small agent) reads the first group's observations.
    first, last = list(env.groups)
    obs = [batch.obs[g] for g in env.groups]
    stored = [action_features(batch.action[g], spec.action_space) for g, spec in env.groups.items()]
    perturbed = [obs[0] + torch.randn_like(obs[0]), obs[1]]
    with torch.no_grad():
        q = algo.critics.values(joint_input(obs, stored))[0]
        q_perturbed = algo.critics.values(joint_input(perturbed, stored))[0]
    assert q.shape == (16, n_total)
    assert not torch.allclose(q[:, -1], q_perturbed[:, -1])
    # ... and the first group's actions
    moved = [stored[0].flip(0), stored[1]]
    with torch.no_grad():
        q_moved = algo.critics.values(joint_input(obs, moved))[0]
    assert not torch.allclose(q[:, -1], q_moved[:, -1])


@pytest.mark.parametrize("shared", [False, True])
def test_forward_parts_equals_the_forward_of_the_concatenation(shared):
    torch.manual_seed(0)
    net = AgentMLP(3, 4 + 2, (8,), 5, shared)
    wide, shared_part = torch.randn(6, 7, 3, 4), torch.randn(7, 3, 2)  # the second part broadcasts over 6 rows
    expected = net(torch.cat([wide, shared_part.expand(6, 7, 3, 2)], dim=-1))
    assert torch.allclose(net.forward_parts([wide, shared_part]), expected, atol=1e-6)
