"""The one-line summary ``dstune train`` prints at the end of a run: the metrics its task has."""

from __future__ import annotations


def summary_line(result) -> str:
    """``N steps, final train loss L`` and the validation metrics of the run's task.

    Args:
        result: a ``train.loop.RunResult`` (its ``val`` holds loss and ppl for an LM, accuracy and macro F1
            for a classifier).
    """
    val = result.val or {}
    text = f"{result.steps} steps, final train loss {result.final_loss:.4f}"
    if "accuracy" in val:
        return text + (
            f", val loss {val['loss']:.4f}, accuracy {val['accuracy']:.4f}, F1 (macro) {val['f1_macro']:.4f}"
        )
    if "ppl" in val:
        return text + f", val loss {val['loss']:.4f} (ppl {val['ppl']:.2f})"
    return text + (f", val loss {val['loss']:.4f}" if "loss" in val else "")
