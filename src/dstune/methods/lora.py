"""LoRA through peft: target presets that know DeepSeek's module names, the variants (DoRA, rsLoRA,
PiSSA/OLoRA initialisation, per-module rank and alpha) and LoRA on MoE experts.

Presets come from the model's module tree (MLA's q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj on V2/V3;
q/k/v/o on Llama, Qwen2): ``attention`` is every Linear in ``self_attn``; ``mlp`` the dense MLPs (dense first
layers on MoE models); ``all-linear`` both, plus any other Linear but the output head and the experts. Experts
(routed, shared) are the explicit ``lora.experts``: V2/V3's routed experts are fused 3-D parameters, adapted
with peft's ``target_parameters`` (one LoRA per expert, ``ParamWrapper``: no dropout, no DoRA; refused).
Invariant: the adapter trains exactly what was asked and plain peft reloads it unchanged, so V2/V3's dense
MLP and shared-expert Linears are targeted by weight parameter (``...mlp.gate_proj.weight``): peft 0.21 on
transformers 5 rewrites such module targets into the routed experts. Details: docs/benchmarks.md, 'lora.py'.
"""

from __future__ import annotations

import re

import peft
import torch.nn as nn

from dstune.config import RunConfig
from dstune.core.facts import full_shape, layer_index
from dstune.errors import UsageError
from dstune.methods.freeze import first_top_layer
from dstune.methods.lora_fast import make_lean
from dstune.methods.peft_model import CausalLM, wrap
from dstune.models.inspect import param_kind

PRESETS = ("attention", "mlp", "all-linear")
_INIT = {
    "default": True,
    "gaussian": "gaussian",
    "pissa": "pissa",
    "pissa_fast": "pissa_niter_16",
    "olora": "olora",
}
_EXPERT_KINDS = {
    "none": set(),
    "shared": {"shared_experts"},
    "routed": {"experts"},
    "all": {"shared_experts", "experts"},
}


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` that computes ``x @ W.T + b``. Subclasses with their own forward are left out:
    DeepSeek-V4's ``DeepseekV4GroupedLinear`` (self_attn.o_a_proj) applies its weight per head group,
    so a dense LoRA/IA3 update or a bitsandbytes layer in its place would compute something else."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _linear_names(model: nn.Module) -> list[str]:
    head = model.get_output_embeddings()
    # A classification head (``score``) is trained whole (peft's modules_to_save), never given a LoRA.
    return [
        n
        for n, m in model.named_modules()
        if is_plain_linear(m) and m is not head and n.rsplit(".", 1)[-1] != "score"
    ]


def _kind(module_name: str) -> str:
    return param_kind(module_name + ".weight")


def resolve_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Turns a preset or a list of module names into the full names of the Linear modules to adapt.

    Args:
        model: the base model.
        targets: "attention", "mlp", "all-linear", or names; a name matches a module whose full name
            equals it or ends with ``.name`` (peft's rule). Presets leave experts out (``lora.experts``).

    Raises:
        ValueError: naming the targets that matched nothing and the leaf names that exist.
    """
    linears = _linear_names(model)
    if isinstance(targets, str):
        if targets == "attention":
            chosen = [n for n in linears if ".self_attn." in n]
        elif targets == "mlp":
            chosen = [n for n in linears if _kind(n) == "dense_mlp"]
        elif targets == "all-linear":
            chosen = [n for n in linears if _kind(n) not in ("experts", "shared_experts")]
        else:
            targets = [t.strip() for t in targets.split(",") if t.strip()]
            return resolve_targets(model, targets)
    else:
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linears)]
        if missing:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise UsageError(
                f"lora.targets: {missing} match no Linear module; presets: {list(PRESETS)}; "
                f"module names in this model: {leaves}"
            )
        chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]
    if not chosen:
        raise UsageError(
            f"lora.targets={targets!r} matched no Linear module in this model (presets: {list(PRESETS)}; "
            f"MoE experts are chosen with lora.experts)"
        )
    return chosen


def expert_targets(model: nn.Module, experts: str) -> tuple[list[str], list[str]]:
    """The expert Linear modules and fused expert parameters that ``lora.experts`` selects.

    Returns:
        ``(module_names, parameter_names)``: Linear experts (shared experts, or unfused routed experts)
        and fused 3-D expert parameters.

    Raises:
        ValueError: when experts are asked for on a model that has none of that kind.
    """
    kinds = _EXPERT_KINDS[experts]
    if not kinds:
        return [], []
    modules = [n for n in _linear_names(model) if _kind(n) in kinds]
    params = [n for n, p in model.named_parameters() if len(full_shape(p)) == 3 and param_kind(n) in kinds]
    if not modules and not params:
        raise UsageError(
            f"lora.experts={experts}: {type(model).__name__} has no "
            f"{' or '.join(sorted(kinds)).replace('_', ' ')}; use lora.experts=none"
        )
    return modules, params


def _rewritten_leaves(model: nn.Module) -> set[str]:
    """Module leaf names that peft's v4-to-v5 MoE conversion would remap on this model (module doc)."""
    try:  # private tables; if peft moves them, fall back to what peft 0.21 does for DeepSeek
        from peft.utils.transformers_weight_conversion import (
            _MODEL_TO_CONVERSION_PATTERN,
            _MOE_TARGET_MODULE_MAPPING,
        )
    except ImportError:
        moe_types = {"deepseek_v2", "deepseek_v3", "deepseek_v32"}
        return (
            {"gate_proj", "up_proj", "down_proj", "gate"} if model.config.model_type in moe_types else set()
        )
    base = _MODEL_TO_CONVERSION_PATTERN.get(getattr(model.config, "model_type", None))
    return set(_MOE_TARGET_MODULE_MAPPING.get(base, {}))


def _patterns(patterns: dict, as_params: bool) -> dict:
    if not as_params:
        return dict(patterns)
    # A Linear targeted by its weight is matched as "<module>.weight" (peft's get_pattern_key is
    # re.match(rf"(.*\.)?({key})$")), so each pattern also gets a ".weight" twin.
    out = dict(patterns)
    out.update({rf"(?:{k})\.weight": v for k, v in patterns.items() if not k.endswith("weight")})
    return out


def lora_config(model: nn.Module, cfg: RunConfig) -> peft.LoraConfig:
    """The peft LoraConfig for ``cfg.lora`` on ``model`` (targets resolved, traps avoided).

    Raises:
        ValueError: naming the ``lora.*`` key to change when a combination cannot work.
    """
    lc = cfg.lora
    modules = resolve_targets(model, lc.targets)
    expert_modules, params = expert_targets(model, lc.experts)
    modules = list(dict.fromkeys(modules + expert_modules))
    if lc.top_layers is not None:
        # With no adapter below them, autograd stops the backward pass at the lowest adapted layer.
        first = first_top_layer(model, lc.top_layers, "lora.top_layers", 1)
        modules, params = (
            [n for n in names if (i := layer_index(n)) is not None and i >= first]
            for names in (modules, params)
        )
    rewritten = _rewritten_leaves(model)
    as_params = [n for n in modules if n.rsplit(".", 1)[-1] in rewritten]
    modules = [n for n in modules if n not in as_params]
    params = params + [f"{n}.weight" for n in as_params]
    if params:
        blocked = {
            "lora.use_dora=true": lc.use_dora,
            f"lora.dropout={lc.dropout}": lc.dropout > 0,
            f"lora.init={lc.init}": lc.init in ("pissa", "pissa_fast", "olora"),
        }
        bad = [k for k, v in blocked.items() if v]
        if bad:
            where = sorted(
                {p.rsplit(".", 2)[-2] if p.endswith(".weight") else p.rsplit(".", 1)[-1] for p in params}
            )
            raise UsageError(
                f"{', '.join(bad)} cannot apply to {where}: on {model.config.model_type} these are adapted "
                f"through "
                f"peft target_parameters (fused experts, or MLP layers peft would otherwise rewrite to the "
                f"experts), which support neither DoRA, dropout nor PiSSA/OLoRA init (peft "
                f"{peft.__version__}, lora.ParamWrapper). Set lora.experts=none and lora.targets=attention, "
                f"or drop {', '.join(k.split('=')[0] for k in bad)}."
            )
    for key in (*lc.rank_pattern, *lc.alpha_pattern):
        names = modules + [p[: -len(".weight")] if p.endswith(".weight") else p for p in params]
        if not any(re.match(rf"(.*\.)?({key})$", n) for n in names):
            raise UsageError(
                f"lora.rank_pattern/alpha_pattern key {key!r} matches none of the adapted modules "
                f"(leaf names: {sorted({n.rsplit('.', 1)[-1] for n in names})})"
            )
    return peft.LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=modules or None,
        target_parameters=params or None,
        use_dora=lc.use_dora,
        use_rslora=lc.use_rslora,
        init_lora_weights=_INIT[lc.init],
        rank_pattern=_patterns(lc.rank_pattern, bool(as_params)),
        alpha_pattern=_patterns(lc.alpha_pattern, bool(as_params)),
        task_type="CAUSAL_LM",
    )


def prepare_lora(model: nn.Module, cfg: RunConfig) -> CausalLM:
    """Wraps the target modules (and experts, if asked) with LoRA adapters; the base weights are frozen.

    Raises:
        ValueError: when a setting cannot apply, or peft adapted other modules than the ones asked for.
    """
    config = lora_config(model, cfg)
    # Copied before wrapping: peft shortens long target lists to unique suffixes in place.
    modules, params = sorted(config.target_modules or []), sorted(config.target_parameters or [])
    wrapped = wrap(model, config)
    _check_targets(wrapped, modules, params)
    make_lean(wrapped)  # fewer passes over the activations, same maths (lora_fast.py)
    if cfg.lora.init in ("pissa", "pissa_fast", "olora"):
        wrapped.keep_initial_adapter()
    return wrapped


def _check_targets(wrapped: peft.PeftModel, modules: list[str], params: list[str]) -> None:
    """Refuses a silent change of targets (a safety net for the rewrite described in the module doc)."""
    tuner = wrapped.base_model
    got_modules = set(getattr(tuner, "targeted_module_names", []))
    got_params = set(getattr(tuner, "targeted_parameter_names", []))
    skipped = [t for t in modules if t not in got_modules] + [p for p in params if p not in got_params]
    extra = sorted(got_params - set(params))
    if skipped or extra:
        raise UsageError(
            f"lora.targets: peft {peft.__version__} did not adapt "
            f"{skipped[:4]}{'...' if len(skipped) > 4 else ''}"
            + (f" and adapted {extra[:2]} instead" if extra else "")
            + ". On DeepSeek-V2/V3 with transformers 5, peft rewrites MLP targets "
            "(gate_proj/up_proj/down_proj) "
            "to the routed experts; use lora.targets=attention, or name attention modules explicitly."
        )
