"""Learning-rate range test: an exponential sweep of the lr over K steps (Smith 2017, "Cyclical Learning
Rates for Training Neural Networks", sec. 3.3; the fastai ``lr_find``).

The sweep trains a fresh copy of the model exactly as ``train`` would (same method, parameter groups,
clipping, regularisation, micro-batches) but with the lr of step i set to
``start * (end / start) ** (i / (K - 1))``; every parameter group keeps its ratio to ``optim.lr``
(layer decay, LoRA+). It writes nothing but the optional PNG: no run directory, no checkpoint.

Suggested lr, the rule (fastai's ``minimum``): smooth the losses with a bias-corrected exponential
moving average, take the lr at the smoothed minimum and divide by 10. At the minimum the loss has
stopped falling and is about to diverge; a tenth of it is still on the steep, stable part of the curve.
The steepest-descent lr (most negative slope of the smoothed loss against log lr) is reported too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from dstune.config import RunConfig
from dstune.methods import prepare_model
from dstune.models.load import load_tokenizer, resolve_model_dir
from dstune.models.templates import resolve_chat_template
from dstune.train.batching import MicroBatches
from dstune.train.loop import backward_window, task_data, task_model
from dstune.train.optim import build_optimizer, clip_gradients
from dstune.train.regularize import apply_regularization

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


def smooth(losses: list[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (as in Adam's first moment)."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** i))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float, float]:
    """Returns (minimum / 10, steepest descent) learning rates of a sweep."""
    best = min(range(len(smoothed)), key=smoothed.__getitem__)
    # Slopes before the minimum, skipping the first tenth of the sweep where the average still warms up.
    first = max(1, len(lrs) // 10)
    slopes = {i: (smoothed[i + 1] - smoothed[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i]))
              for i in range(first, best)}
    steepest = lrs[min(slopes, key=slopes.__getitem__)] if slopes else lrs[best]
    return lrs[best] / 10, steepest


def lr_find(cfg: RunConfig, *, steps: int = 100, start_lr: float = 1e-7, end_lr: float = 1.0,
            beta: float = 0.9, diverge: float = 4.0, plot: str | Path | None = None) -> LRFindResult:
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
        ValueError: a bad range or too few steps, naming the option.
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f"lr-find: need 0 < start_lr < end_lr, got {start_lr} and {end_lr}")
    if steps < 5:
        raise ValueError(f"lr-find: --steps must be at least 5, got {steps}")
    tc = cfg.train
    accelerator = Accelerator(mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[tc.precision])
    # The same preparation as train() (loop.py), in the same seeded order, without its run directory.
    torch.manual_seed(tc.seed)
    resolved = resolve_model_dir(cfg.model.name, revision=cfg.model.revision,
                                 trust_remote_code=cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(resolved.path)
    data = task_data(cfg, tokenizer, resolve_chat_template(tokenizer, cfg.model.chat_template, resolved.family))
    if not data.train:
        raise ValueError(f"no training examples left in {cfg.data.train} after tokenising")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = task_model(cfg, resolved, data.labels, pad_id)
    torch.manual_seed(tc.seed)
    model = prepare_model(model, cfg)
    apply_regularization(model, cfg.regularize)
    optimizer = build_optimizer(model, cfg.optim, accelerator.device)
    ratios = [g["lr"] / cfg.optim.lr for g in optimizer.param_groups]
    model, optimizer = accelerator.prepare(model, optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batches = MicroBatches(data.train, tc.micro_batch_size, tc.seed, pad_id,
                           num_shards=accelerator.num_processes, shard=accelerator.process_index)

    model.train()
    lrs, losses, stopped = [], [], False
    for i in range(steps):
        lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
        for group, ratio in zip(optimizer.param_groups, ratios):
            group["lr"] = lr * ratio
        window = [batches.next()[0] for _ in range(tc.grad_accum)]
        loss_sum, n_global = backward_window(model, window, accelerator, None, cfg.regularize.label_smoothing,
                                             tc.chunk_tokens)
        clip_gradients(trainable, cfg.optim, accelerator)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = (accelerator.reduce(loss_sum, "sum") / n_global).item()
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
        raise ValueError(f"lr-find: the loss diverged at once (lr {start_lr:g}); lower --start-lr")
    smoothed = smooth(losses, beta)
    suggestion, steepest = suggest(lrs, smoothed)
    out = plot_sweep(lrs, losses, smoothed, suggestion, Path(plot)) if plot else None
    return LRFindResult(lrs, losses, smoothed, suggestion, steepest, plot=out, stopped_early=stopped)


def plot_sweep(lrs: list[float], losses: list[float], smoothed: list[float], suggestion: float,
               path: Path) -> Path:
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
