"""COMA (Foerster et al. 2018, pymarl's coma_learner): TD(lambda) targets on hand-computed rollouts,
the counterfactual baseline of Eq. 4, the critic's input (own action zeroed, previous joint action),
the eps-mixed masked behaviour policy, the target copy interval, a checkpoint round trip and a short
learning run. Importing vimarl.algos.coma registers "coma" (until vimarl/algos/__init__.py imports it)."""

import dataclasses

import pytest
import torch

import vimarl
from vimarl.algos.base import UniformPolicy
from vimarl.algos.coma import (
    COMA,
    NO_ACTION,
    COMAConfig,
    behaviour_probs,
    counterfactual_advantage,
)
from vimarl.algos.q_learning import taken
from vimarl.buffer import Transition
from vimarl.envs.base import Discrete, GroupSpec
from vimarl.errors import VimarlError
from vimarl.logging import read_metrics
from vimarl.train import FINAL_EVAL_SEED, evaluate, fill_replay

G = "agents"
SPEC = {G: GroupSpec(n_agents=2, obs_dim=1, action_space=Discrete(3))}


def rollout(rewards, terminated, truncated, actions, steps: int, envs: int, state_dim: int = 0) -> Transition:
    """A time-major rollout (row t * B + b) of the 2-agent SPEC with observation = row number."""
    rows = steps * envs
    obs = torch.arange(rows, dtype=torch.float32).view(rows, 1, 1).expand(rows, 2, 1)
    state = torch.randn(rows, state_dim) if state_dim else None
    return Transition(obs={G: obs}, graph={G: None}, action_mask={G: None}, state=state,
                      action={G: torch.tensor(actions)}, reward={G: torch.tensor(rewards, dtype=torch.float32)},
                      next_obs={G: obs + 1.0}, next_graph={G: None}, next_action_mask={G: None}, next_state=state,
                      terminated=torch.tensor(terminated, dtype=torch.float32),
                      truncated=torch.tensor(truncated, dtype=torch.float32))


# B = 2: env 0 (rows 0, 2, 4) is truncated by a time limit after step 1; env 1 (rows 1, 3, 5)
# terminates after step 1. Both start a new episode at step 2, the rollout's last step.
REWARDS = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0], [2.0, 0.0], [1.0, -1.0]]
TERMINATED = [0, 0, 0, 1, 0, 0]
TRUNCATED = [0, 0, 1, 0, 0, 0]
ACTIONS = [[0, 1], [2, 2], [1, 1], [0, 2], [2, 0], [1, 0]]


def test_td_lambda_targets_follow_the_recursion_and_stop_at_episode_ends():
    algo = COMA(SPEC, 0, COMAConfig(rollout_length=3, gamma=0.9, td_lambda=0.5))
    batch = rollout(REWARDS, TERMINATED, TRUNCATED, ACTIONS, steps=3, envs=2)
    q_next = torch.tensor([[0.5, 0.1], [0.2, 0.3], [0.4, 0.0], [9.0, 9.0], [0.3, 0.3], [0.0, 0.5]])
    got = algo.lambda_returns(batch, q_next, algo.episode_goes_on(batch))
    r, gamma, lam = torch.tensor(REWARDS), 0.9, 0.5
    expected = torch.empty(6, 2)
    # env 0: the truncated step bootstraps fully from Qbar at its final observation; the step before
    # mixes one-step and lambda-return (pymarl: ret_t = lambda gamma ret_{t+1} + r_t + (1 - lambda) gamma Q_{t+1})
    expected[2] = r[2] + gamma * q_next[2]
    expected[0] = r[0] + gamma * ((1 - lam) * q_next[0] + lam * expected[2])
    expected[4] = r[4] + gamma * q_next[4]  # the rollout's last step bootstraps from s'_T
    # env 1: no bootstrap past the termination (the 9.0 must not leak in)
    expected[3] = r[3]
    expected[1] = r[1] + gamma * ((1 - lam) * q_next[1] + lam * expected[3])
    expected[5] = r[5] + gamma * q_next[5]
    assert torch.allclose(got, expected, atol=1e-6)
    assert got[1].tolist() == pytest.approx([0.0 + 0.9 * (0.5 * 0.2 + 0.5 * 0.0), 2.0 + 0.9 * (0.5 * 0.3 + 0.5 * 0.0)])


def test_td_lambda_over_a_whole_episode_matches_pymarl_build_td_lambda_targets():
    algo = COMA(SPEC, 0, COMAConfig(rollout_length=4, gamma=0.99, td_lambda=0.8))
    rewards = torch.tensor([[1.0, 1.0], [0.5, 0.5], [-1.0, -1.0], [2.0, 2.0]])
    batch = rollout(rewards.tolist(), [0] * 4, [0] * 4, [[0, 0]] * 4, steps=4, envs=1)
    q_next = torch.tensor([[0.3, 0.3], [0.7, 0.7], [1.5, 1.5], [-0.4, -0.4]])  # Qbar(s_{t+1}, u_{t+1})
    got = algo.lambda_returns(batch, q_next, algo.episode_goes_on(batch))
    # pymarl's forward view written out: ret_T = Qbar_T;
    # ret_t = lambda gamma ret_{t+1} + r_t + (1 - lambda) gamma Qbar_{t+1}
    ret = q_next[3]
    expected = []
    for t in reversed(range(4)):
        ret = 0.8 * 0.99 * ret + rewards[t] + 0.2 * 0.99 * q_next[t]
        expected.append(ret)
    assert torch.allclose(got, torch.stack(expected[::-1]), atol=1e-6)


def test_bootstrap_uses_the_next_rows_actions_inside_an_episode():
    env = vimarl.make_env("spread_n2", 2, episode_length=3)
    algo = vimarl.make_algo("coma", env, rollout_length=4)
    codec, buffer = fill_replay(env, algo, 4)
    batch = codec.decode(buffer.ordered())
    values = algo.bootstrap_values(batch, algo.rollout_logits(batch)[1])
    previous = algo.previous_actions(batch)
    with torch.no_grad():
        here = taken(algo.target_critic(batch.state, batch.obs[G], batch.action[G], previous), batch.action[G])
    goes_on = algo.row_goes_on(batch)
    assert goes_on.view(4, 2)[:, 0].tolist() == [1, 1, 0, 0]  # step 2 ends the episode, step 3 ends the rollout
    following = goes_on > 0
    # Qbar(s_{t+1}, u_{t+1}) is the target critic at row t + 1 (B = 2 rows later) where the episode goes on
    assert torch.allclose(values[:-2][following[:-2]], here[2:][following[:-2]], atol=1e-5)


def test_counterfactual_baseline_is_the_policy_average_of_the_agents_own_q_vector():
    q = torch.tensor([[[1.0, 2.0, 4.0], [0.0, -3.0, 3.0]]])  # Q(s, (u^-a, .)) of agents 0 and 1
    probs = torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]]])
    actions = torch.tensor([[2, 1]])
    # agent 0: baseline 0.5 + 0.5 + 1.0 = 2.0, A = 4 - 2; agent 1: baseline 0 - 1.8 + 0.9 = -0.9, A = -3 + 0.9
    assert counterfactual_advantage(q, probs, actions)[0].tolist() == pytest.approx([2.0, -2.1])


def test_actor_loss_is_the_counterfactual_policy_gradient():
    torch.manual_seed(0)
    algo = COMA(SPEC, 0, COMAConfig(rollout_length=3))
    batch = rollout(REWARDS, TERMINATED, TRUNCATED, ACTIONS, steps=3, envs=2)
    actions = batch.action[G]
    q = torch.randn(6, 2, 3)
    probs = algo.probs(batch.obs[G], None, algo.epsilon())
    by_hand = torch.empty(6, 2)
    for row in range(6):
        for agent in range(2):
            pi, values, u = probs[row, agent], q[row, agent], actions[row, agent]
            advantage = values[u] - (pi * values).sum()
            by_hand[row, agent] = -advantage.detach() * pi[u].log()
    loss = -(counterfactual_advantage(q, probs.detach(), actions) * taken(probs, actions).log()).mean()
    assert loss.item() == pytest.approx(by_hand.mean().item(), rel=1e-5)
    loss.backward()  # the gradient reaches the policy through log pi only
    assert all(p.grad is not None for p in algo.policy.parameters())
    assert all(p.grad is None for p in algo.critic.parameters())


def test_update_feeds_the_critics_q_vectors_into_the_actor_loss(monkeypatch):
    torch.manual_seed(0)
    algo = COMA(SPEC, 0, COMAConfig(rollout_length=3))
    batch = rollout(REWARDS, TERMINATED, TRUNCATED, ACTIONS, steps=3, envs=2)
    q = torch.randn(6, 2, 3)
    monkeypatch.setattr(algo, "train_critic", lambda *args: (q, torch.zeros(())))
    with torch.no_grad():
        probs = algo.probs(batch.obs[G], None, algo.epsilon())
    expected = -(counterfactual_advantage(q, probs, batch.action[G]) * taken(probs, batch.action[G]).log()).mean()
    assert algo.update(batch)["loss_policy"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_seq_mode_steps_backwards_and_keeps_each_steps_q_from_before_its_step():
    torch.manual_seed(0)
    algo = COMA(SPEC, 0, COMAConfig(rollout_length=3))
    batch = rollout(REWARDS, TERMINATED, TRUNCATED, ACTIONS, steps=3, envs=2)
    obs, actions = batch.obs[G], batch.action[G]
    previous, context = algo.previous_actions(batch), algo.context(None, obs)
    with torch.no_grad():
        untouched = algo.critic(context, obs, actions, previous)
    q, _ = algo.train_critic(context, obs, actions, previous, torch.zeros(6, 2), None)
    assert torch.allclose(q[4:], untouched[4:], atol=1e-6)  # the last step goes first, on the initial critic
    assert not torch.allclose(q[:2], untouched[:2])  # the first step's Q comes after two steps
    assert algo.critic_steps.item() == 3


def test_critic_input_zeroes_the_own_action_and_carries_the_previous_joint_action():
    torch.manual_seed(0)
    n, a = 3, 4
    spec = {G: GroupSpec(n_agents=n, obs_dim=2, action_space=Discrete(a))}
    algo = COMA(spec, 5, COMAConfig())
    state, obs = torch.randn(2, 5), torch.randn(2, n, 2)
    actions = torch.tensor([[1, 3, 0], [2, 2, 1]])
    previous = torch.tensor([[0, 1, 2], [NO_ACTION, NO_ACTION, NO_ACTION]])  # row 1 opens an episode
    x = algo.critic.inputs(state, obs, actions, previous)
    assert x.shape == (2, n, 5 + 2 + 2 * n * a + n)
    joint = x[..., 7:7 + n * a].view(2, n, n, a)  # agent i's view of every agent's action
    last = x[..., 7 + n * a:7 + 2 * n * a].view(2, n, n, a)
    for i in range(n):
        assert joint[:, i, i].abs().sum() == 0  # its own action is zeroed
        for j in range(n):
            if j != i:
                assert joint[:, i, j].argmax(-1).tolist() == actions[:, j].tolist() and joint[:, i, j].sum() == 2
        assert last[0, i].argmax(-1).tolist() == [0, 1, 2] and last[0, i].sum() == n
    assert last[1].abs().sum() == 0  # no previous action at an episode's first step
    assert torch.equal(x[..., -n:], torch.eye(n).expand(2, n, n))
    assert torch.equal(x[..., :5], state.unsqueeze(1).expand(2, n, 5)) and torch.equal(x[..., 5:7], obs)
    # the factorised forward is pymarl's Linear over this input
    assert torch.allclose(algo.critic(state, obs, actions, previous), algo.critic.reference(x), atol=1e-5)
    # so Q(s, (u^-a, .)) of agent 0 ignores agent 0's own action but not another's
    q = algo.critic(state, obs, actions, previous)
    own, other = actions.clone(), actions.clone()
    own[:, 0], other[:, 1] = (own[:, 0] + 1) % a, (other[:, 1] + 1) % a
    assert torch.allclose(algo.critic(state, obs, own, previous)[:, 0], q[:, 0], atol=1e-6)
    assert not torch.allclose(algo.critic(state, obs, other, previous)[:, 0], q[:, 0], atol=1e-4)


def test_previous_joint_action_is_the_last_row_of_the_same_env_and_zero_at_episode_starts():
    algo = COMA(SPEC, 0, COMAConfig(rollout_length=3))
    batch = rollout(REWARDS, TERMINATED, TRUNCATED, ACTIONS, steps=3, envs=2)
    no = [NO_ACTION, NO_ACTION]
    # rows t*2 + b: step 0 has none (no stored field); env 0's step 1 follows row 0; both envs
    # start new episodes at step 2 (after the truncation of row 2 and the termination of row 3)
    assert algo.previous_actions(batch).tolist() == [no, no, ACTIONS[0], ACTIONS[1], no, no]
    batch.extra = {"previous_action": {G: torch.tensor([[1, 2], no, no, no, no, no])}}
    assert algo.previous_actions(batch).tolist()[:2] == [[1, 2], no]  # the stored field fills step 0


def test_collected_previous_actions_carry_across_rollouts_and_reset_at_episode_ends():
    env = vimarl.make_env("spread_n2", 2, episode_length=3)
    algo = vimarl.make_algo("coma", env, rollout_length=2)
    codec, buffer = fill_replay(env, algo, 8)  # 8 steps: episodes end after steps 2 and 5
    batch = codec.decode(buffer.ordered())
    actions, stored = batch.action[G].view(8, 2, 2), batch.extra["previous_action"][G].view(8, 2, 2)
    for t in range(8):
        expected = torch.full((2, 2), NO_ACTION) if t % 3 == 0 else actions[t - 1]
        assert torch.equal(stored[t], expected), t
    algo.config.rollout_length = 8  # the shift inside a rollout agrees with the collected field
    assert torch.equal(algo.previous_actions(batch), stored.view(16, 2))


def test_behaviour_policy_mixes_epsilon_before_masking_and_renormalises():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    mask = torch.tensor([[True, False, True]])
    mixed = (1 - 0.5) * torch.tensor([0.7, 0.2, 0.1]) + 0.5 / 3  # eps spread over all |A| actions
    expected = mixed * torch.tensor([1.0, 0.0, 1.0])
    expected = expected / expected.sum()
    assert torch.allclose(behaviour_probs(logits, 0.5, mask), expected.unsqueeze(0), atol=1e-6)
    assert torch.allclose(behaviour_probs(logits, 0.5, None), mixed.unsqueeze(0), atol=1e-6)


def test_acting_respects_the_mask_and_epsilon_decays_linearly():
    torch.manual_seed(0)
    algo = COMA(SPEC, 0, COMAConfig(epsilon_decay_steps=100))
    obs = torch.randn(500, 2, 1)
    mask = torch.tensor([True, False, True]).expand(500, 2, 3)
    explored = algo.act({G: obs}, {G: None}, explore=True, action_mask={G: mask})[G]
    assert (explored != 1).all() and {0, 2} <= set(explored.unique().tolist())
    greedy = algo.act({G: obs}, {G: None}, explore=False, action_mask={G: mask})[G]
    assert torch.equal(greedy, algo.probs(obs, mask, 0.0).argmax(-1)) and (greedy != 1).all()
    assert algo.epsilon().item() == pytest.approx(0.5)
    algo.env_steps.fill_(50)
    assert algo.epsilon().item() == pytest.approx(0.5 + 0.5 * (0.01 - 0.5))
    algo.env_steps.fill_(1000)
    assert algo.epsilon().item() == pytest.approx(0.01)


def test_target_critic_is_copied_once_the_interval_of_critic_steps_has_passed():
    torch.manual_seed(0)
    algo = COMA(SPEC, 0, COMAConfig(rollout_length=3, target_update_interval=7))
    batch = rollout(REWARDS, TERMINATED, TRUNCATED, ACTIONS, steps=3, envs=2)

    def target_is_critic():
        return all(torch.equal(t, s) for t, s in zip(algo.target_critic.parameters(), algo.critic.parameters()))

    copied = []
    for _ in range(6):  # 3 critic steps per update ("seq"): copies after 9 and 18 steps (7 and more since the last)
        algo.update(batch)
        copied.append(target_is_critic())
    assert copied == [False, False, True, False, False, True]
    assert algo.critic_steps.item() == 18 and algo.last_target_copy.item() == 18


def test_batched_mode_takes_one_critic_step_per_rollout_counted_as_its_time_steps(monkeypatch):
    torch.manual_seed(0)
    algo = COMA(SPEC, 0, COMAConfig(rollout_length=3, critic_train_mode="batched", target_update_interval=5))
    batch = rollout(REWARDS, TERMINATED, TRUNCATED, ACTIONS, steps=3, envs=2)
    steps = []
    original = algo.optimize
    monkeypatch.setattr(algo, "optimize", lambda name, *args, **kw: steps.append(name) or original(name, *args, **kw))
    metrics = algo.update(batch)
    assert steps == ["critic", "actor"] and all(torch.isfinite(v) for v in metrics.values())
    assert algo.critic_steps.item() == 3 and algo.last_target_copy.item() == 0
    algo.update(batch)
    assert algo.last_target_copy.item() == 6  # 6 - 0 >= 5: copied after the second rollout


def test_without_a_state_the_critic_reads_every_observation():
    algo = COMA(SPEC, 0, COMAConfig(rollout_length=3))
    assert not algo.reads_state
    assert algo.critic.widths[0] == 2 * 1  # N x obs_dim
    batch = rollout(REWARDS, TERMINATED, TRUNCATED, ACTIONS, steps=3, envs=2)
    assert torch.equal(algo.context(None, batch.obs[G]), batch.obs[G].flatten(1))
    with_state = COMA(SPEC, 4, COMAConfig(rollout_length=3))
    assert with_state.reads_state and with_state.critic.widths[0] == 4
    metrics = with_state.update(rollout(REWARDS, TERMINATED, TRUNCATED, ACTIONS, steps=3, envs=2, state_dim=4))
    assert all(torch.isfinite(v) for v in metrics.values())


def rows_of(batch: Transition, rows: slice) -> Transition:
    """The rows `rows` of a batch, as a rollout of its own (graphs left out: COMA reads none)."""
    def cut(value):
        if isinstance(value, dict):
            return {key: cut(item) for key, item in value.items()}
        return value[rows] if isinstance(value, torch.Tensor) else None
    return Transition(**{f.name: cut(getattr(batch, f.name)) for f in dataclasses.fields(batch)})


def test_recurrent_actor_unrolls_the_rollout_as_it_acted():
    env = vimarl.make_env("spread_n2", 2, episode_length=3)
    torch.manual_seed(0)
    algo = vimarl.make_algo("coma", env, rollout_length=4, recurrent=True)
    codec, buffer = fill_replay(env, algo, 4)
    batch = codec.decode(buffer.ordered())
    obs, stored = batch.obs[G].view(4, 2, 2, -1), batch.extra["actor_hidden"][G].view(4, 2, 2, 64)
    hidden, expected = torch.zeros(2, 2, 64), []
    with torch.no_grad():
        for t in range(4):  # pymarl's agent stepped by hand, zero state at episode starts (t = 0, 3)
            if t == 3:
                hidden = torch.zeros_like(hidden)
            assert torch.allclose(stored[t], hidden, atol=1e-6)  # the state each step acted from
            logits, hidden = algo.policy(obs[t], None, hidden)
            expected.append(logits)
        logits, _ = algo.rollout_logits(batch)
        assert torch.allclose(logits, torch.stack(expected).flatten(0, 1), atol=1e-5)
        # a rollout that starts mid-episode (steps 1-2) picks up the stored state of its first step
        algo.config.rollout_length = 2
        assert torch.allclose(algo.rollout_logits(rows_of(batch, slice(2, 6)))[0], logits[2:6], atol=1e-5)
    algo.config.rollout_length = 4
    before = [p.clone() for p in algo.policy.cell.parameters()]
    metrics = algo.update(batch)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert all(not torch.equal(b, p) for b, p in zip(before, algo.policy.cell.parameters()))
    with algo.execution():  # evaluation starts afresh and leaves the training state alone
        assert algo.memory is None
        algo.act({G: batch.obs[G][:2]}, {G: None}, explore=False)
    assert algo.memory.shape == (2, 2, 64)


def test_bad_settings_are_refused():
    with pytest.raises(VimarlError, match="td_lambda"):
        COMA(SPEC, 0, COMAConfig(td_lambda=1.5))
    with pytest.raises(VimarlError, match="continuous"):
        vimarl.make_algo("coma", vimarl.make_env("pp_capture_n2", 1))


def test_state_dict_round_trip_gives_identical_actions_and_updates(tmp_path):
    env = vimarl.make_env("spread_n2", 2, episode_length=3)
    torch.manual_seed(0)
    first = vimarl.make_algo("coma", env, rollout_length=4, target_update_interval=5)
    codec, buffer = fill_replay(env, first, 4)
    batch = codec.decode(buffer.ordered())
    first.update(batch)
    torch.save(first.state_dict(), tmp_path / "coma.pt")
    torch.manual_seed(1)
    second = vimarl.make_algo("coma", env, rollout_length=4, target_update_interval=5)
    second.load_state_dict(torch.load(tmp_path / "coma.pt", weights_only=True))
    assert second.env_steps.item() == 8 and second.critic_steps.item() == 4
    assert torch.equal(second.last_actions, first.last_actions)
    obs = {G: batch.obs[G]}
    for explore in (False, True):
        torch.manual_seed(2)
        a = first.act(obs, {G: None}, explore=explore)[G]
        torch.manual_seed(2)
        assert torch.equal(second.act(obs, {G: None}, explore=explore)[G], a)
    torch.manual_seed(3)
    one = first.update(batch)
    torch.manual_seed(3)
    two = second.update(batch)  # the RMSprop state rode along, and the target copy (5 steps) is due in both
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert all(torch.equal(value, second.state_dict()[key]) for key, value in first.state_dict().items()
               if isinstance(value, torch.Tensor))
    assert second.last_target_copy.item() == 8


@pytest.mark.learning
def test_coma_beats_random_on_spread_n2(tmp_path, report):
    env = vimarl.make_env("spread_n2", 100)
    random_return = float(evaluate(UniformPolicy(env.groups), env, seed=FINAL_EVAL_SEED)[G].mean())
    # pymarl's batches: 8 envs x one 25-step episode per update; eps decays over 30% of the run, as
    # the experiments' `schedules` set it (pymarl's 100k steps would outlast this run).
    out = vimarl.train("coma", "spread_n2", out=str(tmp_path / "run"), total_steps=12_000, num_envs=8,
                       eval_every=3_000, eval_episodes=20, progress=False, tensorboard=False,
                       algo_config={"rollout_length": 25, "epsilon_decay_steps": 3_600})
    returns = [row["eval_return_mean"] for row in read_metrics(out / "metrics.csv")]
    report(f"spread N=2, 12k env steps, seed 0, final deterministic eval over 100 episodes: coma {returns[-1]:.1f} "
           f"(curve {[round(r, 1) for r in returns]}), uniform random {random_return:.1f}")
    assert returns[-1] >= random_return + 5
