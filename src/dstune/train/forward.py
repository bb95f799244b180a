"""One forward pass to a summed token loss, with the output layer computed in chunks when asked.

With DeepSeek's 129,280-token vocabulary the logits dominate a small model's memory: a batch of
8 x 512 tokens holds 2.1 GB of fp32 logits, and the cross-entropy's softmax as much again (measured in
DESIGN.md). The chunked path asks the model for its final hidden states only (``logits_to_keep=1``),
keeps the labelled positions, and computes logits and cross-entropy a chunk of tokens at a time under
activation checkpointing, so at most ``chunk x vocab`` logits exist at once, in the forward and the
backward pass. The result equals the plain loss (tested to float tolerance on every family):
``head(hidden_states[-1])`` is exactly the model's logits for Llama, Qwen2 and DeepSeek V2/V3/V3.2/V4 in
transformers 5.23 (checked). Liger-kernel's fused linear cross-entropy does the same on GPUs with a
Triton kernel; this is the portable version for CPUs and for architectures liger does not cover.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dstune.train.loss import IGNORE, token_loss_sum

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """The arguments of the model's forward for a collated batch.

    A packed batch (it has ``position_ids``) goes without a 2-D attention mask and without a cache, the
    two conditions under which transformers builds the block-diagonal mask from the position ids.
    """
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if "position_ids" in inputs:
        inputs.pop("attention_mask", None)
        inputs["use_cache"] = False
    return inputs


def _chunk_ce(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
              label_smoothing: float) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, target, reduction="sum", label_smoothing=label_smoothing)


def loss_sum(model, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0,
             chunk_tokens: int = 0, fused_ce=None) -> torch.Tensor:
    """Summed next-token cross-entropy of ``batch`` (labels shifted inside).

    Args:
        model: a causal LM (plain or peft-wrapped).
        batch: collated tensors with ``labels``.
        label_smoothing: as in ``token_loss_sum``.
        chunk_tokens: 0 computes full logits; N > 0 computes them N labelled tokens at a time.
        fused_ce: a fused linear cross-entropy ``f(weight, hidden, target, bias) -> summed loss`` (liger's,
            see ``train.accel.fused_ce_loss``) used instead of the chunks; it carries its label smoothing.
    """
    labels = batch["labels"]
    if labels.dim() == 1:
        return class_loss_sum(model(**model_inputs(batch)).logits, labels, batch.get("weights"), label_smoothing)
    if not chunk_tokens and fused_ce is None:
        return token_loss_sum(model(**model_inputs(batch)).logits, labels, label_smoothing)
    out = model(**model_inputs(batch), output_hidden_states=True, logits_to_keep=1)
    # Prompt-learning methods prepend virtual tokens: the last T positions are the real ones.
    hidden = out.hidden_states[-1][:, -labels.shape[1]:]
    keep = labels[:, 1:] != IGNORE
    h = hidden[:, :-1][keep]
    y = labels[:, 1:][keep]
    head = getattr(model, "module", model).get_output_embeddings()  # unwrap DDP
    if fused_ce is not None:
        return fused_ce(head.weight, h, y, head.bias).float()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce, h[sl], head.weight, head.bias, y[sl], label_smoothing,
                                       use_reentrant=False)
        else:
            total = total + _chunk_ce(h[sl], head.weight, head.bias, y[sl], label_smoothing)
    return total


def class_loss_sum(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
                   label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy of a classification head's logits ``(batch, classes)``, in fp32.

    With class weights each row's loss is multiplied by its class's weight (``weights``, one per row),
    and the loop divides by the number of rows, so the loss is the mean of ``w[y] x CE``. torch's
    ``weight=`` would divide by the sum of the weights instead, which depends on the batch's classes.
    """
    per_row = F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=label_smoothing)
    return (per_row * weights.to(per_row)).sum() if weights is not None else per_row.sum()
