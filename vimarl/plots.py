"""Learning curves: one run (mean +- std over evaluation episodes) or several runs grouped by
algorithm and environment (mean +- std over runs, e.g. seeds), against environment steps."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from vimarl.errors import VimarlError
from vimarl.logging import read_metrics


def _label(run_dir: Path) -> str:
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        return run_dir.name
    config = yaml.safe_load(config_path.read_text())
    return f"{config['algo']} on {config['env']}"


def curves(run_dirs: list[Path], metric: str = "eval_return_mean", x: str = "env_steps"):
    """{label: (x, mean, spread, n_runs)}; runs of a label are cut to the x values they share.

    The spread is the std over runs, or for a single run of eval_return_mean the std over its
    evaluation episodes (eval_return_std).
    """
    grouped: dict[str, list[dict[float, tuple[float, float]]]] = defaultdict(list)
    for run_dir in map(Path, run_dirs):
        rows = read_metrics(run_dir / "metrics.csv")
        if not rows:
            raise VimarlError(f"{run_dir} has no metrics.csv rows; pass OUT directories of vimarl train runs")
        if metric not in rows[0] or x not in rows[0]:
            raise VimarlError(f"{run_dir}/metrics.csv has no column '{metric}' or '{x}'; "
                              f"columns: {', '.join(rows[0])}")
        within = "eval_return_std" if metric == "eval_return_mean" else None
        grouped[_label(run_dir)].append(
            {row[x]: (row[metric], row.get(within, 0.0) if within else 0.0) for row in rows})
    result = {}
    for label, runs in grouped.items():
        shared = sorted(set.intersection(*(set(run) for run in runs)))
        values = np.array([[run[step][0] for step in shared] for run in runs], dtype=float)
        if len(runs) == 1:
            spread = np.array([runs[0][step][1] for step in shared], dtype=float)
        else:
            spread = values.std(axis=0)
        result[label] = (np.array(shared), values.mean(axis=0), spread, len(runs))
    return result


def plot_runs(run_dirs: list[Path], out: Path, metric: str = "eval_return_mean",
              x: str = "env_steps", title: str | None = None) -> Path:
    """Draw `metric` against `x` for the runs and save a PNG to `out`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, (steps, mean, spread, n_runs) in curves(run_dirs, metric, x).items():
        shown = f"{label} ({n_runs} runs)" if n_runs > 1 else label
        line, = axes.plot(steps, mean, label=shown)
        axes.fill_between(steps, mean - spread, mean + spread, color=line.get_color(), alpha=0.2)
    axes.set_xlabel(x.replace("_", " "))
    axes.set_ylabel(metric.replace("_", " "))
    if title:
        axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)
    return out
