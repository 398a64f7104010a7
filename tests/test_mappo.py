"""MA-PPO (004's baseline) and the trainer's on-policy path: GAE on hand-computed rollouts, the
clipped surrogate, one update per full rollout, no random warm-up, and a short learning run."""

import pytest
import torch

import vimarl
from vimarl.algos.mappo import MAPPO, MAPPOConfig
from vimarl.buffer import ReplayBuffer, Transition, TransitionCodec
from vimarl.envs.base import Box, GroupSpec
from vimarl.logging import read_metrics
from vimarl.train import fill_replay

G = "agents"
SPEC = {G: GroupSpec(n_agents=2, obs_dim=1, action_space=Box(-1.0, 1.0, 1))}


def rollout(rewards, terminated, truncated, steps: int, envs: int) -> Transition:
    """A time-major rollout (row t * B + b) of the 2-agent SPEC with zero observations."""
    rows = steps * envs
    obs = torch.zeros(rows, 2, 1)
    return Transition(obs={G: obs}, graph={G: None}, action_mask={G: None}, state=None,
                      action={G: torch.zeros(rows, 2, 1)}, reward={G: torch.tensor(rewards, dtype=torch.float32)},
                      next_obs={G: obs}, next_graph={G: None}, next_action_mask={G: None}, next_state=None,
                      terminated=torch.tensor(terminated, dtype=torch.float32),
                      truncated=torch.tensor(truncated, dtype=torch.float32))


def test_gae_follows_the_recursion_and_stops_at_episode_ends():
    algo = MAPPO(SPEC, 0, MAPPOConfig(rollout_length=3, gamma=0.9, gae_lambda=0.5))
    # B = 2: env 0 runs 3 steps, truncated after step 1; env 1 terminates after step 0.
    rewards = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0], [2.0, 0.0], [1.0, -1.0]]
    terminated = [0, 1, 0, 0, 0, 0]
    truncated = [0, 0, 1, 0, 0, 0]
    batch = rollout(rewards, terminated, truncated, steps=3, envs=2)
    values = torch.tensor([[0.5, 0.1], [0.2, 0.3], [0.4, 0.0], [1.0, 0.2], [0.3, 0.3], [0.0, 0.5]])
    next_values = torch.tensor([[0.4, 0.0], [9.0, 9.0], [0.7, 0.6], [0.1, 0.4], [0.0, 0.5], [0.2, 0.2]])
    got = algo.advantages(batch, values, next_values)
    r, v, nv = torch.tensor(rewards), values, next_values
    delta = r + 0.9 * (1 - torch.tensor(terminated, dtype=torch.float32)).unsqueeze(-1) * nv - v
    decay = 0.9 * 0.5
    expected = torch.empty(6, 2)
    # env 0: rows 0, 2, 4; the truncation after row 2 stops the carry from row 4 (bootstrapped instead)
    expected[4] = delta[4]
    expected[2] = delta[2]
    expected[0] = delta[0] + decay * expected[2]
    # env 1: rows 1, 3, 5; the termination at row 1 drops V(x') and the carry
    expected[5] = delta[5]
    expected[3] = delta[3] + decay * expected[5]
    expected[1] = delta[1]
    assert torch.allclose(got, expected, atol=1e-6)
    assert delta[1].tolist() == pytest.approx([0.0 - 0.2, 2.0 - 0.3])  # no bootstrap past termination


def test_clipped_surrogate_stops_the_gradient_outside_the_trust_region():
    env = vimarl.make_env("spread_n2", 4)
    algo = vimarl.make_algo("mappo", env, rollout_length=5, minibatches=1, epochs=1, entropy_coef=0.0)
    _, buffer = fill_replay(env, algo, 5)
    batch = TransitionCodec(algo.groups, env.state_dim).decode(buffer.ordered())
    old, _ = algo.log_probs_and_entropy(batch)
    index = torch.arange(20)
    positive = torch.ones(20, 2)
    # ratio = e^1 > 1.2 with A > 0: the clipped term wins and carries no gradient.
    metrics = algo.minibatch_step(batch, index, positive, torch.zeros(20, 2), old - 1.0, None)
    assert metrics["clip_fraction"].item() == 1.0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in algo.policy.parameters())


def test_buffer_returns_rows_in_collection_order_and_clears():
    buffer = ReplayBuffer(4, {"x": ((), torch.int64)})
    for start in (0, 2, 4):
        buffer.add({"x": torch.tensor([start, start + 1])})
    assert buffer.ordered()["x"].tolist() == [2, 3, 4, 5]  # the oldest two were overwritten
    buffer.clear()
    assert len(buffer) == 0
    buffer.add({"x": torch.tensor([7])})
    assert buffer.ordered()["x"].tolist() == [7]


def test_trainer_updates_once_per_rollout_without_random_warmup(tmp_path, monkeypatch):
    seen = []
    original = MAPPO.update

    def spy(self, batch):
        seen.append((batch.terminated.shape[0], self.training))
        return original(self, batch)

    monkeypatch.setattr(MAPPO, "update", spy)
    out = vimarl.train("mappo", "spread_n2", out=str(tmp_path / "run"), total_steps=120, num_envs=4,
                       warmup_steps=1000, eval_every=120, eval_episodes=2, progress=False, tensorboard=False,
                       algo_config={"rollout_length": 10, "minibatches": 2, "epochs": 1})
    assert [rows for rows, _ in seen] == [40, 40, 40]  # 3 rollouts of 10 steps x 4 envs
    row = read_metrics(out / "metrics.csv")[-1]
    assert row["updates"] == 3 and row["env_steps"] == 120
    assert {"loss_policy", "loss_v", "entropy", "approx_kl", "clip_fraction"} <= set(row)


def test_the_buffer_marks_time_limit_truncation():
    env = vimarl.make_env("spread_n2", 2, episode_length=3)
    algo = vimarl.make_algo("mappo", env, rollout_length=6)
    codec, buffer = fill_replay(env, algo, 6)
    batch = codec.decode(buffer.ordered())
    assert batch.truncated.view(6, 2)[:, 0].tolist() == [0, 0, 1, 0, 0, 1]
    assert batch.terminated.sum() == 0


@pytest.mark.learning
def test_mappo_learns_spread_n2(tmp_path, report):
    out = vimarl.train("mappo", "spread_n2", out=str(tmp_path / "run"), total_steps=12_000, num_envs=8,
                       eval_every=6_000, eval_episodes=20, progress=False, tensorboard=False,
                       algo_config={"rollout_length": 25})
    returns = [row["eval_return_mean"] for row in read_metrics(out / "metrics.csv")]
    report(f"spread N=2, 12k env steps, seed 0: mappo {returns[-1]:.1f} (curve {[round(r, 1) for r in returns]})")
    assert returns[-1] >= returns[0] + 25
