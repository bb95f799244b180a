"""Collation: token rows to padded tensors (right-padded LM rows, left-padded classification rows)."""

from __future__ import annotations

import torch

from dstune.core.loss import IGNORE


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pads rows on the right to the longest row of the micro-batch.

    Packed rows (with ``position_ids``, see ``dstune.data.pack``) also get position ids; the padding
    of a packed row counts up from 0 as a segment of its own, so it attends to no real example.
    """
    if isinstance(rows[0]["labels"], int):
        return collate_classes(rows, pad_id)
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    packed = "position_ids" in rows[0]
    pos = torch.arange(width).repeat(len(rows), 1) if packed else None
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
        if packed:
            pos[i, :n] = torch.tensor(r["position_ids"])
            pos[i, n:] = torch.arange(width - n)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if packed:
        batch["position_ids"] = pos
    if "task" in rows[0] or "task_ids" in rows[0]:  # data.mix: each token's task, -1 on padding
        batch["task_ids"] = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            batch["task_ids"][i, :n] = torch.tensor(r["task_ids"]) if "task_ids" in r else r["task"]
    _collate_preference(rows, pad_id, batch)
    return batch


# Preference rows (``data.preference``) carry a second token row per example (the rejected answer, or
# KTO's mismatched completion) and per-example numbers (KTO's label, cached reference log-probabilities).
_SECOND_ROWS = ("rejected_", "kl_")
_NUMBERS = {
    "desirable": torch.long,
    "ref_chosen": torch.float32,
    "ref_rejected": torch.float32,
    "ref_kl": torch.float32,
    "row": torch.long,
}  # fmt: skip  (row: GRPO's prompt rows)


def _collate_preference(rows: list[dict], pad_id: int, batch: dict[str, torch.Tensor]) -> None:
    """Adds the prefixed second rows (padded on their own) and the per-example numbers to ``batch``."""
    for prefix in _SECOND_ROWS:
        if prefix + "input_ids" in rows[0]:
            second = collate(
                [{"input_ids": r[prefix + "input_ids"], "labels": r[prefix + "labels"]} for r in rows], pad_id
            )
            batch.update({prefix + k: v for k, v in second.items()})
    for key, dtype in _NUMBERS.items():
        if key in rows[0]:
            batch[key] = torch.tensor([r[key] for r in rows], dtype=dtype)


def collate_classes(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pads classification-head rows on the left; ``labels`` is one class index per row.

    Left, so the last position of every row is its last real token, the one the head reads, even for
    methods that hand the model embeddings instead of token ids (``models.classify``). Rows with a
    ``weight`` (class weights, training only) give ``weights``.
    """
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, width - n :] = torch.tensor(r["input_ids"])
        mask[i, width - n :] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([r["labels"] for r in rows])}
    if "weight" in rows[0]:
        batch["weights"] = torch.tensor([r["weight"] for r in rows], dtype=torch.float32)
    if "task" in rows[0]:  # data.mix: each row's task
        batch["task_ids"] = torch.tensor([r["task"] for r in rows], dtype=torch.long)
    return batch


def eval_batches(rows: list[dict], micro_batch_size: int, pad_id: int, limit: int | None = None):
    """Validation micro-batches in file order."""
    for n, start in enumerate(range(0, len(rows), micro_batch_size)):
        if limit is not None and n >= limit:
            return
        yield collate(rows[start : start + micro_batch_size], pad_id)
