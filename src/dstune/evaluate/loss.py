"""Validation loss and perplexity, normalised per token like training."""

from __future__ import annotations

import math

import torch

from dstune.core.collate import eval_batches
from dstune.core.forward import loss_sum
from dstune.core.heads import block_cross_entropy, block_softmax, model_heads, predict_in_block
from dstune.core.loss import count_loss_tokens


@torch.no_grad()
def evaluate_loss(
    model,
    rows: list[dict],
    micro_batch_size: int,
    pad_id: int,
    accelerator=None,
    limit: int | None = None,
    chunk_tokens: int = 0,
) -> dict[str, float]:
    """Mean next-token loss over the labelled tokens of ``rows`` and its perplexity.

    Args:
        limit: evaluate at most this many micro-batches (in file order).
        chunk_tokens: compute the output layer this many tokens at a time (0: all at once).
    """
    if not rows:
        return {}
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.long, device=device)
    for batch in eval_batches(rows, micro_batch_size, pad_id, limit):
        batch = {k: v.to(device) for k, v in batch.items()}
        ctx = accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            total += loss_sum(model, batch, chunk_tokens=chunk_tokens).double()
        tokens += count_loss_tokens(batch["labels"])
    if was_training:
        model.train()
    loss = (total / tokens.clamp(min=1)).item()
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(tokens.item())}


def evaluate_groups(model, groups: list[tuple[str, list[dict]]], *args, **kwargs) -> dict[str, float]:
    """``evaluate_loss`` of each group of rows (``{name: loss}``), and the loss, perplexity and tokens of
    all of them together, the token-weighted mean of the groups' (the groups split the rows: every
    labelled token counts once, as in ``evaluate_loss``). ``limit`` counts micro-batches per group."""
    total, tokens, per = 0.0, 0, {}
    for name, rows in groups:
        metrics = evaluate_loss(model, rows, *args, **kwargs)
        if metrics:
            per[name] = metrics["loss"]
            total, tokens = total + metrics["loss"] * metrics["tokens"], tokens + metrics["tokens"]
    if not tokens:
        return {}
    loss = total / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": tokens, **per}


def evaluate_tasks(
    model, rows: list[dict], names: list[str], *args, buckets=None, **kwargs
) -> dict[str, float]:
    """Validation loss of ``rows``, broken down per task (``loss/<task>``: multi-task runs, whose rows carry
    their task) and per length bucket (``buckets(rows)``: ``train.curriculum``), each evaluated on its own.
    Rows without a task (a separate ``data.validation`` file) have no per-task losses."""
    by_task = (
        [(f"loss/{name}", [r for r in rows if r.get("task") == i]) for i, name in enumerate(names)]
        if rows and names and "task" in rows[0]
        else []
    )
    by_length = buckets(rows) if buckets is not None and rows else []
    if not by_task and not by_length:
        return evaluate_loss(model, rows, *args, **kwargs)
    metrics = evaluate_groups(model, by_task or by_length, *args, **kwargs)
    if by_task and by_length:  # a second split of the same rows: evaluated again
        again = evaluate_groups(model, by_length, *args, **kwargs)
        metrics.update({k: v for k, v in again.items() if "/" in k})
    return metrics


@torch.no_grad()
def classifier_outputs(
    model, rows: list[dict], micro_batch_size: int, pad_id: int, accelerator=None, limit: int | None = None
) -> tuple[list[int], list[list[float]], list[float]]:
    """Class probabilities of a classification-head model on ``rows`` (``data.classify`` rows).

    Returns:
        The true class indices, the softmax probabilities per row (head order; with a head per task each
        task's block sums to 1, ``core.heads``), and each row's (unweighted) cross-entropy over its
        label's block.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    heads = model_heads(model)
    y_true, probs, losses = [], [], []
    for batch in eval_batches(rows, micro_batch_size, pad_id, limit):
        batch = {k: v.to(device) for k, v in batch.items() if k != "weights"}  # validation is unweighted
        ctx = accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits.float()
        losses += block_cross_entropy(logits, batch["labels"], heads).tolist()
        y_true += batch["labels"].tolist()
        probs += block_softmax(logits, heads).tolist()
    if was_training:
        model.train()
    return y_true, probs, losses


def evaluate_classifier(
    model,
    rows: list[dict],
    micro_batch_size: int,
    pad_id: int,
    accelerator=None,
    limit: int | None = None,
    names: list[str] | None = None,
) -> dict[str, float]:
    """Validation loss, accuracy and macro precision/recall/F1 of a classification-head model.

    The metrics are ``evaluate.metrics.classification_metrics`` (scikit-learn), the ones ``dstune eval``
    reports, computed on the predicted class (the most probable one; with a head per task, of the row's
    task's head). With ``names`` (``data.mix`` tasks, whose rows carry ``task``) the loss, accuracy and
    macro F1 of each task are added as ``loss/<task>``, ``accuracy/<task>`` and ``f1_macro/<task>``, and
    ``limit`` counts micro-batches per task.
    """
    if not rows:
        return {}
    heads = model_heads(model)
    # Each task's rows on their own, ``limit`` micro-batches each (as ``evaluate_groups``): the validation
    # rows come task after task, so a limit over all of them would leave the last tasks out.
    by_task = bool(names) and "task" in rows[0]  # a data.validation file's rows have no task
    groups = [[r for r in rows if r.get("task") == i] for i in range(len(names))] if by_task else [rows]
    y_true, probs, losses, tasks = [], [], [], []
    for i, group in enumerate(groups):
        if group:
            got = classifier_outputs(model, group, micro_batch_size, pad_id, accelerator, limit)
            y_true, probs, losses = y_true + got[0], probs + got[1], losses + got[2]
            tasks += [i] * len(got[0])
    if not y_true:
        return {}
    y_pred = [predict_in_block(p, y, heads) for p, y in zip(probs, y_true)]
    # every class of the head, so macro averages do not skip an absent one
    out = _class_metrics(y_true, y_pred, losses, range(len(probs[0])))
    out["examples"] = len(y_true)
    for i, name in enumerate(names if by_task else []):
        mine = [j for j, t in enumerate(tasks) if t == i]
        if mine:
            classes = range(*heads[name]) if heads else range(len(probs[0]))
            per = _class_metrics(
                [y_true[j] for j in mine], [y_pred[j] for j in mine], [losses[j] for j in mine], classes
            )
            out.update({f"{key}/{name}": per[key] for key in ("loss", "accuracy", "f1_macro")})
    return out


def _class_metrics(y_true: list[int], y_pred: list[int], losses: list[float], classes) -> dict[str, float]:
    from dstune.evaluate.metrics import classification_metrics

    m = classification_metrics([str(y) for y in y_true], [str(y) for y in y_pred], [str(c) for c in classes])
    return {
        "loss": sum(losses) / max(len(losses), 1),
        "accuracy": m["accuracy"],
        "precision_macro": m["precision_macro"],
        "recall_macro": m["recall_macro"],
        "f1_macro": m["f1_macro"],
    }
