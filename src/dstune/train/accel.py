"""Faster kernels where the machine has them: attention, liger-kernel, torch.compile, MoE experts.

Each choice is a pure function of the request, the device and what is installed (``plan_*``), so the CPU
test suite checks the gating even though the kernels themselves need a GPU; ``apply_*`` then changes the
model. None of these changes the maths beyond float rounding: the fused kernels compute the same RMSNorm,
RoPE, SwiGLU and cross-entropy, and the experts implementations the same sum over the routed experts.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch

from dstune.errors import DstuneError

# liger-kernel patches these transformers model types in place (apply_liger_kernel_to_llama / _qwen2).
# DeepSeek-LLM and the R1-Distill-Llama models are `llama`, R1-Distill-Qwen is `qwen2`. liger has no
# patch for transformers' DeepSeek V2/V3 classes (MLA attention, fused 3-D experts); there only the fused
# linear cross-entropy applies, because dstune computes the loss itself from the final hidden states.
LIGER_FAMILIES = {"llama": "apply_liger_kernel_to_llama", "qwen2": "apply_liger_kernel_to_qwen2"}


class KernelError(DstuneError, RuntimeError):
    """A kernel the config asks for (``train.liger=on``) cannot be used here; the message says why."""


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def plan_attention(
    requested: str,
    device_type: str,
    precision: str,
    supports_flash: bool,
    flash_installed: bool | None = None,
) -> str | None:
    """The attention implementation to set, or None to keep transformers' choice (SDPA where supported).

    ``auto`` picks flash_attention_2 on CUDA in bf16/fp16 when the ``flash_attn`` package is installed and
    the architecture supports it (flash attention has no fp32 kernels); packed rows then run as
    variable-length sequences from their position ids.
    """
    if requested != "auto":
        return requested
    flash_installed = _installed("flash_attn") if flash_installed is None else flash_installed
    if device_type == "cuda" and precision in ("bf16", "fp16") and supports_flash and flash_installed:
        return "flash_attention_2"
    return None


def apply_attention(model, requested: str, device_type: str, precision: str) -> str:
    """Sets the attention implementation on a freshly loaded model; returns the one in use."""
    choice = plan_attention(
        requested, device_type, precision, bool(getattr(model, "_supports_flash_attn", False))
    )
    if choice and choice != model.config._attn_implementation:
        model.set_attn_implementation(choice)
    return model.config._attn_implementation


@dataclass
class LigerPlan:
    """What liger-kernel does in a run: patches on the model and/or the fused linear cross-entropy."""

    patch: str | None = None  # name of liger's patch function for the model type
    fused_ce: bool = False
    why_not: str | None = None  # when nothing applies under ``auto``
    kernels: list[str] = field(default_factory=list)


def plan_liger(mode: str, model_type: str, cuda: bool, installed: bool | None = None) -> LigerPlan:
    """Decides what liger-kernel applies.

    Args:
        mode: ``auto`` (use it when CUDA and liger_kernel are present), ``on`` (require it), ``off``.
        model_type: ``model.config.model_type``.
        cuda: whether training runs on a CUDA device.
        installed: whether liger_kernel is importable (default: look).

    Raises:
        KernelError: ``on`` without CUDA or without liger_kernel, naming the fix.
    """
    if mode == "off":
        return LigerPlan(why_not="train.liger=off")
    installed = _installed("liger_kernel") if installed is None else installed
    missing = [] if cuda else ["a CUDA device (liger's kernels are Triton GPU kernels)"]
    if not installed:
        missing.append("the liger-kernel package (pip install 'dstune[liger]')")
    if missing:
        if mode == "on":
            raise KernelError(f"train.liger=on needs {' and '.join(missing)}; set train.liger=auto or off")
        return LigerPlan(why_not="needs " + " and ".join(missing))
    patch = LIGER_FAMILIES.get(model_type)
    kernels = (["rms_norm", "rope", "swiglu"] if patch else []) + ["fused_linear_cross_entropy"]
    return LigerPlan(patch=patch, fused_ce=True, kernels=kernels)


def apply_liger(model, plan: LigerPlan, strict: bool = False) -> LigerPlan:
    """Patches the (not yet adapter-wrapped) model's RMSNorm, RoPE and SwiGLU MLP with liger's kernels.

    liger's own fused-linear-cross-entropy forward is not installed: dstune computes the loss from the
    final hidden states itself (``train.forward``), normalised over the whole accumulation window, and
    calls liger's ``LigerFusedLinearCrossEntropyLoss`` there (``fused_ce_loss``).

    Args:
        model: the loaded model, before adapters wrap it.
        plan: from ``plan_liger``.
        strict: raise when liger fails to import or patch (``train.liger=on``); otherwise fall back to
            plain kernels and say why in the returned plan.

    Returns:
        The plan that applies (empty after a tolerated failure).
    """
    if not plan.fused_ce:
        return plan
    try:
        import liger_kernel.transformers as lk

        fused_ce_loss()  # fails here, not at the first step, when this liger lacks the loss
        if plan.patch is not None:
            getattr(lk, plan.patch)(
                rope=True,
                rms_norm=True,
                swiglu=True,
                cross_entropy=False,
                fused_linear_cross_entropy=False,
                model=model,
            )
    except Exception as exc:  # an incompatible liger/transformers pair: plain kernels still train
        if strict:
            raise KernelError(f"train.liger=on: liger-kernel could not be applied: {exc}") from exc
        return LigerPlan(why_not=f"liger-kernel failed: {type(exc).__name__}: {exc}")
    return plan


def fused_ce_loss(label_smoothing: float = 0.0):
    """liger's fused linear cross-entropy as ``f(head_weight, hidden, target, bias) -> summed loss``."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(
        ignore_index=-100, label_smoothing=label_smoothing, reduction="sum"
    )


def compile_layers(model, enabled: bool) -> int:
    """``torch.compile`` each decoder layer in place (``Module.compile``); returns how many.

    Per layer rather than the whole model: the layers are identical, so one compiled graph serves all of
    them, the loss code and adapters outside the layers stay eager, and parameter names (checkpoints, the
    peft adapter) are unchanged, which ``torch.compile(model)`` would prefix with ``_orig_mod``.
    ``dynamic=True`` because micro-batches change shape from step to step.
    """
    if not enabled:
        return 0
    from dstune.train.regularize import decoder_layers

    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def plan_experts(requested: str, is_moe: bool) -> str | None:
    """The MoE experts implementation to set, or None to keep transformers' choice.

    transformers 5.24 runs fused experts (DeepSeek V2/V3/V3.2/V4) through ``config._experts_implementation``:
    ``eager`` is a Python loop over the experts hit, ``batched_mm`` gathers each token's expert weights
    and runs one batched matmul, ``grouped_mm`` sorts tokens by expert and runs ``torch._grouped_mm``
    (transformers' default where it can dispatch, else eager). Measured in ``benchmarks/bench_moe.py``.
    """
    if requested == "auto" or not is_moe:
        return None
    return requested


def apply_experts(model, requested: str) -> str | None:
    """Sets the experts implementation of an MoE model; returns the one in use (None for dense models)."""
    is_moe = hasattr(model.config, "_experts_implementation") and bool(
        getattr(model.config, "n_routed_experts", None)
        or getattr(model.config, "num_experts", None)
        or getattr(model.config, "num_local_experts", None)
    )
    choice = plan_experts(requested, is_moe)
    if choice and choice != model.config._experts_implementation:
        model.set_experts_implementation(choice)
    return model.config._experts_implementation if is_moe else None


def describe(
    device: torch.device, attention: str, liger: LigerPlan, compiled: int, experts: str | None
) -> dict:
    """The speed settings in use, for the console and the run summary."""
    return {
        "device": device.type,
        "attention": attention,
        "liger": liger.kernels or f"off ({liger.why_not})",
        "compiled_layers": compiled,
        **({"experts_implementation": experts} if experts else {}),
    }
