"""QLoRA: the frozen base weights in 4-bit NF4 with double quantisation (or 8-bit), LoRA on top.

Follows Dettmers et al. 2023 (QLoRA, sec. 3): NF4 for normally distributed weights, the per-block scales
quantised too, LoRA adapters in 16/32-bit on the de-quantised weights. bitsandbytes (>= 0.45, which has a
CPU backend) does the quantisation and the matmuls, so the same code runs on a CPU (slowly) and on CUDA.
Only ``nn.Linear`` layers are quantised (bitsandbytes has no 3-D kernel); what stays in higher precision is
reported before training: embeddings and output head (as in QLoRA), norms, MoE routers, V2/V3's fused routed
experts, any Linear LoRA reaches through ``target_parameters`` (methods/lora.py), and ``qlora.keep``.
The model is loaded in full precision and quantised in place, so peak host memory while loading is the fp32
model's; the device only ever holds the quantised weights.
Paper figures and why those layers are kept: docs/benchmarks.md, 'qlora.py'.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from rich.console import Console

from dstune.config import QloraConfig, RunConfig
from dstune.errors import MissingExtra
from dstune.methods.lora import is_plain_linear, lora_config
from dstune.methods.peft_model import CausalLM, SequenceClassifier, wrap
from dstune.models.classify import is_classifier
from dstune.models.inspect import param_kind

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def import_bitsandbytes():
    """Imports bitsandbytes, or explains how to install it.

    Raises:
        MissingExtra: naming the extra (``pip install 'dstune[qlora]'``).
    """
    try:
        import bitsandbytes
    except ImportError:
        raise MissingExtra(
            "method=qlora needs bitsandbytes, which is not installed: pip install 'dstune[qlora]' "
            "(bitsandbytes >= 0.45 runs on CPU and CUDA), or use method=lora"
        ) from None
    return bitsandbytes


@dataclass
class QuantReport:
    """Which Linear layers were quantised, and which parameters stayed in higher precision and why."""

    bits: int
    quantized: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # module or parameter group -> reason

    def render(self) -> str:
        """One paragraph for the console."""
        kind = "8-bit (LLM.int8)" if self.bits == 8 else "4-bit"
        lines = [f"qlora: {len(self.quantized)} Linear layers quantised to {kind}; kept in higher precision:"]
        lines += [f"  {name}: {why}" for name, why in self.kept.items()]
        return "\n".join(lines)


def compute_dtype(qc: QloraConfig) -> torch.dtype:
    """``qlora.compute_dtype``; auto is bf16 on CUDA (QLoRA's choice) and fp32 on a CPU."""
    if qc.compute_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return _DTYPES[qc.compute_dtype]


def _quantized_linear(linear: nn.Linear, qc: QloraConfig) -> nn.Module:
    bnb = import_bitsandbytes()
    weight = linear.weight.data.to(torch.float32)
    bias = linear.bias is not None
    if qc.bits == 8:
        new = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False, threshold=6.0
        )
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=bias,
            compute_dtype=compute_dtype(qc),
            quant_type=qc.quant_type,
            compress_statistics=qc.double_quant,
        )
        new.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, quant_type=qc.quant_type, compress_statistics=qc.double_quant
        )
        # bitsandbytes 0.50's CPU inference shortcut (Linear4bit.forward, eval mode without grad on an
        # AVX512-BF16 CPU) repacks the weight for a bf16 kernel: it rounds the block scales to bf16, so
        # evaluation logits drift ~1e-2 from the training ones, and it asserts out_features % 32 == 0,
        # which MLA's kv_a_proj_with_mqa (kv_lora_rank + rope dims) need not satisfy. Keep the exact path.
        new.support_avx512bf16_for_cpu = False
    if bias:
        new.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    # Moving to the device is what quantises in bitsandbytes (Params4bit/Int8Params.to).
    return new.to(linear.weight.device)


def quantize_(model: nn.Module, qc: QloraConfig, keep: dict[str, str] | None = None) -> QuantReport:
    """Replaces the model's Linear layers by bitsandbytes 4-bit or 8-bit layers, in place.

    Deterministic: quantising the same weights again gives the same layers, which is how a QLoRA run is
    reloaded (fp32 base, quantised again, adapter on top).

    Args:
        model: a transformers model in fp32.
        qc: the ``qlora`` section.
        keep: module names to leave unquantised, with the reason.
    """
    report = QuantReport(qc.bits, kept={})
    head, classifier = model.get_output_embeddings(), is_classifier(model)
    keep = dict(keep or {})
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if not is_plain_linear(module):
            report.kept[name] = f"{type(module).__name__} is not a plain matmul"
        elif module is head:
            report.kept[name] = "output head"
        elif leaf == "score" and classifier:
            report.kept[name] = "classification head (new, trained whole)"
        elif name in keep:
            report.kept[name] = keep[name]
        elif any(name == k or name.endswith("." + k) for k in qc.keep):
            report.kept[name] = "qlora.keep"
        elif param_kind(name + ".weight") == "router" or leaf == "gate":
            report.kept[name] = "MoE router"
        elif qc.bits == 8 and leaf == "kv_b_proj":
            # MLA calls kv_b_proj on a 4-D latent [batch, 1, seq, kv_lora_rank]; bitsandbytes 0.50's int8
            # inference path (int8_vectorwise_quant) assumes at most 3-D input and fails on it.
            report.kept[name] = "MLA kv_b_proj takes 4-D input, which bitsandbytes int8 inference mishandles"
        else:
            model.set_submodule(name, _quantized_linear(module, qc))
            report.quantized.append(name)
    linear_params = {
        f"{n}.{p}"
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
        for p, _ in m.named_parameters(recurse=False)
    }
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        if name in linear_params or type(p).__name__ in ("Params4bit", "Int8Params"):
            continue
        kind = param_kind(name)
        label = {"experts": "fused routed experts (3-D, bitsandbytes quantises nn.Linear only)"}.get(
            kind, f"{kind} (not nn.Linear)"
        )
        groups[label] = groups.get(label, 0) + p.numel()
    for label, n in groups.items():
        report.kept[label] = f"{n:,} parameters"
    setattr(model, "is_loaded_in_4bit" if qc.bits == 4 else "is_loaded_in_8bit", True)  # peft's bnb dispatch
    return report


def prepare_qlora(
    model: nn.Module, cfg: RunConfig, console: Console | None = None
) -> CausalLM | SequenceClassifier:
    """Quantises the frozen base (``qlora.*``) and wraps it with LoRA (``lora.*``).

    Raises:
        MissingExtra: when bitsandbytes is missing, naming the extra to install.
        ValueError: when a ``lora`` setting cannot apply (see methods/lora.py).
    """
    import_bitsandbytes()
    config = lora_config(model, cfg)  # resolved on the fp32 model, before any layer changes type
    config.target_modules = sorted(config.target_modules or []) or None  # a copy: peft shortens it in place
    by_param = {
        p[: -len(".weight")]: "LoRA through target_parameters needs a plain weight"
        for p in (config.target_parameters or [])
        if p.endswith(".weight")
    }
    report = quantize_(model, cfg.qlora, by_param)
    for p in model.parameters():
        p.requires_grad_(False)
    (console or Console()).print(report.render(), markup=False, highlight=False, soft_wrap=True)
    wrapped = wrap(model, config)
    wrapped.quant_report = report
    return wrapped


def dequantize_(model: nn.Module) -> int:
    """Turns every bitsandbytes layer back into an fp32 ``nn.Linear`` holding the de-quantised weight.

    Used before merging a QLoRA run: the adapter was trained against the de-quantised weights, so merging
    into them (in fp32) reproduces the trained model.

    Returns:
        The number of layers converted.
    """
    from peft.utils.integrations import dequantize_bnb_weight

    n = 0
    for name, module in list(model.named_modules()):
        weight = getattr(module, "weight", None)
        if type(weight).__name__ not in ("Params4bit", "Int8Params"):
            continue
        state = getattr(module, "state", None)
        dense = dequantize_bnb_weight(weight, state=state).to(torch.float32)
        linear = nn.Linear(dense.shape[1], dense.shape[0], bias=module.bias is not None, device=dense.device)
        linear.weight = nn.Parameter(dense, requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.data.to(torch.float32), requires_grad=False)
        model.set_submodule(name, linear)
        n += 1
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    return n
