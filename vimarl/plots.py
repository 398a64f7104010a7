"""Learning curves against environment steps: one run (mean +- std over its evaluation
episodes) or several runs grouped into curves (the IQM over runs, e.g. seeds, with a pointwise
95% stratified-bootstrap band: vimarl.stats.iqm_band).

Runs belong to one curve when their config.yaml files agree on everything but the seed and
the trainer's bookkeeping (out, progress, ...). Curves are labelled "algo on env", plus the
settings that tell apart curves with the same algorithm and environment.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from vimarl.errors import VimarlError
from vimarl.logging import read_metrics
from vimarl.stats import iqm_band


BOOKKEEPING = {"seed", "out", "progress", "tensorboard", "device", "torch_threads",
               "checkpoint_every", "keep_checkpoints", "save_buffer"}


def _settings(run_dir: Path) -> dict[str, object]:
    """The run's config flattened to 'section.field' -> value, without seed and bookkeeping."""
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        return {"algo": run_dir.name}
    config = yaml.safe_load(config_path.read_text())
    flat: dict[str, object] = {"algo": config["algo"], "env": config["env"]}
    for section, prefix in (("train", ""), ("algo_config", "algo."), ("env_config", "env.")):
        for key, value in config.get(section, {}).items():
            if key not in BOOKKEEPING:
                flat[prefix + key] = value if not isinstance(value, list) else tuple(value)
    return flat


def _labels(settings: list[dict[str, object]]) -> list[str]:
    """A label per distinct settings dict: 'algo on env' and the fields that set it apart."""
    labels = []
    for own in settings:
        base = own["algo"] + (f" on {own['env']}" if "env" in own else "")
        siblings = [o for o in settings if (o.get("algo"), o.get("env")) == (own.get("algo"), own.get("env"))]
        differing = sorted({k for o in siblings for k in set(o) | set(own) if o.get(k) != own.get(k)})
        extra = ", ".join(f"{k}={own.get(k)}" for k in differing)
        labels.append(f"{base} ({extra})" if extra else base)
    return labels


def curves(run_dirs: list[Path], metric: str = "eval_return_mean", x: str = "env_steps",
           names: list[str] | None = None):
    """{label: (x, centre, lower, upper, n_runs)}; runs of a label are cut to the x values they share.
    Runs are grouped by `names` (one per run, e.g. a sweep's algorithm labels) when given, else by
    their settings, labelled by what sets them apart.

    Several runs: the centre is their IQM and [lower, upper] its 95% bootstrap band at each x. A single
    run: its value, and for eval_return_mean +- the std over its evaluation episodes (eval_return_std).
    """
    keys: list[object] = []
    grouped: dict[int, list[dict[float, tuple[float, float]]]] = defaultdict(list)
    for position, run_dir in enumerate(map(Path, run_dirs)):
        rows = read_metrics(run_dir / "metrics.csv")
        if not rows:
            raise VimarlError(f"{run_dir} has no metrics.csv rows; pass OUT directories of vimarl train runs")
        if metric not in rows[0] or x not in rows[0]:
            raise VimarlError(f"{run_dir}/metrics.csv has no column '{metric}' or '{x}'; "
                              f"columns: {', '.join(rows[0])}")
        within = "eval_return_std" if metric == "eval_return_mean" else None
        key = names[position] if names else _settings(run_dir)
        if key not in keys:
            keys.append(key)
        grouped[keys.index(key)].append(
            {row[x]: (row[metric], row.get(within, 0.0) if within else 0.0) for row in rows})
    result = {}
    labels = keys if names else _labels(keys)
    for index, runs in grouped.items():
        label = labels[index]
        shared = sorted(set.intersection(*(set(run) for run in runs)))
        values = np.array([[run[step][0] for step in shared] for run in runs], dtype=float)
        if len(runs) == 1:
            spread = np.array([runs[0][step][1] for step in shared], dtype=float)
            centre, lower, upper = values[0], values[0] - spread, values[0] + spread
        else:
            centre, lower, upper = iqm_band(values)
        result[label] = (np.array(shared), centre, lower, upper, len(runs))
    return result


def matching_columns(run_dir: Path, pattern: str) -> list[str]:
    """The metrics.csv columns of a run that match a shell-style pattern (`kl_*`), in column order."""
    rows = read_metrics(Path(run_dir) / "metrics.csv")
    columns = [c for c in (rows[0] if rows else {}) if fnmatch.fnmatchcase(c, pattern)]
    if not columns:
        raise VimarlError(f"{run_dir}/metrics.csv has no column matching '{pattern}'")
    return columns


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_runs(run_dirs: list[Path], out: Path, metric: str = "eval_return_mean",
              x: str = "env_steps", title: str | None = None, names: list[str] | None = None) -> Path:
    """Draw `metric` against `x` for the runs and save a PNG to `out`. A pattern such as `kl_*`
    draws every matching column (e.g. one curve per agent of 004's diagnostics); `names` as in
    `curves`."""
    plt = _pyplot()
    metrics = matching_columns(run_dirs[0], metric) if any(c in metric for c in "*?[") else [metric]
    drawn = {}
    for name in metrics:
        for label, curve in curves(run_dirs, name, x, names).items():
            drawn[f"{name}: {label}" if len(metrics) > 1 else label] = curve
    # Long legends go under the axes so they never hide the curves.
    figure, axes = plt.subplots(figsize=(6.4, 4.0 + 0.25 * len(drawn) * (len(drawn) > 2)), dpi=120)
    for label, (steps, centre, lower, upper, n_runs) in drawn.items():
        shown = f"{label} (IQM of {n_runs} runs, 95% band)" if n_runs > 1 else label
        line, = axes.plot(steps, centre, label=shown)
        axes.fill_between(steps, lower, upper, color=line.get_color(), alpha=0.2)
    axes.set_xlabel(x.replace("_", " "))
    axes.set_ylabel(metric.replace("_", " "))
    if title:
        axes.set_title(title)
    axes.grid(alpha=0.3)
    if len(drawn) > 2:
        axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    else:
        axes.legend(fontsize=8)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, bbox_inches="tight")  # keeps a legend wider than the axes whole
    plt.close(figure)
    return out


def plot_matrix(run_dir: Path, out: Path, prefix: str = "coord", title: str | None = None) -> Path:
    """Draw the matrix logged as `<prefix>_<i>_<j>` columns (MAMT's coordination coefficients, 004
    Fig. 7) at the run's last evaluation as a heatmap; absent entries (i = j) are blank."""
    plt = _pyplot()
    row = read_metrics(Path(run_dir) / "metrics.csv")[-1]
    cells = {tuple(map(int, key[len(prefix) + 1:].split("_"))): value for key, value in row.items()
             if key.startswith(prefix + "_") and key[len(prefix) + 1:].replace("_", "").isdigit()}
    if not cells:
        raise VimarlError(f"{run_dir}/metrics.csv has no {prefix}_<i>_<j> columns")
    n = max(max(index) for index in cells) + 1
    matrix = np.full((n, n), np.nan)
    for (i, j), value in cells.items():
        matrix[i, j] = value
    figure, axes = plt.subplots(figsize=(4.8, 4.0), dpi=120)
    image = axes.imshow(matrix, cmap="viridis")
    figure.colorbar(image, ax=axes)
    axes.set_xticks(range(n))
    axes.set_yticks(range(n))
    axes.set_xlabel("agent j")
    axes.set_ylabel("agent i")
    axes.set_title(title or f"{prefix} at {int(row['env_steps'])} env steps")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, bbox_inches="tight")
    plt.close(figure)
    return out
