"""The stability guard: every step, look for a broken update before it reaches the weights.

Checked after backward, before ``optimizer.step()``: non-finite (loss or global gradient norm NaN/inf), and
spike: after ``stability.spike_window`` accepted steps, ``x`` (loss, or gradient norm before clipping) spikes
if ``x > median + k * 1.4826 * MAD`` and ``x > ratio * median`` over the window (Leys et al. 2013).
``stability.policy``: ``skip`` drops the update, keeps the optimizer state; ``rollback`` restores the last
in-memory snapshot of trainable weights and optimizer state, lr times ``rollback_lr_factor``; ``halt`` stops
with a diagnostic (step, parameter with the largest gradient, the batch's data rows; weights of the step
before). Under fp16 a non-finite gradient with a finite loss is the scaler's: ``fp16_overflow``, not a fault.
Injection (``stability.inject`` / env ``DSTUNE_STABILITY_INJECT``, comma separated): ``nan_loss@K`` makes step
K's loss and gradients NaN; ``grad_scale@K:F`` scales its gradients by F. See docs/benchmarks.md, 'guard.py'.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
from collections import deque

import torch

from dstune.config import StabilityConfig
from dstune.core.facts import restore_trainable, snapshot_trainable
from dstune.errors import UsageError

ENV_INJECT = "DSTUNE_STABILITY_INJECT"


def parse_injections(items: list[str]) -> dict[int, list[tuple[str, float]]]:
    """``["nan_loss@5", "grad_scale@8:1e4"]`` -> ``{5: [("nan_loss", nan)], 8: [("grad_scale", 1e4)]}``.

    Raises:
        ValueError: naming the item and the accepted forms.
    """
    out: dict[int, list[tuple[str, float]]] = {}
    for item in items:
        try:
            kind, rest = item.split("@")
            step, _, arg = rest.partition(":")
            if kind == "nan_loss" and not arg:
                out.setdefault(int(step), []).append((kind, math.nan))
            elif kind == "grad_scale" and arg:
                out.setdefault(int(step), []).append((kind, float(arg)))
            else:
                raise ValueError
        except ValueError:
            raise UsageError(
                f"stability.inject: cannot parse '{item}'; accepted: nan_loss@STEP, "
                f"grad_scale@STEP:FACTOR (e.g. grad_scale@8:1e4)"
            ) from None
    return out


def is_spike(value: float, window: list[float], k: float, ratio: float) -> bool:
    """The spike rule of the module docstring, on one value against its window."""
    med = statistics.median(window)
    mad = statistics.median(abs(v - med) for v in window)
    return value > med + k * 1.4826 * mad and value > ratio * med


def _clone_state(obj):
    """A deep copy of an optimizer state dict with tensors moved to the CPU (a snapshot must not
    alias the live state, and should not hold accelerator memory)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _clone_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_state(v) for v in obj)
    return copy.copy(obj)


class StabilityGuard:
    """Watches each step of one run; the loop asks it what to do with the step.

    Args:
        cfg: the ``stability`` section.
        model: the unwrapped model (parameter names for snapshots and diagnostics).
        optimizer / scheduler: the run's; rollback restores the one and scales the other's base lrs.
        precision: ``train.precision``.
        rows: the training rows, to name the examples of a halted step.
        log: ``log(step, values)`` for the metrics log; ``say(text)`` prints to the console.
    """

    def __init__(
        self,
        cfg: StabilityConfig,
        model,
        optimizer,
        scheduler,
        precision: str = "fp32",
        rows: list[dict] | None = None,
        log=None,
        say=None,
    ):
        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.precision, self.rows = precision, rows or []
        self.log, self.say = log or (lambda step, values: None), say or (lambda text: None)
        env = [x.strip() for x in os.environ.get(ENV_INJECT, "").split(",") if x.strip()]
        self.injections = parse_injections(list(cfg.inject) + env)
        self.counts = {
            "nonfinite": 0,
            "grad_spike": 0,
            "loss_spike": 0,
            "skipped": 0,
            "rollbacks": 0,
            "fp16_overflow": 0,
            "injected": 0,
        }
        self.losses: deque[float] = deque(maxlen=cfg.spike_window)
        self.grad_norms: deque[float] = deque(maxlen=cfg.spike_window)
        self.halt: dict | None = None
        self._skips_in_a_row = 0
        self._snapshot = None
        if cfg.policy == "rollback":
            self.take_snapshot(0)

    # ------------------------------------------------------------------ injection

    def inject(self, step: int, loss_sum: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        """Applies the faults requested for ``step`` (1-based) to its loss and gradients."""
        for kind, arg in self.injections.get(step, []):
            self.counts["injected"] += 1
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(arg)  # NaN * g is NaN: what backpropagating a NaN loss leaves
            if kind == "nan_loss":
                loss_sum = loss_sum * math.nan
        return loss_sum

    # ------------------------------------------------------------------ detection

    def check(self, step: int, loss: float, grad_norm: float, indices: list[int]) -> str:
        """Classifies step ``step`` (1-based, not yet applied).

        Returns:
            ``"step"`` to apply the update; ``"skip"`` (also after a rollback) to drop it; ``"halt"``
            to stop: ``self.halt`` then holds the diagnostic.
        """
        if self.cfg.policy == "off":
            return "step"
        grad_norm = float(grad_norm)
        fault = None
        if not math.isfinite(loss):
            fault = "nonfinite"
        elif not math.isfinite(grad_norm):
            if self.precision == "fp16":
                self.counts["fp16_overflow"] += 1
                return "step"  # GradScaler skips this update itself and lowers the scale
            fault = "nonfinite"
        elif len(self.grad_norms) == self.cfg.spike_window:
            if self.cfg.detect_grad_spikes and is_spike(
                grad_norm, list(self.grad_norms), self.cfg.spike_k, self.cfg.spike_ratio
            ):
                fault = "grad_spike"
            elif self.cfg.detect_loss_spikes and is_spike(
                loss, list(self.losses), self.cfg.spike_k, self.cfg.spike_ratio
            ):
                fault = "loss_spike"
        if fault is None:
            self.losses.append(loss)
            self.grad_norms.append(grad_norm)
            self._skips_in_a_row = 0
            return "step"
        self.counts[fault] += 1
        detail = f"loss {loss:.4g}, grad norm {grad_norm:.4g}"
        too_many_skips = self.cfg.policy == "skip" and self._skips_in_a_row >= self.cfg.max_consecutive_skips
        if too_many_skips:  # every step skipped: the run only burns compute, so stop and say so
            detail += (
                f"; the {self._skips_in_a_row} updates before it were skipped too "
                "(stability.max_consecutive_skips): lower optim.lr or use stability.policy=rollback"
            )
        if (
            too_many_skips
            or self.cfg.policy == "halt"
            or (self.cfg.policy == "rollback" and self.counts["rollbacks"] >= self.cfg.max_rollbacks)
        ):
            self.halt = self._diagnose(step, fault, detail, indices)
            self.say(f"[bold red]stability guard: halted at step {step}[/]: {self.halt['message']}")
            self.log(step, {**self.counts, "halted": 1})
            return "halt"
        if self.cfg.policy == "rollback":
            self._rollback()
            self.say(
                f"[yellow]stability guard: {fault} at step {step} ({detail}); rolled back to step "
                f"{self._snapshot['step']}, lr x {self.cfg.rollback_lr_factor:g}[/]"
            )
        else:
            self.counts["skipped"] += 1
            self._skips_in_a_row += 1
            self.say(f"[yellow]stability guard: {fault} at step {step} ({detail}); update skipped[/]")
        self.log(step, dict(self.counts))
        return "skip"

    def _diagnose(self, step: int, fault: str, detail: str, indices: list[int]) -> dict:
        worst, worst_norm = None, -1.0
        for name, p in self.model.named_parameters():
            if p.grad is None:
                continue
            norm = float(p.grad.detach().float().norm())
            if not math.isfinite(norm):
                worst, worst_norm = name, math.inf
                break
            if norm > worst_norm:
                worst, worst_norm = name, norm
        sources = [self.rows[i].get("source", str(i)) for i in indices if i < len(self.rows)]
        message = (
            f"{fault} at step {step} ({detail}); largest gradient in {worst} (norm {worst_norm:.4g}); "
            f"batch rows {indices}; weights kept are those after step {step - 1}"
        )
        return {
            "step": step,
            "fault": fault,
            "largest_grad_param": worst,
            "largest_grad_norm": worst_norm,
            "data_indices": indices,
            "data_sources": sources,
            "message": message,
        }

    # ------------------------------------------------------------------ snapshots

    def take_snapshot(self, step: int) -> None:
        """Copies trainable weights and optimizer state to CPU memory (rollback only)."""
        self._snapshot = {
            "step": step,
            "weights": snapshot_trainable(self.model),
            "optimizer": _clone_state(self.optimizer.state_dict()),
        }

    def after_step(self, step: int) -> None:
        """Called after every completed step: refreshes the snapshot when one is due."""
        if self.cfg.policy == "rollback" and step % self.cfg.snapshot_every == 0:
            self.take_snapshot(step)

    def _rollback(self) -> None:
        self.counts["rollbacks"] += 1
        restore_trainable(self.model, self._snapshot["weights"])
        self.optimizer.load_state_dict(_clone_state(self._snapshot["optimizer"]))
        # LambdaLR multiplies base_lrs by the schedule each step; scaling them makes the cut persist,
        # and they are part of the scheduler's saved state, so a resumed run keeps it too.
        self.scheduler.base_lrs = [lr * self.cfg.rollback_lr_factor for lr in self.scheduler.base_lrs]

    def summary(self) -> dict:
        """Event counts and, after a halt, its diagnostic (for summary.json)."""
        return {"policy": self.cfg.policy, **self.counts, "halt": self.halt}
