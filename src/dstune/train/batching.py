"""Deterministic micro-batches whose position can be saved and restored exactly.

We do not use a torch DataLoader sampler here: exact resume needs the order to be a pure function of
(seed, epoch, position), which a seeded permutation per epoch gives with no hidden iterator state.
Nor DataLoader workers: they hand batches between processes by pickling them. ``Prefetcher`` overlaps
collation (and the copy into pinned memory on CUDA) with compute on a thread instead.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from dstune.core.collate import collate


@dataclass(frozen=True)
class Stage:
    """A stage of ``train.curriculum``: its rows are ``rows[first_row : first_row + count]`` and it serves
    micro-batches from ``first_position`` on (until the next stage's)."""

    first_row: int
    count: int
    first_position: int


@dataclass
class MicroBatches:
    """Endless stream of micro-batches over ``rows``, reshuffled every epoch from ``seed + epoch``.

    ``position`` counts micro-batches served since the start of training; it is all the state there is.
    ``num_shards``/``shard`` split every epoch's order across data-parallel processes.
    ``group_by_length`` orders each epoch so that a micro-batch holds rows of similar length (less padding),
    still from ``seed + epoch`` and still every row once per epoch (see ``length_grouped_order``).
    ``stages`` (``train.curriculum``): from each stage's first position on, the stream runs over that stage's
    rows only, its epochs counted from the stage's start (stage k shuffles from ``seed + 1000 k + epoch``);
    None is one stage of every row.
    """

    rows: list[dict]
    micro_batch_size: int
    seed: int
    pad_id: int
    position: int = 0
    num_shards: int = 1
    shard: int = 0
    group_by_length: bool = False
    stages: list[Stage] | None = None

    def __post_init__(self):
        self.stages = self.stages or [Stage(0, len(self.rows), 0)]

    def stage_at(self, position: int) -> int:
        return max(k for k, s in enumerate(self.stages) if s.first_position <= position)

    def epoch_length(self, stage: int) -> int:
        """Micro-batches per epoch of ``stage`` on this process."""
        per_shard = -(-self.stages[stage].count // self.num_shards)
        return -(-per_shard // self.micro_batch_size)

    @property
    def per_epoch(self) -> int:
        """Micro-batches per epoch of the last stage (every row, without a curriculum)."""
        return self.epoch_length(len(self.stages) - 1)

    def _order(self, stage: int, epoch: int) -> list[int]:
        first, count = self.stages[stage].first_row, self.stages[stage].count
        seed = self.seed + 1000 * stage + epoch
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
        if self.group_by_length:  # whole global batches of similar length, then each shard takes its share
            order = length_grouped_order(
                order,
                [len(r["input_ids"]) for r in self.rows[first : first + count]],
                self.micro_batch_size * self.num_shards,
                seed,
            )
        return [first + i for i in order[self.shard :: self.num_shards]]

    def epoch(self) -> float:
        """Epochs of the current stage's rows served so far."""
        stage = self.stage_at(self.position)
        return (self.position - self.stages[stage].first_position) / self.epoch_length(stage)

    def indices_at(self, position: int) -> list[int]:
        """The row indices of micro-batch number ``position`` (a pure function of seed and position)."""
        stage = self.stage_at(position)
        epoch, k = divmod(position - self.stages[stage].first_position, self.epoch_length(stage))
        if getattr(self, "_cached", None) != (stage, epoch):  # one permutation per epoch, not per batch
            self._cached, self._cached_order = (stage, epoch), self._order(stage, epoch)
        return self._cached_order[k * self.micro_batch_size : (k + 1) * self.micro_batch_size]

    def at(self, position: int, pin_memory: bool = False) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Micro-batch number ``position`` and the indices of its rows, without moving ``position``."""
        idx = self.indices_at(position)
        batch = collate([self.rows[i] for i in idx], self.pad_id)
        if pin_memory:  # page-locked host memory: the copy to the GPU can then run asynchronously
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch, idx

    def next(self) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The next micro-batch and the indices of its rows in ``rows``."""
        out = self.at(self.position)
        self.position += 1
        return out


def length_grouped_order(
    order: list[int], lengths: list[int], batch: int, seed: int, mega: int = 50
) -> list[int]:
    """Reorders a shuffled epoch so each run of ``batch`` indices has rows of similar length.

    The megabatch scheme of transformers' ``LengthGroupedSampler``: cut the shuffled order into
    megabatches of ``mega * batch`` rows, sort each by length (longest first), cut it into batches, then
    shuffle the batches from ``seed``. Randomness stays (megabatches are random subsets and the batch order
    is shuffled) while a batch's rows come from a narrow length band. A permutation of ``order``: every row
    is still seen exactly once per epoch.

    Args:
        order: a permutation of row indices (the epoch's shuffled order).
        lengths: token count of each row.
        batch: rows per batch (micro-batch x data-parallel processes).
        seed: seeds the shuffle of the batches.
        mega: batches per megabatch.
    """
    size = batch * mega
    groups = [sorted(order[i : i + size], key=lambda j: -lengths[j]) for i in range(0, len(order), size)]
    batches = [g[i : i + batch] for g in groups for i in range(0, len(g), batch)]
    # The last, possibly short, batch stays last, so every other batch is full.
    head, tail = (batches[:-1], batches[-1:]) if batches and len(batches[-1]) < batch else (batches, [])
    random.Random(seed).shuffle(head)
    return [i for b in head + tail for i in b]


class Prefetcher:
    """Serves ``MicroBatches`` in order while the next ``depth`` micro-batches are collated on a thread.

    Collation (and pinning on CUDA) then overlaps the forward and backward pass. The position of the
    underlying ``MicroBatches`` advances only as batches are served, so a checkpoint still records exactly
    where the data stands; batches prepared ahead are recomputed after a resume, never lost.
    """

    def __init__(self, batches: MicroBatches, depth: int = 2, pin_memory: bool = False):
        self.batches, self.depth, self.pin_memory = batches, depth, pin_memory
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dstune-data")
        self._ahead: dict[int, object] = {}

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def next(self) -> tuple[dict[str, torch.Tensor], list[int]]:
        if self.depth == 0:
            return self.batches.next()
        pos = self.batches.position
        for stale in [p for p in self._ahead if p < pos]:  # the position was moved back (not in the loop)
            self._ahead.pop(stale).cancel()
        for p in range(pos, pos + self.depth + 1):
            if p not in self._ahead:
                self._ahead[p] = self._pool.submit(self.batches.at, p, self.pin_memory)
        out = self._ahead.pop(pos).result()
        self.batches.position = pos + 1
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def length_groups(lengths: list[int], overhead: int) -> list[list[int]]:
    """Row indices of one micro-batch in groups of similar length, each group padded to its own longest.

    The groups minimise ``sum(rows x longest row) + overhead x groups`` over contiguous runs of the rows
    sorted by length (dynamic programming; a micro-batch has a handful of rows). ``overhead`` is the cost
    of one more forward/backward pass in padded tokens: on a CPU a pass over fewer rows runs its matmuls
    less efficiently, so cutting every row apart saves nothing (docs/benchmarks.md, "Where the time goes").
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in order]
    best, cut = [0] + [None] * len(sizes), [0] * (len(sizes) + 1)
    for end in range(1, len(sizes) + 1):  # best[end]: cheapest grouping of the first `end` sorted rows
        for start in range(end):
            cost = best[start] + (end - start) * sizes[end - 1] + overhead
            if best[end] is None or cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(sizes)
    while end:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


_TOKEN_BATCH = {"input_ids", "labels", "attention_mask"}


def split_by_length(window: list[dict], overhead: int) -> list[dict]:
    """Cuts each right-padded micro-batch into sub-batches of similar length with their padding trimmed.

    Exact: every row keeps its tokens, labels and causal attention, the window's loss is normalised by the
    same token count, so only the float summation order changes. Only plain token batches are cut: packed
    rows (position ids), classification rows (left-padded, one label each) and preference batches (pairs
    whose two answers must stay together) are left as they are.
    """
    out = []
    for batch in window:
        if overhead <= 0 or set(batch) - {"task_ids"} != _TOKEN_BATCH or batch["labels"].dim() != 2:
            out.append(batch)
            continue
        lengths = batch["attention_mask"].sum(1).tolist()
        for rows in length_groups(lengths, overhead):
            index, width = torch.tensor(rows), max(lengths[i] for i in rows)
            out.append({k: v[index, :width] for k, v in batch.items()})
    return out
