"""Deterministic micro-batches whose position can be saved and restored exactly.

We do not use a torch DataLoader sampler here: exact resume needs the order to be a pure function of
(seed, epoch, position), which a seeded permutation per epoch gives with no hidden iterator state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dstune.train.loss import IGNORE


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pads rows on the right to the longest row of the micro-batch.

    Packed rows (with ``position_ids``, see ``dstune.data.pack``) also get position ids; the padding
    of a packed row counts up from 0 as a segment of its own, so it attends to no real example.
    """
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


@dataclass
class MicroBatches:
    """Endless stream of micro-batches over ``rows``, reshuffled every epoch from ``seed + epoch``.

    ``position`` counts micro-batches served since the start of training; it is all the state there is.
    ``num_shards``/``shard`` split every epoch's order across data-parallel processes.
    """

    rows: list[dict]
    micro_batch_size: int
    seed: int
    pad_id: int
    position: int = 0
    num_shards: int = 1
    shard: int = 0

    @property
    def per_epoch(self) -> int:
        per_shard = -(-len(self.rows) // self.num_shards)
        return -(-per_shard // self.micro_batch_size)

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.rows), generator=g).tolist()
        return order[self.shard::self.num_shards]

    def epoch(self) -> float:
        return self.position / self.per_epoch

    def next(self) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The next micro-batch and the indices of its rows in ``rows``."""
        epoch, k = divmod(self.position, self.per_epoch)
        order = self._order(epoch)
        idx = order[k * self.micro_batch_size:(k + 1) * self.micro_batch_size]
        self.position += 1
        return collate([self.rows[i] for i in idx], self.pad_id), idx


def eval_batches(rows: list[dict], micro_batch_size: int, pad_id: int, limit: int | None = None):
    """Validation micro-batches in file order."""
    for n, start in enumerate(range(0, len(rows), micro_batch_size)):
        if limit is not None and n >= limit:
            return
        yield collate(rows[start:start + micro_batch_size], pad_id)
