"""Optimizers, parameter groups and gradient clipping.

Parameter groups carry their own learning rate; the schedule (``train/schedules.py``) scales every
group by the same factor, so layer-wise decay and LoRA+ ratios hold at every step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from dstune.config import OptimConfig
from dstune.core.facts import full_shape, layer_index, numel
from dstune.errors import MissingExtra
from dstune.models.classify import head_parameters
from dstune.train.schedules import build_scheduler, lr_factor  # noqa: F401  (re-exported: the loop imports them here)

_LORA_B = re.compile(r"\.lora_(embedding_)?B\.")


@dataclass(frozen=True)
class ParamInfo:
    """Where one trainable parameter sits, which decides its group."""

    name: str
    part: str  # "embeddings", "layer", "head" or "other" (final norm, anything outside the layers)
    layer: int | None  # decoder-layer index for part == "layer"
    decay: bool  # gets weight decay
    lora_b: bool  # a LoRA B matrix (LoRA+ raises its lr)


def _num_layers(model: nn.Module, infos: list[ParamInfo]) -> int:
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if n:
        return int(n)
    return 1 + max((i.layer for i in infos if i.layer is not None), default=-1)


def describe_params(model: nn.Module) -> list[tuple[ParamInfo, nn.Parameter]]:
    """Classifies every trainable parameter once (tied weights once, as the embedding).

    No weight decay on norms, biases and embeddings: decaying a norm's gain or an embedding row pulls
    it towards zero for no regularising benefit (the convention of BERT, GPT-2 and nanoGPT).
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    head_ids |= {id(p) for p in head_parameters(model)}  # task: classification
    out, seen = [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        index = layer_index(name)
        if id(p) in embedding_ids:  # tied input/output weights count as the embeddings
            part = "embeddings"
        elif index is not None:
            part = "layer"
        elif id(p) in head_ids:
            part = "head"
        else:
            part = "other"
        decay = not (len(full_shape(p)) < 2 or "norm" in name.lower() or id(p) in embedding_ids)
        out.append(
            (ParamInfo(name, part, index if part == "layer" else None, decay, bool(_LORA_B.search(name))), p)
        )
    return out


def param_lr(info: ParamInfo, n_layers: int, cfg: OptimConfig) -> float:
    """The peak learning rate of one parameter.

    Layer-wise decay (``optim.layer_decay`` = d; Clark et al. 2020, ELECTRA appendix A; BEiT's
    ``layer_decay``): the head and final norm keep ``lr``, decoder layer i of N gets
    ``lr * d^(N - i)`` and the embeddings, the deepest, ``lr * d^(N + 1)``.
    ``optim.embedding_lr`` / ``optim.head_lr`` replace the rule for those parts. LoRA+ (Hayou et al.
    2024, sec. 3) multiplies the lr of every B matrix by ``optim.lora_plus_ratio``.
    """
    if info.part == "embeddings" and cfg.embedding_lr is not None:
        return cfg.embedding_lr
    if info.part == "head" and cfg.head_lr is not None:
        return cfg.head_lr
    depth = {"embeddings": n_layers + 1, "layer": n_layers - (info.layer or 0)}.get(info.part, 0)
    lr = cfg.lr * cfg.layer_decay**depth
    return lr * cfg.lora_plus_ratio if info.lora_b else lr


def _group_label(info: ParamInfo, cfg: OptimConfig) -> str:
    per_part = cfg.layer_decay != 1.0 or cfg.embedding_lr is not None or cfg.head_lr is not None
    label = ""
    if per_part:
        label = f"layer {info.layer}" if info.part == "layer" else info.part
    if info.lora_b and cfg.lora_plus_ratio != 1.0:
        label = f"{label} lora_B".strip()
    return label


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters grouped by (learning rate, weight decay), in model order.

    With the defaults this is two groups, ``decay`` and ``no_decay``; layer-wise decay, LoRA+ and the
    embedding/head learning rates split them further. Each group has a ``name`` for the printed table.
    """
    described = describe_params(model)
    n_layers = _num_layers(model, [i for i, _ in described])
    groups: dict[tuple[str, bool], dict] = {}
    for info, p in described:
        label = _group_label(info, cfg)
        key = (label, info.decay)
        if key not in groups:
            suffix = "decay" if info.decay else "no_decay"
            groups[key] = {
                "params": [],
                "name": f"{label} / {suffix}" if label else suffix,
                "lr": param_lr(info, n_layers, cfg),
                "weight_decay": cfg.weight_decay if info.decay else 0.0,
            }
        groups[key]["params"].append(p)
    return list(groups.values())


def render_groups(optimizer: torch.optim.Optimizer) -> str:
    """A text table of the optimizer's parameter groups: tensors, parameters, peak lr, weight decay."""
    lines = [f"{'param group':<24}{'tensors':>8}{'params':>14}{'peak lr':>12}{'w. decay':>10}"]
    for g in optimizer.param_groups:
        lr = g.get("initial_lr", g["lr"])
        lines.append(
            f"{g.get('name', '?'):<24}{len(g['params']):>8}{sum(numel(p) for p in g['params']):>14,}"
            f"{lr:>12.3g}{g.get('weight_decay', 0.0):>10.3g}"
        )
    return "\n".join(lines)


_FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, device: torch.device | str | None = None
) -> torch.optim.Optimizer:
    """The optimizer named by ``optim.optimizer`` over ``param_groups(model, cfg)``.

    Args:
        model: the prepared model (only parameters with ``requires_grad`` are optimised).
        cfg: the ``optim`` section.
        device: where training runs; AdamW uses torch's fused kernel (CPU and CUDA) unless
            ``optim.fused`` says otherwise.

    Raises:
        MissingExtra: ``adamw8bit`` without bitsandbytes installed, naming the extra to install.
    """
    groups = param_groups(model, cfg)
    if cfg.optimizer == "adamw":
        # The fused kernel is the same update in one pass over all parameters; torch's default on CPU is
        # a loop of ~10 small ops per tensor (0.20 -> 0.04 CPU s a step for SmolLM2's 240 LoRA tensors,
        # docs/benchmarks.md "Where the time goes").
        fused = cfg.fused if cfg.fused is not None else torch.device(device or "cpu").type in _FUSED_DEVICES
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise MissingExtra(
                "optim.optimizer=adamw8bit needs bitsandbytes: pip install 'dstune[bnb]' "
                "(or choose optim.optimizer=adamw or adafactor)"
            ) from None
        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    from transformers.optimization import Adafactor

    # An explicit lr with relative_step/scale_parameter off makes Adafactor follow our schedule and
    # param-group lrs; its own time-dependent lr would ignore both (Shazeer & Stern 2018, sec. 8).
    return Adafactor(
        groups, lr=cfg.lr, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=0.0
    )


# --------------------------------------------------------------------------- clipping


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Norm per output unit: rows of a matrix (dim 0 indexes units), the whole tensor for a vector.

    Matches the NFNet reference (deepmind-research/nfnets/agc_optax.py) with torch's (out, in) layout.
    """
    if x.ndim <= 1:
        return x.norm()
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.ndim - 1)))


@torch.no_grad()
def adaptive_clip_(params: list[torch.Tensor], clip: float, eps: float = 1e-3) -> None:
    """Adaptive gradient clipping (Brock et al. 2021, sec. 4.1), in place.

    Each unit's gradient G_i is rescaled so that ``|G_i| / max(|W_i|, eps) <= clip``; units already under
    the bound are untouched. ``eps`` (the paper's 1e-3) keeps zero-initialised weights, such as LoRA's B
    matrices at step 0, from freezing: their gradients are bounded by ``clip * eps`` instead of 0.
    """
    for p in params:
        if p.grad is None:
            continue
        max_norm = unitwise_norm(p.detach()).clamp(min=eps) * clip
        g_norm = unitwise_norm(p.grad)
        scale = torch.where(g_norm > max_norm, max_norm / g_norm.clamp(min=1e-6), torch.ones_like(g_norm))
        p.grad.mul_(scale.to(p.grad.dtype))


def clip_gradients(params: list[torch.Tensor], cfg: OptimConfig, accelerator) -> torch.Tensor:
    """Clips gradients as configured and returns their global norm before any clipping.

    Order: global norm (``max_grad_norm``), then AGC (``agc_clip``), then value (``clip_value``). Each
    only shrinks gradients, so every bound that is set holds at the end.
    """
    if cfg.max_grad_norm is not None:
        norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)  # unscales fp16 gradients first
    else:
        accelerator.unscale_gradients()  # a no-op except under fp16 loss scaling
        norms = [p.grad.norm() for p in params if p.grad is not None]  # none: every layer was dropped
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    if cfg.agc_clip is not None:
        adaptive_clip_(params, cfg.agc_clip)
    if cfg.clip_value is not None:
        torch.nn.utils.clip_grad_value_(params, cfg.clip_value)
    return norm
