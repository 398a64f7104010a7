"""Kill tests (issue 21 item 6): a run killed with SIGKILL at fixed pseudo-random moments and resumed
always completes, with one metrics row per evaluation, and with save_buffer=true ends with the
parameters of the uninterrupted run; a sweep whose driver is SIGKILLed stops its cells (they get
SIGTERM, checkpoint and exit) and `--resume` finishes every cell once."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vimarl
from vimarl import checkpoint
from vimarl.logging import read_metrics

VIMARL = Path(sys.executable).parent / "vimarl"
SETTINGS = {"total_steps": 960, "eval_every": 96, "warmup_steps": 64, "batch_size": 32, "eval_episodes": 4,
            "final_eval_episodes": 4, "save_buffer": True, "keep_checkpoints": 2, "progress": False,
            "tensorboard": False}
ARGS = [f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in SETTINGS.items()]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL and prctl: Linux only")


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the run made no progress")
        time.sleep(0.05)


def kill_and_resume(out: Path, delay: float) -> None:
    process = subprocess.Popen([str(VIMARL), "train", "isac", "grid_coordination", f"out={out}", *ARGS],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: checkpoint.list_checkpoints(out / "checkpoints") or process.poll() is not None)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    result = subprocess.run([str(VIMARL), "train", "--resume", str(out)], capture_output=True, text=True, timeout=300)
    if result.returncode == 2 and "already run" in result.stderr:  # the kill came after the last step
        return
    assert result.returncode == 0, result.stderr


def test_sigkill_at_random_moments_then_resume_matches_the_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    vimarl.train("isac", "grid_coordination", out=str(full), **SETTINGS)
    reference = checkpoint.load(checkpoint.latest(full))["algo"]
    expected_rows = list(range(0, 961, 96))
    moments = random.Random(21).sample([0.0, 0.2, 0.5, 0.9, 1.4], 3)
    for i, delay in enumerate(moments):
        out = tmp_path / f"killed-{i}"
        kill_and_resume(out, delay)
        rows = read_metrics(out / "metrics.csv")
        assert [r["env_steps"] for r in rows] == expected_rows, delay  # no duplicate, none missing
        assert json.loads((out / "summary.json").read_text())["status"] == "done"
        final = checkpoint.load(checkpoint.latest(out))["algo"]
        for name, value in reference.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, final[name]), (delay, name)


def test_a_killed_sweep_driver_stops_its_cells_and_resume_finishes_each_once(tmp_path):
    experiment = Path(__file__).parent / "data" / "tiny_experiment.yaml"
    out = tmp_path / "sweep"
    command = [str(VIMARL), "sweep", str(experiment), "--workers", "2", "--out", str(out), "--only", "*/vpp-*"]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: any(out.glob("*/vpp-s*/metrics.csv")) or driver.poll() is not None)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    # The cells' trainers got SIGTERM from the kernel (their parent died): none keeps running.
    def running() -> list[str]:
        found = subprocess.run(["pgrep", "-f", f"out={out}"], capture_output=True, text=True).stdout.split()
        return [pid for pid in found if int(pid) != os.getpid()]
    wait_for(lambda: not running(), timeout=60)
    result = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    ledger = json.loads((out / "sweep.json").read_text())
    assert ledger["cells"] and all(c["status"] == "done" for c in ledger["cells"])
    for cell in ledger["cells"]:
        steps = [r["env_steps"] for r in read_metrics(Path(cell["run_dir"]) / "metrics.csv")]
        assert len(steps) == len(set(steps)) and steps[-1] == cell["total_steps"], cell["run_dir"]
