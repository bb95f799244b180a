"""Hugging Face weights and config to llama.cpp's GGUF names, shapes and keys, and back.

Names, layouts and metadata keys follow llama.cpp's converter (convert_hf_to_gguf.py, now split into
conversion/llama.py, qwen.py and deepseek.py: LlamaModel, Qwen2Model, DeepseekV2Model), with the
tensor names of the ``gguf`` package's TensorNameMap. Three transforms differ from a rename:

- llama: q/k rows are permuted for llama.cpp's rope (``LlamaModel.permute``); qwen2 is not permuted.
- deepseek2: ``kv_b_proj`` is split into ``attn_k_b`` (per head, transposed) and ``attn_v_b``, the layout
  llama.cpp's MLA absorption reads; routed experts are 3-D ``ffn_{gate,up,down}_exps``.
- deepseek2: the router's ``e_score_correction_bias`` (V3) becomes ``exp_probs_b.bias``.

``to_hf`` inverts each transform so a file can be read back into the transformers model (the
deepseek2 check in the tests and docs/benchmarks.md, which transformers' own GGUF loader cannot read).
"""

from __future__ import annotations

import math
from typing import Iterator

import gguf
import numpy as np
import torch

# llama.cpp architecture names to the gguf package's enum.
ARCHS = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "deepseek2": gguf.MODEL_ARCH.DEEPSEEK2,
}


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp conversion/llama.py LlamaModel.permute: rows of each head reordered from HF's
    # half-split rope layout to llama.cpp's interleaved one. transformers' GGUF loader undoes it.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_freqs(config) -> torch.Tensor | None:
    """llama3 rope scaling as a ``rope_freqs`` tensor (conversion/llama.py generate_extra_tensors)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "")) != "llama3":
        return None
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = (
        rope.get("factor", 8.0),
        rope.get("low_freq_factor", 1.0),
        rope.get("high_freq_factor", 4.0),
    )
    old = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def write_metadata(writer: gguf.GGUFWriter, arch: str, config, family: str) -> None:
    """Writes the model's hyperparameters under llama.cpp's keys (TextModel.set_gguf_parameters and
    each architecture's own additions)."""
    c = config
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_head_count(c.num_attention_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    rope = getattr(c, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))))
    if arch != "deepseek2":
        writer.add_head_count_kv(c.num_key_value_heads)
        if arch == "llama":
            writer.add_rope_dimension_count(
                getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
            )
        if rope.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope["factor"])
        return
    _write_deepseek2_metadata(writer, c, family, rope)


def _write_deepseek2_metadata(writer: gguf.GGUFWriter, c, family: str, rope: dict) -> None:
    # conversion/deepseek.py DeepseekV2Model.set_gguf_parameters: MLA is stored as MQA (one kv head)
    # whose key is the compressed latent plus the rope part; llama.cpp decompresses it per head.
    writer.add_head_count_kv(1)
    writer.add_leading_dense_block_count(c.first_k_dense_replace)
    if c.q_lora_rank is not None:
        writer.add_q_lora_rank(c.q_lora_rank)
    writer.add_kv_lora_rank(c.kv_lora_rank)
    writer.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
    writer.add_value_length(c.kv_lora_rank)
    writer.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)
    writer.add_value_length_mla(c.v_head_dim)
    writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    writer.add_expert_count(c.n_routed_experts)
    writer.add_expert_used_count(c.num_experts_per_tok)
    writer.add_expert_shared_count(c.n_shared_experts)
    writer.add_expert_weights_scale(float(c.routed_scaling_factor))
    if getattr(c, "norm_topk_prob", False):
        writer.add_expert_weights_norm(True)
    # V3 routes with sigmoid scores (plus a correction bias), V2 with softmax (DeepSeek-V3 report 2.1.2).
    sigmoid = family == "deepseek-v3"
    writer.add_expert_gating_func(
        gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX
    )
    if getattr(c, "n_group", None):
        writer.add_expert_group_count(c.n_group)
        writer.add_expert_group_used_count(c.topk_group)
    writer.add_rope_dimension_count(c.qk_rope_head_dim)
    if rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if rope.get("mscale_all_dim") is not None:  # [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX] in llama.cpp
            writer.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])


def _name(tmap: gguf.TensorNameMap, hf_name: str) -> str:
    gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if gname is None:
        raise KeyError(f"no GGUF name for tensor {hf_name}")
    return gname


def to_gguf(model: torch.nn.Module, arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields ``(gguf_name, fp32 tensor)`` for every weight, transformed as llama.cpp's converter does."""
    c = model.config
    tmap = gguf.get_tensor_name_map(ARCHS[arch], c.num_hidden_layers)
    if arch == "llama" and (freqs := _rope_freqs(c)) is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freqs
    for name, w in model.state_dict().items():
        w = w.detach().to(torch.float32)
        if name == "lm_head.weight" and getattr(c, "tie_word_embeddings", False):
            continue  # llama.cpp reads token_embd for a tied output layer
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _permute(w, c.num_attention_heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _permute(w, c.num_key_value_heads)
        elif name.endswith("kv_b_proj.weight"):
            # conversion/deepseek.py: "MLA with the absorption optimization, needs these two split and
            # k_b_proj transposed" (k_b: [heads, kv_lora_rank, qk_nope], v_b: [heads, v_head, kv_lora_rank]).
            kv_b = w.view(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, w.shape[-1])
            k_b, v_b = torch.split(kv_b, [c.qk_nope_head_dim, c.v_head_dim], dim=1)
            yield _name(tmap, name.replace("kv_b_proj", "k_b_proj")), k_b.transpose(1, 2).contiguous()
            yield _name(tmap, name.replace("kv_b_proj", "v_b_proj")), v_b.contiguous()
            continue
        elif name.endswith("mlp.experts.gate_up_proj"):
            # transformers 5 fuses gate and up per expert ([E, 2I, H], gate first); llama.cpp stacks each.
            gate, up = w.chunk(2, dim=1)
            yield _name(tmap, name.replace("gate_up_proj", "gate_proj.weight")), gate.contiguous()
            yield _name(tmap, name.replace("gate_up_proj", "up_proj.weight")), up.contiguous()
            continue
        elif name.endswith("mlp.experts.down_proj"):
            name += ".weight"
        elif name.endswith("e_score_correction_bias"):
            name = name.replace("e_score_correction_bias", "e_score_correction.bias")  # as llama.cpp does
        yield _name(tmap, name), w


def to_hf(tensors: dict[str, np.ndarray], model: torch.nn.Module, arch: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_gguf`: a state dict for ``model`` from de-quantised GGUF tensors.

    Args:
        tensors: GGUF name -> fp32 array in the torch shape (as :func:`to_gguf` yielded it).
        model: a model of the same config; its state dict names the tensors to fill.
        arch: the llama.cpp architecture.
    """
    c = model.config
    tmap = gguf.get_tensor_name_map(ARCHS[arch], c.num_hidden_layers)
    out: dict[str, torch.Tensor] = {}
    for name in model.state_dict():
        get = lambda hf: torch.from_numpy(np.ascontiguousarray(tensors[_name(tmap, hf)]))  # noqa: E731
        if name == "lm_head.weight" and getattr(c, "tie_word_embeddings", False):
            w = get("model.embed_tokens.weight")
        elif name.endswith("kv_b_proj.weight"):
            k_b = get(name.replace("kv_b_proj", "k_b_proj")).transpose(1, 2)
            v_b = get(name.replace("kv_b_proj", "v_b_proj"))
            w = torch.cat([k_b, v_b], dim=1).reshape(-1, c.kv_lora_rank)
        elif name.endswith("mlp.experts.gate_up_proj"):
            w = torch.cat(
                [get(name.replace("gate_up_proj", p)) for p in ("gate_proj.weight", "up_proj.weight")], 1
            )
        elif name.endswith("mlp.experts.down_proj"):
            w = get(name + ".weight")
        elif name.endswith("e_score_correction_bias"):
            w = get(name.replace("e_score_correction_bias", "e_score_correction.bias"))
        else:
            w = get(name)
            if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
                w = _unpermute(w, c.num_attention_heads)
            elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
                w = _unpermute(w, c.num_key_value_heads)
        out[name] = w
    return out
