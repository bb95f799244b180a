"""Causal-LM loss as a (sum, count) pair, so the loop can normalise over a whole accumulation window."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


def count_loss_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Tokens that carry loss after the causal shift (the first label of each row predicts nothing).

    Classification-head batches have one class index per row (1-D ``labels``): each row is one target.
    """
    if labels.dim() == 1:
        return (labels != IGNORE).sum()
    return (labels[:, 1:] != IGNORE).sum()


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum of next-token cross-entropies over the labelled positions, computed in fp32.

    We sum instead of averaging per micro-batch: averaging per micro-batch weights a short batch's
    tokens more than a long one's, so 2 micro-batches of 4 would not equal 1 of 8 (the bug fixed in
    transformers' Trainer by ``num_items_in_batch``, huggingface/transformers#34191).

    Args:
        logits: ``(batch, seq, vocab)``.
        labels: ``(batch, seq)``, ``IGNORE`` where no loss is taken.
        label_smoothing: eps; each token's loss becomes ``(1 - eps) * CE + eps * mean_k(-log p_k)``
            (Szegedy et al. 2016, sec. 7), torch's definition. Training only: validation stays plain CE.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
        label_smoothing=label_smoothing,
    )


@dataclass
class TaskLosses:
    """Multi-task training (``data.mix``): each task's loss weight, and the task losses seen since the last
    read (unweighted sums and token counts on the device, read once per log step).

    The training loss is ``sum_t w(task of t) x CE_t / N`` over the window's N labelled tokens: a task's
    weight scales its tokens' share of the gradient without changing the normaliser, so weights of 1 are
    plain fine-tuning.
    """

    names: list[str]
    weights: list[float]
    acc: torch.Tensor | None = None  # float64 (2, tasks): loss sums and token counts, on the loss's device

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for w in self.weights)

    def token_weights(self, task_ids: torch.Tensor) -> torch.Tensor | None:
        """The loss weight of each token (``task_ids``: its task), or None when every weight is 1."""
        if not self.weighted:
            return None
        table = torch.tensor(self.weights, dtype=torch.float32, device=task_ids.device)
        return table[task_ids.clamp(min=0)]

    def add(self, task_ids: torch.Tensor, losses: torch.Tensor) -> None:
        """Counts the (unweighted) losses of labelled tokens under their tasks."""
        if self.acc is None:
            self.acc = torch.zeros(2, len(self.names), dtype=torch.float64, device=losses.device)
        ids = task_ids.clamp(min=0)
        self.acc[0].index_add_(0, ids, losses.detach().double())
        self.acc[1].index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))

    def take(self) -> dict[str, float]:
        """``loss/<task>`` (mean token loss) of each task seen since the last call, over every process of
        a distributed run (all of them call this at the same step), then starts afresh."""
        acc = self.acc if self.acc is not None else torch.zeros(2, len(self.names), dtype=torch.float64)
        self.acc = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            acc = acc.to("cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
            torch.distributed.all_reduce(acc)
        acc = acc.cpu()
        return {f"loss/{n}": float(acc[0, i] / acc[1, i]) for i, n in enumerate(self.names) if acc[1, i] > 0}


def token_losses(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Each position's next-token cross-entropy ``(batch, seq - 1)`` in fp32, 0 where no loss is taken."""
    shift_logits = logits[:, :-1, :].float()
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
        label_smoothing=label_smoothing,
    ).view(labels.shape[0], -1)
