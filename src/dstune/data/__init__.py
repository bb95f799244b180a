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
from dstune.data.split import split_examples, split_rows, without_augmented
from dstune.data.tokenize import IGNORE, Tokenized, tokenize_examples

__all__ = [
    "DataError",
    "IGNORE",
    "Loaded",
    "PreparedData",
    "Tokenized",
    "load_examples",
    "prepare_data",
    "split_examples",
    "tokenize_examples",
]


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
    labels: list[str] = field(default_factory=list)  # task=classification: class i is labels[i]
    heads: dict[str, list[int]] | None = None  # a head per task: task -> [start, end) (core.heads)


def _read_report(loaded: Loaded) -> dict:
    report = {**loaded.summary(), "with_reasoning": sum(map(has_reasoning, loaded.examples))}
    if loaded.format == "classification":  # the label names a classification run was trained with
        report["labels"] = sorted({ex["label"] for ex in loaded.examples})
    return report


def _load(cfg: Any, path: str, max_samples: int | None) -> Loaded:
    """Reads one file with the options of ``cfg`` and applies its reasoning policy."""
    loaded = load_examples(
        path,
        cfg.format,
        cfg.lenient,
        max_samples,
        cfg.system,
        text_column=getattr(cfg, "text_column", None),
        label_column=getattr(cfg, "label_column", None),
    )
    if getattr(cfg, "reasoning", "keep") == "strip":
        loaded.examples = [strip_reasoning(ex) for ex in loaded.examples]
    return loaded


def _check_kinds(named: list[tuple[str, Loaded]]) -> None:
    """Refuses files a run cannot read together, naming each one's key and format.

    Supervised formats mix (text, alpaca and messages rows are all tokenised by ``tokenize_examples``);
    preference pairs, KTO rows and prompt-only rows (GRPO) are each tokenised and trained only with their
    own kind.
    """
    formats = {loaded.format for _, loaded in named}
    if len(formats) > 1 and formats & {"preference", "kto", "prompt"}:
        listing = "; ".join(f"{key} ({loaded.path}): {loaded.format}" for key, loaded in named)
        raise DataError(
            f"the data files hold different kinds of rows: {listing}. A run trains on one kind: "
            "prompt/chosen/rejected pairs (objective dpo, orpo or simpo), prompt/completion/label rows "
            "(objective kto), prompts with answers (objective grpo) or supervised rows (objective sft); use "
            "files of one kind"
        )


def _token_report(tok: Tokenized) -> dict:
    return {
        "rows": len(tok.rows),
        "dropped": dict(tok.dropped),
        "truncated": tok.truncated,
        "tokens": tok.tokens,
        "trainable_tokens": tok.trainable_tokens,
    }


def _read_splits(cfg: Any, seed: int, report: dict) -> dict[str, list[dict]]:
    """Reads ``data.train`` (or every data set of ``data.mix``) and splits it, filling ``report``."""
    if cfg.mix:
        from dstune.data.mix import mix_examples, task_names

        reads = [_load(cfg, source.path, cfg.max_samples) for source in cfg.mix]  # first N rows of each
        held = _load(cfg, cfg.validation, None) if cfg.validation else None
        _check_kinds(
            [(f"data.mix[{i}]", r) for i, r in enumerate(reads)]
            + ([("data.validation", held)] if held else [])
        )
        splits = [
            (r.examples, [], [], 0) if held else split_rows(r.examples, tuple(cfg.split), seed) for r in reads
        ]
        if left_out := sum(p[3] for p in splits):  # dstune data augment's copies of held-out rows
            report["augmented_left_out"] = left_out
        parts = [p[:3] for p in splits]
        # Every row knows its task (its data set's index), for the loss weights and the per-task losses.
        parts = [tuple([{**e, "task": i} for e in split] for split in p) for i, p in enumerate(parts)]
        for i, (part, r) in enumerate(zip(parts, reads)):
            if not part[0]:
                raise DataError(f"data.mix[{i}] ({r.path}) has no training rows; remove it or fix the file")
        train, counts = mix_examples([p[0] for p in parts], [s.weight for s in cfg.mix], seed)
        report.update(
            format=reads[0].format if len({r.format for r in reads}) == 1 else "mixed",
            files={"mix": [s.path for s in cfg.mix], "validation": cfg.validation},
        )
        report["read"] = {f"mix[{i}]": _read_report(r) for i, r in enumerate(reads)}
        report["mix"] = [
            {
                "path": s.path,
                "weight": s.weight,
                "train_rows": len(p[0]),
                "sampled": n,
                "share": round(n / max(len(train), 1), 4),
                "task": name,
                "loss_weight": s.loss_weight,
            }
            for s, p, n, name in zip(cfg.mix, parts, counts, task_names(cfg.mix))
        ]
        if held:
            report["read"]["validation"] = _read_report(held)
            return {"train": train, "val": _held_rows(held, report), "test": []}
        return {
            "train": train,
            "val": [e for p in parts for e in p[1]],
            "test": [e for p in parts for e in p[2]],
        }
    loaded = _load(cfg, cfg.train, cfg.max_samples)
    report.update(
        format=loaded.format,
        files={"train": loaded.path, "validation": cfg.validation},
        read={"train": _read_report(loaded)},
    )
    if cfg.validation:
        held = _load(cfg, cfg.validation, None)
        _check_kinds([("data.train", loaded), ("data.validation", held)])
        report["read"]["validation"] = _read_report(held)
        return {"train": loaded.examples, "val": _held_rows(held, report), "test": []}
    train, val, test, left_out = split_rows(loaded.examples, tuple(cfg.split), seed)
    if left_out:  # dstune data augment's copies of validation and test rows (dstune/augment.py)
        report["augmented_left_out"] = left_out
    return {"train": train, "val": val, "test": test}


def _held_rows(held: Loaded, report: dict) -> list[dict]:
    """A validation file's rows; augmented ones (``dstune data augment``) are never validated on."""
    rows, left_out = without_augmented(held.examples)
    if left_out:
        report["augmented_left_out"] = report.get("augmented_left_out", 0) + left_out
    return rows


def dropped_rows_warning(report: dict, max_length: int) -> str | None:
    """A warning when tokenizing dropped a tenth or more of a split's rows, else None.

    Rows whose answer ``data.max_length`` cuts off entirely carry no loss and are dropped; a run then
    trains and validates on far fewer rows than it read, and a validation loss over a handful of tokens
    ranks nothing (bench_tune at max_length 48 kept 4 of 24 validation rows, 21 tokens). Only an empty
    training split is an error (below); this says so before the steps are spent.
    """
    lost = []
    for name, tok in report.get("tokenized", {}).items():
        dropped = sum(tok["dropped"].values())
        if dropped and dropped >= 0.1 * (dropped + tok["rows"]):
            why = ", ".join(f"{reason}: {n}" for reason, n in tok["dropped"].items())
            lost.append(f"{dropped} of {dropped + tok['rows']} {name} rows ({why})")
    if not lost:
        return None
    val = report["tokenized"].get("val")
    left = (
        f"; {val['rows']} validation rows with {val['trainable_tokens']} trainable tokens are left"
        if val
        else ""
    )
    return (
        f"data: tokenizing dropped {', '.join(lost)}{left}. Rows whose answer data.max_length={max_length} "
        f"cuts off entirely carry no loss: raise data.max_length (data inspect shows the rows as tokenized)"
    )


def _tokenize_splits(cfg, splits, tokenizer, chat_template, task, class_weights, head_setting, report):
    """Each split's rows as token rows, the way its task and format need; the class labels (or []) and
    the task blocks of a head per task (or None)."""
    labels: list[str] = []
    heads = None
    if task == "classification":
        from dstune.data.classify import class_weights as weights_of
        from dstune.data.classify import per_task_class_weights, task_heads, tokenize_classification
        from dstune.data.mix import task_names

        names = task_names(cfg.mix) if cfg.mix else []
        labels, heads = task_heads(splits["train"] + splits["val"] + splits["test"], names, head_setting)
        if heads:  # one head per task: a row's class is its task's label (``<task>:<label>``)
            if any("task" not in ex for rows in splits.values() for ex in rows):
                raise DataError(
                    "classify.heads=per_task needs the task of every validation row: leave data.validation "
                    "unset so each data.mix file is split into its own validation rows"
                )
            splits = {
                name: [{**ex, "label": f"{names[ex['task']]}:{ex['label']}"} for ex in rows]
                for name, rows in splits.items()
            }
            weights = per_task_class_weights(class_weights, labels, heads, splits["train"])
        else:
            weights = weights_of(class_weights, labels, splits["train"]) if labels else None
        tokenized = {
            name: tokenize_classification(
                rows, tokenizer, labels, cfg.max_length, weights if name == "train" else None
            )
            for name, rows in splits.items()
        }
        report["labels"] = labels
        report["class_weights"] = weights
        if heads:
            report["heads"] = heads
    elif report["format"] in ("preference", "kto", "prompt"):
        from dstune.data.preference import tokenize_preference

        tokenized = {
            name: tokenize_preference(rows, tokenizer, chat_template, cfg.max_length, cfg.overflow)
            for name, rows in splits.items()
        }
    else:
        tokenized = {
            name: tokenize_examples(
                rows, tokenizer, chat_template, cfg.max_length, cfg.overflow, cfg.train_on
            )
            for name, rows in splits.items()
        }
    return tokenized, labels, heads


def prepare_data(
    cfg: Any,
    tokenizer: Any,
    chat_template: str | None,
    seed: int,
    *,
    task: str = "lm",
    class_weights: str | dict = "none",
    heads: str = "auto",
) -> PreparedData:
    """Reads, splits and tokenizes the data a run trains on.

    With ``cfg.validation`` set, validation comes from that file and test is empty; otherwise the
    train file is split by ``cfg.split``. The split happens before tokenizing, so it depends only on
    the data and the seed, not on the tokenizer or ``max_length``. With ``cfg.mix`` each data set is
    split on its own and the training parts are mixed by weight (``dstune.data.mix``).

    Args:
        cfg: a ``DataConfig``.
        tokenizer: a fast transformers tokenizer.
        chat_template: the resolved Jinja template (``models.templates.resolve_chat_template``);
            None uses the tokenizer's own.
        seed: the split seed (the run's seed).
        task: "lm" (token rows with a loss mask) or "classification" (text rows with a class index for a
            classification head, ``dstune.data.classify``).
        class_weights: ``classify.class_weights``, for task "classification".
        heads: ``classify.heads``: one head per ``data.mix`` task, or one shared
            (``data.classify.task_heads``).

    Returns:
        The token rows of each split and the report.

    Raises:
        DataError: no train file set, a bad file or row, or no trainable rows left in train.
    """
    if not cfg.train and not cfg.mix:
        raise DataError(
            "no training data: set data.train to a .json, .jsonl, .csv, .parquet or .txt file "
            "(or data.mix to several, with weights)"
        )
    report: dict = {}
    splits = _read_splits(cfg, seed, report)
    report["split"] = {name: len(rows) for name, rows in splits.items()}
    tokenized, labels, heads = _tokenize_splits(
        cfg, splits, tokenizer, chat_template, task, class_weights, heads, report
    )
    report["tokenized"] = {name: _token_report(tok) for name, tok in tokenized.items()}
    report["trainable_tokens"] = tokenized["train"].trainable_tokens
    if not tokenized["train"].rows:
        why = ", ".join(f"{r}: {n}" for r, n in tokenized["train"].dropped.items())
        raise DataError(
            f"{cfg.train or 'data.mix'}: no training rows left after tokenizing ({why}); raise "
            f"data.max_length (now {cfg.max_length}), or set data.overflow=truncate if it is drop"
        )
    return PreparedData(
        train=tokenized["train"].rows,
        val=tokenized["val"].rows,
        test=tokenized["test"].rows,
        report=report,
        labels=labels,
        heads=heads,
    )
