"""Sequence-classification models: the decoder with a ``[num_classes, hidden]`` head instead of the LM head.

The head (``score``, no bias) reads the hidden state of the last non-padding token, as transformers'
``GenericForSequenceClassification`` does for Llama, Qwen2 and DeepSeek-V2/V3. Transformers 5.24 has no such
class for DeepSeek-V3.2 and V4, so the generic class is put on their base model here, as transformers would.
Invariant: classification batches are padded on the left (``train.batching``), so the last position is always
a real token, also where pooling cannot see token ids (prompt/P-tuning pass ``inputs_embeds``); RoPE depends
only on distances, so the shift does not change a row's result (tested to float tolerance).
``classify.pooling: mean`` reads the mean over the real tokens instead (``_MeanPooling``), which helps small
data sets; it is saved in the model config (``classifier_pooling``) and in the run's config.
Measured figures: docs/benchmarks.md, 'classify.py'.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig
from transformers.modeling_layers import GenericForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutputWithPast
from transformers.utils import logging as hf_logging

from dstune.core.heads import check_heads
from dstune.errors import UsageError
from dstune.rundir import RunDir

LABELS_FILE = RunDir.LABELS
POOLINGS = ("last", "mean")
_HEAD = "score."  # the head's parameter names in GenericForSequenceClassification
# model_type -> (module, prefix of the PreTrainedModel class) for architectures without a transformers head.
_WRAPPED = {
    "deepseek_v32": ("transformers.models.deepseek_v32.modeling_deepseek_v32", "DeepseekV32"),
    "deepseek_v4": ("transformers.models.deepseek_v4.modeling_deepseek_v4", "DeepseekV4"),
}


def is_classifier(model: nn.Module) -> bool:
    """Whether ``model``, or the model a peft/adapter wrapper holds, ends in a classification head."""
    return any(isinstance(m, GenericForSequenceClassification) for m in model.modules())


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The classification head's parameters (``score``; under peft both its frozen original and the trainable
    copy in ``modules_to_save``), or none when ``model`` is not a classifier. ``get_output_embeddings()``
    is None on a sequence classifier, so code that finds the head through it needs this."""
    return [
        p
        for m in model.modules()
        if isinstance(m, GenericForSequenceClassification)
        for p in m.score.parameters()
    ]


def _wrapper_class(model_type: str) -> type:
    import importlib

    module, prefix = _WRAPPED[model_type]
    base = getattr(importlib.import_module(module), f"{prefix}PreTrainedModel")
    return type(f"{prefix}ForSequenceClassification", (GenericForSequenceClassification, base), {})


def mean_of_real_tokens(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(batch, seq, hidden)`` -> ``(batch, hidden)``: the mean over the positions where ``mask`` is 1."""
    mask = mask.to(hidden.dtype)
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


class _MeanPooling:
    """Mixin over a ``GenericForSequenceClassification`` class: the head reads the mean hidden state of the
    real tokens (``attention_mask`` 1) instead of the last one. transformers has no such option, so its
    forward is rewritten here, after the one it replaces (decoder, head, ``self.loss_function``)."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        kwargs.pop("return_dict", None)  # the decoder's output object is needed here
        out = getattr(self, self.base_model_prefix)(
            input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
        )
        hidden = out.last_hidden_state
        if attention_mask is None:
            mask = hidden.new_ones(hidden.shape[:2])
        else:  # prefix tuning's mask also covers its virtual tokens, which are not in ``hidden``; prompt
            # tuning's virtual tokens are in both and enter the mean (the same states for every input)
            mask = attention_mask[:, -hidden.shape[1] :]
        # the head is linear without bias: this is also the mean of the per-token logits
        logits = self.score(mean_of_real_tokens(hidden, mask))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )


@functools.cache
def _mean_pooled(cls: type) -> type:
    # Same class name, so a saved config.json names the architecture transformers knows.
    return type(cls.__name__, (_MeanPooling, cls), {"__module__": cls.__module__})


def _classifier_config(path: str, labels: list[str], pad_id: int, **kwargs) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(path, **kwargs)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    # The head pools the last token that is not pad_token_id; without one, batches > 1 fail.
    config.pad_token_id = pad_id
    config.problem_type = "single_label_classification"
    return config


def load_classifier(
    path: str,
    labels: list[str],
    pad_id: int,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    pooling: str | None = None,
    heads: dict[str, list[int]] | None = None,
) -> nn.Module:
    """Loads a model directory as a classifier over ``labels``.

    The decoder weights come from ``path``; the head is new (initialised from the torch seed) unless
    ``path`` is a classifier saved by a full or freeze run, whose head is loaded.

    Args:
        path: a model directory with safetensors weights (``models.load.resolve_model_dir``).
        labels: class names; class i is ``labels[i]``.
        pad_id: the padding token id of the batches.
        pooling: ``last`` (transformers' way) or ``mean`` (see ``_MeanPooling``); None: what a saved
            classifier's config says (``classifier_pooling``), else ``last``.
        heads: one head per task, ``{task: [start, end]}`` over ``labels`` (``core.heads``); None: what a
            saved classifier's config says (``classifier_heads``), else one head.

    Raises:
        ValueError: fewer than two labels, or an unknown pooling.
    """
    if len(labels) < 2:
        raise UsageError(
            f"a classification head needs at least two labels, got {labels}; check data.label_column"
        )
    config = _classifier_config(path, labels, pad_id, trust_remote_code=trust_remote_code)
    pooling = pooling or getattr(config, "classifier_pooling", None) or "last"
    if pooling not in POOLINGS:
        raise UsageError(f"classify.pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    config.classifier_pooling = pooling
    if heads is not None:
        check_heads(heads, len(labels))
        config.classifier_heads = {task: list(block) for task, block in heads.items()}
    kwargs = {
        "config": config,
        "dtype": dtype,
        "use_safetensors": True,
        "trust_remote_code": trust_remote_code,
        "output_loading_info": True,
    }
    cls = (
        _wrapper_class(config.model_type)
        if config.model_type in _WRAPPED
        else AutoModelForSequenceClassification
    )
    # transformers prints a load report that calls the new head MISSING and the dropped LM head UNEXPECTED:
    # both are the point of a classifier, and the report reads like a failure. It is silenced here, and
    # only what would be a real problem (decoder weights missing or left over) is reported, by name.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [k for k in info["missing_keys"] if not k.startswith(_HEAD)]
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith("lm_head.")]
    if missing or unexpected:
        warnings.warn(
            f"{path}: loading it as a classifier left decoder weights missing {missing[:8]} or unused "
            f"{unexpected[:8]}; the checkpoint does not match its config",
            stacklevel=2,
        )
    if pooling == "mean":
        # The loaded object becomes its mean-pooling subclass: the class is only known after from_pretrained
        # (AutoModelForSequenceClassification picks it), and the weights are the same.
        model.__class__ = _mean_pooled(type(model))
    return model


def save_labels(
    directory: str | Path,
    labels: list[str],
    positive: str | None = None,
    heads: dict[str, list[int]] | None = None,
) -> Path:
    """Writes ``labels.json``: the class names in head order (class i is ``labels[i]``), and the task
    blocks of a head per task (``core.heads``)."""
    path = Path(directory) / LABELS_FILE
    record = {"labels": labels, "positive": positive, **({"heads": heads} if heads else {})}
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False), "utf-8")
    return path


def read_labels(directory: str | Path) -> list[str] | None:
    """The class names saved in a run directory, or None when it is not a classification run."""
    path = Path(directory) / LABELS_FILE
    return json.loads(path.read_text(encoding="utf-8"))["labels"] if path.is_file() else None


def read_heads(directory: str | Path) -> dict[str, list[int]] | None:
    """The task blocks of a run trained with one head per task (``labels.json``), else None."""
    path = Path(directory) / LABELS_FILE
    return json.loads(path.read_text(encoding="utf-8")).get("heads") if path.is_file() else None
