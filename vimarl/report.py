"""`vimarl report SWEEP_DIR`: our numbers next to the paper's, with a verdict per claim (DESIGN §9).

A claim in an experiment file::

    claims:
      - claim: "MA-SAC at least on par with MADDPG"     # the paper's words or a paraphrase
        source: "003 Sec. 5.3, Fig. 2(a)"               # paper, figure/table and section or page
        env: spread                                      # one env label or a list (every one must hold)
        compare: "masac >= maddpg"                       # optional: automatic verdict
        tolerance: 5                                     # optional, for >= and ~= (default 0)
        reported: {masac: -350}                          # optional: the paper's numbers, shown as they are

`compare` is `LEFT OP RIGHT[, RIGHT ...]` with OP one of `>`, `>=`, `~=`; an operand is an algorithm
label of the experiment, optionally with an extra metric (`vm3ac:z_shared_seed`), or a number (the
paper's value, e.g. `vpp ~= 0` with `tolerance: 0.5`).

Statistics (vimarl.stats): a run's score is the compared metric averaged over its last three
evaluations; an arm's number is the interquartile mean (IQM) over its seeds with a 95%
stratified-bootstrap interval; P(A > B) is rliable's probability of improvement (a random seed of A
above a random seed of B) with its interval. Every bootstrap is seeded: a report is deterministic.

Verdicts: for `A OP B` the 95% bootstrap interval [lo, hi] of IQM(A) - IQM(B) is computed, each arm's
seeds resampled independently (B a number: the interval of IQM(A) minus that number). The interval
*supports* the claim (reproduced), *contradicts* it (not reproduced), or neither (inconclusive):

- `A > B`: reproduced if lo > 0, not reproduced if hi < 0, else inconclusive.
- `A >= B` (at least on par, tolerance t >= 0): reproduced if lo > -t, not reproduced if hi < -t,
  else inconclusive. With t = 0 this asks as much as `A > B`: the tolerance says how far below B
  still counts as on par.
- `A ~= B` (tolerance t): with t > 0, reproduced if [lo, hi] lies inside [-t, t], not reproduced if
  lo > t or hi < -t, else inconclusive. With t = 0 there is no band to lie inside: reproduced if the
  interval contains 0 (no detectable difference), not reproduced if it excludes 0.
- An arm with fewer than 2 seeds: inconclusive (too few seeds), whatever the numbers.

A claim over several envs or right-hand operands is reproduced if every comparison that ran is,
not reproduced if every one is not, inconclusive if every one is inconclusive, and otherwise
"mixed (k of n reproduced, m not reproduced)"; comparisons whose cells did not run at this scale
are listed as "not run" in the reason and left out (a claim with none run is "not run"). Claims
without `compare` get "needs judgement" with our numbers and the paper's.

Beside the verdicts the report states each run's budget against the paper scale's
(`scales.paper.train.total_steps`) and whether the curves have flattened: per run, the mean of the
last three evaluations minus the mean of the three before them; its IQM over seeds with a bootstrap
interval; "flattened" if the interval contains 0, "still rising" / "still falling" otherwise.
The report also lists each arm's resolved hyperparameters per env (from the runs' config.yaml),
marking with ** the ones that differ between arms.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from dataclasses import asdict
from typing import Any, NamedTuple

import yaml

from vimarl.errors import VimarlError
from vimarl.logging import read_metrics
from vimarl.stats import SCORE_EVALUATIONS, Estimate, evaluation_values, iqm_difference, iqm_interval, \
    probability_of_improvement
from vimarl.sweep import (EXPERIMENT_COPY, Cell, _format, estimate, fmt, is_finished, metric_spec, number, read_ledger,
                          summarise)

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, JUDGEMENT, NOT_RUN = (
    "reproduced", "not reproduced", "inconclusive", "needs judgement", "not run")
OPERATORS = (">=", "~=", ">")
MIN_SEEDS = 2
"""Seeds an arm needs before its interval can support or contradict a claim."""
TRAIN_FIELDS = ("total_steps", "num_envs", "batch_size", "update_every", "gradient_steps", "warmup_steps",
                "buffer_size")
"""Trainer settings in the configuration table; the algorithms' fields are picked by `_shown_algo_field`."""


def judge(op: str, difference: Estimate, tolerance: float = 0.0) -> tuple[str, str]:
    """(verdict, why) of `A OP B` from the interval of IQM(A) - IQM(B) (module docstring's rules)."""
    lo, hi, t = difference.lo, difference.hi, tolerance
    shown = f"IQM difference {fmt(difference, signed=True)}"
    if op == ">":
        if lo > 0:
            return REPRODUCED, f"{shown} lies above 0"
        if hi < 0:
            return NOT_REPRODUCED, f"{shown} lies below 0"
        return INCONCLUSIVE, f"{shown} contains 0"
    if op == ">=":
        edge = number(-t) if t else "0"
        if lo > -t:
            return REPRODUCED, f"{shown} lies above {edge}"
        if hi < -t:
            return NOT_REPRODUCED, f"{shown} lies below {edge}"
        return INCONCLUSIVE, f"{shown} contains {edge}"
    if op == "~=":
        if t == 0:
            if lo <= 0 <= hi:
                return REPRODUCED, f"{shown} contains 0"
            return NOT_REPRODUCED, f"{shown} excludes 0"
        band = f"[{number(-t)}, {number(t)}]"
        if -t <= lo and hi <= t:
            return REPRODUCED, f"{shown} lies inside {band}"
        if lo > t or hi < -t:
            return NOT_REPRODUCED, f"{shown} lies outside {band}"
        return INCONCLUSIVE, f"{shown} crosses an edge of {band}"
    raise VimarlError(f"unknown comparison '{op}'; use one of {', '.join(OPERATORS)}")


class Comparison(NamedTuple):
    verdict: str
    reason: str
    improvement: Estimate | None
    """P(A > B) with its interval; None where the comparison did not run."""


def compare(left: list[float], op: str, right: list[float] | float, tolerance: float = 0.0,
            names: tuple[str, str] = ("A", "B")) -> Comparison:
    """`left OP right` for the seeds' scores of two arms (`right` may be the paper's number)."""
    if not left or (isinstance(right, list) and not right):
        return Comparison(NOT_RUN, "no finished runs", None)
    few = [f"{name} has {len(scores)}" for name, scores in zip(names, (left, right))
           if isinstance(scores, list) and len(scores) < MIN_SEEDS]
    improvement = probability_of_improvement(left, right)
    chance = f"P({names[0]} > {names[1]}) {fmt(improvement)}"
    if few:
        return Comparison(INCONCLUSIVE, f"too few seeds: {', '.join(few)}, {MIN_SEEDS} needed; {chance}", improvement)
    verdict, why = judge(op, iqm_difference(left, right), tolerance)
    return Comparison(verdict, f"{why}; {chance}", improvement)


def combine(verdicts: list[str]) -> str:
    """One verdict for a claim made of several comparisons, from those that ran; the ones not run
    (at this scale, or not yet in a sweep stopped part-way) are counted in the verdict."""
    ran = [v for v in verdicts if v != NOT_RUN]
    if not ran:
        return NOT_RUN
    missing = f" ({len(verdicts) - len(ran)} of {len(verdicts)} comparisons not run)" if len(ran) < len(verdicts) else ""
    for word in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE):
        if all(v == word for v in ran):
            return word + missing
    return (f"mixed ({ran.count(REPRODUCED)} of {len(ran)} reproduced, "
            f"{ran.count(NOT_REPRODUCED)} not reproduced)" + missing)


def parse_compare(text: str) -> tuple[str, str, list[str]]:
    match = re.fullmatch(r"\s*(\S+)\s*(>=|~=|>)\s*(.+?)\s*", text)
    if not match:
        raise VimarlError(f"claim comparison '{text}' must look like 'A > B', 'A >= B, C' or 'A ~= B'; "
                          f"fix the experiment file")
    left, op, rights = match.groups()
    return left, op, [r.strip() for r in rights.split(",") if r.strip()]


def _number(operand: str) -> float | None:
    try:
        return float(operand)
    except ValueError:
        return None


def _row(summary: list[dict], env: str, operand: str) -> dict | None:
    """The summary row of an operand `label` or `label:extra_metric` in an env (None if it did not run)."""
    label, _, metric = operand.partition(":")
    return next((row for row in summary if row["env"] == env and row["algorithm"] == label
                 and (row["metric"] == metric if metric else row["main"])), None)


def _scores(summary: list[dict], env: str, operand: str) -> list[float] | float:
    """The seeds' scores of an operand, or the number it is."""
    if (value := _number(operand)) is not None:
        return value
    row = _row(summary, env, operand)
    return row["values"] if row else []


class Judged(NamedTuple):
    verdict: str
    reason: str
    ours: str
    """Our IQM [interval] of every operand, per env."""
    improvement: str
    """P(A > B) [interval] of every comparison that ran."""


def evaluate_claim(claim: dict, summary: list[dict]) -> Judged:
    """A claim's verdict, reason and our numbers against the summary rows."""
    envs = claim.get("env", [])
    envs = [envs] if isinstance(envs, str) else list(envs)
    if not envs:
        envs = list(dict.fromkeys(row["env"] for row in summary))
    if "compare" in claim:
        left, op, rights = parse_compare(claim["compare"])
        operands = [o for o in (left, *rights) if _number(o) is None]
    else:
        operands = list((claim.get("reported") or {}).keys())
    rows = {(env, o): _row(summary, env, o) for env in envs for o in operands}
    ours = "; ".join(f"{env} " + ", ".join(
        f"{o} {fmt(estimate(rows[env, o])) if rows[env, o] else 'n/a'}" for o in operands) for env in envs)
    if "compare" not in claim:
        if not any(row and row["n_seeds"] for row in rows.values()):
            return Judged(NOT_RUN, "no finished runs of these cells at this scale", ours, "")
        return Judged(JUDGEMENT, "no automatic comparison; read our numbers against the paper's", ours, "")
    tolerance = float(claim.get("tolerance", 0.0))
    if tolerance < 0:
        raise VimarlError(f"claim '{claim.get('claim', claim['compare'])}': tolerance must be >= 0; fix the experiment file")
    verdicts, reasons, improvements = [], [], []
    for env in envs:
        for right in rights:
            result = compare(_scores(summary, env, left), op, _scores(summary, env, right), tolerance, (left, right))
            verdicts.append(result.verdict)
            reasons.append(f"{env}, {left} {op} {right}: {result.verdict} ({result.reason})")
            if result.improvement:
                improvements.append(f"{env}: P({left} > {right}) {fmt(result.improvement)}")
    return Judged(combine(verdicts), "; ".join(reasons), ours, "; ".join(improvements))


# -- budget and flatness ----------------------------------------------------------------------
def flatness(rows_per_run: list[list[dict[str, Any]]], columns: list[str], divide_by: float = 1.0) -> str:
    """Whether the curves of an arm's runs have flattened: per run, the mean of the last three
    evaluations minus the mean of the three before them; its IQM over the runs with an interval."""
    window = SCORE_EVALUATIONS
    changes = []
    for rows in rows_per_run:
        values = evaluation_values(rows, columns, divide_by)
        if len(values) >= 2 * window:
            changes.append(sum(values[-window:]) / window - sum(values[-2 * window:-window]) / window)
    if len(changes) < MIN_SEEDS:
        return f"too few evaluations to tell ({len(changes)} of {len(rows_per_run)} runs have {2 * window} or more)"
    change = iqm_interval(changes)
    shown = f"last {window} minus previous {window} evaluations {fmt(change, signed=True)}"
    if change.lo > 0:
        return f"still rising: {shown}"
    if change.hi < 0:
        return f"still falling: {shown}"
    return f"flattened: {shown}"


def _paper_budget(experiment: dict, env_label: str) -> str:
    env_spec = experiment["envs"].get(env_label) or {}
    steps = (((env_spec.get("scales") or {}).get("paper") or {}).get("overrides") or {}).get("total_steps") or (
        ((experiment.get("scales") or {}).get("paper") or {}).get("train") or {}).get("total_steps")
    return f"{int(steps):,}" if steps else "paper budget not stated"


def budget_lines(experiment: dict, cells: list[dict[str, Any]]) -> list[str]:
    """The budget and flatness table: one row per env x algorithm."""
    lines = ["| env | algorithm | env steps per run | paper scale's env steps | curves |", "|---|---|---|---|---|"]
    for env_label in dict.fromkeys(c["env_label"] for c in cells):
        columns, divide_by = metric_spec(experiment, env_label)
        for label in dict.fromkeys(c["label"] for c in cells if c["env_label"] == env_label):
            arm = [c for c in cells if c["env_label"] == env_label and c["label"] == label]
            steps = ", ".join(f"{s:,}" for s in sorted({c["total_steps"] for c in arm if c["total_steps"]})) or "unknown"
            runs = [read_metrics(Path(c["run_dir"]) / "metrics.csv") for c in arm if c["status"] == "done"]
            lines.append(f"| {env_label} | {label} | {steps} | {_paper_budget(experiment, env_label)} | "
                         f"{flatness(runs, columns, divide_by)} |")
    return lines


# -- configurations ---------------------------------------------------------------------------
def _shown_algo_field(name: str) -> bool:
    """Learning rates, discount, target rate, widths, exploration, entropy and other bonus weights
    (alpha, VM3-AC's beta, MAVEN's MI, SI-MOA's influence, LOLA's eta, NeurComm's spatial discount)
    and latents, gradient clipping, reward scaling, critic design, the discrete policy gradient and
    an on-policy learner's rollout length (its update ratio)."""
    return (name in ("lr", "gamma", "tau", "alpha", "auto_alpha", "beta", "eta", "latent_dim", "noise_dim",
                     "temperature", "exploration", "discrete_gradient", "normalize_rewards", "rollout_length",
                     "spatial_discount")
            or name.endswith(("_lr", "_weight", "_coef")) or name.startswith(("epsilon_", "reward_", "critic_"))
            or any(part in name for part in ("hidden", "units", "embed", "clip", "grad_norm", "delay")))


def _tested_group(columns: list[str]) -> str | None:
    """The group whose return is compared (`eval_return/<group>`), if the metric names one."""
    return next((c.split("/", 1)[1] for c in columns if c.startswith("eval_return/")), None)


def arm_settings(config: dict[str, Any], tested_group: str | None = None) -> dict[str, Any]:
    """The settings of a run's config.yaml that the configuration table shows. For a team, those of
    the member playing `tested_group` (default: the first member listed), and its opponents."""
    from vimarl.algos import get_algorithm
    from vimarl.fields import as_dict, build

    algo_config = config["algo_config"]
    settings: dict[str, Any] = {}
    if config["algo"] == "team":
        members, frozen = algo_config.get("members") or {}, algo_config.get("frozen") or {}
        group = tested_group if tested_group in members else next(iter(members), tested_group)
        member = members.get(group, algo_config.get("default"))
        settings["algorithm"] = f"{member} (team, {group})"
        settings["opponents"] = ", ".join([f"{name} ({g})" for g, name in members.items() if g != group]
                                          + [f"frozen {path} ({g})" for g, path in frozen.items()]) or "-"
        overrides = (algo_config.get("configs") or {}).get(member, {})
        algo_values = as_dict(build(get_algorithm(member).Config, overrides, f"algo.configs.{member}")) if member else {}
    else:
        settings["algorithm"] = config["algo"]
        algo_values = algo_config
    settings.update({name: config["train"].get(name) for name in TRAIN_FIELDS})
    settings.update({name: value for name, value in algo_values.items() if _shown_algo_field(name)})
    return settings


def config_table(settings_by_arm: dict[str, dict[str, Any]]) -> list[str]:
    """A markdown table, a row per setting and a column per arm; '-' where an arm lacks the field,
    and the setting in bold (**name**) where the arms' values differ."""
    names = list(dict.fromkeys(name for settings in settings_by_arm.values() for name in settings))
    lines = ["| setting | " + " | ".join(settings_by_arm) + " |", "|---|" + "---|" * len(settings_by_arm)]
    for name in names:
        values = [_format(s[name]) if s.get(name) is not None else "-" for s in settings_by_arm.values()]
        shown = f"**{name}**" if len(set(values)) > 1 else name
        lines.append("| " + " | ".join([shown, *values]) + " |")
    return lines


def config_lines(experiment: dict, cells: list[dict[str, Any]]) -> list[str]:
    """A configuration table per env, from each arm's first run that wrote a config.yaml."""
    lines = []
    for env_label in dict.fromkeys(c["env_label"] for c in cells):
        tested = _tested_group(metric_spec(experiment, env_label)[0])
        settings_by_arm = {}
        for cell in cells:
            path = Path(cell["run_dir"]) / "config.yaml"
            if cell["env_label"] == env_label and cell["label"] not in settings_by_arm and path.exists():
                settings_by_arm[cell["label"]] = arm_settings(yaml.safe_load(path.read_text()), tested)
        if settings_by_arm:
            lines += [f"### {env_label}", "", *config_table(settings_by_arm), ""]
    return lines


def resolved_config_lines(experiment_name: str | Path, scale: str = "cpu") -> list[str]:
    """The configuration tables of an experiment's arms as its cells resolve, before anything runs
    (`vimarl sweep EXPERIMENT --configs`): what the report will show, to check against the papers."""
    from vimarl.sweep import expand, load_experiment

    experiment = load_experiment(experiment_name)
    tables: dict[str, dict[str, dict[str, Any]]] = {}
    for cell in expand(experiment, scale):
        arms = tables.setdefault(cell.env_label, {})
        if cell.label not in arms:
            tested = _tested_group(metric_spec(experiment, cell.env_label)[0])
            arms[cell.label] = arm_settings(cell.resolve().to_dict(), tested)
    lines = [f"{experiment['name']} ({scale}): resolved settings per arm, differing ones in bold", ""]
    for env_label, arms in tables.items():
        lines += [f"### {env_label}", "", *config_table(arms), ""]
    return lines


# -- the report -------------------------------------------------------------------------------
def report(sweep_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the markdown report of a finished (or partly finished) sweep; returns its path."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise VimarlError(f"{sweep_dir} is not a directory; pass the --out folder of a vimarl sweep")
    ledger = read_ledger(sweep_dir)
    try:
        experiment = yaml.safe_load((sweep_dir / EXPERIMENT_COPY).read_text())
    except (OSError, yaml.YAMLError):
        raise VimarlError(f"{sweep_dir}/{EXPERIMENT_COPY} is missing or unreadable; rerun vimarl sweep --resume") from None
    name = ledger["experiment"]
    out = Path(out or f"docs/results/{name}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    # The summary is made afresh from the runs as they stand, so that a sweep stopped part-way (or
    # one whose ledger predates its last cells) is reported from exactly the runs that finished.
    # A cell the ledger marks done whose run folder no longer reaches its budget (e.g. not kept by
    # `vimarl archive`) counts as missing.
    finished = [Cell(**{**c, "status": "done" if is_finished(Cell(**c)) else
                        "missing" if c["status"] == "done" and c.get("total_steps") is not None else c["status"]})
                for c in ledger["cells"]]
    summary = summarise(sweep_dir, {**experiment, "name": name}, finished)
    cells = [asdict(cell) for cell in finished]
    done = sum(c["status"] == "done" for c in cells)
    scale = (experiment.get("scales") or {}).get(ledger["scale"]) or {}
    lines = [f"# {experiment.get('title', name)}", "",
             f"Paper: {experiment.get('paper', '?')}, {experiment.get('figure', '')}.", "",
             f"- command: `{ledger['command']}`",
             f"- scale: {ledger['scale']}" + (f" ({scale['note'].strip()})" if scale.get("note") else ""),
             f"- budget: {_budget(cells)}; seeds {', '.join(map(str, ledger['seeds']))}",
             f"- machine: {ledger['machine']}; backend {ledger['backend']}, {ledger['workers']} workers; "
             f"started {ledger['started']}, "
             + (f"{ledger['wall_s']:.0f} s wall" if ledger["wall_s"] else "wall time not recorded (cells run before)")
             + (f" over {1 + len(ledger['resumed'])} sessions" if ledger.get("resumed") else "")
             + f"; the runs' own wall times sum to {sum(c['wall_s'] for c in cells):,.0f} s",
             f"- cells: {done} of {len(cells)} finished" + (
                 f"; not finished: {', '.join(c['env_label'] + '/' + c['label'] + '-s' + str(c['seed']) for c in cells if c['status'] != 'done')}"
                 if done < len(cells) else ""), "",
             "A run's score is its mean over its last three evaluations; numbers are IQMs over seeds with 95% "
             "stratified-bootstrap intervals; the verdict rules are in docs/experiments.md (Reports).", ""]
    lines += ["## Our numbers", "", (sweep_dir / "summary.md").read_text().split("\n", 2)[-1].strip(), ""]
    figures = sorted(sweep_dir.glob("*.png"))
    if figures:  # copied next to the report so that docs/ holds them
        (out.parent / name).mkdir(parents=True, exist_ok=True)
        for figure in figures:
            shutil.copyfile(figure, out.parent / name / figure.name)
        lines += [f"![{figure.stem}]({name}/{figure.name})" for figure in figures] + [""]
    configurations = config_lines(experiment, cells)
    if configurations:
        lines += ["## Configurations", "", "Each arm's resolved settings (its first run's config.yaml); "
                  "**bold**: the value differs between the arms of the env.", "", *configurations]
    claims = experiment.get("claims") or []
    if claims:
        lines += ["## Claims", "", "| claim | source | paper reports | ours: IQM [95% CI] | P(improvement) | verdict | reason |",
                  "|---|---|---|---|---|---|---|"]
        for claim in claims:
            judged = evaluate_claim(claim, summary)
            reported = ", ".join(f"{k}: {val}" for k, val in (claim.get("reported") or {}).items())
            lines.append("| " + " | ".join(str(x).replace("|", "/") for x in (
                claim.get("claim", ""), claim.get("source", ""), reported, judged.ours, judged.improvement,
                f"**{judged.verdict}**", judged.reason)) + " |")
        lines.append("")
    lines += ["## Budget and convergence", "",
              "Our budget against the paper scale's, and whether the curves have flattened "
              "(IQM over seeds of the last three evaluations minus the three before them, 95% interval).", "",
              *budget_lines(experiment, cells), ""]
    if experiment.get("notes"):
        lines += ["## Notes", "", experiment["notes"].strip(), ""]
    out.write_text("\n".join(lines))
    return out


def _budget(cells: list[dict[str, Any]]) -> str:
    steps = sorted({c["total_steps"] for c in cells if c["total_steps"]})
    return ("env steps per run: " + ", ".join(f"{s:,}" for s in steps)) if steps else "unknown"


__all__ = ["combine", "compare", "evaluate_claim", "judge", "report"]
