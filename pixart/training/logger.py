"""Training metrics to a CSV file and TensorBoard (tensorboardX event files)."""
from __future__ import annotations

import csv
import os
from typing import Dict, Optional


class MetricsLogger:
    """Appends one row per logged step to ``train_log.csv`` and the same scalars to TensorBoard.

    Resuming appends to the existing CSV; rows past the resumed step (written after the
    checkpoint the run resumes from) are dropped so the log has no duplicate steps.
    """

    def __init__(self, output_path: str, resume_step: Optional[int] = None, tensorboard: bool = True):
        os.makedirs(output_path, exist_ok=True)
        self.csv_path = os.path.join(output_path, "train_log.csv")
        self.fields = None
        if resume_step is not None and os.path.isfile(self.csv_path):
            with open(self.csv_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            if rows:
                self.fields = list(rows[0])
            with open(self.csv_path, "w", newline="") as f:
                if self.fields:
                    writer = csv.DictWriter(f, self.fields)
                    writer.writeheader()
                    writer.writerows(rows)
        elif os.path.exists(self.csv_path):
            os.remove(self.csv_path)
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(os.path.join(output_path, "tensorboard"), purge_step=resume_step)

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        row = {"step": step, **metrics}
        new_file = self.fields is None
        if new_file:
            self.fields = list(row)
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.fields, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
