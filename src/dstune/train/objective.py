"""The objective seam: what the loop asks of a training loss.

An objective turns one collated micro-batch into a summed loss and says how many units (labelled tokens,
or rows for a classification head) that sum is over; the loop divides by the units of the whole
accumulation window on every process, so accumulation and data parallelism give the gradient of one big
batch. Supervised fine-tuning is one objective; preference (``train.preference``) and reward
(``train.grpo``) objectives are further classes with the same methods, chosen by ``build``. ``prepare``
runs first on the step's micro-batches: GRPO samples and scores its completions there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from dstune.core.forward import loss_sum
from dstune.core.loss import TaskLosses, count_loss_tokens


class Objective(Protocol):
    def prepare(self, model: torch.nn.Module, window: list[dict], engine) -> list[dict]:
        """The micro-batches the step trains on, made from those the data served (usually the same)."""

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed training loss of one micro-batch (a scalar tensor on the model's device)."""

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """How many units ``loss_sum`` sums over (the normaliser of the window)."""


@dataclass
class SupervisedObjective:
    """Next-token cross-entropy on the labelled tokens (or the class cross-entropy of a head).

    Args:
        label_smoothing: training only; validation loss is plain cross-entropy.
        chunk_tokens: compute the output layer this many labelled tokens at a time (0: all at once).
        fused_ce: liger's fused linear cross-entropy on CUDA, used instead of the chunks.
        tasks: multi-task training (``data.mix``): token losses weighted by their task's ``loss_weight``.
    """

    label_smoothing: float = 0.0
    chunk_tokens: int = 0
    fused_ce: Callable | None = None
    tasks: TaskLosses | None = None  # data.mix: the task loss weights and per-task logs

    def prepare(self, model: torch.nn.Module, window: list[dict], engine) -> list[dict]:
        return window

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_sum(model, batch, self.label_smoothing, self.chunk_tokens, self.fused_ce, self.tasks)

    def take_metrics(self) -> dict[str, float]:
        """Each task's mean token loss since the last call (``loss/<task>``; multi-task runs only)."""
        return self.tasks.take() if self.tasks is not None else {}

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return count_loss_tokens(batch["labels"])
