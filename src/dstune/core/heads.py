"""One classification head per task (``classify.heads: per_task``) on one shared decoder.

A multi-task classification run (``data.mix`` of classification sets whose label sets differ) gives each
task its own head: task t has classes ``labels[start_t:end_t]``, named ``<task>:<label>``. The heads are
stored as the row blocks of the one ``score`` matrix of transformers' sequence classifier, so the model
saves, loads, merges and takes LoRA (peft's ``modules_to_save``) exactly like a single-head classifier;
what makes the blocks separate heads is that every softmax and every loss runs over one block at a time
(``block_softmax``, ``block_cross_entropy``): a row never competes with another task's classes, and a
task's rows give no gradient to another task's block.

The blocks are saved in the model config (``classifier_heads``: ``{task: [start, end]}``, so a merged
model knows them) and in the run's ``labels.json`` (``heads``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

Heads = dict[str, list[int]]  # task -> [start, end) of its classes in the head


def head_blocks(names: list[str], labels_per_task: list[list[str]]) -> tuple[list[str], Heads]:
    """The head's class names (``<task>:<label>``, task by task) and each task's block."""
    labels: list[str] = []
    heads: Heads = {}
    for name, own in zip(names, labels_per_task):
        heads[name] = [len(labels), len(labels) + len(own)]
        labels += [f"{name}:{label}" for label in own]
    return labels, heads


def check_heads(heads: Heads, classes: int) -> None:
    """Raises UsageError unless ``heads`` cut ``range(classes)`` into consecutive non-empty blocks, each
    with at least two classes."""
    from dstune.errors import UsageError

    ends = 0
    for task, (start, end) in sorted(heads.items(), key=lambda item: item[1][0]):
        if start != ends or end - start < 2:
            raise UsageError(f"classifier heads {heads}: task {task!r} is not a block of two or more classes")
        ends = end
    if ends != classes:
        raise UsageError(f"classifier heads {heads} cover {ends} classes; the head has {classes}")


def model_heads(model: nn.Module) -> Heads | None:
    """The task blocks of a classifier (plain, peft- or DDP-wrapped), or None for a single head."""
    from transformers.modeling_layers import GenericForSequenceClassification

    for module in model.modules():
        if isinstance(module, GenericForSequenceClassification):
            return getattr(module.config, "classifier_heads", None) or None
    return None


def block_ids(heads: Heads, classes: int, device: torch.device | None = None) -> torch.Tensor:
    """The block (task index, in ``heads`` order) of each class of the head."""
    out = torch.empty(classes, dtype=torch.long, device=device)
    for i, (start, end) in enumerate(heads.values()):
        out[start:end] = i
    return out


def block_softmax(logits: torch.Tensor, heads: Heads | None) -> torch.Tensor:
    """Class probabilities ``(rows, classes)``: a softmax over each task's block (each block sums to 1),
    or over all classes for a single head."""
    if not heads:
        return torch.softmax(logits, dim=-1)
    out = torch.empty_like(logits)
    for start, end in heads.values():
        out[:, start:end] = torch.softmax(logits[:, start:end], dim=-1)
    return out


def block_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, heads: Heads | None, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Each row's cross-entropy over the block of its label (its task's head), ``(rows,)`` in fp32;
    over all classes for a single head. Label smoothing spreads over the row's own block."""
    logits = logits.float()
    if not heads:
        return F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    out = logits.new_zeros(labels.shape[0])
    task = block_ids(heads, logits.shape[-1], labels.device)[labels]
    for i, (start, end) in enumerate(heads.values()):
        rows = (task == i).nonzero(as_tuple=True)[0]
        if rows.numel():
            out = out.index_put(
                (rows,),
                F.cross_entropy(
                    logits[rows, start:end],
                    labels[rows] - start,
                    reduction="none",
                    label_smoothing=label_smoothing,
                ),
            )
    return out


def predict_in_block(probs: list[float], label: int, heads: Heads | None) -> int:
    """The predicted class of a row whose true class is ``label``: the most probable class of that
    label's block (its task's head), or of all classes for a single head."""
    start, end = 0, len(probs)
    if heads:
        start, end = next((s, e) for s, e in heads.values() if s <= label < e)
    return max(range(start, end), key=probs.__getitem__)
