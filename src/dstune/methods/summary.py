"""Say what is trained: trainable and frozen parameter counts per kind of module."""

from __future__ import annotations

from collections import defaultdict

import torch.nn as nn

from dstune.core.facts import numel
from dstune.models.inspect import param_kind

KIND_ORDER = [
    "embeddings",
    "attention",
    "dense_mlp",
    "shared_experts",
    "experts",
    "router",
    "norm",
    "head",
    "adapter",
    "other",
]


def _is_adapter(name: str) -> bool:
    return any(tag in name for tag in ("lora_", ".adapter.", "prompt_encoder", "prefix", "ia3_l"))


def trainable_summary(model: nn.Module) -> dict[str, dict]:
    """Counts trainable and frozen parameters per kind ("attention", "experts", ...).

    Adapter weights (LoRA A/B, bottleneck adapters, prompts, IA3 vectors) are counted under "adapter"
    so that the base modules' kinds show the frozen base weights; ``summary["adapter"]["on"]`` splits
    the trainable adapter parameters by the kind of module they adapt (LoRA on the fused experts shows
    as ``{"experts": N}``; prompts and prefixes as ``other``). Tied parameters are counted once.
    """
    seen: set[int] = set()
    counts: dict[str, dict] = defaultdict(lambda: {"trainable": 0, "frozen": 0})
    adapted: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        kind = "adapter" if _is_adapter(name) else param_kind(name)
        counts[kind]["trainable" if p.requires_grad else "frozen"] += numel(p)
        if kind == "adapter" and p.requires_grad:
            adapted[param_kind(name)] += numel(p)
    if "adapter" in counts:
        counts["adapter"]["on"] = dict(adapted)
    return {k: counts[k] for k in KIND_ORDER + sorted(set(counts) - set(KIND_ORDER)) if k in counts}


def render_summary(summary: dict[str, dict[str, int]], is_moe: bool) -> str:
    """A small text table; on MoE models it says in words whether routed experts are trained."""
    total_t = sum(v["trainable"] for v in summary.values())
    total = sum(v["trainable"] + v["frozen"] for v in summary.values())
    lines = [f"{'module kind':<16}{'trainable':>14}{'frozen':>14}"]
    for kind, v in summary.items():
        lines.append(f"{kind:<16}{v['trainable']:>14,}{v['frozen']:>14,}")
    lines.append(
        f"{'total':<16}{total_t:>14,}{total - total_t:>14,}   "
        f"({100.0 * total_t / max(total, 1):.3f}% trainable)"
    )
    on = summary.get("adapter", {}).get("on", {})
    if on:
        lines.append(
            "adapter parameters by adapted module: "
            + ", ".join(
                f"{k} {v:,}"
                for k, v in sorted(
                    on.items(), key=lambda kv: KIND_ORDER.index(kv[0]) if kv[0] in KIND_ORDER else 99
                )
            )
        )
    if is_moe:
        for kind, label in (("experts", "routed experts"), ("shared_experts", "shared experts")):
            ex = summary.get(kind, {"trainable": 0, "frozen": 0})
            if not ex["trainable"] + ex["frozen"]:
                continue
            if ex["trainable"]:
                state = f"TRAINED ({ex['trainable']:,} trainable, {ex['frozen']:,} frozen)"
            elif on.get(kind):
                state = f"ADAPTED (base {ex['frozen']:,} frozen, {on[kind]:,} adapter parameters train)"
            else:
                state = f"FROZEN ({ex['frozen']:,} frozen, no adapter)"
            lines.append(f"{label}: {state}")
    return "\n".join(lines)
