"""The installed `vimarl` command, end to end."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vimarl
from vimarl.cli import main

VIMARL = Path(sys.executable).parent / "vimarl"
FAST = ["total_steps=320", "eval_every=160", "warmup_steps=64", "batch_size=32", "eval_episodes=8",
        "progress=false", "tensorboard=false"]


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(VIMARL), *args], capture_output=True, text=True, timeout=300)
    assert (result.returncode == 0) == ok, result.stderr
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vimarl: error: "), result.stderr
    assert expected in lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    run("train", "vpp", "grid_coordination", f"out={out}", "seed=1", "algo.alpha=0.1", *FAST)
    return out


def test_entry_point_is_installed():
    assert VIMARL.exists(), "install vimarl into the environment running the tests (make test does)"


def test_list_shows_algorithms_envs_and_flags():
    output = run("list").stdout
    assert "vpp" in output and "isac" in output and "grid_coordination" in output
    assert "[discrete/continuous, needs_graph, heterogeneous]" in output


def test_train_writes_the_run(trained):
    for name in ("config.yaml", "metrics.csv", "curve.png", "summary.json"):
        assert (trained / name).exists(), name
    assert "alpha: 0.1" in (trained / "config.yaml").read_text()
    assert list((trained / "checkpoints").glob("step_*.pt"))


def test_eval_prints_one_json_line_and_writes_a_gif(trained, tmp_path):
    gif = tmp_path / "episode.gif"
    lines = run("eval", str(trained), "--episodes", "7", "--gif", str(gif)).stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["episodes"] == 7 and result["env_steps"] == 320 and result["algo"] == "vpp"
    assert -12.0 <= result["return_mean"] <= 0.0 and result["return_std"] >= 0.0
    assert result["deterministic"] is False  # the grid preset samples the joint policy
    assert gif.read_bytes()[:6] == b"GIF89a"
    deterministic = json.loads(run("eval", str(trained), "--episodes", "3", "--no-sample").stdout)
    assert deterministic["deterministic"] is True


def test_eval_reports_every_execution_mode_of_vm3ac(tmp_path, capsys):
    out = vimarl.train("vm3ac", "pp_capture_n2", out=str(tmp_path / "vm3ac"), total_steps=40, num_envs=2,
                       warmup_steps=20, update_every=10, gradient_steps=1, batch_size=8, eval_every=40,
                       eval_episodes=2, buffer_size=1000, progress=False, tensorboard=False,
                       env_config={"episode_length": 10})
    assert main(["eval", str(out), "--episodes", "3"]) == 0  # in-process: no second interpreter start
    result = json.loads(capsys.readouterr().out)
    assert set(result["return_mean_by_mode"]) == {"z_mean", "z_shared_seed"}
    assert result["return_mean_by_mode"]["z_mean"] == result["return_mean"]  # z_mode=mean is configured


def test_plot_over_runs(trained, tmp_path):
    second = tmp_path / "second"
    run("train", "vpp", "grid_coordination", f"out={second}", "seed=2", *FAST)
    out = tmp_path / "plot.png"
    run("plot", str(trained), str(second), "--out", str(out))
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_resume_through_the_cli(trained):
    run("train", "--resume", str(trained), "total_steps=480", "progress=false")
    assert json.loads((trained / "summary.json").read_text())["env_steps"] == 480


@pytest.mark.parametrize("args, expected", [
    (["train", "vpp", "grid_coordinaton"], "unknown env 'grid_coordinaton' (did you mean 'grid_coordination'?)"),
    (["train", "vppp", "grid_coordination"], "unknown algorithm 'vppp' (did you mean 'vpp'?)"),
    (["train", "vpp", "grid_coordination", "algo.lr=fast"], "algo.lr expects float, got 'fast'"),
    (["train", "vpp", "grid_coordination", "totl_steps=5"], "did you mean 'total_steps'?"),
    (["train", "vpp", "grid_coordination", "env.n=1"], "n must be at least 2"),
    (["train", "vpp"], "train needs ALGO and ENV"),
    (["eval", "/nonexistent/run"], "does not exist"),
    (["plot", "/nonexistent/run", "--out", "x.png"], "is not a directory"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_input_gives_one_line_errors(args, expected):
    assert_one_line_error(run(*args, ok=False), expected)


def test_corrupt_checkpoint_on_eval(trained, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    assert_one_line_error(run("eval", str(broken), ok=False), "is corrupt or not a vimarl checkpoint")


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path):
    out = tmp_path / "interrupted"
    process = subprocess.Popen([str(VIMARL), "train", "vpp", "grid_coordination", f"out={out}",
                                "total_steps=1000000", "eval_every=80", "progress=false", "tensorboard=false"],
                               stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.csv"
    for _ in range(600):  # wait (up to a minute) until training has logged past step 0
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "checkpoint saved, continue with: vimarl train --resume" in stderr and "Traceback" not in stderr
    saved = sorted((out / "checkpoints").glob("step_*.pt"))
    assert saved
    run("train", "--resume", str(out), "total_steps=" + str(int(saved[-1].stem.split("_")[1]) + 80))
    assert (out / "summary.json").exists()


def test_train_options_may_come_before_the_overrides(monkeypatch):
    from vimarl import cli
    seen = {}
    monkeypatch.setattr(cli, "_train", lambda args: seen.update(items=args.items, preset=args.preset))
    assert cli.main(["train", "vpp", "spread", "--preset", "cpu", "seed=3", "out=x"]) == 0
    assert seen == {"items": ["vpp", "spread", "seed=3", "out=x"], "preset": "cpu"}
    assert cli.main(["train", "vpp", "spread", "--preset", "cpu", "seed=3", "--bogus"]) == 2


def test_plot_draws_a_metric_pattern_and_a_coordination_matrix(tmp_path):
    run_dir = tmp_path / "mamt-run"
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text("env_steps,kl_0,kl_1,coord_0_1,coord_1_0\n0,0.0,0.0,0.0,0.0\n"
                                         "100,0.2,0.4,0.9,0.1\n")
    from vimarl.plots import curves, matching_columns
    assert matching_columns(run_dir, "kl_*") == ["kl_0", "kl_1"]
    assert curves([run_dir], "kl_1")["mamt-run"][1].tolist() == [0.0, 0.4]
    for option in (["--metric", "kl_*"], ["--matrix", "coord"]):
        out = tmp_path / f"{option[1].strip('*_')}.png"
        assert main(["plot", str(run_dir), "--out", str(out), *option]) == 0
        assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "x.png"), "--matrix", "dns"]) == 2
