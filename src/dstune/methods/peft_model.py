"""peft's causal-LM wrapper, with the three fixes DeepSeek models and dstune's loop need.

Every peft method (LoRA and variants, QLoRA, IA3, prefix, P-tuning, prompt tuning) is wrapped in ``CausalLM``
(a ``peft.PeftModelForCausalLM``), saved in peft's ``adapter_config.json`` + ``adapter_model.safetensors``.
1. Logits line up with the input: the ``num_virtual_tokens`` positions prompt tuning and P-tuning prepend are
   dropped, since the loop and the evaluator compare logits with labels position by position.
2. Prefix tuning on MLA (V2/V3), where peft's per-head prefix fails, is learned in the latent the model caches
   (``kv_lora_rank + qk_rope_head_dim`` per layer and virtual token, passing through ``kv_b_proj`` like real
   tokens); saved as PREFIX_TUNING that plain peft loads but cannot run: use ``dstune.methods.load_trained``.
3. PiSSA / OLoRA adapters are saved as plain LoRA on the original base weights (loadable on the bare base).
Why MLA breaks peft's prefix, the saved format and the sizes: docs/benchmarks.md, 'peft_model.py'.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

import peft
import torch
from peft.utils import PeftType
from transformers import DynamicCache

from dstune.errors import UsageError

# MLA families whose cache holds (kv_nope latent, rotary key); V3.2 also has a sparse-attention indexer
# with its own key cache, which a learned prefix cannot fill (see methods/prompt.py).
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


@functools.cache
def _renamed_cache() -> bool:
    """True when the model's forward takes the KV cache as ``cache`` (transformers >= 5.24)."""
    import inspect

    from transformers.generation.utils import GenerationMixin

    return "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters


def is_mla(config) -> bool:
    """True for DeepSeek-V2/V3 attention, whose cache holds the compressed KV latent."""
    return (
        getattr(config, "model_type", "") in MLA_MODEL_TYPES
        and getattr(config, "kv_lora_rank", None) is not None
    )


def mla_prefix_width(config) -> int:
    """Numbers per layer and virtual token of an MLA prefix: the KV latent plus the rotary key."""
    return config.kv_lora_rank + config.qk_rope_head_dim


class _DeepSeekFixes:
    """Fixes 2 and 3 of the module doc, shared by the causal-LM and the sequence-classification wrappers."""

    def __init__(self, model, peft_config, adapter_name: str = "default", **kwargs):
        super().__init__(model, peft_config, adapter_name, **kwargs)
        self._initial_adapter_dir: str | None = None

    # ------------------------------------------------------------------ 2. MLA prefix
    def add_adapter(self, adapter_name, peft_config, *args, **kwargs):
        mla_prefix = peft_config.peft_type == PeftType.PREFIX_TUNING and is_mla(self.base_model.config)
        wanted = (peft_config.token_dim, peft_config.num_attention_heads) if mla_prefix else None
        super().add_adapter(adapter_name, peft_config, *args, **kwargs)
        if mla_prefix and (peft_config.token_dim, peft_config.num_attention_heads) != wanted:
            # peft resizes a prefix to (num_key_value_heads x head_dim) whenever the model config has
            # num_key_value_heads (peft/utils/other.py, _prepare_prompt_learning_config, for GQA); MLA's
            # cache is not per head, so restore the latent shape and rebuild the encoder.
            peft_config.token_dim, peft_config.num_attention_heads = wanted
            self._setup_prompt_encoder(adapter_name)

    def get_prompt(self, batch_size: int, task_ids=None, max_cache_len=None):
        cfg = self.active_peft_config
        base_config = self.get_base_model().config
        if cfg.peft_type != PeftType.PREFIX_TUNING or not is_mla(base_config):
            return super().get_prompt(batch_size, task_ids, max_cache_len)
        encoder = self.prompt_encoder[self.active_adapter]
        weight = encoder.embedding.weight
        tokens = self.prompt_tokens[self.active_adapter][: cfg.num_virtual_tokens]
        tokens = tokens.unsqueeze(0).expand(batch_size, -1).to(weight.device)
        # Same as peft: in inference mode the saved prefix is the embedding itself (any projection was
        # folded in when saving).
        latent = weight.repeat(batch_size, 1, 1) if cfg.inference_mode else encoder(tokens)
        if self.base_model_torch_dtype is not None:
            latent = latent.to(self.base_model_torch_dtype)
        latent = latent.view(batch_size, cfg.num_virtual_tokens, cfg.num_layers, -1)
        rank, rope = base_config.kv_lora_rank, base_config.qk_rope_head_dim
        cache = DynamicCache(config=base_config)
        for layer in range(cfg.num_layers):
            per_layer = latent[:, :, layer]  # [batch, virtual tokens, rank + rope (+1 padding if odd)]
            # Single-head 4-D tensors, the shapes DeepseekV3Attention writes into the cache itself.
            cache.update(
                per_layer[..., :rank].unsqueeze(1), per_layer[..., rank : rank + rope].unsqueeze(1), layer
            )
        return cache

    # ------------------------------------------------------------------ 3. PiSSA / OLoRA export
    def keep_initial_adapter(self) -> None:
        """Saves the adapter as initialised (PiSSA/OLoRA), so later saves convert to plain LoRA."""
        init_dir = tempfile.mkdtemp(prefix="dstune-initial-adapter-")
        cfg = self.peft_config["default"]
        mode = cfg.init_lora_weights
        cfg.init_lora_weights = True  # peft's documented recipe (docs: "PiSSA", "convert to LoRA")
        super().save_pretrained(init_dir, safe_serialization=True)
        cfg.init_lora_weights = mode
        self._initial_adapter_dir = init_dir

    def save_pretrained(self, save_directory, **kwargs):
        """peft's save; a PiSSA/OLoRA adapter is written as plain LoRA (rank 2r) on the original base."""
        if self._initial_adapter_dir and "path_initial_model_for_weight_conversion" not in kwargs:
            # peft rewrites the config in this directory, so convert from a copy and keep ours pristine.
            work = Path(tempfile.mkdtemp(prefix="dstune-convert-"))
            try:
                shutil.copytree(self._initial_adapter_dir, work, dirs_exist_ok=True)
                kwargs["path_initial_model_for_weight_conversion"] = str(work)
                return super().save_pretrained(save_directory, **kwargs)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return super().save_pretrained(save_directory, **kwargs)


class CausalLM(_DeepSeekFixes, peft.PeftModelForCausalLM):
    """``peft.PeftModelForCausalLM`` with aligned logits, MLA prefix tuning, PiSSA export (module doc) and
    prefix generation on transformers that renamed the generation cache (``_renamed_cache``)."""

    def __init__(self, model, peft_config, adapter_name: str = "default", **kwargs):
        super().__init__(model, peft_config, adapter_name, **kwargs)
        base_prepare = self.base_model_prepare_inputs_for_generation

        def prepare_with_old_name(*args, **kw):
            inputs = base_prepare(*args, **kw)
            if "cache" in inputs and "past_key_values" not in inputs:
                inputs["past_key_values"] = inputs.pop("cache")
            return inputs

        self.base_model_prepare_inputs_for_generation = prepare_with_old_name

    def prepare_inputs_for_generation(self, *args, **kwargs):
        # 4. The generation cache was renamed. transformers 5.24 passes the KV cache to the model as
        # ``cache`` (``past_key_values`` is a deprecated alias until 5.40); peft 0.21 looks for
        # ``past_key_values`` to decide when to insert the learned prefix, finds none, and adds the prefix
        # under the old name next to the new one, which the model then ignores: generate() answered like
        # the base model. The base model's inputs are renamed to the old name for peft (above) and back here.
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        if "past_key_values" in inputs and _renamed_cache():
            inputs["cache"] = inputs.pop("past_key_values")
        return inputs

    # ------------------------------------------------------------------ 1. aligned logits
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        out = super().forward(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
        )
        cfg = self.active_peft_config
        if (
            cfg.peft_type in (PeftType.PROMPT_TUNING, PeftType.P_TUNING)
            and getattr(out, "logits", None) is not None
        ):
            n = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            if out.logits.shape[1] == n + cfg.num_virtual_tokens:
                out.logits = out.logits[:, -n:]
        return out


class SequenceClassifier(_DeepSeekFixes, peft.PeftModelForSequenceClassification):
    """``peft.PeftModelForSequenceClassification`` (``task: classification``), with MLA prefix and PiSSA
    export.

    peft adds the head (``score``) to ``modules_to_save``, so it trains beside the adapter and is saved in
    ``adapter_model.safetensors``. Prefix tuning is re-routed: peft looks for a ``past_key_values``
    argument in the model's forward signature, which transformers 5 renamed ``cache`` (it still
    accepts the old name), and would refuse ("Model does not support past key values").
    """

    def _prefix_tuning_forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        batch_size = input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]
        return self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            labels=labels,
            past_key_values=self.get_prompt(batch_size),
            **kwargs,
        )


def wrap(model: torch.nn.Module, config: peft.PeftConfig) -> CausalLM | SequenceClassifier:
    """Wraps a transformers model with a peft method, as ``peft.get_peft_model`` does.

    Args:
        model: the base model (modified in place, as peft does); a model with a classification head
            (``models.classify``) gets peft's sequence-classification wrapper, so the head trains too.
        config: any peft config; its ``task_type`` is set from the model.
    """
    from dstune.models.classify import is_classifier

    config.base_model_name_or_path = model.__dict__.get("name_or_path") or None
    if is_classifier(model):
        config.task_type = "SEQ_CLS"
        return SequenceClassifier(model, config)
    return CausalLM(model, config)


def load(base: torch.nn.Module, adapter_dir: str | Path) -> CausalLM:
    """Loads a peft adapter saved by dstune (any peft method, MLA prefix included) for inference.

    Args:
        base: the base model it was trained on, freshly loaded (QLoRA: quantised the same way).
        adapter_dir: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.

    Raises:
        ValueError: when the adapter's weights do not fit the model, naming the keys.
    """
    config = peft.PeftConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = True
    model = SequenceClassifier(base, config) if config.task_type == "SEQ_CLS" else CausalLM(base, config)
    weights = peft.utils.load_peft_weights(str(adapter_dir), device="cpu")
    result = peft.set_peft_model_state_dict(model, weights)
    # peft loads a prompt's embedding itself and lists it among unexpected keys; adapter weights must fit.
    unexpected = [
        k
        for k in getattr(result, "unexpected_keys", [])
        if "lora_" in k or "ia3_" in k or "modules_to_save" in k
    ]
    if unexpected:
        raise UsageError(f"{adapter_dir}: adapter weights {unexpected[:4]} do not fit this base model")
    model.eval()
    return model
