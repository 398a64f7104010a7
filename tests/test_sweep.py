"""`vimarl sweep` and `vimarl report`: experiment files, cells, the local and Ray backends, resume,
retries, the summary and the report (tests/data/tiny_experiment.yaml: about a second of training
per cell, plus the subprocess's start). The statistics and verdict rules: tests/test_statistics.py."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from vimarl.cli import main
from vimarl.errors import VimarlError
from vimarl.logging import read_metrics
from vimarl.report import report
from vimarl.stats import iqm_interval, run_score
from vimarl.sweep import (ARCHIVED_RUN_FILES, SOCKET_PATH_LIMIT, _ray_temp_dir, archive, expand, experiment_names,
                          load_experiment, read_ledger, sweep)
from vimarl.train import train_from_cli

TINY = Path(__file__).parent / "data" / "tiny_experiment.yaml"
QUIET = {"say": lambda line: None}


def tiny(tmp_path: Path, **changes) -> Path:
    """A copy of the tiny experiment with top-level keys replaced."""
    data = yaml.safe_load(TINY.read_text())
    data.update(changes)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_shipped_experiment_expands_at_both_scales():
    names = experiment_names()
    for required in ("masac_fig2", "vm3ac_fig3", "vm3ac_table3", "mamt_fig4", "mamt_fig10", "vpp_fig7_toy",
                     "vpp_fig3_cityflow", "vpp_fig11_coopnav", "vpp_fig8_ablations", "vpp_fig8_traffic", "ip_fig4"):
        assert required in names
    for name in names:
        experiment = load_experiment(name)
        for scale in ("cpu", "paper"):
            cells = expand(experiment, scale, "out")
            assert all(cell.total_steps for cell in cells), name
        assert experiment.get("claims"), f"{name} states no claims of its paper"


def test_expand_cells_directories_and_overrides(tmp_path):
    experiment = load_experiment(TINY)
    cells = expand(experiment, "cpu", tmp_path)
    assert len(cells) == 2 * 2 * 2  # envs x algorithms x seeds
    assert {Path(c.run_dir).relative_to(tmp_path).as_posix() for c in cells} == {
        f"{env}/{algo}-s{seed}" for env in ("grid3", "grid2") for algo in ("vpp", "isac") for seed in (0, 1)}
    cell = next(c for c in cells if c.key == "grid2/isac-s1")
    assert (cell.algo, cell.env, cell.total_steps) == ("isac", "grid_coordination", 64)
    for item in ("env.n=2", "algo.hidden_dim=8", "total_steps=64", "eval_every=32", "num_envs=4", "seed=1",
                 "progress=false"):
        assert item in cell.args
    assert "env.n=2" not in next(c for c in cells if c.key == "grid3/isac-s1").args
    paper = expand(experiment, "paper", tmp_path)
    assert len(paper) == 2 * 2 * 3 and paper[0].total_steps == 2000
    assert [c.key for c in expand(experiment, "cpu", tmp_path, seeds=[5], only="grid2/*")] == [
        "grid2/vpp-s5", "grid2/isac-s5"]


def test_a_scale_can_run_a_subset_of_the_envs(tmp_path):
    experiment = load_experiment(TINY)
    experiment["scales"]["cpu"]["envs"] = ["grid2"]
    assert {c.env_label for c in expand(experiment, "cpu", tmp_path)} == {"grid2"}
    assert {c.env_label for c in expand(experiment, "paper", tmp_path)} == {"grid2", "grid3"}
    experiment["scales"]["cpu"]["envs"] = ["grid4"]
    with pytest.raises(VimarlError, match="scales.cpu.envs names grid4, not in envs"):
        expand(experiment, "cpu", tmp_path)


def test_an_arm_can_set_overrides_per_scale(tmp_path):
    experiment = load_experiment(TINY)
    experiment["algorithms"]["isac"] = {"overrides": {"algo.lr": 0.002}, "scales": {"cpu": {"overrides": {"algo.lr": 0.001}}}}
    lr = {scale: {c.label: next((a for a in c.args if a.startswith("algo.lr=")), None)
                  for c in expand(experiment, scale, tmp_path)} for scale in ("cpu", "paper")}
    assert lr["cpu"]["isac"] == "algo.lr=0.001" and lr["paper"]["isac"] == "algo.lr=0.002"
    assert lr["cpu"]["vpp"] is None  # the other arm is untouched
    experiment["algorithms"]["isac"]["scales"] = {"cpu": [1]}
    with pytest.raises(VimarlError, match="arm isac: scales.cpu must be a mapping"):
        expand(experiment, "cpu", tmp_path)


def test_per_env_algorithm_overrides_and_env_restrictions():
    experiment = load_experiment("vm3ac_fig3")
    fig3 = expand(experiment, "cpu", "out")
    seeds = len(experiment["scales"]["cpu"]["seeds"])  # the ablation runs on one env only, every seed
    assert sum(c.label == "vm3ac_beta0" for c in fig3) == seeds and {c.env for c in fig3 if c.label == "vm3ac_beta0"} == {
        "pp_capture_n2"}
    tag = next(c for c in expand(load_experiment("masac_fig2"), "cpu", "out") if c.key == "tag/masac-s0")
    assert tag.algo == "team" and "algo.members={predators: masac, prey: maddpg}" in tag.args
    rover = next(c for c in expand(load_experiment("mamt_fig4"), "cpu", "out") if c.key == "rover_tower/mamt-s0")
    assert "update_every=8" in rover.args and "update_every=2" not in rover.args
    fig11 = load_experiment("vpp_fig11_coopnav")
    vpp = {scale: next(c for c in expand(fig11, scale, "out") if c.label == "vpp").args for scale in ("cpu", "paper")}
    assert vpp["paper"][:2] == ["--preset", "paper"] and "--preset" not in vpp["cpu"]  # a preset per scale, none at cpu
    op = next(c for c in expand(load_experiment("mamt_fig10"), "cpu", "out") if c.key == "spread3_mix/mamd_op-s0")
    assert op.algo == "mamd" and op.args[:2] == ["--preset", "op_mix"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    """The tiny experiment's VPP cells (2 envs x 2 seeds), run with the local backend."""
    out = tmp_path_factory.mktemp("sweep") / "tiny"
    sweep(TINY, out=out, workers=2, only="*/vpp-*", **QUIET)
    return out


def test_local_backend_runs_every_cell_and_writes_ledger_and_summary(swept):
    ledger = json.loads((swept / "sweep.json").read_text())
    assert ledger["experiment"] == "tiny_experiment" and ledger["backend"] == "local"
    assert [(c["env_label"], c["label"], c["seed"], c["status"], c["attempts"]) for c in ledger["cells"]] == [
        (env, "vpp", seed, "done", 1) for env in ("grid3", "grid2") for seed in (0, 1)]
    assert all(c["wall_s"] > 0 for c in ledger["cells"])
    with open(swept / "summary.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2
    for row in rows:
        runs = [read_metrics(swept / row["env"] / f"vpp-s{seed}" / "metrics.csv") for seed in (0, 1)]
        assert all(run[-1]["env_steps"] == 64 for run in runs)
        scores = [run_score(run, ["eval_return_mean"]) for run in runs]  # the mean of the last three evaluations
        assert [float(v) for v in row["values"].split()] == pytest.approx(scores, rel=1e-5)
        assert float(row["mean"]) == pytest.approx(sum(scores) / 2, rel=1e-5)
        assert float(row["std"]) == pytest.approx(abs(scores[0] - scores[1]) / 2, rel=1e-5)
        aggregate = iqm_interval(scores)  # two seeds: the IQM is their mean
        assert [float(row[c]) for c in ("iqm", "iqm_lo", "iqm_hi")] == pytest.approx(
            [aggregate.value, aggregate.lo, aggregate.hi])
        assert min(scores) <= aggregate.lo <= aggregate.value <= aggregate.hi <= max(scores)
    assert (swept / "grid3.png").exists() and (swept / "grid2.png").exists()
    summary = (swept / "summary.md").read_text()
    assert "| grid2 | eval_return_mean | " in summary and "IQM [95% bootstrap interval]" in summary
    assert (swept / "sweep.csv").read_text().count("done") == 4


def test_sweep_figures_group_runs_by_the_experiment_labels(swept):
    from vimarl.plots import curves
    runs = [swept / env / f"vpp-s{seed}" for env in ("grid3", "grid2") for seed in (0, 1)]
    drawn = curves(runs, names=["vpp on grid3", "vpp on grid3", "vpp on grid2", "vpp on grid2"])
    assert list(drawn) == ["vpp on grid3", "vpp on grid2"]
    finals = [read_metrics(run / "metrics.csv")[-1]["eval_return_mean"] for run in runs]
    steps, centre, lower, upper, n_runs = drawn["vpp on grid2"]
    assert n_runs == 2 and steps[-1] == 64
    assert centre[-1] == pytest.approx((finals[2] + finals[3]) / 2)  # the IQM of two runs is their mean
    assert min(finals[2:]) <= lower[-1] <= centre[-1] <= upper[-1] <= max(finals[2:])  # the bootstrap band


def test_resume_with_only_keeps_the_ledgers_other_cells(swept, tmp_path):
    """--only chooses what runs now; the ledger (and so the report) keeps every cell it held."""
    out = tmp_path / "tiny"
    shutil.copytree(swept, out)
    before = json.loads((out / "sweep.json").read_text())["cells"]
    sweep(TINY, out=out, only="grid2/vpp-s0", resume=True, **QUIET)
    after = json.loads((out / "sweep.json").read_text())["cells"]
    key = lambda c: (c["env_label"], c["label"], c["seed"])  # noqa: E731
    assert sorted(map(key, after)) == sorted(map(key, before)) and len(after) == 4
    assert all(c["status"] == "done" for c in after)


def test_resume_skips_finished_cells_and_resumes_an_interrupted_one(swept, tmp_path):
    out = tmp_path / "tiny"
    shutil.copytree(swept, out)
    # Replace one cell by a run stopped at 32 of its 64 steps, with the checkpoint it wrote.
    interrupted = next(c for c in expand(load_experiment(TINY), "cpu", out) if c.key == "grid2/vpp-s1")
    shutil.rmtree(interrupted.run_dir)
    train_from_cli(interrupted.algo, interrupted.env,
                   [a for a in interrupted.args if not a.startswith("total_steps=")]
                   + ["total_steps=32", f"out={interrupted.run_dir}"], None, None)
    first_rows = read_metrics(Path(interrupted.run_dir) / "metrics.csv")
    assert first_rows[-1]["env_steps"] == 32
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*/vpp-s*/metrics.csv") if "grid2/vpp-s1" not in str(p)}

    with pytest.raises(VimarlError, match="--resume"):
        sweep(TINY, out=out, only="*/vpp-*", **QUIET)
    first = json.loads((out / "sweep.json").read_text())
    sweep(TINY, out=out, workers=1, only="*/vpp-*", resume=True, command="vimarl sweep again", **QUIET)
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # not run again
    ledger = json.loads((out / "sweep.json").read_text())
    assert (ledger["command"], ledger["started"], len(ledger["resumed"])) == (first["command"], first["started"], 1)
    assert ledger["wall_s"] > first["wall_s"]  # the first session's wall time plus this one's
    assert (ledger["machine"], ledger["workers"]) == (first["machine"], "2, then 1")  # every session named
    cells = {f"{c['env_label']}/{c['label']}-s{c['seed']}": c for c in ledger["cells"]}
    assert all(c["status"] == "done" for c in cells.values())
    assert [cells[k]["attempts"] for k in ("grid3/vpp-s0", "grid3/vpp-s1", "grid2/vpp-s0")] == [1, 1, 1]
    resumed = read_metrics(Path(interrupted.run_dir) / "metrics.csv")
    assert resumed[-1]["env_steps"] == 64
    def kept(rows):
        return [(r["env_steps"], r["wall_s"], r["eval_return_mean"]) for r in rows]
    assert kept(resumed[:len(first_rows)]) == kept(first_rows)  # continued, not restarted
    assert "--resume" in (Path(interrupted.run_dir) / "train.log").read_text()


def test_failing_cell_is_retried_then_reported_without_stopping_the_sweep(tmp_path):
    path = tiny(tmp_path, algorithms={"vpp": {"overrides": {"algo.hidden_dim": 8}},
                                      "broken": {"algo": "isac", "overrides": {"algo.no_such_field": 1}}})
    out = tmp_path / "out"
    sweep(path, out=out, workers=2, only="grid2/*", seeds=[0], retries=1, **QUIET)
    cells = {c["label"]: c for c in json.loads((out / "sweep.json").read_text())["cells"]}
    assert cells["vpp"]["status"] == "done" and cells["vpp"]["attempts"] == 1
    assert cells["broken"]["status"] == "failed" and cells["broken"]["attempts"] == 2
    assert "no_such_field" in cells["broken"]["error"]
    assert "failed" in (out / "sweep.csv").read_text()
    summary = (out / "summary.md").read_text()
    assert "n/a" in summary  # the failed cell has no numbers


def test_ray_backend_runs_the_same_sweep(tmp_path):
    pytest.importorskip("ray", reason="ray is not installed: pip install 'vimarl[ray]' to test the Ray backend")
    out, said = tmp_path / "ray", []
    sweep(TINY, backend="ray", out=out, workers=2, only="grid2/vpp-*", say=said.append)
    ledger = json.loads((out / "sweep.json").read_text())
    assert ledger["backend"] == "ray"
    assert [(c["seed"], c["status"], c["attempts"]) for c in ledger["cells"]] == [(0, "done", 1), (1, "done", 1)]
    for seed in (0, 1):
        assert read_metrics(out / "grid2" / f"vpp-s{seed}" / "metrics.csv")[-1]["env_steps"] == 64
    # Ray's temp dir is inside the sweep folder unless that path is too long for its sockets.
    inside = len(str((out / "ray").resolve())) <= SOCKET_PATH_LIMIT
    assert (out / "ray").is_dir() == inside
    assert any("too long for Ray's Unix sockets" in line for line in said) != inside


def test_ray_temp_dir_falls_back_to_a_short_path(tmp_path):
    assert _ray_temp_dir(Path("/r")) == ("/r/ray", "")
    long_dir, note = _ray_temp_dir(tmp_path / ("x" * 50))
    assert len(long_dir) <= SOCKET_PATH_LIMIT and "too long" in note and long_dir in note
    shutil.rmtree(long_dir)


def test_report_puts_our_numbers_next_to_the_claims(swept, tmp_path):
    out = report(swept, tmp_path / "tiny.md")
    text = out.read_text()
    assert "vimarl sweep" in text and "machine:" in text and "env steps per run: 64" in text
    assert "| VPP reaches 0 | test | vpp: 0 | grid3 vpp " in text and "**needs judgement**" in text
    assert "VPP at least on par with ISAC" in text and "**not run**" in text  # isac cells were left out
    assert "ours: IQM [95% CI] | P(improvement) |" in text
    assert "### grid2\n\n| setting | vpp |\n" in text and "| hidden_dim | 8 |" in text  # each arm's settings
    # Fewer than six evaluations per run (every 32 of 64 steps) cannot tell a flat curve; paper scale: 2,000 steps.
    assert "| grid2 | vpp | 64 | 2,000 | too few evaluations to tell" in text
    figures = sorted(tmp_path.glob("*/*.png"))  # copied next to the report, and shown
    assert [f.relative_to(tmp_path).as_posix() for f in figures] == [
        "tiny_experiment/grid2.png", "tiny_experiment/grid3.png"]
    assert "![grid3](tiny_experiment/grid3.png)" in text
    assert main(["report", str(swept), "--out", str(tmp_path / "cli.md")]) == 0
    assert (tmp_path / "cli.md").exists()


def test_report_of_a_sweep_stopped_part_way_uses_the_runs_that_finished(swept, tmp_path):
    """A sweep killed mid-way leaves its ledger behind the runs: the report summarises afresh from
    the runs' own metrics, counting a cell as finished when its run reached total_steps."""
    partial = tmp_path / "partial"
    shutil.copytree(swept, partial)
    ledger = json.loads((partial / "sweep.json").read_text())
    for cell in ledger["cells"]:
        cell["status"] = "pending"  # the ledger of a sweep killed before it wrote the outcomes
        cell["run_dir"] = str(partial / Path(cell["run_dir"]).relative_to(swept))
    (partial / "sweep.json").write_text(json.dumps(ledger))
    (partial / "grid2" / "vpp-s1" / "metrics.csv").unlink()  # a cell that never ran
    text = report(partial, tmp_path / "partial.md").read_text()
    assert "cells: 3 of 4 finished; not finished: grid2/vpp-s1" in text
    rows = {row["env"]: row for row in csv.DictReader(open(partial / "summary.csv"))}
    assert rows["grid2"]["n_seeds"] == "1" and rows["grid3"]["n_seeds"] == "2"


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vimarl: error: "), lines
    return lines[0]


def test_bad_input_gives_one_line_errors(capsys, tmp_path):
    assert "did you mean 'masac_fig2'" in one_line_error(capsys, ["sweep", "masac_fig"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("envs: {a: [1\n")
    assert "not valid YAML" in one_line_error(capsys, ["sweep", str(broken)])
    broken.write_text("envs: {grid_coordination: {}}\n")
    assert "needs a non-empty 'algorithms'" in one_line_error(capsys, ["sweep", str(broken)])
    broken.write_text("envs: {grid_coordination: {}}\nalgorithms: {vpp: {}}\nclaim: []\n")
    assert "unknown key 'claim'" in one_line_error(capsys, ["sweep", str(broken)])
    assert "holds no sweep.json" in one_line_error(capsys, ["report", str(tmp_path)])
    assert "no cells" in one_line_error(capsys, ["sweep", str(TINY), "--only", "nothing", "--out", str(tmp_path / "o")])
    assert "--workers" in one_line_error(capsys, ["sweep", str(TINY), "--workers", "0"])


def test_archive_keeps_finished_runs_and_a_restored_sweep_reports_and_resumes(swept, tmp_path):
    out = tmp_path / "moved"
    shutil.copytree(swept, out)
    unfinished = next(c for c in expand(load_experiment(TINY), "cpu", out) if c.key == "grid2/vpp-s1")
    shutil.rmtree(unfinished.run_dir)  # as if it had not finished
    kept = tmp_path / "archive"
    assert archive(out, kept) == 3
    assert sorted(p.name for p in (kept / "grid3" / "vpp-s0").iterdir()) == sorted(ARCHIVED_RUN_FILES)
    assert not (kept / "grid2" / "vpp-s1").exists() and not list(kept.rglob("*.pt"))

    # A later session: the archive copied to another place reads with its own run folders.
    restored = tmp_path / "restored"
    shutil.copytree(kept, restored)
    ledger = read_ledger(restored)
    assert all(c["run_dir"].startswith(str(restored)) for c in ledger["cells"])
    report_path = report(restored, tmp_path / "report.md")
    assert "3 of 4 finished" in report_path.read_text()
    finished = {p: p.stat().st_mtime_ns for p in restored.glob("*/vpp-s*/metrics.csv")}
    sweep(TINY, out=restored, only="*/vpp-*", resume=True, **QUIET)
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # the archived runs are not rerun
    assert read_metrics(restored / "grid2" / "vpp-s1" / "metrics.csv")[-1]["env_steps"] == 64


def test_random_baseline_reads_the_compared_metric_including_env_metrics():
    """The uniform-random row of a summary is the experiment's metric for uniformly random actions on
    the final evaluation's episodes: the return, or an env metric such as coop_nav's team_return
    (which, with local rewards, is N times the return)."""
    from vimarl.sweep import random_baseline

    experiment = {"metric": "eval_return_mean", "envs": {"nav": {"env": "coop_nav_n3", "overrides": {"env.reward": "local"}}}}
    local_return = random_baseline(experiment, "nav", episodes=8)
    team_return = random_baseline({**experiment, "metric": "eval_team_return"}, "nav", episodes=8)
    assert local_return < 0 and team_return == pytest.approx(3 * local_return, rel=1e-5)
