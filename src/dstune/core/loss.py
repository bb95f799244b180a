"""Causal-LM loss as a (sum, count) pair, so the loop can normalise over a whole accumulation window."""

from __future__ import annotations

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
