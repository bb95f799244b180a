"""Architecture facts: what each parameter is, how many there are, and how many a token uses.

Reports are built from the config alone, on PyTorch's meta device (shapes without storage), so the
671B DeepSeek-V3 is counted in well under a second and nothing is downloaded or allocated.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from dstune.core.facts import layer_index
from dstune.models.load import family_of, load_config_only

KINDS = (
    "attention",
    "dense_mlp",
    "experts",
    "shared_experts",
    "router",
    "embeddings",
    "head",
    "norm",
    "other",
)

# peft wraps a module and adds parameters under these names, each followed by the adapter name
# ("...q_proj.lora_A.default.weight"); the adapter name is dropped so it cannot be mistaken for a module.
_PEFT_WITH_ADAPTER = {
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    "modules_to_save",
    "ia3_l",
}
_PEFT_WRAPPERS = {"base_layer", "original_module"}
_HEAD = {"lm_head", "score"}
_EMBEDDINGS = {"embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embeddings"}
_ATTENTION = {"self_attn", "attention", "attn", "self_attention"}
_SHARED = {"shared_experts", "shared_expert", "shared_expert_gate"}
_ROUTER = {"gate", "router"}
_MLP = {"mlp", "feed_forward", "ffn", "block_sparse_moe"}


def _components(name: str) -> list[str]:
    parts, skip = [], False
    for part in name.split("."):
        if skip:
            skip = False
        elif part in _PEFT_WITH_ADAPTER:
            skip = True
        elif part not in _PEFT_WRAPPERS:
            parts.append(part)
    return parts


def param_kind(name: str, config: PretrainedConfig | None = None) -> str:
    """Says what a parameter is, from its name.

    Works on the names of Llama, Qwen2 and DeepSeek V2/V3/V3.2/V4 in transformers 5, and on the same
    names wrapped by peft (``base_model.model.``, ``.base_layer``, ``.lora_A.<adapter>``), where a LoRA
    matrix counts as the kind of the module it adapts.

    Args:
        name: a name from ``model.named_parameters()``.
        config: accepted so callers can pass it; the names alone decide for the supported families.

    Returns:
        One of ``KINDS``: ``attention`` (including MLA's low-rank projections and their norms),
        ``dense_mlp``, ``experts`` (routed, stored fused as 3-D tensors in V2/V3), ``shared_experts``,
        ``router``, ``embeddings``, ``head``, ``norm`` or ``other`` (e.g. a prompt encoder, V4's
        hyper-connection mixers).
    """
    del config  # part of the signature for callers; not needed by the supported families
    parts = _components(name)
    found = set(parts)
    if "prompt_encoder" in found:  # prefix/prompt tuning's own parameters belong to no base module
        return "other"
    if found & _HEAD:
        return "head"
    if found & _EMBEDDINGS:
        return "embeddings"
    if found & _ATTENTION:
        return "attention"
    if found & _SHARED:
        return "shared_experts"
    if "experts" in found:
        return "experts"
    if found & _ROUTER:
        return "router"
    if found & _MLP:
        return "dense_mlp"
    if any(p == "norm" or p.endswith(("norm", "layernorm")) or p.startswith("ln_") for p in parts):
        return "norm"
    return "other"


def count_params_by_kind(model: torch.nn.Module, *, trainable: bool | None = None) -> dict[str, int]:
    """Counts parameters per kind; tied weights are counted once.

    Args:
        model: any model, peft-wrapped or not, on any device (meta included).
        trainable: None counts every parameter, True only those that require grad, False only frozen ones.

    Returns:
        A count for every kind in ``KINDS`` order, zeros included.
    """
    counts = dict.fromkeys(KINDS, 0)
    for name, param in model.named_parameters():
        if trainable is None or param.requires_grad == trainable:
            counts[param_kind(name)] += param.numel()
    return counts


def _first(config: PretrainedConfig, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _attention_facts(config: PretrainedConfig) -> dict[str, Any]:
    heads = config.num_attention_heads
    kv_heads = _first(config, "num_key_value_heads") or heads
    facts: dict[str, Any] = {"heads": heads, "kv_heads": kv_heads}
    if getattr(config, "kv_lora_rank", None):
        # MLA: keys and queries are nope + rope wide, values v_head_dim wide (DeepSeek-V2 paper, sec. 2.1).
        facts["kind"] = "MLA"
        for key in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            facts[key] = getattr(config, key, None)
        facts["qk_head_dim"] = config.qk_nope_head_dim + config.qk_rope_head_dim
    else:
        facts["kind"] = "MHA" if kv_heads == heads else "MQA" if kv_heads == 1 else "GQA"
        facts["head_dim"] = _first(config, "head_dim") or config.hidden_size // heads
        for key in ("q_lora_rank", "o_lora_rank", "qk_rope_head_dim", "sliding_window"):
            if getattr(config, key, None):
                facts[key] = getattr(config, key)
    if getattr(config, "index_topk", None):  # DeepSeek sparse attention: a lightning indexer picks top-k keys
        facts["index_topk"] = config.index_topk
    layer_types = getattr(config, "layer_types", None)
    if layer_types and len(set(layer_types)) > 1:
        facts["layer_types"] = {t: layer_types.count(t) for t in dict.fromkeys(layer_types)}
    return facts


def architecture_report(
    config: PretrainedConfig, *, name: str | None = None, trust_remote_code: bool = False
) -> dict[str, Any]:
    """Describes an architecture and counts its parameters, without allocating any weights.

    Active parameters are those one token's forward pass multiplies with: every parameter except the
    routed experts it is not sent to (experts count as ``num_experts_per_tok / n_routed_experts`` of
    their total) and the input embedding table, of which a token reads one row. This is the convention
    of DeepSeek's published figures (V3: 37B, V2-Lite: 2.4B); with tied embeddings the table is also
    the output layer and is counted.

    Args:
        config: a transformers config (see :func:`dstune.models.load.load_config_only`).
        name: the spec or hub id it came from, used to name the family.
        trust_remote_code: needed for configs whose model class lives in the checkpoint repo.

    Returns:
        A dict with model_type, architecture, family, layers, sizes, ``attention`` and ``moe`` facts,
        ``total_params``, ``active_params`` and ``params_by_kind``.
    """
    config = copy.deepcopy(config)  # building a model writes to its config (attention implementation)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    by_kind = dict.fromkeys(KINDS, 0)
    experts_per_layer: dict[int, int] = defaultdict(int)
    for pname, param in model.named_parameters():
        kind = param_kind(pname)
        by_kind[kind] += param.numel()
        index = layer_index(pname)
        if kind == "experts" and index is not None:
            experts_per_layer[index] += param.numel()
    total = sum(by_kind.values())
    layers = config.num_hidden_layers

    moe = None
    active: int | None = total
    if by_kind["experts"]:
        routed = _first(config, "n_routed_experts", "num_local_experts", "num_experts")
        per_token = _first(config, "num_experts_per_tok")
        moe = {
            "routed_experts": routed,
            "shared_experts": _first(config, "n_shared_experts") or 0,
            "experts_per_token": per_token,
            "moe_intermediate_size": _first(config, "moe_intermediate_size"),
            "first_k_dense_replace": _first(config, "first_k_dense_replace"),
            "moe_layer_freq": _first(config, "moe_layer_freq"),
            "dense_layers": [i for i in range(layers) if i not in experts_per_layer],
            "moe_layers": sorted(experts_per_layer),
        }
        active = None
        if routed and per_token:
            active = round(total - by_kind["experts"] + by_kind["experts"] * per_token / routed)
    if active is not None and not getattr(config, "tie_word_embeddings", False):
        active -= by_kind["embeddings"]

    return {
        "name": name,
        "family": family_of(config, name or ""),
        "model_type": config.model_type,
        "architecture": type(model).__name__,
        "layers": layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": None if moe and not moe["dense_layers"] else _first(config, "intermediate_size"),
        "vocab_size": config.vocab_size,
        "max_position_embeddings": _first(config, "max_position_embeddings"),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "attention": _attention_facts(config),
        "moe": moe,
        "total_params": total,
        "active_params": active,
        "params_by_kind": by_kind,
        "storage": _storage(config),
    }


def _storage(config) -> str | None:
    """How the checkpoint stores its weights when not in the config's dtype: DeepSeek-V3/R1/V3.2 ship FP8."""
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    if quant.get("quant_method") == "fp8":
        block = quant.get("weight_block_size")
        blocks = f", {block[0]}x{block[1]} blocks with a scale each" if block else ""
        return (
            f"FP8 ({quant.get('fmt', 'e4m3')}{blocks}); de-quantised on load, except on GPUs "
            "with FP8 support (compute capability 8.9+), where transformers keeps them in FP8"
        )
    return f"quantised ({quant.get('quant_method', '?')})"


def inspect_model(spec: str) -> dict[str, Any]:
    """The architecture report of a spec (release name, hub id, local dir, GGUF or tiny:<family>)."""
    return architecture_report(load_config_only(spec), name=spec)


# --------------------------------------------------------------------------- rendering


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _ranges(indices: list[int]) -> str:
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def render_report(report: dict[str, Any]) -> str:
    """Formats an architecture report as an aligned plain-text table."""
    att, moe = report["attention"], report["moe"]
    title = report["name"] or report["model_type"]
    rows: list[tuple[str, str]] = []
    if moe:
        dense = f"{len(moe['dense_layers'])} dense" + (
            f": {_ranges(moe['dense_layers'])}" if moe["dense_layers"] else ""
        )
        layers = f"{report['layers']} ({dense}; {len(moe['moe_layers'])} MoE: {_ranges(moe['moe_layers'])})"
    else:
        layers = str(report["layers"])
    rows += [
        ("layers", layers),
        ("hidden size", str(report["hidden_size"])),
        ("vocabulary", f"{report['vocab_size']:,}"),
        (
            "context",
            f"{report['max_position_embeddings']:,} positions" if report["max_position_embeddings"] else "?",
        ),
        (
            "embeddings",
            "tied to the output layer" if report["tie_word_embeddings"] else "separate output layer",
        ),
    ]
    if report.get("storage"):
        rows.append(("weights", report["storage"]))
    heads = (
        f"{att['kind']}, {att['heads']} heads, {att['kv_heads']} kv head{'s' if att['kv_heads'] != 1 else ''}"
    )
    rows.append(("attention", heads))
    if att["kind"] == "MLA":
        q = f"q_lora_rank {att['q_lora_rank']}" if att["q_lora_rank"] else "no q compression"
        rows.append(("", f"{q}, kv_lora_rank {att['kv_lora_rank']}"))
        rows.append(
            (
                "",
                f"qk head dim {att['qk_head_dim']} ({att['qk_nope_head_dim']} nope + "
                f"{att['qk_rope_head_dim']} rope), v head dim {att['v_head_dim']}",
            )
        )
    else:
        extra = [f"head dim {att['head_dim']}"] + [
            f"{k} {att[k]}" for k in ("q_lora_rank", "o_lora_rank", "sliding_window") if k in att
        ]
        rows.append(("", ", ".join(extra)))
    if "index_topk" in att:
        rows.append(("", f"sparse attention: indexer keeps the top {att['index_topk']} keys"))
    if "layer_types" in att:
        rows.append(("", ", ".join(f"{n} x {t}" for t, n in att["layer_types"].items())))
    if report["intermediate_size"]:
        rows.append(("dense MLP", f"intermediate {report['intermediate_size']}"))
    if moe:
        rows.append(
            (
                "experts",
                f"{moe['routed_experts']} routed ({moe['experts_per_token']} per token) + "
                f"{moe['shared_experts']} shared, intermediate {moe['moe_intermediate_size']}",
            )
        )
    total, active = report["total_params"], report["active_params"]
    rows.append(("parameters", f"{_human(total)} total ({total:,})"))
    if moe and active is not None:  # a dense model's figure would only differ by the embedding table
        rows.append(("", f"{_human(active)} active per token"))
        left_out = "routed experts not chosen" + (
            "" if report["tie_word_embeddings"] else ", input embeddings"
        )
        rows.append(("", f"  ({left_out} left out)"))
    rows.append(("by kind", ""))
    for kind, count in report["params_by_kind"].items():
        if count:
            rows.append((f"  {kind}", f"{_human(count):>8}  {100 * count / total:5.1f}%"))
    width = max(len(label) for label, _ in rows) + 2
    head = f"{title}  ({report['family']}, {report['architecture']})"
    return "\n".join([head] + [f"  {label:<{width}}{value}".rstrip() for label, value in rows])
