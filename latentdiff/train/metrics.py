"""metrics.csv: one row every `log_every` steps and every `sample_every` step, written by the main process only."""
from __future__ import annotations

import csv
from pathlib import Path


class MetricsLog:
    """metrics.csv with a fixed set of columns; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, columns: list[str], resume_step: int):
        self.path, self.columns = path, ["step"] + columns
        rows = []
        if resume_step and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, step: int, values: dict[str, float]) -> dict[str, float]:
        """Append a row of `values` (those that have a column); returns them (the same to TensorBoard)."""
        kept = {k: float(v) for k, v in values.items() if k in self.columns and k != "step"}
        with open(self.path, "a", newline="") as f:
            row = {"step": step, **{k: f"{v:.6g}" for k, v in kept.items()}}
            csv.DictWriter(f, self.columns).writerow(row)
        return kept
