"""Prompt-based methods through peft: prefix tuning, P-tuning, prompt tuning; and IA3.

- ``prefix`` (Li & Liang 2021): learned keys and values in front of every layer's attention; on MLA
  (DeepSeek-V2/V3) learned in the compressed KV latent the model caches (methods/peft_model.py).
- ``ptuning`` (Liu et al. 2021, "GPT Understands, Too"): virtual-token embeddings from a small prompt
  encoder (MLP or LSTM), prepended to the input.
- ``prompt`` (Lester et al. 2021): the virtual-token embeddings themselves, optionally initialised from a
  text's embeddings (``prompt.init_text``), which the paper found beats random init (sec. 3.2).
- ``ia3`` (Liu et al. 2022, "Few-Shot PEFT is Better and Cheaper"): learned vectors rescaling the keys,
  values and the MLP's inner activations.
Prompt-based methods cannot be merged into the weights; IA3 can.
"""

from __future__ import annotations

import peft
import torch.nn as nn

from dstune.config import RunConfig
from dstune.errors import UsageError
from dstune.methods.lora import is_plain_linear
from dstune.methods.peft_model import CausalLM, is_mla, mla_prefix_width, wrap
from dstune.models.inspect import param_kind

# Families whose forward pass cannot take a learned prompt, and why (checked with transformers 5.23).
_NO_VIRTUAL_TOKENS = {
    "deepseek_v4": "DeepSeek-V4's hash-routed MoE layers pick experts by token id (tid2eid[input_ids]), and "
    "virtual tokens have no id",
}
_NO_PREFIX = {
    "deepseek_v32": "DeepSeek-V3.2's sparse attention selects keys with an indexer that keeps its own key "
    "cache "
    "and gets no gradient from the LM loss, so a learned prefix has no index keys and would be "
    "dropped or picked at random by the top-k selection",
    "deepseek_v4": "DeepSeek-V4's compressed attention caches compressor state "
    "(store_compression_weights) that "
    "a learned key/value prefix cannot provide",
}


def _refuse(cfg: RunConfig, model: nn.Module, table: dict[str, str]) -> None:
    model_type = getattr(model.config, "model_type", "")
    if model_type in table:
        raise UsageError(
            f"method={cfg.method} does not work on {model_type}: {table[model_type]}. "
            f"Use method=lora or method=adapter on this family."
        )


def prepare_prefix(model: nn.Module, cfg: RunConfig) -> CausalLM:
    """Prefix tuning with ``prompt.virtual_tokens`` learned key/value positions in every layer."""
    _refuse(cfg, model, _NO_PREFIX)
    pc, c = cfg.prompt, model.config
    kwargs = {}
    if is_mla(c):
        # One "head" whose key and value slots together hold the latent (kv_lora_rank + rope dims, rounded
        # up to even); CausalLM.get_prompt splits it back (methods/peft_model.py).
        kwargs = {"num_attention_heads": 1, "token_dim": (mla_prefix_width(c) + 1) // 2}
    config = peft.PrefixTuningConfig(
        num_virtual_tokens=pc.virtual_tokens,
        prefix_projection=pc.prefix_projection,
        encoder_hidden_size=pc.encoder_hidden_size or c.hidden_size,
        task_type="CAUSAL_LM",
        **kwargs,
    )
    return wrap(model, config)


def prepare_ptuning(model: nn.Module, cfg: RunConfig) -> CausalLM:
    """P-tuning: ``prompt.virtual_tokens`` embeddings from a prompt encoder (``prompt.encoder``)."""
    _refuse(cfg, model, _NO_VIRTUAL_TOKENS)
    pc = cfg.prompt
    config = peft.PromptEncoderConfig(
        num_virtual_tokens=pc.virtual_tokens,
        task_type="CAUSAL_LM",
        encoder_reparameterization_type="MLP" if pc.encoder == "mlp" else "LSTM",
        encoder_hidden_size=pc.encoder_hidden_size or model.config.hidden_size,
    )
    return wrap(model, config)


def prepare_prompt(model: nn.Module, cfg: RunConfig) -> CausalLM:
    """Prompt tuning: ``prompt.virtual_tokens`` embeddings, from ``prompt.init_text`` when given."""
    _refuse(cfg, model, _NO_VIRTUAL_TOKENS)
    pc = cfg.prompt
    kwargs = {}
    if pc.init_text:
        path = getattr(model, "name_or_path", None)
        if not path:
            raise UsageError(
                "prompt.init_text needs the base model's tokenizer, but the model has no name_or_path"
            )
        kwargs = {
            "prompt_tuning_init": "TEXT",
            "prompt_tuning_init_text": pc.init_text,
            "tokenizer_name_or_path": path,
        }
    config = peft.PromptTuningConfig(num_virtual_tokens=pc.virtual_tokens, task_type="CAUSAL_LM", **kwargs)
    return wrap(model, config)


def ia3_targets(model: nn.Module, targets: str | list[str]) -> tuple[list[str], list[str]]:
    """IA3's target modules and the feed-forward subset (whose input, not output, is rescaled).

    ``default`` follows the paper: keys, values and the MLP's inner activation (the input of
    ``down_proj``). On MLA, keys and values come out of ``kv_b_proj`` together, so that is the target.
    Fused routed experts are not ``nn.Linear`` and stay untouched (peft's IA3 has no parameter targets).
    """
    head = model.get_output_embeddings()
    linears = [n for n, m in model.named_modules() if is_plain_linear(m) and m is not head]
    if targets == "default":
        kv = ("k_proj", "v_proj", "kv_b_proj", "kv_proj")
        chosen = [
            n
            for n in linears
            if ".self_attn." in n
            and n.rsplit(".", 1)[-1] in kv
            and ".indexer." not in n
            and ".compressor." not in n
        ]
        chosen += [n for n in linears if n.endswith("down_proj") and param_kind(n + ".weight") != "experts"]
    else:
        names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
        missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in linears)]
        if missing:
            raise UsageError(
                f"ia3.targets: {missing} match no Linear module; use 'default' or names from "
                f"{sorted({n.rsplit('.', 1)[-1] for n in linears})}"
            )
        chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in names)]
    if not chosen:
        raise UsageError(f"ia3.targets={targets!r} matched no Linear module of {type(model).__name__}")
    return chosen, [n for n in chosen if n.endswith("down_proj")]


def prepare_ia3(model: nn.Module, cfg: RunConfig) -> CausalLM:
    """IA3: learned rescaling vectors on ``ia3.targets``."""
    modules, feedforward = ia3_targets(model, cfg.ia3.targets)
    config = peft.IA3Config(target_modules=modules, feedforward_modules=feedforward, task_type="CAUSAL_LM")
    return wrap(model, config)
