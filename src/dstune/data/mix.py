"""Mixtures of data sets with sampling weights (``data.mix``), for multi-task training.

Each data set is read and split on its own (``data.split``, the run's seed), so every one keeps its
validation and test rows. The training set has as many rows as the data sets' training parts together,
``N``; data set i contributes ``round(N x w_i / sum(w))`` of them (largest remainders, so the counts add
up to N exactly). A data set asked for more rows than it has is repeated: its rows are cycled through
seeded permutations, so each row is used either ``floor`` or ``ceil`` of (quota / size) times, never
three times while another is left out. One asked for fewer is subsampled by a seeded permutation. The
mixed rows are then shuffled together. Everything is a function of the files, the weights and the seed.
Validation and test are the data sets' held-out parts concatenated, unweighted: each task is measured
on its own rows.

Each data set is a task: its rows carry the task's index (``task``), so the training loss can weight a
task's tokens (``data.mix[i].loss_weight``) and the logs break the loss down per task (``loss/<name>``).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Sequence

from dstune.errors import UsageError


def quotas(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Rows each data set contributes: ``sum(sizes)`` split by ``weights`` (largest-remainder rounding).

    Raises:
        ValueError: a weight that is not a positive finite number, naming its index in ``data.mix``.
    """
    for i, w in enumerate(weights):
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
            raise UsageError(f"data.mix[{i}].weight must be a positive number, got {w!r}")
    total, norm = sum(sizes), sum(weights)
    exact = [total * w / norm for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def sample(rows: list, count: int, rng: random.Random) -> list:
    """``count`` rows from ``rows``: seeded permutations cycled, so repeats are as even as possible."""
    if not rows:
        return []
    out: list = []
    while len(out) < count:
        order = list(range(len(rows)))
        rng.shuffle(order)
        out.extend(rows[i] for i in order[: count - len(out)])
    return out


def mix_examples(parts: list[list], weights: Sequence[float], seed: int) -> tuple[list, list[int]]:
    """The weighted mixture of the training parts of several data sets (module doc).

    Args:
        parts: the training examples of each data set.
        weights: the sampling weight of each (positive).
        seed: the run's seed.

    Returns:
        The mixed, shuffled examples and the number taken from each data set.
    """
    counts = quotas([len(p) for p in parts], weights)
    rng = random.Random(seed)
    mixed = [row for part, n in zip(parts, counts) for row in sample(part, n, rng)]
    rng.shuffle(mixed)
    return mixed, counts


def task_names(sources: Sequence) -> list[str]:
    """The task name of each ``data.mix`` entry: its ``task``, else its file's name without the suffix
    (``medical.jsonl`` -> ``medical``); a name taken by an earlier entry gets the entry's index appended."""
    names: list[str] = []
    for i, source in enumerate(sources):
        name = source.task or Path(source.path).stem
        names.append(name if name not in names else f"{name}-{i}")
    return names
