"""The trainer: run outputs, exact resume, checkpoint errors."""

import importlib
import json
import shutil

import pytest
import torch
import yaml

import vimarl
from vimarl import checkpoint
from vimarl.errors import VimarlError
from vimarl.logging import read_metrics

FAST = dict(total_steps=480, eval_every=160, warmup_steps=64, batch_size=32, eval_episodes=16,
            progress=False, tensorboard=False)


def test_run_writes_config_metrics_curve_checkpoint_and_summary(tmp_path):
    out = tmp_path / "run"
    vimarl.train("vpp", "grid_coordination", out=str(out), seed=3, tensorboard=True,
                 **{k: v for k, v in FAST.items() if k != "tensorboard"})
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["algo"] == "vpp" and config["train"]["seed"] == 3 and config["algo_config"]["alpha"] == 0.2
    rows = read_metrics(out / "metrics.csv")
    assert [r["env_steps"] for r in rows] == [0, 160, 320, 480]
    assert [r["agent_steps"] for r in rows] == [0, 1440, 2880, 4320]  # 9 agents
    for column in ("eval_return_mean", "eval_return_std", "wall_s", "loss_q", "train_return_mean"):
        assert column in rows[-1]
    # updates every 8 env steps after the 64-step warm-up: (480 - 64) / 8
    assert rows[-1]["updates"] == 52
    assert (out / "curve.png").stat().st_size > 1000
    assert list((out / "tensorboard").iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["env_steps"] == 480 and summary["eval_return_mean"] == rows[-1]["eval_return_mean"]
    # A checkpoint at every evaluation by default (checkpoint_every=None), the newest two kept.
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(out / "checkpoints")] == [320, 480]


def test_resume_continues_exactly(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    settings = dict(FAST, total_steps=640, checkpoint_every=320, save_buffer=True, keep_checkpoints=5)
    vimarl.train("vpp", "grid_coordination", out=str(full), **settings)
    steps = [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(full / "checkpoints")]
    assert steps == [320, 640]

    # An interrupted copy: only the mid-run checkpoint, and metrics past it (to be dropped).
    shutil.copytree(full, resumed)
    (resumed / "checkpoints" / checkpoint.checkpoint_path(resumed, 640).name).unlink()
    (resumed / "summary.json").unlink()
    vimarl.train(resume=resumed)

    final_full = checkpoint.load(checkpoint.latest(full))
    final_resumed = checkpoint.load(checkpoint.latest(resumed))
    assert final_resumed["counters"]["env_steps"] == 640
    assert final_resumed["counters"]["updates"] == final_full["counters"]["updates"]
    for name, value in final_full["algo"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, final_resumed["algo"][name]), name
    returns = lambda run: [(r["env_steps"], r["eval_return_mean"]) for r in read_metrics(run / "metrics.csv")]
    assert returns(full) == returns(resumed)


def test_resume_can_extend_the_budget_but_not_change_the_run(tmp_path):
    out = tmp_path / "run"
    vimarl.train("isac", "grid_coordination", out=str(out), **dict(FAST, total_steps=160))
    vimarl.train(resume=out, total_steps=320)
    assert [r["env_steps"] for r in read_metrics(out / "metrics.csv")] == [0, 160, 320]
    with pytest.raises(VimarlError, match=r"cannot change \['seed'\] when resuming"):
        vimarl.train(resume=out, seed=4)
    with pytest.raises(VimarlError, match="already holds a run; continue it with --resume"):
        vimarl.train("isac", "grid_coordination", out=str(out), **FAST)


def test_corrupt_or_foreign_checkpoints_give_one_line_errors(tmp_path):
    out = tmp_path / "run"
    vimarl.train("vpp", "grid_coordination", out=str(out), **dict(FAST, total_steps=160))
    path = checkpoint.latest(out)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(VimarlError) as error:
        vimarl.train(resume=out)
    assert "is corrupt or not a vimarl checkpoint" in str(error.value) and "\n" not in str(error.value)
    torch.save({"weights": 1}, path)
    with pytest.raises(VimarlError, match="is not a vimarl checkpoint"):
        vimarl.train(resume=out)
    with pytest.raises(VimarlError, match="no checkpoint in"):
        vimarl.train(resume=tmp_path)


def test_checkpoints_keep_only_the_newest(tmp_path):
    out = tmp_path / "run"
    vimarl.train("vpp", "grid_coordination", out=str(out), checkpoint_every=80, keep_checkpoints=2,
                 **dict(FAST, total_steps=400))
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(out / "checkpoints")] == [320, 400]
    assert not list((out / "checkpoints").glob(".*tmp"))


def test_same_seed_same_result_and_different_seed_differs(tmp_path):
    def final_weights(seed, name):
        out = tmp_path / name
        vimarl.train("vpp", "grid_coordination", out=str(out), seed=seed, **dict(FAST, total_steps=160))
        return checkpoint.load(checkpoint.latest(out))["algo"]["policy.heads.agents.net.0.weight"]
    assert torch.equal(final_weights(0, "a"), final_weights(0, "b"))
    assert not torch.equal(final_weights(0, "c"), final_weights(1, "d"))


def test_reuse_freed_memory_takes_effect_on_glibc():
    import platform

    from vimarl.train import reuse_freed_memory
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert reuse_freed_memory() == expected


def test_freed_memory_is_reused_only_when_asked(monkeypatch):
    """It changes the whole process's malloc: off by default (library calls and CLI alike)."""
    train_module = importlib.import_module("vimarl.train")  # `vimarl.train` the attribute is the function
    from vimarl.config import TrainConfig
    calls = []
    monkeypatch.setattr(train_module, "reuse_freed_memory", lambda: calls.append(1) or True)
    train_module.configure_process(TrainConfig())
    assert calls == []
    train_module.configure_process(TrainConfig(reuse_freed_memory=True))
    assert calls == [1]


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Issue 21 item 3: NaN / Inf in a loss ends the run with a one-line error naming the metric and
    the env step; the checkpoint written before stays untouched and summary.json says it failed."""
    from vimarl.algos.isac import ISAC

    real, calls = ISAC.update, []

    def update(self, batch):
        metrics = real(self, batch)
        calls.append(1)
        return {**metrics, "loss_q": torch.tensor(float("nan"))} if len(calls) > 30 else metrics

    monkeypatch.setattr(ISAC, "update", update)
    out = tmp_path / "run"
    with pytest.raises(VimarlError) as error:
        vimarl.train("isac", "grid_coordination", out=str(out), **dict(FAST, update_every=4))
    message = str(error.value)
    assert "loss_q became nan in update 31 at env step" in message and "isac on grid_coordination" in message
    assert "\n" not in message
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == message
    # Updates every 4 env steps after the 64-step warm-up, 4 sub-environments: update 31 at step 192.
    assert summary["env_steps"] == 192 and "env step 192" in message
    kept = checkpoint.list_checkpoints(out / "checkpoints")
    assert [checkpoint.step_of(p) for p in kept] == [160]  # the evaluation before the failure, and nothing after


def test_a_non_finite_reward_from_the_env_is_named(tmp_path, monkeypatch):
    env_class = type(vimarl.make_env("grid_coordination", 1))
    real, calls = env_class.step, []

    def step(self, actions):
        result = real(self, actions)
        calls.append(1)
        if len(calls) == 7:
            result.groups["agents"].reward[1, 4] = float("inf")
        return result

    monkeypatch.setattr(env_class, "step", step)
    with pytest.raises(VimarlError) as error:
        vimarl.train("isac", "grid_coordination", out=str(tmp_path / "run"), **FAST)
    assert "returned a non-finite reward for agent 4 of group 'agents' (sub-environment 1)" in str(error.value)


def test_a_crash_in_the_loop_is_one_line_with_the_traceback_kept_and_resume_continues(tmp_path, monkeypatch):
    """Issue 21 item 4: an exception inside training becomes a one-line error; the traceback goes to
    crash.log, summary.json says failed, and the checkpoint of the last evaluation resumes the run."""
    from vimarl.algos.isac import ISAC

    real, calls = ISAC.update, []

    def update(self, batch):
        calls.append(1)
        if len(calls) == 30:
            raise RuntimeError("simulated failure\nsecond line")
        return real(self, batch)

    monkeypatch.setattr(ISAC, "update", update)
    out = tmp_path / "run"
    with pytest.raises(VimarlError) as error:
        vimarl.train("isac", "grid_coordination", out=str(out), **dict(FAST, update_every=4))
    message = str(error.value)
    assert "training crashed at env step 184 (RuntimeError: simulated failure)" in message and "\n" not in message
    assert f"continue from step 160 with: vimarl train --resume {out}" in message
    assert "simulated failure" in (out / "crash.log").read_text() and "Traceback" in (out / "crash.log").read_text()
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"
    monkeypatch.setattr(ISAC, "update", real)
    vimarl.train(resume=out)
    assert json.loads((out / "summary.json").read_text())["status"] == "done"
    assert [r["env_steps"] for r in read_metrics(out / "metrics.csv")] == [0, 160, 320, 480]
