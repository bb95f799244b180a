"""The one line ``dstune train`` prints at the end of a run, with the metrics its task has.

A language-model run validates to loss and perplexity; a classification run (``task: classification``)
to loss, accuracy and macro precision/recall/F1, and has no perplexity. The line names only what the
run's validation produced, so no task's metrics are assumed for another's.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

# (key in the validation metrics, how the line names it, format), in the order they are printed after
# the validation loss. A key the run's validation did not produce is left out.
_AFTER_LOSS = [
    ("ppl", "ppl", ".2f"),
    ("accuracy", "accuracy", ".4f"),
    ("f1_macro", "F1 macro", ".4f"),
    ("exact_match", "exact match", ".4f"),
    ("rewards/accuracy", "reward accuracy", ".4f"),  # preference objectives (dpo, orpo, simpo, kto)
    ("rewards/margins", "reward margin", ".4f"),
    ("reward", "reward", ".4f"),  # objective=grpo: the greedy completions' mean reward, and per function
    ("reward/accuracy", "accuracy reward", ".4f"),
    ("reward/format", "format reward", ".4f"),
]


def _number(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and math.isfinite(value) else str(value)


def val_text(val: Mapping[str, Any] | None) -> str:
    """``val loss 0.6912 (accuracy 0.6875, F1 macro 0.4074)``, or ``""`` when there was no validation.

    Args:
        val: the run's final validation metrics (``RunResult.val`` / ``summary.json``'s ``val``).
    """
    if not val:
        return ""
    extra = [f"{name} {_number(val[key], fmt)}" for key, name, fmt in _AFTER_LOSS if val.get(key) is not None]
    head = f"val loss {_number(val['loss'], '.4f')}" if val.get("loss") is not None else "val"
    return head + (f" ({', '.join(extra)})" if extra else "")


def summary_line(result: Any) -> str:
    """The end-of-run line: steps, final training loss and the validation metrics of the run's task.

    Args:
        result: what ``train`` returned (``steps``, ``final_loss`` and ``val`` are read).

    Returns:
        e.g. ``done: 2 steps, final train loss 0.7012, val loss 0.6912 (accuracy 0.6875, F1 macro 0.4074)``
        for a classifier, ``..., val loss 11.7600 (ppl 128100.00)`` for a language model.
    """
    line = f"done: {result.steps} steps, final train loss {_number(result.final_loss, '.4f')}"
    val = val_text(getattr(result, "val", None))
    return line + (f", {val}" if val else "")


def padding_hint(summary: dict, packing: bool, threshold: float = 0.3) -> str | None:
    """After a run whose computed batches were mostly padding: how much training time packing would save.

    The estimate takes the step time as proportional to the tokens computed (padding included), which holds
    when the matmuls dominate, as they do from SmolLM2's size up (docs/benchmarks.md, "Where the time goes").
    """
    share, wall = summary.get("padding_share"), summary.get("wall_s")
    if packing or not share or share <= threshold or not wall:
        return None
    return (
        f"hint: {share:.0%} of the tokens this run computed were padding; --set train.packing=true packs "
        f"several examples per row and computes none, which would have saved about {share * wall:.0f} s "
        f"of its {wall:.0f} s (an estimate: a step's time grows with the tokens it computes)"
    )
