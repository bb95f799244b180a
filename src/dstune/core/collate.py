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
    return batch


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
    return batch


def eval_batches(rows: list[dict], micro_batch_size: int, pad_id: int, limit: int | None = None):
    """Validation micro-batches in file order."""
    for n, start in enumerate(range(0, len(rows), micro_batch_size)):
        if limit is not None and n >= limit:
            return
        yield collate(rows[start : start + micro_batch_size], pad_id)
