"""Elastic weight consolidation against forgetting (Kirkpatrick et al. 2017, eq. 3): the loss of the new task
plus ``lambda / 2 * sum_i F_i (theta_i - theta*_i)^2``, where theta* are the weights the run starts from (the
model after the previous task) and F the diagonal Fisher information of the previous task's data.

F is the empirical Fisher: the mean over ``regularize.ewc_samples`` examples of the previous task (its data
file, ``regularize.ewc_data``) of each example's squared gradient of its mean token loss, one example at a
time (a batch gradient squared would be a different, smaller quantity). It is computed for the trainable
parameters only, at the start of the run, so with LoRA it is the Fisher of the adapter's parameters at the
point the new task starts from. It is deterministic (fixed examples, eval mode, no dropout), so a resumed run
recomputes the same values; ``fisher.safetensors`` in the run directory keeps them for inspection.

The penalty's gradient ``lambda * F * (theta - theta*)`` is added to the accumulated gradients after the
backward pass, before clipping: the same update as adding the penalty to the normalised loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dstune.core.collate import collate
from dstune.core.forward import loss_sum
from dstune.core.loss import count_loss_tokens


@dataclass
class EWC:
    """The penalty of one run: the anchor weights theta*, the Fisher F (both by parameter name) and lambda."""

    strength: float
    anchor: dict[str, torch.Tensor]
    fisher: dict[str, torch.Tensor]

    def add_gradients(self, model: torch.nn.Module) -> float:
        """Adds ``lambda * F * (theta - theta*)`` to each trainable parameter's gradient and returns the
        penalty ``lambda / 2 * sum F (theta - theta*)^2``."""
        total = 0.0
        for name, p in model.named_parameters():
            if name not in self.fisher:
                continue
            f = self.fisher[name].to(p.device)
            diff = p.detach().float() - self.anchor[name].to(p.device)
            grad = (self.strength * f * diff).to(p.dtype)
            p.grad = grad if p.grad is None else p.grad + grad
            total += float((f * diff * diff).sum())
        return self.strength / 2 * total


def fisher_diagonal(model: torch.nn.Module, rows: list[dict], pad_id: int, device) -> dict[str, torch.Tensor]:
    """The empirical Fisher of the trainable parameters on ``rows``: mean of per-example squared gradients
    of the example's mean token loss. The model is in eval mode for it (no dropout) and its gradients are
    left cleared."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.eval()
    used = 0
    for row in rows:
        batch = {k: v.to(device) for k, v in collate([row], pad_id).items()}
        n = count_loss_tokens(batch["labels"])
        if int(n) == 0:
            continue
        model.zero_grad(set_to_none=True)
        (loss_sum(model, batch) / n).backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += p.grad.detach().float() ** 2
        used += 1
    model.zero_grad(set_to_none=True)
    if was_training:
        model.train()
    return {n: f / max(used, 1) for n, f in fisher.items()}


def make_ewc(cfg, model: torch.nn.Module, tokenizer, template, pad_id: int, device) -> EWC:
    """The EWC penalty of ``cfg.regularize``: the previous task's examples tokenized like this run's data,
    the Fisher of the trainable parameters on them, and the starting weights as the anchor."""
    from dstune.data import prepare_data

    rc = cfg.regularize
    previous = cfg.data.model_copy(
        update={
            "train": rc.ewc_data,
            "validation": None,
            "mix": [],
            "split": (1.0, 0.0, 0.0),
            "max_samples": rc.ewc_samples,
        }  # fmt: skip
    )
    rows = prepare_data(previous, tokenizer, template, seed=cfg.train.seed).train
    fisher = fisher_diagonal(model, rows, pad_id, device)
    anchor = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return EWC(rc.ewc_lambda, anchor, fisher)
