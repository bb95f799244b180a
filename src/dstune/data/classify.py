"""Classification examples to rows for a classification head (``task: classification``).

A row is the text alone, ``bos + tokens(text)``, cut to ``max_length`` by dropping the end of the text,
with its class index: ``{"input_ids": [...], "labels": k, "source": ...}``. No chat template and no
end-of-sequence token: the head reads the last token, and with pad = eos (most DeepSeek tokenizers) an
eos there would be taken for padding. The label is an int, not a list, which is how the batching and
the loss tell a classification row from a token row.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from dstune.data.formats import DataError
from dstune.data.tokenize import Tokenized, _control_tokens

_CHUNK = 256


def label_list(examples: list[dict]) -> list[str]:
    """The sorted label names of classification examples; integer-like names sort as numbers (2 < 10)."""
    names = {ex["label"] for ex in examples if "label" in ex}
    return sorted(names, key=lambda n: (0, int(n), n) if n.lstrip("-").isdigit() else (1, 0, n))


def class_weights(
    setting: str | dict[str, float], labels: list[str], train: list[dict]
) -> list[float] | None:
    """Loss weight of each class, or None for plain cross-entropy.

    Args:
        setting: "none"; "balanced", ``n / (classes x count_c)`` over the training rows (scikit-learn's
            rule); or ``{label: weight}`` naming every class.
        labels: the classes in head order.
        train: the training examples (with ``label``).

    Raises:
        DataError: a weight for an unknown label, a missing label, or a class absent from train.
    """
    if setting == "none":
        return None
    if setting == "balanced":
        counts = Counter(ex["label"] for ex in train)
        absent = [name for name in labels if not counts[name]]
        if absent:
            raise DataError(f"classify.class_weights=balanced: classes {absent} have no training rows")
        return [len(train) / (len(labels) * counts[name]) for name in labels]
    unknown = sorted(set(setting) - set(labels))
    missing = [name for name in labels if name not in setting]
    if unknown or missing:
        raise DataError(
            f"classify.class_weights names {unknown or 'no unknown labels'} and misses {missing or 'none'}; "
            f"give one positive weight for each of the labels {labels}"
        )
    bad = {k: v for k, v in setting.items() if not v > 0}
    if bad:
        raise DataError(f"classify.class_weights must be positive, got {bad}")
    return [float(setting[name]) for name in labels]


def task_heads(
    examples: list[dict], names: list[str], setting: str
) -> tuple[list[str], dict[str, list[int]] | None]:
    """The head's classes for ``data.mix`` classification sets (rows with ``task``), and the task blocks
    when each task gets its own head (``classify.heads``; ``core.heads``), else None.

    ``auto`` gives one head per task when the tasks' label sets differ: a shared head would make every
    row choose among the other tasks' classes too.

    Raises:
        DataError: a task with fewer than two labels under one head per task.
    """
    own = [label_list([ex for ex in examples if ex.get("task") == i]) for i in range(len(names))]
    if not names or setting == "shared" or (setting == "auto" and len({tuple(o) for o in own}) == 1):
        return label_list(examples), None
    for i, (name, labels) in enumerate(zip(names, own)):
        if len(labels) < 2:
            raise DataError(
                f"data.mix[{i}] (task {name!r}) has the labels {labels}: a head of its own needs two or "
                "more; fix the file's label column, or set classify.heads=shared for one head over all labels"
            )
    from dstune.core.heads import head_blocks

    return head_blocks(names, own)


def per_task_class_weights(
    setting: str | dict[str, float], labels: list[str], heads: dict[str, list[int]], train: list[dict]
) -> list[float] | None:
    """``class_weights`` with a head per task: ``balanced`` is computed within each task's rows and classes
    (a task's rows are only compared with its own classes); a dict names every ``<task>:<label>``."""
    if setting != "balanced":
        return class_weights(setting, labels, train)
    out: list[float] = []
    for i, (start, end) in enumerate(heads.values()):
        out += class_weights(setting, labels[start:end], [ex for ex in train if ex.get("task") == i])
    return out


def tokenize_classification(
    examples: list[dict],
    tokenizer: Any,
    labels: list[str],
    max_length: int,
    weights: list[float] | None = None,
) -> Tokenized:
    """Turns classification examples into head rows (module doc).

    Args:
        examples: ``{"messages", "label", "source"}`` from ``load_examples`` with format classification.
        tokenizer: the model's tokenizer.
        labels: the classes in head order; a label outside them is an error.
        max_length: tokens per row; longer texts lose their end and are counted as truncated.
        weights: per-class loss weights, stored on each row as ``weight`` (training rows only).

    Raises:
        DataError: an example without a label, or with a label the head does not have.
    """
    index = {name: i for i, name in enumerate(labels)}
    control = _control_tokens(tokenizer, None)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = Tokenized(rows=[])
    for first in range(0, len(examples), _CHUNK):
        chunk, texts = [], []
        for ex in examples[first : first + _CHUNK]:
            if "label" not in ex:
                raise DataError(
                    f"{ex.get('source', '?')}: task=classification needs classification rows (a text "
                    "and a label column); this row has none. Set data.format=classification"
                )
            if ex["label"] not in index:
                raise DataError(
                    f"{ex['source']}: label {ex['label']!r} is not one of the run's labels {labels}"
                )
            text = ex["messages"][-2]["content"]
            if control is not None and control.search(text):
                out.dropped["contains a control token"] = out.dropped.get("contains a control token", 0) + 1
                continue
            chunk.append(ex)
            texts.append(text)
        if not texts:
            continue
        for ex, ids in zip(chunk, tokenizer(texts, add_special_tokens=False).input_ids):
            ids = bos + list(ids)
            if len(ids) > max_length:
                ids = ids[:max_length]
                out.truncated += 1
            row = {"input_ids": ids, "labels": index[ex["label"]], "source": ex["source"]}
            if "task" in ex:  # data.mix: the row's data set (data/mix.py)
                row["task"] = ex["task"]
            if weights is not None:
                row["weight"] = weights[row["labels"]]
            out.rows.append(row)
    return out
