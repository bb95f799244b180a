"""The task axis, in one place: what differs between a language-model run and a classifier run.

``task: lm`` trains next-token loss on token rows (tokenised once, then from the cache) and validates
loss, perplexity and, when asked, generated answers. ``task: classification`` puts a ``[classes, hidden]``
head in place of the LM head, trains on one labelled row per example and validates accuracy and macro
F1. ``build``, the hooks and the run directory ask ``TASKS[cfg.task]``; nothing else branches on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dstune.config import RunConfig
from dstune.data import PreparedData, prepare_data
from dstune.data.cache import cached_prepare
from dstune.evaluate.answers import evaluate_answers
from dstune.evaluate.loss import evaluate_classifier, evaluate_tasks
from dstune.models.load import load_model
from dstune.train.curriculum import length_buckets


def _lm_data(cfg: RunConfig, tokenizer, template: str | None) -> PreparedData:
    return cached_prepare(
        cfg.data, tokenizer, template, cfg.train.seed
    )  # tokenised once, then from the cache


def _lm_model(cfg: RunConfig, resolved, labels: list[str], pad: int, heads=None) -> torch.nn.Module:
    return load_model(
        resolved,
        dtype=torch.float32,
        trust_remote_code=cfg.model.trust_remote_code,
        revision=cfg.model.revision,
        allow_pickle=cfg.model.allow_pickle,
        rope_scaling=cfg.model.rope_scaling,
    )


def _lm_validate(run, micro: int) -> dict[str, float]:
    tc = run.cfg.train
    if hasattr(run.objective, "evaluate"):  # a preference objective: its loss and rewards on validation pairs
        return run.objective.evaluate(run.model, run.data.val, micro, run.engine, tc.eval_batches)
    tasks = getattr(run.objective, "tasks", None)
    metrics = evaluate_tasks(
        run.model,
        run.data.val,
        tasks.names if tasks is not None else [],
        micro,
        run.pad_id,
        run.engine,
        tc.eval_batches,
        run.objective.chunk_tokens,
        buckets=(lambda rows: length_buckets(run.cfg, rows)) if tc.curriculum else None,
    )
    # Answers are generated one row at a time, so a smaller evaluation batch would not help them.
    if metrics and tc.eval_generate:
        metrics.update(
            evaluate_answers(
                run.unwrapped, run.data.val, run.tokenizer, tc.eval_generate, tc.eval_max_new_tokens
            )
        )
    return metrics


def _classifier_data(cfg: RunConfig, tokenizer, template: str | None) -> PreparedData:
    # Head rows (data/classify.py); the token cache does not key on the task.
    return prepare_data(
        cfg.data,
        tokenizer,
        template,
        cfg.train.seed,
        task="classification",
        class_weights=cfg.classify.class_weights,
        heads=cfg.classify.heads,
    )


def _classifier_model(cfg: RunConfig, resolved, labels: list[str], pad: int, heads=None) -> torch.nn.Module:
    from dstune.models.classify import load_classifier

    return load_classifier(
        resolved.path,
        labels,
        pad,
        trust_remote_code=cfg.model.trust_remote_code,
        pooling=cfg.classify.pooling,
        heads=heads,
    )


def _classifier_validate(run, micro: int) -> dict[str, float]:
    tasks = getattr(run.objective, "tasks", None)
    return evaluate_classifier(
        run.model,
        run.data.val,
        micro,
        run.pad_id,
        run.engine,
        run.cfg.train.eval_batches,
        names=tasks.names if tasks is not None else None,
    )


def _save_labels(run_dir: Path, data: PreparedData) -> None:
    from dstune.models.classify import save_labels

    save_labels(run_dir, data.labels, heads=data.heads)


@dataclass(frozen=True)
class Task:
    """How one task prepares data and model, validates, and what its run directory holds besides."""

    data: Callable[[RunConfig, object, str | None], PreparedData]
    model: Callable[[RunConfig, object, list[str], int, dict | None], torch.nn.Module]  # heads: core.heads
    validate: Callable[[object, int], dict[str, float]]  # (Run, evaluation micro-batch) -> metrics
    tokens_per_row: bool  # rows are token sequences with per-token loss (chunked output layer, padding hint)
    save: Callable[[Path, PreparedData], None] | None = None  # extra files of the run directory (labels)


TASKS: dict[str, Task] = {
    "lm": Task(_lm_data, _lm_model, _lm_validate, tokens_per_row=True),
    "classification": Task(
        _classifier_data, _classifier_model, _classifier_validate, tokens_per_row=False, save=_save_labels
    ),
}
