"""Agents that leave an episode early (GroupStep.alive): the replay buffer keeps who is in, and
vpp, masac and vm3ac neither learn from a departed agent's slot nor bootstrap past its departure."""

import pytest
import torch

pytest.importorskip("pettingzoo", reason="the toy env is a PettingZoo env: pip install 'vimarl[pettingzoo]'")

import vimarl  # noqa: E402
from vimarl.buffer import TransitionCodec  # noqa: E402


def leaving_batch():
    """The first four transitions of pz_toys.LeavingEnv: runner_1 leaves at step 2 of 5."""
    env = vimarl.make_env("pettingzoo", 1, seed=0, env="pz_toys:LeavingEnv", kwargs={"leave_at": 2, "horizon": 5})
    codec = TransitionCodec(env.groups, env.state_dim)
    step, rows = env.reset(seed=0), []
    for t in range(4):
        action = {"runner": torch.tensor([[t % 3, 1, 2]])}
        next_step = env.step(action)
        rows.append(codec.encode(step, action, next_step))
        step = next_step
    return env, codec.decode({key: torch.cat([r[key] for r in rows]) for key in rows[0]})


def test_the_buffer_keeps_who_is_in_and_who_goes_on():
    _, batch = leaving_batch()
    assert batch.alive["runner"].tolist() == [[True] * 3, [True] * 3, [True, False, True], [True, False, True]]
    assert batch.continuing("runner").tolist() == [[1, 1, 1], [1, 0, 1], [1, 0, 1], [1, 0, 1]]
    assert batch.joint_alive(["runner"]).tolist() == batch.alive["runner"].tolist()


@pytest.mark.parametrize("algo", ["vpp", "masac", "vm3ac"])
def test_departed_slots_change_no_loss(algo):
    env, batch = leaving_batch()
    learner = vimarl.make_algo(algo, env)

    def q_loss(rewards):
        batch.reward["runner"] = rewards
        torch.manual_seed(0)
        loss = learner.q_loss("runner", batch) if algo == "vpp" else learner.q_loss(batch)
        return float(loss.detach())

    rewards = batch.reward["runner"].clone()
    base = q_loss(rewards)
    departed = rewards.clone()
    departed[2:, 1] = 1e3  # runner_1 is gone from transition 2 on
    assert q_loss(departed) == pytest.approx(base, rel=1e-6)
    present = rewards.clone()
    present[2:, 0] = 1e3
    assert q_loss(present) > base + 1.0
