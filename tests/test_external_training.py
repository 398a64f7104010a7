"""Smoke training on the external environments: a few hundred env steps of vpp and masac on
SISL multiwalker and pursuit (vm3ac on multiwalker N = 3, mamt on pursuit, vpp on the MAgent2 jungle), then a resume
from the checkpoint."""

import importlib.util
import math

import pytest

import vimarl
from vimarl.logging import read_metrics

SIMULATORS = {"multiwalker_n2": ("pettingzoo", "sisl"), "multiwalker_n3": ("pettingzoo", "sisl"),
              "pursuit": ("pettingzoo", "sisl"), "jungle": ("magent2", "magent")}
# Short episodes and no 100-episode final evaluation keep the evaluations cheap (pursuit steps at
# about 90 env steps/s).
EPISODE = {"multiwalker_n2": {"episode_length": 50}, "multiwalker_n3": {"episode_length": 50},
           "pursuit": {"episode_length": 50}, "jungle": {"episode_length": 25}}


@pytest.mark.parametrize("algo,env", [("vpp", "multiwalker_n2"), ("masac", "multiwalker_n2"),
                                      ("vm3ac", "multiwalker_n3"), ("vpp", "pursuit"), ("masac", "pursuit"),
                                      ("mamt", "pursuit"), ("vpp", "jungle")])
def test_smoke_training_and_resume(tmp_path, algo, env):
    module, extra = SIMULATORS[env]
    if importlib.util.find_spec(module) is None or (extra == "sisl" and importlib.util.find_spec("pymunk") is None):
        pytest.skip(f"{env} needs its simulator: pip install 'vimarl[{extra}]'")
    budget = dict(total_steps=200, buffer_size=1000, warmup_steps=100, update_every=10, batch_size=32, num_envs=2,
                  eval_every=200, eval_episodes=1, final_eval_episodes=0, checkpoint_every=200,
                  progress=False, tensorboard=False)
    out = vimarl.train(algo, env, out=str(tmp_path / "run"), seed=0, env_config=EPISODE[env],
                       **budget)
    rows = read_metrics(out / "metrics.csv")
    assert [row["env_steps"] for row in rows] == [0, 200]
    assert all(math.isfinite(row["eval_return_mean"]) for row in rows)
    losses = [key for key in rows[-1] if "loss" in key]
    assert losses and all(math.isfinite(rows[-1][key]) for key in losses)
    resumed = vimarl.train(resume=str(out), total_steps=220)
    assert read_metrics(resumed / "metrics.csv")[-1]["env_steps"] == 220
