"""Scores and interval estimates over seeds (DESIGN §9.4), on top of rliable (Agarwal et al., "Deep
Reinforcement Learning at the Edge of the Statistical Precipice", NeurIPS 2021).

- A run's score is the compared metric averaged over its last `SCORE_EVALUATIONS` evaluations
  (fewer where the run has fewer): one evaluation is noisy, and the last three are what the run
  ended at rather than where one evaluation happened to land.
- An arm's aggregate is the interquartile mean (IQM) of its seeds' scores: the mean of the middle
  50% (rliable.metrics.aggregate_iqm, scipy's trim_mean cutting 25% at each end; with fewer than 4
  seeds nothing is cut and it is the mean).
- Intervals are 95% percentile intervals of a stratified bootstrap over seeds
  (rliable.library.get_interval_estimates, `BOOTSTRAP_REPS` resamples): an arm's seeds are resampled
  with replacement, and where two arms are compared each arm's seeds are resampled independently.
  The bootstrap is seeded (`BOOTSTRAP_SEED`), so the same scores always give the same intervals.
- The probability of improvement P(A > B) is the chance that a random seed of A scores above a
  random seed of B, ties counting half (rliable.metrics.probability_of_improvement, the
  Mann-Whitney U statistic over n_A x n_B); against a number it is the fraction of A's seeds above it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

SCORE_EVALUATIONS = 3
"""Evaluations (the last rows of metrics.csv) a run's score averages."""
BOOTSTRAP_REPS = 2000
"""Bootstrap resamples per interval (rliable's default for performance profiles): enough for stable
95% percentile bounds, at a fraction of a second per interval (the cost grows linearly with it)."""
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap confidence interval [lo, hi]."""

    value: float
    lo: float
    hi: float


def evaluation_values(rows: list[dict[str, Any]], columns: list[str], divide_by: float = 1.0) -> list[float]:
    """The compared metric at every evaluation row: the sum of `columns` divided by `divide_by`
    (rows without every column, or with an empty one, are left out)."""
    values = []
    for row in rows:
        cells = [row.get(column) for column in columns]
        if all(isinstance(cell, (int, float)) and math.isfinite(cell) for cell in cells):
            values.append(sum(cells) / divide_by)
    return values


def run_score(rows: list[dict[str, Any]], columns: list[str], divide_by: float = 1.0) -> float | None:
    """The mean of the compared metric over the run's last SCORE_EVALUATIONS evaluations (None without any)."""
    values = evaluation_values(rows, columns, divide_by)[-SCORE_EVALUATIONS:]
    return sum(values) / len(values) if values else None


def iqm(values: Sequence[float]) -> float:
    from rliable import metrics
    return float(metrics.aggregate_iqm(np.asarray(values, dtype=float)))


@contextlib.contextmanager
def _seeded_bootstrap() -> Iterator[None]:
    """rliable 1.2.0 draws its resampling indices from numpy's global generator (its random_state
    argument does not reach them), so the global generator is seeded here and restored after."""
    state = np.random.get_state()
    np.random.seed(BOOTSTRAP_SEED)
    try:
        yield
    finally:
        np.random.set_state(state)


def _interval(scores: np.ndarray | list[np.ndarray], statistic) -> tuple[np.ndarray, np.ndarray]:
    """(point estimate, [lower; upper]) of `statistic` by rliable's stratified bootstrap; `scores` is one
    (runs x tasks) array, or a list of them resampled independently of each other."""
    from rliable import library

    with _seeded_bootstrap():
        points, intervals = library.get_interval_estimates(
            {"scores": scores}, statistic, reps=BOOTSTRAP_REPS, confidence_interval_size=CONFIDENCE)
    return np.asarray(points["scores"], dtype=float), np.asarray(intervals["scores"], dtype=float)


def _column(values: Sequence[float]) -> np.ndarray:
    """Scores as rliable's (runs x tasks) matrix of one task."""
    return np.asarray(values, dtype=float).reshape(-1, 1)


def iqm_interval(values: Sequence[float]) -> Estimate:
    """IQM over seeds with its bootstrap interval (one seed: the interval is that seed's value)."""
    from rliable import metrics

    point, interval = _interval(_column(values), lambda scores: np.array([metrics.aggregate_iqm(scores)]))
    return Estimate(float(point[0]), float(interval[0, 0]), float(interval[1, 0]))


def iqm_difference(left: Sequence[float], right: Sequence[float] | float) -> Estimate:
    """IQM(left) - IQM(right) with its interval, each arm's seeds resampled independently; a number
    as `right` (a paper's value) has no spread: the interval is IQM(left)'s, shifted."""
    from rliable import metrics

    if isinstance(right, (int, float)):
        shifted = iqm_interval(left)
        return Estimate(shifted.value - right, shifted.lo - right, shifted.hi - right)
    point, interval = _interval([_column(left), _column(right)], lambda a, b: np.array(
        [metrics.aggregate_iqm(a) - metrics.aggregate_iqm(b)]))
    return Estimate(float(point[0]), float(interval[0, 0]), float(interval[1, 0]))


def probability_of_improvement(left: Sequence[float], right: Sequence[float] | float) -> Estimate:
    """P(left > right) over random pairs of seeds, with its interval (rliable's definition)."""
    from rliable import metrics

    right_scores = _column([right] if isinstance(right, (int, float)) else right)
    point, interval = _interval([_column(left), right_scores], metrics.probability_of_improvement)
    lower, upper = interval.ravel()
    return Estimate(float(point), float(lower), float(upper))


def iqm_band(runs_by_step: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(IQM, lower, upper) at every column of a (runs x evaluation steps) matrix: each step's runs are
    resampled on their own (steps are rliable's strata), giving a pointwise 95% band."""
    from scipy.stats import trim_mean

    def per_step_iqm(scores: np.ndarray) -> np.ndarray:  # rliable's aggregate_iqm, one value per step
        return trim_mean(scores, proportiontocut=0.25, axis=0)

    point, interval = _interval(np.asarray(runs_by_step, dtype=float), per_step_iqm)
    return point, interval[0], interval[1]
