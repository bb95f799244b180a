"""Deterministic train/validation/test split."""

from __future__ import annotations

import math
import random
from typing import TypeVar

from dstune.errors import UsageError

T = TypeVar("T")


def _round(x: float) -> int:
    # Half up, not Python's half-to-even, so 2.5 examples is 3 whatever the parity.
    return int(math.floor(x + 0.5))


def split_examples(
    examples: list[T], ratios: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 42
) -> tuple[list[T], list[T], list[T]]:
    """Shuffles with ``random.Random(seed)`` and cuts into train, validation and test.

    Sizes are the ratios times the count, rounded half up; validation and test each get at least one
    example when their ratio is positive and there are at least 3 examples, and train keeps at least
    one. Every example lands in exactly one split; the same seed gives the same split.

    Args:
        examples: the examples (any objects).
        ratios: train, validation and test fractions: non-negative, summing to 1, train > 0.
        seed: the shuffle seed.

    Returns:
        (train, validation, test) lists.

    Raises:
        ValueError: for ratios that are not three non-negative numbers summing to 1 with train > 0.
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6 or ratios[0] <= 0:
        raise UsageError(
            f"split ratios must be three non-negative numbers summing to 1 with train > 0, got {list(ratios)}"
        )
    n = len(examples)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val, n_test = _round(n * ratios[1]), _round(n * ratios[2])
    if n >= 3:
        n_val = max(n_val, 1) if ratios[1] > 0 else 0
        n_test = max(n_test, 1) if ratios[2] > 0 else 0
    # Rounding up both held-out splits can leave train empty on tiny sets: give back from the larger one.
    while n > 0 and n - n_val - n_test < 1:
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    n_train = n - n_val - n_test
    picked = [examples[i] for i in order]
    return picked[:n_train], picked[n_train : n_train + n_val], picked[n_train + n_val :]


def split_rows(
    examples: list[dict], ratios: tuple[float, float, float], seed: int
) -> tuple[list[dict], list[dict], list[dict], int]:
    """``split_examples`` for data that ``dstune data augment`` wrote (rows with an ``origin``).

    The original rows are split; an augmented row joins training when the row it was made from (its
    ``group``) is in training, and is left out otherwise, so no augmented copy of a validation or test row
    is trained on, and none is validated or tested on. Pseudo-labelled rows (no group) train. Without
    ``origin`` fields this is ``split_examples``.

    Returns:
        (train, validation, test, augmented rows left out).
    """
    if not any("origin" in e for e in examples):
        return (*split_examples(examples, ratios, seed), 0)
    originals = [e for e in examples if e.get("origin", "original") == "original"]
    made = [e for e in examples if e.get("origin", "original") != "original"]
    train, val, test = split_examples(originals, ratios, seed)
    groups = {e.get("group") for e in train}
    kept = [e for e in made if e.get("group") is None or e.get("group") in groups]
    return train + kept, val, test, len(made) - len(kept)


def without_augmented(examples: list[dict]) -> tuple[list[dict], int]:
    """A validation file's rows without augmented ones (``origin`` other than ``original``), and how many
    were left out."""
    kept = [e for e in examples if e.get("origin", "original") == "original"]
    return kept, len(examples) - len(kept)
