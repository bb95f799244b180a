"""Learning-rate schedules: a factor of ``optim.lr`` for each optimizer step, with warmup and a floor.

Every schedule is a pure function of (step, total, config), wrapped in a ``LambdaLR`` whose state is
plain numbers, so checkpoints stay JSON and a resumed run gets the same learning rates.

Conventions, shared by all schedules (``s`` is the 0-based optimizer step, ``W`` the warmup steps,
``T`` the run's total steps, ``m`` = ``optim.min_lr_ratio``):

- warmup: factor ``(s + 1) / (W + 1)`` for ``s < W`` (never 0, so the first step moves the weights);
- after warmup, ``p = (s - W) / (T - W)`` is the progress in [0, 1) and each schedule decays from 1
  towards ``m``:

======================  ======================================================================
constant                1 (the floor does not apply)
linear                  m + (1 - m) (1 - p)
cosine                  m + (1 - m) (1 + cos(pi p)) / 2
cosine_restarts         cosine within each cycle; cycle i lasts T_0 * T_mult^i steps (SGDR,
                        Loshchilov & Hutter 2017, eq. 5), T_0 = restart_steps, T_mult = restart_mult
polynomial              m + (1 - m) (1 - p)^power (transformers' polynomial decay)
wsd                     warmup-stable-decay: 1 until the last ``decay_ratio`` of the post-warmup
                        steps, then linear to m over D = decay_ratio (T - W) steps
                        (Hu et al. 2024, MiniCPM, sec. 4; Hägele et al. 2024 show a linear
                        cool-down matches cosine)
======================  ======================================================================
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from dstune.config import OptimConfig


def warmup_steps(total: int, cfg: OptimConfig) -> int:
    """Warmup length in steps: ``warmup_steps`` if set, else ``warmup_ratio`` of the run."""
    return cfg.warmup_steps or int(cfg.warmup_ratio * total)


def _constant(p: float, s: int, w: int, total: int, cfg: OptimConfig) -> float:
    return 1.0


def _linear(p: float, s: int, w: int, total: int, cfg: OptimConfig) -> float:
    return 1.0 - p


def _cosine(p: float, s: int, w: int, total: int, cfg: OptimConfig) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * p))


def _cosine_restarts(p: float, s: int, w: int, total: int, cfg: OptimConfig) -> float:
    # Walk the cycles instead of inverting the geometric sum with logarithms: exact for any T_mult,
    # and a run has at most a few dozen cycles.
    t, period = s - w, float(cfg.restart_steps)
    while t >= period:
        t -= period
        period *= cfg.restart_mult
    return 0.5 * (1.0 + math.cos(math.pi * t / period))


def _polynomial(p: float, s: int, w: int, total: int, cfg: OptimConfig) -> float:
    return (1.0 - p) ** cfg.power


def _wsd(p: float, s: int, w: int, total: int, cfg: OptimConfig) -> float:
    decay = max(1, round(cfg.decay_ratio * (total - w)))
    start = total - decay
    if s < start:
        return 1.0
    return 1.0 - (s - start) / decay


# Each returns the decayed fraction in [0, 1]; ``lr_factor`` maps it onto [min_lr_ratio, 1].
SCHEDULES: dict[str, Callable[[float, int, int, int, OptimConfig], float]] = {
    "constant": _constant,
    "linear": _linear,
    "cosine": _cosine,
    "cosine_restarts": _cosine_restarts,
    "polynomial": _polynomial,
    "wsd": _wsd,
}


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based) of a ``total``-step run.

    Args:
        step: optimizer steps already taken.
        total: optimizer steps of the whole run.
        cfg: the ``optim`` section (schedule, warmup, min_lr_ratio and the schedule's own keys).
    """
    warmup = warmup_steps(total, cfg)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = cfg.min_lr_ratio
    return floor + (1.0 - floor) * SCHEDULES[cfg.schedule](progress, step, warmup, total, cfg)


def build_scheduler(optimizer: torch.optim.Optimizer, total: int, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over ``lr_factor``: each parameter group's own lr (layer decay, LoRA+) is scaled
    by the same factor. Its state is plain numbers, so it saves as JSON."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg))


def current_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: OptimConfig) -> float:
    """The lr a parameter with no group-specific ratio gets now: ``optim.lr`` x schedule factor (x any
    rollback cut). Logged as ``lr``; group 0 alone may be the embeddings under layer-wise decay."""
    group = scheduler.optimizer.param_groups[0]
    return cfg.lr * scheduler.get_last_lr()[0] / group["initial_lr"]
