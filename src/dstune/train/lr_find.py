"""Learning-rate range test: an exponential lr sweep over K steps (Smith 2017, "Cyclical Learning Rates for
Training Neural Networks", sec. 3.3; the fastai ``lr_find``).

A fresh copy of the model trains exactly as ``train`` would (the same ``build``: method, kernels, casting,
packing, parameter groups, clipping, regularisation, micro-batches), with step i's lr
``start * (end / start) ** (i / (K - 1))``; each parameter group keeps its ratio to ``optim.lr`` (layer decay,
LoRA+). It writes nothing but the optional PNG: no run directory, no checkpoint. Suggested lr (fastai's
``minimum``): the lr at the minimum of the bias-corrected EMA-smoothed loss, divided by 10: at the minimum the
loss is about to diverge, a tenth is still on the steep, stable part. The steepest-descent lr (most negative
slope of smoothed loss against log lr) is reported too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from dstune.config import RunConfig
from dstune.errors import UsageError
from dstune.train.build import build
from dstune.train.loop import backward_window
from dstune.train.optim import clip_gradients

RULE = "lr at the minimum of the smoothed loss / 10"


@dataclass
class LRFindResult:
    """The sweep: one lr and loss per step, the smoothed loss and the suggestion."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    steepest: float
    rule: str = RULE
    plot: Path | None = None
    stopped_early: bool = field(default=False)
    descended: bool = True  # False: the smoothed loss was lowest at the start of the sweep


def smooth(losses: list[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (as in Adam's first moment)."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta**i))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float, float]:
    """Returns (minimum / 10, steepest descent) learning rates of a sweep."""
    best = min(range(len(smoothed)), key=smoothed.__getitem__)
    # Slopes before the minimum, skipping the first tenth of the sweep where the average still warms up.
    first = max(1, len(lrs) // 10)
    slopes = {
        i: (smoothed[i + 1] - smoothed[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i]))
        for i in range(first, best)
    }
    steepest = lrs[min(slopes, key=slopes.__getitem__)] if slopes else lrs[best]
    return lrs[best] / 10, steepest


def lr_find(
    cfg: RunConfig,
    *,
    steps: int = 100,
    start_lr: float = 1e-7,
    end_lr: float = 1.0,
    beta: float = 0.9,
    diverge: float = 4.0,
    plot: str | Path | None = None,
) -> LRFindResult:
    """Runs the lr range test for ``cfg`` and returns the sweep and the suggested ``optim.lr``.

    Args:
        cfg: a run config; ``optim.lr`` only sets the ratios between parameter groups, the schedule and
            ``train.max_steps`` are ignored, ``cfg.output`` is not touched.
        steps: K, the number of sweep steps.
        start_lr / end_lr: the sweep's first and last lr.
        beta: smoothing of the loss curve (fastai uses 0.98 over 100+ steps; 0.9 suits short sweeps).
        diverge: stop once the smoothed loss exceeds this multiple of its minimum.
        plot: write a PNG of loss against lr here (nothing is written without it).

    Raises:
        UsageError: a bad range or too few steps, naming the option.
    """
    if cfg.objective == "grpo":  # its loss is a centred surrogate near 0 whatever the lr: no curve to read
        raise UsageError(
            "lr-find: objective=grpo has no loss curve to read (its loss is a policy-gradient surrogate "
            "near 0); search optim.lr with `dstune tune` on tune.objective=reward instead"
        )
    if not 0 < start_lr < end_lr:
        raise UsageError(f"lr-find: need 0 < --start-lr < --end-lr, got {start_lr} and {end_lr}")
    if steps < 5:
        raise UsageError(f"lr-find: --steps must be at least 5, got {steps}")
    run = build(cfg)  # exactly what train() trains, without its run directory
    ratios = [base / cfg.optim.lr for base in run.scheduler.base_lrs]
    run.model.train()
    lrs, losses, stopped = [], [], False
    for i in range(steps):
        lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
        for group, ratio in zip(run.optimizer.param_groups, ratios):
            group["lr"] = lr * ratio
        window = [run.batches.next()[0] for _ in range(cfg.train.grad_accum)]
        loss_sum, n_global = backward_window(run.model, window, run.engine, run.objective)
        clip_gradients(run.params, cfg.optim, run.engine)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        loss = (run.engine.reduce(loss_sum, "sum") / n_global).item()
        if not math.isfinite(loss):
            stopped = True
            break
        lrs.append(lr)
        losses.append(loss)
        smoothed = smooth(losses, beta)
        if i >= 3 and smoothed[-1] > diverge * min(smoothed):
            stopped = True
            break
    if len(losses) < 2:
        raise UsageError(f"lr-find: the loss diverged at once (lr {start_lr:g}); lower --start-lr")
    smoothed = smooth(losses, beta)
    suggestion, steepest = suggest(lrs, smoothed)
    out = plot_sweep(lrs, losses, smoothed, suggestion, Path(plot)) if plot else None
    # A minimum in the sweep's first tenth means the loss never fell: there is no lr to suggest.
    descended = min(range(len(smoothed)), key=smoothed.__getitem__) >= max(1, len(lrs) // 10)
    return LRFindResult(
        lrs, losses, smoothed, suggestion, steepest, plot=out, stopped_early=stopped, descended=descended
    )


def plot_sweep(
    lrs: list[float], losses: list[float], smoothed: list[float], suggestion: float, path: Path
) -> Path:
    """Loss against lr (log axis), raw and smoothed, with the suggestion marked; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(lrs, losses, lw=0.8, alpha=0.5, label="loss")
    ax.plot(lrs, smoothed, lw=1.6, label="smoothed loss")
    ax.axvline(suggestion, color="tab:red", ls="--", label=f"suggested lr {suggestion:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"lr range test ({RULE})")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
