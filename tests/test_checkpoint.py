"""Checkpoints load weights only (issue 21 item 1): a file carrying a pickled object is refused,
with no side effect, wherever vimarl reads checkpoints (vimarl eval, --resume, algo.frozen=); the
trainer's non-plain state (time steps, graphs, numpy's RNG state) round-trips through plain values;
format-1 files you trust are upgraded explicitly."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import vimarl
from vimarl import checkpoint
from vimarl.cli import main
from vimarl.envs.base import GroupStep, TimeStep
from vimarl.envs.graph import Graph
from vimarl.errors import VimarlError
from vimarl.logging import read_metrics

train_module = importlib.import_module("vimarl.train")  # vimarl.train the attribute is the function
QUICK = dict(total_steps=64, eval_every=64, warmup_steps=32, batch_size=16, eval_episodes=2, final_eval_episodes=2,
             progress=False, tensorboard=False)


class Payload:
    """Unpickling this creates a file: the side effect a malicious checkpoint would have."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    vimarl.train("isac", "grid_coordination", out=str(out), **QUICK)
    return out


def poisoned_copy(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the run whose checkpoint also carries the payload; (run folder, marker file)."""
    target, marker = tmp_path / "poisoned", tmp_path / "payload-ran"
    target.mkdir()
    for name in ("config.yaml", "metrics.csv", "summary.json"):
        (target / name).write_bytes((run_dir / name).read_bytes())
    (target / "checkpoints").mkdir()
    content = torch.load(checkpoint.latest(run_dir), weights_only=True)
    content["extra"] = Payload(marker)
    torch.save(content, target / "checkpoints" / checkpoint.latest(run_dir).name)
    return target, marker


def refused(marker: Path, error: VimarlError) -> None:
    message = str(error)
    assert "holds a pickled object (getattr)" in message and "\n" not in message  # the global it would call
    assert not marker.exists()  # the payload never ran


def test_a_pickled_payload_is_refused_by_eval_resume_and_frozen_members(run_dir, tmp_path, capsys):
    poisoned, marker = poisoned_copy(run_dir, tmp_path)
    with pytest.raises(VimarlError) as error:
        checkpoint.load(checkpoint.latest(poisoned))
    refused(marker, error.value)

    assert main(["eval", str(poisoned), "--episodes", "2"]) != 0
    err = capsys.readouterr().err
    assert "holds a pickled object" in err and err.count("\n") == 1 and not marker.exists()

    with pytest.raises(VimarlError) as error:
        vimarl.train(resume=poisoned)
    refused(marker, error.value)

    env = vimarl.make_env("tag", 2, seed=0)
    trained_prey = tmp_path / "prey"
    vimarl.train("isac", "tag", out=str(trained_prey), **QUICK)
    content = torch.load(checkpoint.latest(trained_prey), weights_only=True)
    content["extra"] = Payload(marker)
    torch.save(content, checkpoint.latest(trained_prey))
    with pytest.raises(VimarlError) as error:
        vimarl.make_algo("team", env, members={"predators": "isac"}, frozen={"prey": str(trained_prey)})
    refused(marker, error.value)


def test_checkpoints_are_weights_only_files(run_dir):
    content = torch.load(checkpoint.latest(run_dir), weights_only=True)  # would raise on any object
    assert content["version"] == checkpoint.VERSION == 2
    assert content["step"]["__vimarl_type__"] == "TimeStep"


def test_time_steps_graphs_and_numpy_state_round_trip():
    graph = Graph(torch.tensor([[[1], [0]]]), torch.tensor([[[True], [False]]]))
    step = TimeStep(groups={"agents": GroupStep(obs=torch.randn(1, 2, 3), reward=torch.zeros(1, 2), graph=graph)},
                    terminated=torch.zeros(1, dtype=torch.bool), truncated=torch.ones(1, dtype=torch.bool),
                    info={"average_travel_time": torch.tensor([3.0])})
    rng = np.random.RandomState(5).get_state()
    plain = checkpoint.to_plain({"step": step, "rng": rng, "counters": {"updates": np.int64(3)}})
    back = checkpoint.from_plain(plain)
    assert isinstance(back["step"], TimeStep) and isinstance(back["step"].groups["agents"].graph, Graph)
    assert torch.equal(back["step"].groups["agents"].obs, step.groups["agents"].obs)
    assert torch.equal(back["step"].groups["agents"].graph.mask, graph.mask)
    assert back["step"].info["average_travel_time"].item() == 3.0
    assert back["rng"][0] == "MT19937" and back["rng"][1].dtype == np.uint32
    assert np.array_equal(back["rng"][1], rng[1]) and back["counters"]["updates"] == 3
    restored = np.random.RandomState()
    restored.set_state(back["rng"])
    assert restored.rand() == np.random.RandomState(5).rand()


def test_unknown_objects_are_refused_when_saving(tmp_path):
    with pytest.raises(VimarlError) as error:
        checkpoint.save(tmp_path / "x.pt", {"env": {"simulator": object()}})
    assert "cannot write object at checkpoint.env.simulator" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "x.pt").exists()


def test_a_trusted_format_1_checkpoint_is_upgraded_explicitly(run_dir, tmp_path):
    old = tmp_path / "step_000000000064.pt"
    content = checkpoint.from_plain(torch.load(checkpoint.latest(run_dir), weights_only=True))
    torch.save({**content, "version": 1}, old)  # pickles the TimeStep and numpy objects, as format 1 did
    with pytest.raises(VimarlError, match="python -m vimarl.checkpoint upgrade"):
        checkpoint.load(old)
    assert checkpoint.main(["upgrade", str(old)]) == 0
    upgraded = checkpoint.load(old)
    assert isinstance(upgraded["step"], TimeStep) and upgraded["version"] == 2
    assert checkpoint.main(["upgrade"]) == 2
    assert os.path.getsize(old) > 0


# -- crash safety (issue 21 items 4, 5) ----------------------------------------------------------
def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    out = tmp_path / "run"
    vimarl.train("isac", "grid_coordination", out=str(out), **dict(QUICK, total_steps=128, eval_every=64))
    older, newest = checkpoint.list_checkpoints(out / "checkpoints")
    newest.write_bytes(newest.read_bytes()[:300])
    with pytest.warns(UserWarning, match=f"is corrupt.*using the earlier checkpoint {older.name}"):
        path, content = checkpoint.load_latest(out)
    assert path == older and content["counters"]["env_steps"] == 64
    with pytest.raises(VimarlError, match="is corrupt"):  # no earlier one to fall back to
        checkpoint.load_latest(newest)


def test_resume_at_or_below_the_steps_done_is_a_one_line_error(run_dir, capsys):
    assert main(["train", "--resume", str(run_dir), "total_steps=64"]) == 2
    err = capsys.readouterr().err
    assert "has already run 64 env steps, which reaches total_steps=64" in err and err.count("\n") == 1


def test_resume_without_the_replay_waits_until_the_buffer_refills(tmp_path, monkeypatch):
    """save_buffer=false: the resumed buffer is empty, so updates wait for max(batch, warm-up) rows."""
    out = tmp_path / "run"
    settings = dict(QUICK, total_steps=96, eval_every=48, warmup_steps=16, batch_size=40, update_every=1)
    vimarl.train("isac", "grid_coordination", out=str(out), **settings)  # grid_coordination: 4 envs
    sizes = []
    real = train_module.Trainer._record

    def record(self, metrics):
        sizes.append(len(self.buffer))
        real(self, metrics)

    monkeypatch.setattr(train_module.Trainer, "_record", record)
    with pytest.warns(UserWarning, match="without its replay buffer.*until it holds 40 transitions"):
        vimarl.train(resume=out, total_steps=160)
    assert sizes and min(sizes) >= 40  # never a batch of 40 drawn from fewer rows
    assert read_metrics(out / "metrics.csv")[-1]["env_steps"] == 160


