"""Validation loss and perplexity, normalised per token like training."""

from __future__ import annotations

import math

import torch

from dstune.train.batching import eval_batches
from dstune.train.forward import loss_sum
from dstune.train.loss import count_loss_tokens


@torch.no_grad()
def evaluate_loss(model, rows: list[dict], micro_batch_size: int, pad_id: int, accelerator=None,
                  limit: int | None = None, chunk_tokens: int = 0) -> dict[str, float]:
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
