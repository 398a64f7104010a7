"""Metrics to OUT/metrics.csv (rewritten atomically, so it is never half-written) and TensorBoard."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from vimarl.checkpoint import atomic_write


class MetricsLog:
    """Rows of metrics; columns are the union of keys, in order of first appearance."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, purge_step: int | None = None):
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # imported only when asked for
            self.writer = SummaryWriter(str(tensorboard_dir), purge_step=purge_step)

    def keep_until(self, env_steps: int) -> None:
        """Load an existing log and drop rows after `env_steps` (resume from a checkpoint)."""
        self.rows = [row for row in read_metrics(self.path) if row["env_steps"] <= env_steps]

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        columns = list(dict.fromkeys(key for r in self.rows for key in r))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.path, lambda file: file.write(buffer.getvalue().encode()))
        if self.writer is not None:
            for key, value in row.items():
                if key != "env_steps" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, row["env_steps"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.csv as a list of rows with numbers parsed (empty cells are NaN)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as file:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(file)]


def _number(text: str) -> Any:
    if text == "":
        return math.nan
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value
