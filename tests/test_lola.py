"""LOLA-PG: trace bookkeeping, the bootstrapped Monte Carlo advantage, the plain policy gradient, the
exact opponent-learning correction (against the closed form of a one-step matrix game and finite
differences of the opponent's update), N = 3 and Box actions, a checkpoint round trip, and learning
on spread_n2."""

import io

import pytest
import torch
from torch.func import functional_call

import vimarl
from vimarl.algos.base import UniformPolicy
from vimarl.algos.lola import (
    LOLA,
    LOLAConfig,
    segment_starts,
    trace_cumsum,
    trace_positions,
)
from vimarl.buffer import Transition
from vimarl.envs.base import Box, Discrete, GroupSpec
from vimarl.errors import VimarlError
from vimarl.logging import read_metrics
from vimarl.train import FINAL_EVAL_SEED, evaluate, fill_replay

G = "agents"


def rollout(obs, actions, rewards, terminated, truncated=None) -> Transition:
    """A time-major rollout (row t * B + b) of one group; next_obs = obs (the tests' values ignore it)."""
    obs = torch.as_tensor(obs)
    rows = obs.shape[0]
    return Transition(obs={G: obs}, graph={G: None}, action_mask={G: None}, state=None,
                      action={G: torch.as_tensor(actions)}, reward={G: torch.as_tensor(rewards, dtype=obs.dtype)},
                      next_obs={G: obs}, next_graph={G: None}, next_action_mask={G: None}, next_state=None,
                      terminated=torch.as_tensor(terminated, dtype=torch.float32),
                      truncated=torch.zeros(rows) if truncated is None else torch.as_tensor(truncated, dtype=torch.float32))


def test_traces_restart_where_episodes_end():
    # T = 4, B = 2: env 0 ends an episode after step 1, env 1 after step 2 (by time limit)
    batch = rollout(torch.zeros(8, 1, 1), torch.zeros(8, 1, dtype=torch.int64), torch.zeros(8, 1),
                    terminated=[0, 0, 1, 0, 0, 0, 0, 0], truncated=[0, 0, 0, 0, 0, 1, 0, 0])
    starts = segment_starts(batch, 4)
    assert starts.tolist() == [[True, True], [False, False], [True, False], [False, True]]
    first, age = trace_positions(starts)
    assert first.tolist() == [[0, 0], [0, 0], [2, 0], [2, 3]]
    assert age.tolist() == [[0, 0], [1, 1], [0, 2], [1, 0]]
    values = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]]).unsqueeze(-1)
    sums = trace_cumsum(values, first).squeeze(-1)
    assert sums.tolist() == [[1.0, 10.0], [3.0, 30.0], [3.0, 60.0], [7.0, 40.0]]


def test_advantage_is_the_bootstrapped_monte_carlo_return():
    """lambda = 1: A_t = sum_k gamma^k r_t+k + gamma^(T-t) V(s_T) - V(s_t) to the trace's end (LOLA's target)."""
    spec = {G: GroupSpec(n_agents=2, obs_dim=1, action_space=Discrete(2))}
    algo = LOLA(spec, 0, LOLAConfig(rollout_length=3, gamma=0.5))
    rewards = [[1.0, 2.0], [0.0, 4.0], [3.0, 0.0]]
    batch = rollout(torch.zeros(3, 2, 1), torch.zeros(3, 2, dtype=torch.int64), rewards, terminated=[0, 0, 0])
    values = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.5, 2.0]])
    next_values = torch.tensor([[2.0, 1.0], [0.5, 2.0], [4.0, 8.0]])
    got = algo.advantages(batch, values, next_values)
    # agent 0: returns 1 + .5*0 + .25*3 + .125*4 = 2.25, 0 + .5*3 + .25*4 = 2.5, 3 + .5*4 = 5
    # agent 1: 2 + .5*4 + 0 + .125*8 = 5, 4 + 0 + .25*8 = 6, 0 + .5*8 = 4
    expected = torch.tensor([[2.25 - 1.0, 5.0 - 0.0], [2.5 - 2.0, 6.0 - 1.0], [5.0 - 0.5, 4.0 - 2.0]])
    assert torch.allclose(got, expected)


def tiny_lola(n_agents=2, obs_dim=1, actions=2, hidden=3, **config) -> LOLA:
    spec = {G: GroupSpec(n_agents=n_agents, obs_dim=obs_dim, action_space=Discrete(actions))}
    return LOLA(spec, 0, LOLAConfig(hidden_dim=hidden, **config)).double()


def agent_slice(tensors, i):
    return torch.cat([t[i].flatten() for t in tensors])


def test_plain_gradient_term_is_the_likelihood_ratio_sum():
    """grad_i V^i = 1/B sum_t gamma^t A^i_t grad_i log pi_i(a^i_t), term by term (T = 2, B = 2)."""
    algo = tiny_lola(obs_dim=2, actions=3, rollout_length=2, gamma=0.5, eta=0.0)
    obs = torch.randn(4, 2, 2, dtype=torch.float64)
    actions = torch.tensor([[0, 2], [1, 1], [2, 0], [0, 1]])
    batch = rollout(obs, actions, torch.zeros(4, 2), terminated=[0, 1, 0, 0])  # env 1 restarts at t = 1
    advantages = torch.tensor([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.25], [2.0, 1.0]], dtype=torch.float64)
    own, correction = algo.directions(batch, advantages)
    assert all(c.abs().max() == 0 for c in correction)
    params = list(algo.policy[G].parameters())
    weights = [1.0, 1.0, 0.5, 1.0]  # gamma^age: row 3 (t = 1 of env 1) starts a new trace
    for i in range(2):
        expected = sum(weights[row] * advantages[row, i] / 2 *
                       agent_slice(torch.autograd.grad(algo.policy[G](obs[row:row + 1]).log_prob(actions[row:row + 1])[0, i],
                                                       params), i) for row in range(4))
        assert torch.allclose(agent_slice(own, i), expected)


# A one-step general-sum matrix game with policies set to pi_1 = (3/4, 1/4), pi_2 = (1/4, 3/4): the 16
# episodes hold each joint action as often as its probability says, so the sample estimators of
# LOLA-PG equal their expectations and the update must equal the closed form of exact LOLA.
PAYOFF = torch.tensor([[[3.0, -1.0], [2.0, 0.5]], [[1.0, 4.0], [-2.0, 1.5]]], dtype=torch.float64)  # [agent, a1, a2]
PROBS = torch.tensor([[0.75, 0.25], [0.25, 0.75]], dtype=torch.float64)


def matrix_game():
    algo = tiny_lola(rollout_length=1, gamma=0.9, eta=0.3)
    net = algo.policy[G]
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.7)
        last = net.net.net[-1]
        logits = net.net(torch.zeros(1, 2, 1, dtype=torch.float64))[0]  # [N, A]
        last.bias += PROBS.log() - logits
    counts = (PROBS[0].unsqueeze(1) * PROBS[1].unsqueeze(0) * 16).round().long()  # [a1, a2]
    joint = [(a1, a2) for a1 in range(2) for a2 in range(2) for _ in range(counts[a1, a2])]
    actions = torch.tensor(joint)
    rewards = PAYOFF[:, actions[:, 0], actions[:, 1]].T
    batch = rollout(torch.zeros(16, 2, 1, dtype=torch.float64), actions, rewards, terminated=[1] * 16)
    return algo, batch


def closed_form_values(algo, first_params, second_params):
    """V^1, V^2 of the matrix game, agent 1's policy from `first_params`, agent 2's from `second_params`."""
    obs = torch.zeros(1, 2, 1, dtype=torch.float64)
    pi_1 = functional_call(algo.policy[G], first_params, (obs,)).log_probs[0, 0].exp()
    pi_2 = functional_call(algo.policy[G], second_params, (obs,)).log_probs[0, 1].exp()
    joint = pi_1.unsqueeze(1) * pi_2.unsqueeze(0)
    return (joint * PAYOFF[0]).sum(), (joint * PAYOFF[1]).sum()


def test_lola_equals_exact_lola_on_a_matrix_game():
    algo, batch = matrix_game()
    with torch.no_grad():
        advantages = algo.advantages(batch, algo.values(batch.obs), algo.values(batch.next_obs))
    own, correction = algo.directions(batch, advantages)
    first = {n: p.detach().clone().requires_grad_() for n, p in algo.policy[G].named_parameters()}
    second = {n: p.detach().clone().requires_grad_() for n, p in algo.policy[G].named_parameters()}
    v1, v2 = closed_form_values(algo, first, second)
    grad_1_v1 = torch.autograd.grad(v1, list(first.values()), retain_graph=True)
    grad_2_v2 = torch.autograd.grad(v2, list(second.values()), retain_graph=True, create_graph=True)
    grad_2_v1 = torch.autograd.grad(v1, list(second.values()), retain_graph=True)
    grad_1_v2 = torch.autograd.grad(v2, list(first.values()), retain_graph=True, create_graph=True)
    assert torch.allclose(agent_slice(own, 0), agent_slice(grad_1_v1, 0))
    assert torch.allclose(agent_slice(own, 1), agent_slice(torch.autograd.grad(v2, list(second.values()),
                                                                               retain_graph=True), 1))
    # agent 1: grad_1 [(grad_2 V^1)^T grad_2 V^2]; agent 2: grad_2 [(grad_1 V^2)^T grad_1 V^1]
    shaping_1 = sum((a.detach() * b).sum() for a, b in zip(grad_2_v1, grad_2_v2))
    exact_1 = agent_slice(torch.autograd.grad(shaping_1, list(first.values()), retain_graph=True), 0)
    grad_1_v1_graph = torch.autograd.grad(v1, list(first.values()), retain_graph=True, create_graph=True)
    shaping_2 = sum((a.detach() * b).sum() for a, b in zip(grad_1_v2, grad_1_v1_graph))
    exact_2 = agent_slice(torch.autograd.grad(shaping_2, list(second.values())), 1)
    assert exact_1.abs().max() > 1e-3 and exact_2.abs().max() > 1e-3  # the test case has a real correction
    assert torch.allclose(agent_slice(correction, 0), exact_1, atol=1e-10)
    assert torch.allclose(agent_slice(correction, 1), exact_2, atol=1e-10)


def test_correction_matches_finite_differences_of_the_opponent_update():
    """Agent 1's correction = d/d theta_1 of (grad_2 V^1)^T Delta theta_2(theta_1), the opponent's naive
    step on V^2 taken by first-order autograd at theta_1 +- h e_k (central differences)."""
    algo, batch = matrix_game()
    with torch.no_grad():
        advantages = algo.advantages(batch, algo.values(batch.obs), algo.values(batch.next_obs))
    _, correction = algo.directions(batch, advantages)
    params = {n: p.detach().clone() for n, p in algo.policy[G].named_parameters()}
    second = {n: p.clone().requires_grad_() for n, p in params.items()}
    v1, _ = closed_form_values(algo, params, second)
    grad_2_v1 = torch.autograd.grad(v1, list(second.values()))

    def shaping(first):
        second = {n: p.clone().requires_grad_() for n, p in params.items()}
        _, v2 = closed_form_values(algo, first, second)
        opponent_step = torch.autograd.grad(v2, list(second.values()))
        return sum((a * b).sum() for a, b in zip(grad_2_v1, opponent_step))

    h, differences = 1e-5, []
    for name, p in params.items():
        for k in range(p[0].numel()):
            plus = {n: q.clone() for n, q in params.items()}
            minus = {n: q.clone() for n, q in params.items()}
            plus[name][0].view(-1)[k] += h
            minus[name][0].view(-1)[k] -= h
            differences.append((shaping(plus) - shaping(minus)) / (2 * h))
    assert torch.allclose(agent_slice(correction, 0), torch.stack(differences), atol=1e-7)


def test_update_steps_along_gradient_plus_eta_correction():
    algo, batch = matrix_game()
    with torch.no_grad():
        advantages = algo.advantages(batch, algo.values(batch.obs), algo.values(batch.next_obs))
    own, correction = algo.directions(batch, advantages)
    before = [p.detach().clone() for p in algo.policy.parameters()]
    algo.update(batch)
    for b, p, g, c in zip(before, algo.policy.parameters(), own, correction):
        assert torch.allclose(p.detach(), b + algo.config.lr * (g + 0.3 * c))


def test_three_agents_box_actions_and_refusals():
    spec = {G: GroupSpec(n_agents=3, obs_dim=2, action_space=Box(-1.0, 1.0, 2))}
    algo = LOLA(spec, 0, LOLAConfig(rollout_length=2, hidden_dim=4, eta=0.5))
    obs = torch.randn(4, 3, 2)
    actions = algo.act({G: obs}, {G: None}, explore=True)[G]
    batch = rollout(obs, actions, torch.randn(4, 3), terminated=[0, 0, 0, 1])
    _, correction = algo.directions(batch, torch.randn(4, 3))
    assert all(torch.isfinite(c).all() for c in correction)
    assert all(c[i].abs().sum() > 0 for c in correction[-1:] for i in range(3))  # every agent is shaped
    metrics = algo.update(batch)
    assert all(torch.isfinite(v) for v in metrics.values())
    with pytest.raises(VimarlError, match="at least 2 agents"):
        LOLA({G: GroupSpec(n_agents=1, obs_dim=2, action_space=Discrete(2))}, 0, LOLAConfig())


def test_checkpoint_round_trip_gives_identical_actions_and_updates():
    env = vimarl.make_env("spread_n2", 4)
    algo = vimarl.make_algo("lola", env, rollout_length=5, optimizer="adam", critic_steps=2)
    codec, buffer = fill_replay(env, algo, 5)
    batch = codec.decode(buffer.ordered())
    algo.update(batch)  # the Adam moments are part of the state
    saved = io.BytesIO()
    torch.save(algo.state_dict(), saved)
    saved.seek(0)
    copy = vimarl.make_algo("lola", env, rollout_length=5, optimizer="adam", critic_steps=2)
    copy.load_state_dict(torch.load(saved, weights_only=False))
    obs = {G: batch.obs[G][:4]}
    assert torch.equal(algo.act(obs, {G: None}, explore=False)[G], copy.act(obs, {G: None}, explore=False)[G])
    first, second = algo.update(batch), copy.update(batch)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert all(torch.equal(a, b) for a, b in zip(algo.state_dict().values(), copy.state_dict().values())
               if isinstance(a, torch.Tensor))


@pytest.mark.learning
def test_lola_beats_random_on_spread_n2(tmp_path, report):
    env = vimarl.make_env("spread_n2", 100)
    random_return = float(evaluate(UniformPolicy(env.groups), env, seed=FINAL_EVAL_SEED)[G].mean())
    # Budget knobs only: 40k env steps in 200 rollouts of 8 episodes; 5 value steps per rollout.
    out = vimarl.train("lola", "spread_n2", out=str(tmp_path / "run"), total_steps=40_000, num_envs=8,
                       eval_every=10_000, eval_episodes=20, progress=False, tensorboard=False,
                       algo_config={"critic_steps": 5})
    rows = read_metrics(out / "metrics.csv")
    returns = [row["eval_return_mean"] for row in rows]
    report(f"spread N=2, 40k env steps, seed 0, final deterministic eval over 100 episodes: lola "
           f"{returns[-1]:.1f} (curve {[round(r, 1) for r in returns]}), uniform random {random_return:.1f}")
    assert rows[-1]["correction_norm"] > 0  # the LOLA term was on
    assert returns[-1] >= random_return + 5
