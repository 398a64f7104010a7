"""Scores, IQM and bootstrap intervals (vimarl.stats), the verdict rules, the configuration and
budget tables and the report end to end (vimarl.report), on hand-written runs with known answers."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from vimarl import stats
from vimarl.config import resolve
from vimarl.errors import VimarlError
from vimarl.report import (INCONCLUSIVE, NOT_REPRODUCED, NOT_RUN, REPRODUCED, arm_settings, combine, compare,
                           config_table, evaluate_claim, flatness, judge, report)
from vimarl.stats import Estimate, iqm, iqm_band, iqm_interval
from vimarl.sweep import Cell, fmt, load_experiment, read_summary, score, summarise, write_ledger


@pytest.fixture(autouse=True)
def fewer_bootstrap_resamples(monkeypatch):
    """The rules do not depend on the number of resamples; fewer keep these tests fast."""
    monkeypatch.setattr(stats, "BOOTSTRAP_REPS", 400)


def write_metrics(run_dir: Path, rows: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return run_dir


def test_a_runs_score_is_the_mean_of_its_last_three_evaluations(tmp_path):
    run = write_metrics(tmp_path / "run", [
        {"env_steps": 100 * i, "eval_return_mean": m, "eval_return/a": a, "eval_return/b": b}
        for i, (m, a, b) in enumerate([(0, 0, 0), (1, 1, 3), (2, 2, 2), (4, 4, 6), (6, 5, 9)])])
    assert score(run, ["eval_return_mean"]) == pytest.approx((2 + 4 + 6) / 3)
    # Columns summed, then divided, as metric and divide_by say: ((2+2) + (4+6) + (5+9)) / 2 / 3.
    assert score(run, ["eval_return/a", "eval_return/b"], divide_by=2) == pytest.approx(28 / 6)
    short = write_metrics(tmp_path / "short", [{"env_steps": 0, "eval_return_mean": 1.0},
                                               {"env_steps": 100, "eval_return_mean": 2.0}])
    assert score(short, ["eval_return_mean"]) == pytest.approx(1.5)  # fewer rows: the mean of what exists
    assert score(short, ["eval_return/a"]) is None and score(tmp_path / "none", ["eval_return_mean"]) is None


def test_iqm_of_known_values_and_an_interval_that_shrinks_with_more_seeds():
    assert iqm(range(1, 9)) == pytest.approx(4.5)  # the mean of the middle half: 3, 4, 5, 6
    assert iqm([1, 2, 3]) == pytest.approx(2)  # under four seeds nothing is cut
    few, many = iqm_interval(range(1, 9)), iqm_interval(list(range(1, 9)) * 4)
    assert few.value == many.value == pytest.approx(4.5)
    assert few.lo < 4.5 < few.hi and many.lo < 4.5 < many.hi
    assert many.hi - many.lo < few.hi - few.lo
    assert iqm_interval([3.0]) == Estimate(3.0, 3.0, 3.0)
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    assert iqm_interval(range(1, 9)) == few  # seeded: the same scores give the same interval
    assert (np.random.get_state()[1] == before).all()  # and numpy's global generator is left as it was
    centre, lower, upper = iqm_band(np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]]))  # runs x steps
    assert centre.tolist() == pytest.approx([2.0, 4.0]) and (lower <= centre).all() and (centre <= upper).all()
    assert (fmt(Estimate(-3698.4, -3800.2, -3600.0)), fmt(Estimate(math.nan, math.nan, math.nan))) == (
        "-3,698 [-3,800, -3,600]", "n/a")


@pytest.mark.parametrize("op, lo, hi, tolerance, expected", [
    (">", 0.5, 2.0, 0, REPRODUCED), (">", -2.0, -0.5, 0, NOT_REPRODUCED), (">", -0.5, 2.0, 0, INCONCLUSIVE),
    (">=", 0.5, 2.0, 0, REPRODUCED), (">=", -0.5, 2.0, 0, INCONCLUSIVE),
    (">=", -0.5, 2.0, 1, REPRODUCED),       # at most 1 below: on par within the tolerance
    (">=", -3.0, -2.0, 1, NOT_REPRODUCED), (">=", -3.0, -0.5, 1, INCONCLUSIVE),
    ("~=", -0.5, 0.5, 1, REPRODUCED), ("~=", 1.5, 3.0, 1, NOT_REPRODUCED), ("~=", -3.0, -1.5, 1, NOT_REPRODUCED),
    ("~=", 0.5, 1.5, 1, INCONCLUSIVE),
    ("~=", -0.5, 0.5, 0, REPRODUCED), ("~=", 0.5, 1.5, 0, NOT_REPRODUCED),  # tolerance 0: does it contain 0
])
def test_verdict_rules_on_the_interval_of_the_difference(op, lo, hi, tolerance, expected):
    assert judge(op, Estimate((lo + hi) / 2, lo, hi), tolerance)[0] == expected


STRONG, WEAK = [10.0, 11.0, 12.0, 13.0, 14.0], [0.0, 1.0, 2.0, 3.0, 4.0]
NOISY_A, NOISY_B = [0.0, 5.0, 10.0, 2.0, 8.0], [1.0, 6.0, 9.0, 3.0, 7.0]


@pytest.mark.parametrize("left, op, right, tolerance, expected", [
    (STRONG, ">", WEAK, 0, REPRODUCED), (WEAK, ">", STRONG, 0, NOT_REPRODUCED),
    (NOISY_A, ">", NOISY_B, 0, INCONCLUSIVE), (NOISY_A, "~=", NOISY_B, 0, REPRODUCED),
    (STRONG, ">", 5.0, 0, REPRODUCED),                    # the paper's number as an operand
    (STRONG, "~=", 12.0, 3, REPRODUCED), (STRONG, "~=", 20.0, 3, NOT_REPRODUCED),
    (STRONG, "~=", 13.5, 1, INCONCLUSIVE),
    (WEAK, ">=", STRONG, 20, REPRODUCED), (WEAK, ">=", STRONG, 5, NOT_REPRODUCED),  # about 10 below
    (WEAK, ">=", STRONG, 10, INCONCLUSIVE),
    ([14.0], ">", WEAK, 0, INCONCLUSIVE),                 # one seed cannot support a claim
])
def test_verdicts_on_hand_made_runs(left, op, right, tolerance, expected):
    assert compare(left, op, right, tolerance).verdict == expected


def test_a_comparison_shows_its_interval_and_the_probability_of_improvement():
    result = compare(STRONG, ">", WEAK, names=("a", "b"))
    assert result.improvement == Estimate(1.0, 1.0, 1.0)  # every seed of a above every seed of b
    assert result.reason.startswith("IQM difference +10 [") and "lies above 0; P(a > b) 1 [1, 1]" in result.reason
    noisy = compare(NOISY_A, ">", NOISY_B)
    assert noisy.improvement.value == pytest.approx(0.48)  # 12 of the 25 pairs of seeds
    assert 0 < noisy.improvement.lo < 0.48 < noisy.improvement.hi < 1
    one_seed = compare([14.0], ">", WEAK, names=("a", "b"))
    assert "too few seeds: a has 1, 2 needed" in one_seed.reason
    assert compare([], ">", WEAK).verdict == NOT_RUN


def summary_of(scores: dict[tuple[str, str], list[float]]) -> list[dict]:
    """Summary rows as read_summary returns them, for (env, algorithm) -> seed scores."""
    rows = []
    for (env, algorithm), values in scores.items():
        aggregate = iqm_interval(values)
        rows.append({"env": env, "algorithm": algorithm, "metric": "eval_return_mean", "main": True,
                     "n_seeds": len(values), "iqm": aggregate.value, "iqm_lo": aggregate.lo,
                     "iqm_hi": aggregate.hi, "values": values})
    return rows


def test_claims_combine_over_envs_and_operands():
    summary = summary_of({("x", "a"): STRONG, ("x", "b"): WEAK, ("x", "c"): [v + 20 for v in STRONG],
                          ("y", "a"): WEAK, ("y", "b"): STRONG, ("z", "a"): [1.0]})
    assert evaluate_claim({"env": "x", "compare": "a > b"}, summary).verdict == REPRODUCED
    assert evaluate_claim({"env": ["x", "y"], "compare": "b > a"}, summary).verdict == "mixed (1 of 2 reproduced, 1 not reproduced)"
    assert evaluate_claim({"env": "x", "compare": "a > b, c"}, summary).verdict == "mixed (1 of 2 reproduced, 1 not reproduced)"
    assert evaluate_claim({"env": "x", "compare": "c > a, b"}, summary).verdict == REPRODUCED
    assert evaluate_claim({"env": "x", "compare": "b > a, c"}, summary).verdict == NOT_REPRODUCED
    mixed = evaluate_claim({"env": ["x", "z"], "compare": "a > b"}, summary)  # z has one seed of a, no b
    assert mixed.verdict == "reproduced (1 of 2 comparisons not run)" and "z, a > b: not run (no finished runs)" in mixed.reason
    assert evaluate_claim({"env": "z", "compare": "a > 0"}, summary).verdict == INCONCLUSIVE
    judged = evaluate_claim({"env": "x", "compare": "a ~= 12", "tolerance": 3}, summary)
    assert judged.verdict == REPRODUCED and "lies inside [-3, 3]" in judged.reason
    assert judged.ours.startswith("x a 12 [") and judged.ours.count("[") == 1  # the number is no arm of ours
    assert judged.improvement.startswith("x: P(a > 12) 0.5 [")
    assert evaluate_claim({"env": "x", "compare": "a > missing"}, summary).verdict == NOT_RUN
    quoted = evaluate_claim({"env": "x", "reported": {"a": 12}}, summary)
    assert quoted.verdict == "needs judgement" and quoted.ours.startswith("x a 12 [")
    assert evaluate_claim({"env": "w", "reported": {"a": 12}}, summary).verdict == NOT_RUN
    assert combine([REPRODUCED, NOT_RUN]) == "reproduced (1 of 2 comparisons not run)" and combine([NOT_RUN]) == NOT_RUN
    assert combine([INCONCLUSIVE, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([REPRODUCED, INCONCLUSIVE, NOT_REPRODUCED]) == "mixed (1 of 3 reproduced, 1 not reproduced)"


def config_yaml(algo: str, algo_config: dict, **train) -> dict:
    return {"algo": algo, "env": "spread", "train": {"total_steps": 1000, "num_envs": 4, "batch_size": 32,
                                                     "update_every": 1, "gradient_steps": 1, "warmup_steps": 10,
                                                     "buffer_size": 100, "seed": 0, **train},
            "algo_config": algo_config, "env_config": {}}


def test_the_configuration_table_marks_exactly_the_differing_fields(tmp_path):
    maddpg = {"lr": 0.01, "gamma": 0.95, "tau": 0.01, "hidden_dim": 64, "grad_clip": 0.5, "policy_reg": 0.001}
    for name, config in {"fast": config_yaml("maddpg", {**maddpg, "lr": 0.03}, batch_size=64),
                         "slow": config_yaml("maddpg", maddpg, seed=3)}.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    settings = {name: arm_settings(yaml.safe_load((tmp_path / f"{name}.yaml").read_text()))
                for name in ("fast", "slow")}
    lines = config_table(settings)
    assert lines[0] == "| setting | fast | slow |"
    marked = {line.split(" | ")[0][4:-2] for line in lines[2:] if line.startswith("| **")}
    assert marked == {"lr", "batch_size"}  # the seed is not shown; policy_reg is no shown hyperparameter
    assert "| **lr** | 0.03 | 0.01 |" in lines and "| grad_clip | 0.5 | 0.5 |" in lines
    assert not any("policy_reg" in line or "seed" in line for line in lines)


def test_a_team_shows_the_member_under_test_and_its_opponents():
    team = config_yaml("team", {"members": {"predators": "masac", "prey": "maddpg"}, "default": "vpp",
                                "frozen": {}, "configs": {"masac": {"alpha": 0.26}}})
    tested = arm_settings(team, "predators")
    assert (tested["algorithm"], tested["opponents"], tested["alpha"]) == ("masac (team, predators)", "maddpg (prey)", 0.26)
    assert tested["lr"] == resolve("masac", "spread").algo_config.lr  # the member's other fields resolved
    maac = config_yaml("maac", {"pi_lr": 0.001, "q_lr": 0.001, "gamma": 0.99, "critic_grad_clip": 10.0})
    lines = config_table({"masac": tested, "maac": arm_settings(maac)})
    assert "| **opponents** | maddpg (prey) | - |" in lines and "| **pi_lr** | - | 0.001 |" in lines


def test_flatness_of_the_curves():
    def runs(curves):
        return [[{"env_steps": i, "eval_return_mean": v} for i, v in enumerate(curve)] for curve in curves]
    rising = runs([[0, 1, 2, 3, 4, 5 + seed] for seed in range(3)])
    flat = runs([[5, 5, 5, 5, 5, 5 + 3 * change] for change in (0.1, -0.2, 0.15)])
    assert flatness(rising, ["eval_return_mean"]).startswith("still rising: last 3 minus previous 3 evaluations +3")
    assert flatness(runs([[5, 4, 3, 2, 1, 0]] * 2), ["eval_return_mean"]).startswith("still falling")
    assert flatness(flat, ["eval_return_mean"]).startswith("flattened")
    assert flatness(runs([[0, 1, 2, 3, 4]] * 3), ["eval_return_mean"]) == (
        "too few evaluations to tell (0 of 3 runs have 6 or more)")


EXPERIMENT = {
    "title": "Hand-made sweep", "paper": "test", "figure": "Fig. 1", "metric": "eval_return_mean",
    "scales": {"cpu": {"seeds": [0, 1, 2, 3, 4]}, "paper": {"train": {"total_steps": 80_000}}},
    "envs": {"grid": {"env": "grid_coordination"}},
    "algorithms": {"good": {"algo": "vpp"}, "poor": {"algo": "vpp", "overrides": {"algo.lr": 0.1}}},
    "claims": [{"claim": "good above poor", "source": "test", "env": "grid", "compare": "good > poor"},
               {"claim": "poor above good", "source": "test", "env": "grid", "compare": "poor > good"},
               {"claim": "good reaches 10", "source": "test", "env": "grid", "compare": "good ~= 10",
                "tolerance": 2, "reported": {"good": 10}}]}


def test_the_report_end_to_end_on_hand_written_runs(tmp_path):
    """Runs written by hand (metrics.csv and config.yaml), summarised and reported as a sweep would."""
    path = tmp_path / "hand.yaml"
    path.write_text(yaml.safe_dump(EXPERIMENT))
    experiment = load_experiment(path)
    sweep_dir = tmp_path / "sweep"
    cells = []
    for label, level, lr in (("good", 10.0, 0.01), ("poor", 0.0, 0.1)):
        for seed in range(5):
            run_dir = sweep_dir / "grid" / f"{label}-s{seed}"
            curve = [level * min(1.0, i / 4) + 0.1 * seed for i in range(10)]  # rises, then flat for 6 evaluations
            write_metrics(run_dir, [{"env_steps": 100 * i, "eval_return_mean": v} for i, v in enumerate(curve)])
            config = resolve("vpp", "grid_coordination").to_dict()
            config["train"].update(total_steps=900, seed=seed)
            config["algo_config"]["lr"] = lr
            (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
            cells.append(Cell("grid", label, seed, "vpp", "grid_coordination", [], str(run_dir), 900, "done", 1, 1.0))
    (sweep_dir / "experiment.yaml").write_text(path.read_text())
    write_ledger(sweep_dir, {"experiment": "hand", "scale": "cpu", "backend": "local", "workers": 1,
                             "seeds": list(range(5)), "command": "vimarl sweep hand.yaml", "machine": "test",
                             "started": "now", "wall_s": 10.0}, cells)
    rows = summarise(sweep_dir, experiment, cells)
    assert [(r["algorithm"], r["n_seeds"]) for r in rows] == [("good", 5), ("poor", 5)]
    assert rows[0]["iqm"] == pytest.approx(10.2)  # middle three seeds' scores 10.1, 10.2, 10.3
    assert "| grid | eval_return_mean | 10.2 [" in (sweep_dir / "summary.md").read_text()
    text = report(sweep_dir, tmp_path / "hand.md").read_text()
    assert "| good above poor | test |  | grid good 10.2 [" in text
    claims = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| good ") or line.startswith("| poor ")}
    assert "**reproduced**" in claims["good above poor"] and "P(good > poor) 1 [1, 1]" in claims["good above poor"]
    assert "**not reproduced**" in claims["poor above good"]
    assert "**reproduced**" in claims["good reaches 10"] and "lies inside [-2, 2]" in claims["good reaches 10"]
    assert "| **lr** | 0.01 | 0.1 |" in text and "| total_steps | 900 | 900 |" in text  # only lr differs
    assert sum(line.startswith("| **") for line in text.splitlines()) == 1
    assert "| grid | good | 900 | 80,000 | flattened: last 3 minus previous 3 evaluations +0 [" in text
    assert "| grid | poor | 900 | 80,000 | flattened" in text
    assert (tmp_path / "hand" / "grid.png").exists()


def test_a_summary_written_before_intervals_asks_for_a_resume(tmp_path):
    (tmp_path / "summary.csv").write_text("env,algorithm,metric,main,n_seeds,mean,std,env_steps,values\n")
    with pytest.raises(VimarlError, match="predates interval estimates; rewrite it with vimarl sweep"):
        read_summary(tmp_path)
