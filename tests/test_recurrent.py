"""Recurrent (GRU) agents of VDN and QMIX: replayed windows, hidden-state resets, acting memory, TD targets, training."""

import copy
import dataclasses
import math
import shutil

import pytest
import torch

import vimarl
from vimarl import checkpoint
from vimarl.algos.q_learning import episode_starts
from vimarl.algos.qmix import QMIX, QMIXConfig
from vimarl.algos.vdn import VDN, VDNConfig
from vimarl.buffer import ReplayBuffer, Transition
from vimarl.envs.base import Discrete, GroupSpec
from vimarl.errors import VimarlError
from vimarl.logging import read_metrics
from vimarl.checkpoint import load_trained
from vimarl.train import _run_episodes, evaluate, fill_replay

G = "agents"


def spec(n=2, obs=3, actions=3):
    return {G: GroupSpec(n_agents=n, obs_dim=obs, action_space=Discrete(actions))}


def windows(obs, next_obs, reward, terminated, action, truncated=None, valid=None, state_dim=0):
    """A batch of windows [T, W, ...] as the trainer hands it to `update`."""
    t, w = terminated.shape
    state = lambda: torch.randn(t, w, state_dim) if state_dim else None
    return Transition(obs={G: obs}, graph={G: None}, action_mask={G: None}, state=state(), action={G: action},
                      reward={G: reward}, next_obs={G: next_obs}, next_graph={G: None}, next_action_mask={G: None},
                      next_state=state(), terminated=terminated,
                      truncated=torch.zeros(t, w) if truncated is None else truncated,
                      valid=torch.ones(t, w, dtype=torch.bool) if valid is None else valid)


@torch.no_grad()
def constant_head(critic, values):
    """Make a recurrent Q network output `values` [A] whatever its input and state."""
    critic.rest[1][0].weight.zero_()
    critic.rest[1][0].bias.copy_(torch.tensor(values))


# -- sequence sampling -----------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [2, 6])  # 6 vectorised steps of 3 sub-environments wrap a 10-row ring
def test_sample_sequences_are_contiguous_rows_of_one_sub_env_masked_at_the_write_head(steps):
    streams, capacity, length = 3, 10, 4
    buffer = ReplayBuffer(capacity, {"step": ((), torch.int64), "env": ((), torch.int64)}, seed=1)
    for t in range(steps):
        buffer.add({"step": torch.full((streams,), t), "env": torch.arange(streams)})
    oldest = max(steps * streams - capacity, 0)  # global index of the oldest stored row
    stored = {(g // streams, g % streams) for g in range(oldest, steps * streams)}
    rows = buffer.sample_sequences(500, length, streams)
    assert rows["step"].shape == rows["valid"].shape == (length, 500)
    starts = set()
    for w in range(500):
        step, env, valid = rows["step"][:, w].tolist(), rows["env"][:, w].tolist(), rows["valid"][:, w].tolist()
        assert (step[0], env[0]) in stored and valid[0]
        starts.add((step[0], env[0]))
        assert len(set(env)) == 1  # one sub-environment
        # consecutive steps up to the newest stored one (steps - 1); past it, masked copies of it
        assert valid == [step[0] + k <= steps - 1 for k in range(length)]
        assert step == [min(step[0] + k, steps - 1) for k in range(length)]
    assert starts == stored  # every stored row can start a window


@pytest.mark.parametrize("steps", [5, 9])  # 9 vectorised steps of 3 sub-environments wrap a 20-row ring
def test_episode_aligned_windows_start_at_an_episode_first_step(steps):
    """Episodes of 3 steps (done at t = 2, 5, 8): windows start only at t = 0, 3, 6 (or, once the
    ring has dropped the first steps, at the starts it still holds)."""
    streams, capacity = 3, 20
    fields = {"step": ((), torch.int64), "terminated": ((), torch.bool), "truncated": ((), torch.bool)}
    buffer = ReplayBuffer(capacity, fields, seed=2)
    for t in range(steps):
        buffer.add({"step": torch.full((streams,), t), "terminated": torch.full((streams,), t % 3 == 2),
                    "truncated": torch.zeros(streams, dtype=torch.bool)})
    oldest_step = (max(steps * streams - capacity, 0) + streams - 1) // streams  # first step whole in the ring
    first = buffer.sample_sequences(300, 3, streams, episode_aligned=True)["step"][0]
    expected = {t for t in range(oldest_step, steps) if t % 3 == 0}
    assert set(first.tolist()) == expected
    anywhere = buffer.sample_sequences(300, 3, streams)["step"][0]
    assert set(anywhere.tolist()) > expected


def test_transition_flatten_is_time_major():
    batch = windows(torch.randn(3, 2, 2, 4), torch.randn(3, 2, 2, 4), torch.randn(3, 2, 2), torch.zeros(3, 2),
                    torch.zeros(3, 2, 2, dtype=torch.int64), state_dim=5)
    flat = batch.flatten()
    assert flat.obs[G].shape == (6, 2, 4) and flat.state.shape == (6, 5) and flat.valid.shape == (6,)
    assert torch.equal(flat.obs[G][3], batch.obs[G][1, 1]) and flat.graph[G] is None


# -- the recurrent Q over windows ------------------------------------------------------------------
def test_hidden_state_resets_at_an_episode_start_inside_a_window():
    torch.manual_seed(1)
    algo = VDN(spec(), 0, VDNConfig(recurrent=True, sequence_length=4))
    obs = torch.randn(4, 3, 2, 3)
    terminated = torch.zeros(4, 3)
    truncated = torch.zeros(4, 3)
    terminated[1, 0] = 1.0  # window 0: an episode ends at step 1, so step 2 opens one
    truncated[0, 1] = 1.0  # window 1: a time limit at step 0, so step 1 opens one
    batch = windows(obs, torch.randn(4, 3, 2, 3), torch.zeros(4, 3, 2), terminated,
                    torch.zeros(4, 3, 2, dtype=torch.int64), truncated=truncated)
    assert episode_starts(batch).tolist() == [[True] * 3, [False, True, False], [True, False, False],
                                              [False] * 3]
    with torch.no_grad():
        q = algo.sequence_q(batch)[0].view(4, 3, 2, 3)
        fresh = lambda t, w: algo.policy(obs[t, w:w + 1], None)[0][0]  # one step from a zero state
    assert torch.allclose(q[2, 0], fresh(2, 0), atol=1e-6)  # reset: as at a fresh start
    assert torch.allclose(q[1, 1], fresh(1, 1), atol=1e-6)
    assert not torch.allclose(q[2, 2], fresh(2, 2), atol=1e-3)  # no reset: the history matters
    assert not torch.allclose(q[3, 0], fresh(3, 0), atol=1e-3)


def test_td_target_on_a_hand_computed_three_step_sequence_with_a_termination():
    # VDN, N = 2, constant utilities: online Q = [1, 3, 2], target Qbar = [10, 0, 20]; plain max target.
    algo = VDN(spec(), 0, VDNConfig(recurrent=True, sequence_length=3, gamma=0.5, double_q=False))
    constant_head(algo.policy.critic, [1.0, 3.0, 2.0])
    constant_head(algo.target_policy.critic, [10.0, 0.0, 20.0])
    reward = torch.tensor([[[1.0, 2.0], [0.0, 0.0]], [[3.0, 4.0], [0.0, 0.0]], [[5.0, 6.0], [1e6, 1e6]]])
    terminated = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    action = torch.tensor([[[0, 1], [0, 0]], [[2, 2], [0, 0]], [[1, 1], [0, 0]]])
    valid = torch.tensor([[True, True], [True, True], [True, False]])  # window 1's last step is past the head
    batch = windows(torch.randn(3, 2, 2, 3), torch.randn(3, 2, 2, 3), reward, terminated, action, valid=valid)
    # Q_tot: window 0 = 1 + 3, 2 + 2, 3 + 3; window 1 = 1 + 1 at both valid steps.
    # y = R + 0.5 (1 - d) (20 + 20): window 0 = 3 + 20, 7 (terminal), 11 + 20; window 1 = 0 + 20 twice.
    errors = [4.0 - 23.0, 4.0 - 7.0, 6.0 - 31.0, 2.0 - 20.0, 2.0 - 20.0]
    expected = sum(e * e for e in errors) / 5
    assert math.isclose(float(algo.update(batch)["loss_q"]), expected, rel_tol=1e-6)


def test_sequence_targets_unroll_both_networks_over_the_window():
    """Against the acting path: step the online and target GRUs one env step at a time by hand."""
    torch.manual_seed(2)
    algo = QMIX(spec(n=2), 4, QMIXConfig(recurrent=True, sequence_length=3, gamma=0.9, double_q=True))
    with torch.no_grad():
        for p in algo.target_policy.parameters():  # a target network that differs from the online one
            p.add_(0.3 * torch.randn_like(p))
    obs, next_obs = torch.randn(3, 1, 2, 3), torch.randn(3, 1, 2, 3)
    terminated = torch.tensor([[0.0], [1.0], [0.0]])
    action = torch.randint(3, (3, 1, 2))
    batch = windows(obs, next_obs, torch.randn(3, 1, 2), terminated, action, state_dim=4)
    expected = []
    with torch.no_grad():
        hidden = target_hidden = None
        for t in range(3):
            if t == 2:  # the episode ended at step 1
                hidden = target_hidden = None
            q, hidden = algo.policy(obs[t], None, hidden)
            _, target_hidden = algo.target_policy(obs[t], None, target_hidden)
            best = algo.policy(next_obs[t], None, hidden)[0].argmax(-1, keepdim=True)  # double-Q
            next_q = algo.target_policy(next_obs[t], None, target_hidden)[0].gather(-1, best).squeeze(-1)
            y = batch.reward[G][t].sum(-1) + 0.9 * (1 - terminated[t]) * algo.target_mixer(next_q, batch.next_state[t])
            q_tot = algo.mixer(q.gather(-1, action[t].unsqueeze(-1)).squeeze(-1), batch.state[t])
            expected.append((q_tot - y).square())
    assert torch.allclose(algo.update(batch)["loss_q"], torch.cat(expected).mean(), atol=1e-5)


def test_burn_in_steps_carry_no_loss():
    algo = VDN(spec(), 0, VDNConfig(recurrent=True, sequence_length=3, burn_in=1))
    batch = windows(torch.randn(3, 2, 2, 3), torch.randn(3, 2, 2, 3), torch.randn(3, 2, 2), torch.zeros(3, 2),
                    torch.zeros(3, 2, 2, dtype=torch.int64))
    assert algo.sequence_q(batch)[2].view(3, 2).tolist() == [[False, False], [True, True], [True, True]]
    with pytest.raises(VimarlError, match="burn_in < sequence_length"):
        VDN(spec(), 0, VDNConfig(recurrent=True, sequence_length=3, burn_in=3))
    with pytest.raises(VimarlError, match="windows of consecutive steps") as error:  # single transitions
        algo.update(Transition(**{**vars(batch.flatten()), "valid": None}))
    assert "\n" not in str(error.value)


# -- acting ----------------------------------------------------------------------------------------
def test_acting_carries_the_hidden_state_and_resets_finished_sub_envs():
    torch.manual_seed(3)
    env = vimarl.make_env("spread", 2)
    algo = vimarl.make_algo("qmix", env, recurrent=True)
    step = env.reset(seed=0)
    obs = {G: step.groups[G].obs}
    first = algo.q_values(obs[G], None)
    second = algo.q_values(obs[G], None)  # the same observations again: the GRU state differs
    assert algo.memory.shape == (2, 3, 64) and not torch.allclose(first, second, atol=1e-4)
    done = dataclasses.replace(step, terminated=torch.tensor([True, False]), truncated=torch.tensor([False, False]))
    algo.observe(step, {}, done)  # sub-environment 0's episode ended
    assert (algo.memory[0] == 0).all() and (algo.memory[1] != 0).any()
    third = algo.q_values(obs[G], None)
    assert torch.allclose(third[0], first[0]) and not torch.allclose(third[1], first[1], atol=1e-4)
    algo.q_values(torch.randn(5, 3, obs[G].shape[-1]), None)  # an env of another size starts from zeros
    assert algo.memory.shape[0] == 5
    algo.reset_memory()
    assert algo.memory is None and torch.allclose(algo.q_values(obs[G], None), first)


def test_evaluation_starts_fresh_and_keeps_the_training_state():
    torch.manual_seed(4)
    env = vimarl.make_env("spread", 3, seed=7)
    algo = vimarl.make_algo("vdn", env, recurrent=True)
    fresh = copy.deepcopy(algo)
    algo.memory = 5 * torch.randn(3, 3, 64)  # a training env of the same size, mid-episode
    saved = algo.memory.clone()
    returns = evaluate(algo, env, seed=11)[G]
    assert torch.equal(returns, evaluate(fresh, env, seed=11)[G])
    assert torch.equal(algo.memory, saved)
    torch.manual_seed(11)  # the same episodes played from the training state instead: other returns
    assert not torch.equal(_run_episodes(algo, env, 11, True, None)[G], returns)
    with algo.execution():  # what evaluate runs under
        assert algo.memory is None


# -- training --------------------------------------------------------------------------------------
BUDGET = dict(num_envs=4, warmup_steps=64, update_every=8, batch_size=32, eval_every=96, eval_episodes=2,
              progress=False, tensorboard=False)


def test_recurrent_qmix_trains_on_windows_and_resumes_exactly(tmp_path, monkeypatch):
    sampled = []
    original = ReplayBuffer.sample_sequences
    monkeypatch.setattr(ReplayBuffer, "sample_sequences",
                        lambda self, *args: sampled.append(args) or original(self, *args))
    config = {"recurrent": True, "sequence_length": 8}
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    vimarl.train("qmix", "spread", out=str(full), algo_config=config, total_steps=192, checkpoint_every=96,
                 save_buffer=True, keep_checkpoints=5, **BUDGET)
    assert set(sampled) == {(4, 8, 4, True)}  # batch_size // sequence_length windows of 8 steps of 4 streams
    _, algo, content = load_trained(full)
    assert algo.config.recurrent and int(algo.gradient_steps) == (192 - 64) // 8
    assert content["algo"]["_extra_state"]["memory"].shape == (4, 3, 64)

    shutil.copytree(full, resumed)  # interrupted at 96 env steps
    (resumed / "checkpoints" / checkpoint.checkpoint_path(resumed, 192).name).unlink()
    (resumed / "summary.json").unlink()
    vimarl.train(resume=resumed)
    final_full, final_resumed = (checkpoint.load(checkpoint.latest(run)) for run in (full, resumed))
    for name, value in final_full["algo"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, final_resumed["algo"][name]), name
    assert torch.equal(final_full["algo"]["_extra_state"]["memory"], final_resumed["algo"]["_extra_state"]["memory"])
    returns = lambda run: [(r["env_steps"], r["eval_return_mean"]) for r in read_metrics(run / "metrics.csv")]
    assert returns(full) == returns(resumed)


def test_feed_forward_checkpoints_carry_no_memory():
    env = vimarl.make_env("spread", 2)
    algo = vimarl.make_algo("vdn", env)
    fill_replay(env, algo, 3)
    assert algo.sampler.kind == "transitions" and algo.memory is None
    assert set(algo.state_dict()["_extra_state"]) == {"q"}
