"""LoRA through peft, with target presets that know DeepSeek's module names.

Presets are computed from the model's own module tree rather than a hard-coded name list, so MLA
projections (q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj) are found on V2/V3 and the usual
q/k/v/o on Llama and Qwen2. Routed experts in transformers 5 are fused 3-D parameters, not
``nn.Linear``, so no preset touches them: the printed summary shows them frozen.
"""

from __future__ import annotations

import peft
import torch.nn as nn

from dstune.config import RunConfig

PRESETS = ("attention", "mlp", "all-linear")


def _linear_names(model: nn.Module) -> list[str]:
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def resolve_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Turns a preset or a list of module names into the full names of the Linear modules to adapt.

    Args:
        model: the base model.
        targets: "attention", "mlp", "all-linear", or names; a name matches a module whose full name
            equals it or ends with ``.name`` (peft's rule).

    Raises:
        ValueError: naming the targets that matched nothing and the leaf names that exist.
    """
    linears = _linear_names(model)
    if isinstance(targets, str):
        if targets == "attention":
            chosen = [n for n in linears if ".self_attn." in n]
        elif targets == "mlp":
            chosen = [n for n in linears if ".mlp." in n]
        elif targets == "all-linear":
            chosen = linears
        else:
            targets = [t.strip() for t in targets.split(",") if t.strip()]
            return resolve_targets(model, targets)
    else:
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linears)]
        if missing:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(f"lora.targets: {missing} match no Linear module; presets: {list(PRESETS)}; "
                             f"module names in this model: {leaves}")
        chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]
    if not chosen:
        raise ValueError(f"lora.targets={targets!r} matched no Linear module in this model")
    return chosen


def prepare_lora(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Wraps the target modules with LoRA adapters (peft); the base weights are frozen.

    Raises:
        ValueError: when peft adapted other modules than the ones asked for (see ``_check_targets``).
    """
    lc = cfg.lora
    targets = resolve_targets(model, lc.targets)
    config = peft.LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets,
                             task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(model, config)
    _check_targets(wrapped, targets)
    return wrapped


def _check_targets(wrapped: peft.PeftModel, requested: list[str]) -> None:
    """Refuses a silent change of targets.

    peft 0.21 on transformers 5 rewrites any target ending in ``gate_proj``/``up_proj``/``down_proj`` of a
    DeepSeek-V2/V3 model into LoRA on the fused routed experts (its v4-to-v5 checkpoint conversion,
    peft/utils/transformers_weight_conversion.py), so the dense MLP and shared experts would be skipped
    and the experts trained instead. The same rewrite runs again in ``PeftModel.from_pretrained``, so no
    workaround here would keep the adapter loadable by plain peft: we stop and say so.
    """
    tuner = wrapped.base_model
    got = set(getattr(tuner, "targeted_module_names", []))
    skipped = [t for t in requested if t not in got]
    extra = sorted(set(getattr(tuner, "targeted_parameter_names", [])))
    if skipped or extra:
        raise ValueError(
            f"lora.targets: peft {peft.__version__} did not adapt {skipped[:4]}{'...' if len(skipped) > 4 else ''}"
            + (f" and adapted the fused expert parameters {extra[:2]} instead" if extra else "")
            + ". On DeepSeek-V2/V3 with transformers 5, peft rewrites MLP targets (gate_proj/up_proj/down_proj) "
              "to the routed experts; use lora.targets=attention, or name attention modules explicitly.")
