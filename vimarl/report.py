"""`vimarl report SWEEP_DIR`: our numbers next to the paper's, with a verdict per claim.

A claim in an experiment file::

    claims:
      - claim: "MA-SAC at least on par with MADDPG"     # the paper's words or a paraphrase
        source: "003 Sec. 5.3, Fig. 2(a)"               # paper, figure/table and section or page
        env: spread                                      # one env label or a list (every one must hold)
        compare: "masac >= maddpg"                       # optional: automatic verdict
        reported: {masac: -350}                          # optional: the paper's numbers, shown as they are

`compare` is `LEFT OP RIGHT[, RIGHT ...]` with OP one of `>`, `>=`, `~=`; an operand is an algorithm
label of the experiment, optionally with an extra metric (`vm3ac:z_shared_seed`), or a number (the
paper's value, e.g. `vpp ~= 0` with `tolerance: 0.5`; a number has no spread). Means are compared
against the noise of their difference, sqrt(std_left^2 + std_right^2) over seeds:

- `A > B`: reproduced if mean_A - mean_B exceeds the noise; partially if it is positive but within it;
  not reproduced otherwise.
- `A >= B` (at least on par): reproduced if mean_A >= mean_B; partially if below by at most the noise;
  not reproduced if below by more.
- `A ~= B`: reproduced if the difference is within the noise (or `tolerance`), not reproduced otherwise.

Claims without `compare` get "needs judgement" with our numbers and the paper's.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from vimarl.errors import VimarlError
from vimarl.sweep import EXPERIMENT_COPY, fmt, number, read_ledger, read_summary

REPRODUCED, PARTIAL, NOT_REPRODUCED, JUDGEMENT, NOT_RUN = (
    "reproduced", "partially", "not reproduced", "needs judgement", "not run")
OPERATORS = (">=", "~=", ">")


def verdict(left: tuple[float, float], op: str, right: tuple[float, float],
            tolerance: float | None = None) -> tuple[str, str]:
    """(verdict, reason) for `left OP right`, each a (mean, std over seeds)."""
    (lm, ls), (rm, rs) = left, right
    if any(math.isnan(v) for v in (lm, rm)):
        return NOT_RUN, "no finished runs"
    diff = lm - rm
    noise = tolerance if tolerance is not None else math.sqrt(ls ** 2 + rs ** 2)
    numbers = f"difference {'+' if diff >= 0 else ''}{number(diff)}, noise {number(noise, 2)}"
    if op == ">":
        if diff > noise:
            return REPRODUCED, f"{numbers}: above by more than the noise"
        if diff > 0:
            return PARTIAL, f"{numbers}: above, but within the noise"
        return NOT_REPRODUCED, f"{numbers}: not above"
    if op == ">=":
        if diff >= 0:
            return REPRODUCED, f"{numbers}: at least on par"
        if -diff <= noise:
            return PARTIAL, f"{numbers}: below, but within the noise"
        return NOT_REPRODUCED, f"{numbers}: below by more than the noise"
    if op == "~=":
        if abs(diff) <= noise:
            return REPRODUCED, f"{numbers}: equal within the noise"
        return NOT_REPRODUCED, f"{numbers}: differ by more than the noise"
    raise VimarlError(f"unknown comparison '{op}'; use one of {', '.join(OPERATORS)}")


def combine(verdicts: list[str]) -> str:
    """One verdict for a claim made of several comparisons (every one that ran must hold; the
    reason lists the ones not run at this scale)."""
    verdicts = [v for v in verdicts if v != NOT_RUN]
    if not verdicts:
        return NOT_RUN
    if all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    if any(v in (REPRODUCED, PARTIAL) for v in verdicts):
        return PARTIAL
    return NOT_REPRODUCED


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


def _lookup(summary: list[dict], env: str, operand: str) -> tuple[float, float]:
    if (value := _number(operand)) is not None:
        return value, 0.0
    label, _, metric = operand.partition(":")
    for row in summary:
        if row["env"] == env and row["algorithm"] == label and (
                row["metric"] == metric if metric else row["main"]):
            return row["mean"], row["std"]
    return math.nan, math.nan


def evaluate_claim(claim: dict, summary: list[dict]) -> tuple[str, str, str]:
    """(verdict, reason, our numbers) of one claim against the summary rows."""
    envs = claim.get("env", [])
    envs = [envs] if isinstance(envs, str) else list(envs)
    if not envs:
        envs = list(dict.fromkeys(row["env"] for row in summary))
    if "compare" in claim:
        left, op, rights = parse_compare(claim["compare"])
        operands = [o for o in (left, *rights) if _number(o) is None]
    else:
        operands = list((claim.get("reported") or {}).keys())
    ours = "; ".join(f"{env} " + ", ".join(f"{o} {fmt(*_lookup(summary, env, o))}" for o in operands)
                     for env in envs)
    if "compare" not in claim:
        if all(math.isnan(_lookup(summary, env, o)[0]) for env in envs for o in operands):
            return NOT_RUN, "no finished runs of these cells at this scale", ours
        return JUDGEMENT, "no automatic comparison; read our numbers against the paper's", ours
    verdicts, reasons = [], []
    for env in envs:
        for right in rights:
            v, why = verdict(_lookup(summary, env, left), op, _lookup(summary, env, right), claim.get("tolerance"))
            verdicts.append(v)
            reasons.append(f"{env}, {left} {op} {right}: {v} ({why})")
    return combine(verdicts), "; ".join(reasons), ours


def report(sweep_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the markdown report of a finished (or partly finished) sweep; returns its path."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise VimarlError(f"{sweep_dir} is not a directory; pass the --out folder of a vimarl sweep")
    ledger = read_ledger(sweep_dir)
    summary = read_summary(sweep_dir)
    try:
        experiment = yaml.safe_load((sweep_dir / EXPERIMENT_COPY).read_text())
    except (OSError, yaml.YAMLError):
        raise VimarlError(f"{sweep_dir}/{EXPERIMENT_COPY} is missing or unreadable; rerun vimarl sweep --resume") from None
    name = ledger["experiment"]
    out = Path(out or f"docs/results/{name}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    cells = ledger["cells"]
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
             + (f" over {1 + len(ledger['resumed'])} sessions" if ledger.get("resumed") else ""),
             f"- cells: {done} of {len(cells)} finished" + (
                 f"; failed: {', '.join(c['env_label'] + '/' + c['label'] + '-s' + str(c['seed']) for c in cells if c['status'] != 'done')}"
                 if done < len(cells) else ""), ""]
    lines += ["## Our numbers", "", (sweep_dir / "summary.md").read_text().split("\n", 2)[-1].strip(), ""]
    figures = sorted(sweep_dir.glob("*.png"))
    if figures:  # copied next to the report so that docs/ holds them
        (out.parent / name).mkdir(parents=True, exist_ok=True)
        for figure in figures:
            shutil.copyfile(figure, out.parent / name / figure.name)
        lines += [f"![{figure.stem}]({name}/{figure.name})" for figure in figures] + [""]
    claims = experiment.get("claims") or []
    if claims:
        lines += ["## Claims", "", "| claim | source | paper reports | ours | verdict | reason |", "|---|---|---|---|---|---|"]
        for claim in claims:
            v, why, ours = evaluate_claim(claim, summary)
            reported = ", ".join(f"{k}: {val}" for k, val in (claim.get("reported") or {}).items())
            lines.append("| " + " | ".join(str(x).replace("|", "/") for x in (
                claim.get("claim", ""), claim.get("source", ""), reported, ours, f"**{v}**", why)) + " |")
        lines.append("")
    if experiment.get("notes"):
        lines += ["## Notes", "", experiment["notes"].strip(), ""]
    out.write_text("\n".join(lines))
    return out


def _budget(cells: list[dict[str, Any]]) -> str:
    steps = sorted({c["total_steps"] for c in cells if c["total_steps"]})
    return ("env steps per run: " + ", ".join(f"{s:,}" for s in steps)) if steps else "unknown"


__all__ = ["combine", "evaluate_claim", "report", "verdict"]
