"""The data path: read a file, normalise its rows, split, tokenize with a loss mask.

    from dstune.data import prepare_data
    data = prepare_data(cfg.data, tokenizer, chat_template, seed=cfg.train.seed)
    data.train[0]  # {"input_ids": [...], "labels": [...], "source": "my.jsonl:line 1"}
    data.report    # what was read, dropped, truncated, and how many tokens carry loss
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dstune.data.formats import DataError, has_reasoning, strip_reasoning
from dstune.data.read import Loaded, load_examples
from dstune.data.split import split_examples
from dstune.data.tokenize import IGNORE, Tokenized, tokenize_examples

__all__ = ["DataError", "IGNORE", "Loaded", "PreparedData", "Tokenized", "load_examples", "prepare_data",
           "split_examples", "tokenize_examples"]


@dataclass
class PreparedData:
    """Token rows for each split and a report of how they were made.

    Attributes:
        train, val, test: lists of ``{"input_ids", "labels", "source"}`` rows.
        report: JSON-ready summary: format, files, rows read and dropped (by reason), split sizes,
            and per split the rows kept, dropped (by reason), truncated, tokens and trainable tokens.
    """

    train: list[dict]
    val: list[dict]
    test: list[dict]
    report: dict = field(default_factory=dict)


def _read_report(loaded: Loaded) -> dict:
    report = {"path": loaded.path, "format": loaded.format, "rows_read": loaded.rows_read,
              "examples": len(loaded.examples), "dropped": dict(loaded.dropped),
              "first_dropped": dict(loaded.first_dropped),
              "with_reasoning": sum(map(has_reasoning, loaded.examples))}
    if loaded.format == "classification":  # the label names a classification run was trained with
        report["labels"] = sorted({ex["label"] for ex in loaded.examples})
    return report


def _load(cfg: Any, path: str, max_samples: int | None) -> Loaded:
    """Reads one file with the options of ``cfg`` and applies its reasoning policy."""
    loaded = load_examples(path, cfg.format, cfg.lenient, max_samples, cfg.system,
                           text_column=getattr(cfg, "text_column", None), label_column=getattr(cfg, "label_column", None))
    if getattr(cfg, "reasoning", "keep") == "strip":
        loaded.examples = [strip_reasoning(ex) for ex in loaded.examples]
    return loaded


def _token_report(tok: Tokenized) -> dict:
    return {"rows": len(tok.rows), "dropped": dict(tok.dropped), "truncated": tok.truncated,
            "tokens": tok.tokens, "trainable_tokens": tok.trainable_tokens}


def prepare_data(cfg: Any, tokenizer: Any, chat_template: str | None, seed: int) -> PreparedData:
    """Reads, splits and tokenizes the data a run trains on.

    With ``cfg.validation`` set, validation comes from that file and test is empty; otherwise the
    train file is split by ``cfg.split``. The split happens before tokenizing, so it depends only on
    the data and the seed, not on the tokenizer or ``max_length``.

    Args:
        cfg: a ``DataConfig``.
        tokenizer: a fast transformers tokenizer.
        chat_template: the resolved Jinja template (``models.templates.resolve_chat_template``);
            None uses the tokenizer's own.
        seed: the split seed (the run's seed).

    Returns:
        The token rows of each split and the report.

    Raises:
        DataError: no train file set, a bad file or row, or no trainable rows left in train.
    """
    if not cfg.train:
        raise DataError("no training data: set data.train to a .json, .jsonl, .csv, .parquet or .txt file")
    loaded = _load(cfg, cfg.train, cfg.max_samples)
    report: dict = {"format": loaded.format, "files": {"train": loaded.path, "validation": cfg.validation},
                    "read": {"train": _read_report(loaded)}}
    if cfg.validation:
        held = _load(cfg, cfg.validation, None)
        report["read"]["validation"] = _read_report(held)
        splits = {"train": loaded.examples, "val": held.examples, "test": []}
    else:
        train, val, test = split_examples(loaded.examples, tuple(cfg.split), seed)
        splits = {"train": train, "val": val, "test": test}
    report["split"] = {name: len(rows) for name, rows in splits.items()}
    tokenized = {name: tokenize_examples(rows, tokenizer, chat_template, cfg.max_length, cfg.overflow, cfg.train_on)
                 for name, rows in splits.items()}
    report["tokenized"] = {name: _token_report(tok) for name, tok in tokenized.items()}
    report["trainable_tokens"] = tokenized["train"].trainable_tokens
    if not tokenized["train"].rows:
        why = ", ".join(f"{r}: {n}" for r, n in tokenized["train"].dropped.items())
        raise DataError(f"{cfg.train}: no training rows left after tokenizing ({why}); raise data.max_length "
                        f"(now {cfg.max_length}), or set data.overflow=truncate if it is drop")
    return PreparedData(train=tokenized["train"].rows, val=tokenized["val"].rows, test=tokenized["test"].rows,
                        report=report)
