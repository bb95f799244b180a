"""``train.curriculum``: short-to-long training, the long-context recipe of the fine-tuning guides.

The data is tokenised once, at ``data.max_length``. Each stage cuts those rows to its own ``max_length``
(``data.overflow``: truncate keeps the first tokens, drop leaves out rows that are longer; a cut row left
with no trainable token is left out) and, with ``train.packing``, packs them into rows of that length.
The stages' rows are stored one after another in the run's training rows, and the micro-batch stream
(``batching.MicroBatches``) switches to the next stage's rows at the stage's first micro-batch, so the
position is still all the state a resume needs. Validation stays on the full rows and reports the loss
per length bucket, one bucket per stage length (``len_loss/A-B``).
"""

from __future__ import annotations

import math

from dstune.config import RunConfig
from dstune.core.loss import IGNORE
from dstune.data.pack import pack_rows
from dstune.errors import UsageError
from dstune.train.batching import Stage


def cut_rows(rows: list[dict], max_length: int, overflow: str) -> list[dict]:
    """``rows`` cut to ``max_length`` tokens (or left out: ``overflow=drop``, or no trainable token left)."""
    out = []
    for row in rows:
        if len(row["input_ids"]) > max_length:
            if overflow == "drop":
                continue
            row = {**row, "input_ids": row["input_ids"][:max_length], "labels": row["labels"][:max_length]}
            if all(t == IGNORE for t in row["labels"][1:]):
                continue
        out.append(row)
    return out


def stage_rows(cfg: RunConfig, rows: list[dict]) -> tuple[list[dict], list[Stage], list[dict]]:
    """Every stage's training rows, one stage after another, the stages for ``MicroBatches`` and their
    report (``data_report.json``: length, rows, steps, first micro-batch)."""
    tc = cfg.train
    out: list[dict] = []
    stages: list[Stage] = []
    report: list[dict] = []
    position = 0
    for k, stage in enumerate(tc.curriculum):
        cut = cut_rows(rows, stage.max_length, cfg.data.overflow)
        if tc.packing:
            cut = pack_rows(cut, stage.max_length, tc.seed + k)
        if not cut:
            raise UsageError(
                f"train.curriculum[{k}] (max_length {stage.max_length}) has no training rows left: every row "
                f"is longer (data.overflow=drop) or has no trainable token in its first {stage.max_length}"
            )
        stages.append(Stage(len(out), len(cut), position))
        report.append(
            {"max_length": stage.max_length, "rows": len(cut), "steps": stage.steps, "first_batch": position}
        )
        out += cut
        position += (stage.steps or 0) * tc.grad_accum
    return out, stages, report


def curriculum_steps(cfg: RunConfig, last_stage_epoch: int) -> int:
    """Optimizer steps of a curriculum run: ``train.max_steps``, else the stages before the last plus
    ``train.epochs`` over the last stage's rows (``last_stage_epoch`` micro-batches each)."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    before = sum(s.steps for s in cfg.train.curriculum[:-1])
    return before + max(1, math.ceil(cfg.train.epochs * last_stage_epoch / cfg.train.grad_accum))


def length_buckets(cfg: RunConfig, rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """Validation rows grouped by length, one bucket per stage: ``(name, rows)`` with names like
    ``len_loss/1-256`` and ``len_loss/257-1024`` (the last bucket also takes anything longer)."""
    bounds = [s.max_length for s in cfg.train.curriculum]
    buckets: list[tuple[str, list[dict]]] = []
    low = 1
    for i, high in enumerate(bounds):
        last = i == len(bounds) - 1
        keep = [r for r in rows if low <= len(r["input_ids"]) and (last or len(r["input_ids"]) <= high)]
        buckets.append((f"len_loss/{low}-{high}", keep))
        low = high + 1
    return buckets
