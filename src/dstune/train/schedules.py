"""Learning-rate schedules: a factor of ``optim.lr`` for each optimizer step, with warmup and a floor.

Each is a pure function of (step, total, config) in a ``LambdaLR`` of plain numbers: checkpoints stay JSON, a
resumed run gets the same rates. s: 0-based step; W, T: warmup, total steps; m: ``optim.min_lr_ratio``. Warmup
(s + 1) / (W + 1) for s < W (never 0: step 0 moves the weights), then, with p = (s - W) / (T - W) in [0, 1):

===============  ==========================================================================================
constant         1 (the floor does not apply)
linear           m + (1 - m) (1 - p)
cosine           m + (1 - m) (1 + cos(pi p)) / 2
cosine_restarts  cosine per cycle; cycle i lasts restart_steps * restart_mult^i steps
                 (SGDR, Loshchilov & Hutter 2017, eq. 5)
polynomial       m + (1 - m) (1 - p)^power (transformers' polynomial decay)
wsd              1, then linear to m over the last D = decay_ratio (T - W) steps (warmup-stable-decay: Hu
                 et al. 2024, MiniCPM, sec. 4; Hägele et al. 2024 show a linear cool-down matches cosine)
===============  ==========================================================================================
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


def phased_factor(step: int, phases: list[dict], cfg: OptimConfig) -> float:
    """The lr factor of a run whose length was changed on resume.

    The first phase is the configured schedule over its ``total``. A later phase starts at the step where
    the run was resumed with another length, from the factor of the last step taken, and decays
    to the floor (``min_lr_ratio``, or that factor if lower) over the remaining steps: a half cosine for
    cosine schedules, ``(1 - p)^power`` for polynomial, constant for constant, else linear. So the lr never
    jumps when a run is extended; this is the rule ``dstune train --resume`` prints when it applies it.
    """
    phase = max((p for p in phases if p["start"] <= step), key=lambda p: p["start"])
    if "factor" not in phase:
        return lr_factor(step, phase["total"], cfg)
    start, factor = phase["start"], phase["factor"]
    progress = min(1.0, (step - start) / max(1, phase["total"] - start))
    if cfg.schedule == "constant":
        return factor
    if cfg.schedule in ("cosine", "cosine_restarts"):
        shape = (1 + math.cos(math.pi * progress)) / 2
    elif cfg.schedule == "polynomial":
        shape = (1 - progress) ** cfg.power
    else:
        shape = 1 - progress
    floor = min(cfg.min_lr_ratio, factor)
    return floor + (factor - floor) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, total: int | list[dict], cfg: OptimConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over ``lr_factor`` (or ``phased_factor`` given a list of phases): each parameter
    group's own lr (layer decay, LoRA+) is scaled by the same factor. Its state is plain numbers, so it
    saves as JSON."""
    phases = [{"start": 0, "total": total}] if isinstance(total, int) else total
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: phased_factor(s, phases, cfg))


def change_length(phases: list[dict], step: int, total: int, cfg: OptimConfig) -> dict | None:
    """Adds the phase for a run resumed at ``step`` with a new length ``total``; returns it (None when the
    length is unchanged). The new phase starts from the lr factor of the last step taken."""
    if phases[-1]["total"] == total or step == 0:
        if step == 0:
            phases[-1]["total"] = total
        return None
    phase = {"start": step, "factor": phased_factor(step - 1, phases, cfg), "total": total}
    phases.append(phase)
    return phase


def current_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: OptimConfig) -> float:
    """The lr a parameter with no group-specific ratio gets now: ``optim.lr`` x schedule factor (x any
    rollback cut). Logged as ``lr``; group 0 alone may be the embeddings under layer-wise decay."""
    group = scheduler.optimizer.param_groups[0]
    return cfg.lr * scheduler.get_last_lr()[0] / group["initial_lr"]
