"""A run directory and every file name in it: no other module spells one.

A run directory holds everything about one run: the resolved config, ``run.json`` (what was trained on
what), the data report, metrics, checkpoints, the final adapter or model, plots and summaries. It counts
as a run once it has ``run.json`` or a checkpoint; a directory with neither can be reused. Checkpoint
directories are complete only with their ``COMPLETE`` marker (see ``train.checkpoint``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dstune.errors import DstuneError

COMPLETE = "COMPLETE"  # the marker written last into a checkpoint directory


class NotARunError(DstuneError, FileNotFoundError):
    """A path given as a run directory is not one, or its run has not finished; the message says why."""


class RunDir:
    """The paths of one run directory, and the JSON it keeps."""

    CONFIG = "config.yaml"
    RUN = "run.json"
    DATA_REPORT = "data_report.json"
    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    BEST = "best_checkpoint.json"
    CHANGES = "config_changes.jsonl"
    CHECKPOINTS = "checkpoints"
    FINAL = "final"
    LOSS_PLOT = "loss.png"
    REWARD_PLOT = "reward.png"  # objective=grpo: the mean reward per step and at each validation
    COMPLETIONS = "completions.jsonl"  # objective=grpo: a few validation completions at each evaluation
    FISHER = "fisher.safetensors"  # regularize.ewc_lambda: the Fisher information the penalty weighs by
    TENSORBOARD = "tb"
    LABELS = "labels.json"
    EVAL_JSON = "eval.json"
    EVAL_MD = "eval.md"
    PLOTS = "plots"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    config = property(lambda self: self.path / self.CONFIG)
    run_json = property(lambda self: self.path / self.RUN)
    data_report = property(lambda self: self.path / self.DATA_REPORT)
    metrics = property(lambda self: self.path / self.METRICS)
    summary = property(lambda self: self.path / self.SUMMARY)
    best = property(lambda self: self.path / self.BEST)
    changes = property(lambda self: self.path / self.CHANGES)
    checkpoints = property(lambda self: self.path / self.CHECKPOINTS)
    loss_plot = property(lambda self: self.path / self.LOSS_PLOT)
    tensorboard = property(lambda self: self.path / self.TENSORBOARD)
    labels = property(lambda self: self.path / self.LABELS)
    eval_json = property(lambda self: self.path / self.EVAL_JSON)
    eval_md = property(lambda self: self.path / self.EVAL_MD)
    plots = property(lambda self: self.path / self.PLOTS)

    @property
    def final(self) -> Path:
        """The saved adapter or model (``run.json`` may name another folder)."""
        return self.path / self.read_json(self.RUN).get("final", self.FINAL)

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:06d}"

    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoints (marker present), oldest first."""
        return sorted(
            p
            for p in self.checkpoints.glob("step-*")
            if not p.name.endswith(".tmp") and (p / COMPLETE).exists()
        )

    def latest_checkpoint(self) -> Path | None:
        done = self.list_checkpoints()
        return done[-1] if done else None

    def is_run(self) -> bool:
        """True once training wrote ``run.json`` or a checkpoint here."""
        return self.run_json.is_file() or any(self.checkpoints.glob("step-*"))

    def read_json(self, name: str) -> dict[str, Any]:
        """One of the run's JSON files, or ``{}`` when it does not exist."""
        path = self.path / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def write_json(self, name: str, value: Any) -> Path:
        """Writes a JSON file atomically (temporary file, then rename): a crash leaves the old one whole."""
        return write_text_atomic(
            self.path / name, json.dumps(value, indent=2, ensure_ascii=False, default=str)
        )

    def append_jsonl(self, name: str, row: dict) -> None:
        with (self.path / name).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> Path:
    """Writes ``text`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
