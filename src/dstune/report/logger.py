"""Metrics to a JSON-lines file and TensorBoard, one call per logging step."""

from __future__ import annotations

import json
from pathlib import Path

from dstune.rundir import RunDir


class MetricsLogger:
    """Appends ``{"step": n, ...}`` rows to ``metrics.jsonl`` and scalars to TensorBoard under ``tb/``."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = RunDir(run_dir).metrics
        self.enabled = enabled
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported here: slow, and only rank 0 logs

            self._tb = SummaryWriter(log_dir=str(RunDir(run_dir).tensorboard))

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": split, **values}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self._tb.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    """All rows of a run's ``metrics.jsonl``."""
    path = RunDir(run_dir).metrics
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
