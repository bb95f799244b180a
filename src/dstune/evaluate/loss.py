"""Validation loss and perplexity, normalised per token like training."""

from __future__ import annotations

import math

import torch

from dstune.train.batching import eval_batches
from dstune.train.loss import count_loss_tokens, token_loss_sum


@torch.no_grad()
def evaluate_loss(model, rows: list[dict], micro_batch_size: int, pad_id: int, accelerator=None,
                  limit: int | None = None) -> dict[str, float]:
    """Mean next-token loss over the labelled tokens of ``rows`` and its perplexity.

    Args:
        limit: evaluate at most this many micro-batches (in file order).
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
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total += token_loss_sum(logits, batch["labels"]).double()
        tokens += count_loss_tokens(batch["labels"])
    if was_training:
        model.train()
    loss = (total / tokens.clamp(min=1)).item()
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(tokens.item())}
