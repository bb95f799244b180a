"""One forward pass to a summed token loss, with the output layer computed in chunks when asked.

The chunked path asks the model for its final hidden states and no logits (``no_logits``), keeps the
labelled positions and computes logits and cross-entropy a chunk of tokens at a time, so at most
``chunk x vocab`` logits exist at once. In training each chunk's gradient is computed in the forward pass
(``LinearCrossEntropy``, as liger's fused linear cross-entropy does in Triton on GPUs): the logits are used
once and freed, with no recomputation and no separate softmax backward; this is the portable version for
CPUs and for architectures liger does not cover. Invariant: the result equals the plain loss (tested to
float tolerance on every family), which relies on ``head(hidden_states[-1])`` being exactly the model's
logits, as it is for Llama, Qwen2 and DeepSeek V2/V3/V3.2/V4 in transformers 5.23 (checked).
Measured figures: docs/benchmarks.md, 'forward.py'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dstune.core.heads import block_cross_entropy, model_heads
from dstune.core.loss import IGNORE, TaskLosses, token_loss_sum, token_losses

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def no_logits(input_ids: torch.Tensor) -> torch.Tensor:
    """``logits_to_keep`` for a forward whose caller computes the output layer itself: an empty index of
    positions, so the model's head runs on none. (``logits_to_keep=1`` still ran it on the last position of
    each row; under bf16 autocast on a CPU that 3-D slice made oneDNN's batched matmul copy the whole output
    layer once per row: 0.21 s of a 3.4 s SmolLM2 step, docs/benchmarks.md.)"""
    return torch.empty(0, dtype=torch.long, device=input_ids.device)


def chunk_size(chunk_tokens: int | str, vocab: int) -> int:
    """``train.chunk_tokens``; ``auto``: the largest power of two whose fp32 logits stay within 512 MB
    (2^27 values), at least 256 tokens: 1,024 for DeepSeek's 129,280-token vocabulary."""
    if chunk_tokens != "auto":
        return int(chunk_tokens)
    size = 256
    while size * 2 * vocab <= 1 << 27:
        size *= 2
    return size


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


def _chunk_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    label_smoothing: float,
    reduction: str = "sum",
) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, target, reduction=reduction, label_smoothing=label_smoothing)


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``target``, chunk by chunk, with the
    gradients computed in the forward pass.

    For each chunk: logits (fp32), log-sum-exp, the loss, then ``softmax - target distribution`` in place of
    the logits and from it the gradient of the hidden states (and of the weight and bias when they train).
    Only those gradients are kept for backward, which scales them by the incoming gradient; this is exact
    because the summed loss enters the training loss linearly. Label smoothing follows torch's definition:
    target distribution ``(1 - eps) * onehot + eps / V``.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, target, label_smoothing: float, chunk: int, scale=None, losses=None
    ):
        """``scale``: a weight per token (multi-task loss weights) or None; ``losses``: None, or a tensor
        of one float per token that receives each token's (unweighted) loss, for the per-task logs."""
        need_w, need_b = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        eps, vocab = label_smoothing, weight.shape[0]
        for start in range(0, target.numel(), chunk):
            h, y = hidden[start : start + chunk], target[start : start + chunk]
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            nll = lse - logits.gather(1, y[:, None]).squeeze(1)
            if scale is None and losses is None:
                total += (1 - eps) * nll.sum() + (eps * (lse - logits.mean(dim=-1)).sum() if eps else 0.0)
            else:
                each = (1 - eps) * nll + (eps * (lse - logits.mean(dim=-1)) if eps else 0.0)
                if losses is not None:
                    losses[start : start + chunk] = each
                total += each.sum() if scale is None else (each * scale[start : start + chunk]).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
            probs[torch.arange(len(y), device=y.device), y] -= 1 - eps
            if eps:
                probs -= eps / vocab
            if scale is not None:
                probs *= scale[start : start + chunk, None]
            grad_h[start : start + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w += probs.t() @ h.float()
            if need_b:
                grad_b += probs.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        g = grad_out.to(torch.float32)
        return (
            grad_h * g.to(grad_h.dtype),
            None if grad_w is None else (grad_w * g).to(ctx.dtypes[0]),
            None if grad_b is None else (grad_b * g).to(ctx.dtypes[1]),
            None,
            None,
            None,
            None,
            None,
        )


def loss_sum(
    model,
    batch: dict[str, torch.Tensor],
    label_smoothing: float = 0.0,
    chunk_tokens: int = 0,
    fused_ce=None,
    tasks: TaskLosses | None = None,
) -> torch.Tensor:
    """Summed next-token cross-entropy of ``batch`` (labels shifted inside).

    Args:
        model: a causal LM (plain or peft-wrapped).
        batch: collated tensors with ``labels``.
        label_smoothing: as in ``token_loss_sum``.
        chunk_tokens: 0 computes full logits; N > 0 computes them N labelled tokens at a time.
        fused_ce: a fused linear cross-entropy ``f(weight, hidden, target, bias) -> summed loss`` (liger's,
            see ``train.accel.fused_ce_loss``) used instead of the chunks; it carries its label smoothing.
        tasks: multi-task training (a batch with ``task_ids``): each token's loss is weighted by its task's
            weight and counted in its task's log (``core.loss.TaskLosses``).
    """
    labels = batch["labels"]
    task_ids = batch.get("task_ids") if tasks is not None else None
    if labels.dim() == 1:
        logits = model(**model_inputs(batch)).logits
        return class_loss_sum(
            logits, labels, batch.get("weights"), label_smoothing, model_heads(model), tasks, task_ids
        )
    if not chunk_tokens and fused_ce is None:
        logits = model(**model_inputs(batch)).logits
        if task_ids is None:
            return token_loss_sum(logits, labels, label_smoothing)
        keep = labels[:, 1:] != IGNORE
        return _task_sum(token_losses(logits, labels, label_smoothing)[keep], task_ids[:, 1:][keep], tasks)
    out = model(
        **model_inputs(batch), output_hidden_states=True, logits_to_keep=no_logits(batch["input_ids"])
    )
    # Prompt-learning methods prepend virtual tokens: the last T positions are the real ones.
    hidden = out.hidden_states[-1][:, -labels.shape[1] :]
    keep = labels[:, 1:] != IGNORE
    h = hidden[:, :-1][keep]
    y = labels[:, 1:][keep]
    head = getattr(model, "module", model).get_output_embeddings()  # unwrap DDP
    if fused_ce is not None:  # build never combines liger's fused loss with task weights (it has none)
        return fused_ce(head.weight, h, y, head.bias).float()
    if task_ids is not None:
        t = task_ids[:, 1:][keep]
        each = torch.empty(len(y), dtype=torch.float32, device=y.device)
        if torch.is_grad_enabled():
            weights = tasks.token_weights(t)
            total = LinearCrossEntropy.apply(
                h, head.weight, head.bias, y, label_smoothing, chunk_tokens, weights, each
            )
            tasks.add(t, each)
            return total
        for start in range(0, y.numel(), chunk_tokens):
            part = slice(start, start + chunk_tokens)
            each[part] = _chunk_ce(h[part], head.weight, head.bias, y[part], label_smoothing, "none")
        return _task_sum(each, t, tasks)
    if torch.is_grad_enabled():
        return LinearCrossEntropy.apply(h, head.weight, head.bias, y, label_smoothing, chunk_tokens)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), chunk_tokens):
        total = total + _chunk_ce(
            h[start : start + chunk_tokens],
            head.weight,
            head.bias,
            y[start : start + chunk_tokens],
            label_smoothing,
        )
    return total


def _task_sum(losses: torch.Tensor, task_ids: torch.Tensor, tasks: TaskLosses) -> torch.Tensor:
    """The task-weighted sum of labelled tokens' losses, counted in each task's log."""
    tasks.add(task_ids, losses)
    weights = tasks.token_weights(task_ids)
    return losses.sum() if weights is None else (losses * weights).sum()


def class_loss_sum(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    heads: dict[str, list[int]] | None = None,
    tasks: TaskLosses | None = None,
    task_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of a classification head's logits ``(batch, classes)``, in fp32.

    With class weights each row's loss is multiplied by its class's weight (``weights``, one per row),
    and the loop divides by the number of rows, so the loss is the mean of ``w[y] x CE``. torch's
    ``weight=`` would divide by the sum of the weights instead, which depends on the batch's classes.
    With ``heads`` (a head per task) each row's softmax covers its task's classes only
    (``core.heads.block_cross_entropy``); with ``tasks`` and ``task_ids`` (``data.mix``) each row's loss
    is counted in its task's log and scaled by its task's loss weight.
    """
    per_row = block_cross_entropy(logits, labels, heads, label_smoothing)
    scale = weights.to(per_row) if weights is not None else None
    if task_ids is not None and tasks is not None:
        tasks.add(task_ids, per_row)
        by_task = tasks.token_weights(task_ids)
        if by_task is not None:
            scale = by_task if scale is None else scale * by_task
    return (per_row * scale).sum() if scale is not None else per_row.sum()
