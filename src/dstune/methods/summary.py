"""Say what is trained: trainable and frozen parameter counts per kind of module."""

from __future__ import annotations

from collections import defaultdict

import torch.nn as nn

from dstune.models.inspect import param_kind

KIND_ORDER = ["embeddings", "attention", "dense_mlp", "shared_experts", "experts", "router", "norm",
              "head", "adapter", "other"]


def _is_adapter(name: str) -> bool:
    return any(tag in name for tag in ("lora_", "adapter", "prompt_encoder", "prefix"))


def trainable_summary(model: nn.Module) -> dict[str, dict[str, int]]:
    """Counts trainable and frozen parameters per kind ("attention", "experts", ...).

    Adapter weights (LoRA A/B) are counted under "adapter" so that the base modules' kinds show the
    frozen base weights. Tied parameters are counted once.
    """
    seen: set[int] = set()
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"trainable": 0, "frozen": 0})
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        kind = "adapter" if _is_adapter(name) else param_kind(name)
        counts[kind]["trainable" if p.requires_grad else "frozen"] += p.numel()
    return {k: counts[k] for k in KIND_ORDER + sorted(set(counts) - set(KIND_ORDER)) if k in counts}


def render_summary(summary: dict[str, dict[str, int]], is_moe: bool) -> str:
    """A small text table; on MoE models it says in words whether routed experts are trained."""
    total_t = sum(v["trainable"] for v in summary.values())
    total = sum(v["trainable"] + v["frozen"] for v in summary.values())
    lines = [f"{'module kind':<16}{'trainable':>14}{'frozen':>14}"]
    for kind, v in summary.items():
        lines.append(f"{kind:<16}{v['trainable']:>14,}{v['frozen']:>14,}")
    lines.append(f"{'total':<16}{total_t:>14,}{total - total_t:>14,}   "
                 f"({100.0 * total_t / max(total, 1):.3f}% trainable)")
    if is_moe:
        ex = summary.get("experts", {"trainable": 0, "frozen": 0})
        state = "TRAINED" if ex["trainable"] else "FROZEN"
        lines.append(f"routed experts: {state} ({ex['trainable']:,} trainable, {ex['frozen']:,} frozen)")
    return "\n".join(lines)
