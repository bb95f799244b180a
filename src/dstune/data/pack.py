"""Padding-free packing: several examples per row, each attending only to itself.

Fine-tuning data is short and uneven, so padded batches waste compute. A packed row concatenates examples;
its ``position_ids`` restart at 0 at each example, and transformers 5 turns restarting position ids into a
block-diagonal attention mask when no 2-D attention mask and no cache are given
(``masking_utils.find_packed_sequence_indices``; SDPA, eager and flash attention alike). Invariant: the first
label of each example is masked, so no example is trained to predict its neighbour's first token, and the
loss stays a sum over labelled tokens divided by their count: exactly the per-token loss of the same examples
unpacked. Measured figures: docs/benchmarks.md, 'pack.py'.
"""

from __future__ import annotations

import random

from dstune.core.loss import IGNORE


def pack_rows(rows: list[dict], max_length: int, seed: int) -> list[dict]:
    """Packs tokenised rows into rows of at most ``max_length`` tokens, first-fit decreasing.

    The rows are shuffled from ``seed`` before sorting by length so that equal-length examples do not
    always land together; the result is deterministic for a seed.

    Args:
        rows: ``{"input_ids", "labels", "source"}`` dicts, each at most ``max_length`` long.
        max_length: tokens per packed row.
        seed: shuffling seed.

    Returns:
        Packed rows with ``input_ids``, ``labels``, ``position_ids`` and ``sources`` (the examples' sources,
        in order).
    """
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -len(rows[i]["input_ids"]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(rows[i]["input_ids"])
        if n > max_length:
            raise ValueError(
                f"row {rows[i].get('source', i)} has {n} tokens, more than the packing length {max_length}"
            )
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_length - n)
    packed = []
    for members in bins:
        ids, labels, pos, sources, tasks = [], [], [], [], []
        for i in members:
            r = rows[i]
            ids += r["input_ids"]
            labels += [IGNORE] + list(r["labels"][1:])  # never predict across an example boundary
            pos += list(range(len(r["input_ids"])))
            sources.append(r.get("source", str(i)))
            tasks += [r.get("task", -1)] * len(r["input_ids"])
        row = {"input_ids": ids, "labels": labels, "position_ids": pos, "source": "+".join(sources)}
        if "task" in rows[members[0]]:  # data.mix: each token's task (its example's data set)
            row["task_ids"] = tasks
        packed.append(row)
    return packed


def padding_share(rows: list[dict], micro_batch_size: int) -> float:
    """Share of padding tokens when ``rows`` are batched in order and padded to each batch's longest row."""
    real = padded = 0
    for start in range(0, len(rows), micro_batch_size):
        chunk = rows[start : start + micro_batch_size]
        width = max(len(r["input_ids"]) for r in chunk)
        real += sum(len(r["input_ids"]) for r in chunk)
        padded += width * len(chunk)
    return 1 - real / padded if padded else 0.0
