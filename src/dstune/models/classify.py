"""Sequence-classification models: the decoder with a ``[num_classes, hidden]`` head instead of the LM head.

The head (``score``, no bias) reads the hidden state of the last token that is not padding, as
transformers' ``GenericForSequenceClassification`` does for Llama, Qwen2 and DeepSeek-V2/V3
(``AutoModelForSequenceClassification``). Transformers 5.24 has no such class for DeepSeek-V3.2 and V4
(checked: no ``DeepseekV32ForSequenceClassification`` / ``DeepseekV4ForSequenceClassification``), so for
those the same generic class is put on top of their base model here: it is the class transformers would
define (``class XForSequenceClassification(GenericForSequenceClassification, XPreTrainedModel): pass``).

Classification batches are padded on the left (``train.batching``), so the last position is always a
real token: this holds even where the pooling cannot see token ids (prompt tuning and P-tuning pass
``inputs_embeds``, and transformers then pools the last position). RoPE attention depends only on the
distance between positions, so the constant shift left padding gives a row does not change its result
(tested to float tolerance).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig
from transformers.modeling_layers import GenericForSequenceClassification
from transformers.utils import logging as hf_logging

LABELS_FILE = "labels.json"
_HEAD = "score."  # the head's parameter names in GenericForSequenceClassification
# model_type -> (module, prefix of the PreTrainedModel class) for architectures without a transformers head.
_WRAPPED = {"deepseek_v32": ("transformers.models.deepseek_v32.modeling_deepseek_v32", "DeepseekV32"),
            "deepseek_v4": ("transformers.models.deepseek_v4.modeling_deepseek_v4", "DeepseekV4")}


def is_classifier(model: nn.Module) -> bool:
    """Whether ``model``, or the model a peft/adapter wrapper holds, ends in a classification head."""
    return any(isinstance(m, GenericForSequenceClassification) for m in model.modules())


def _wrapper_class(model_type: str) -> type:
    import importlib

    module, prefix = _WRAPPED[model_type]
    base = getattr(importlib.import_module(module), f"{prefix}PreTrainedModel")
    return type(f"{prefix}ForSequenceClassification", (GenericForSequenceClassification, base), {})


def _classifier_config(path: str, labels: list[str], pad_id: int, **kwargs) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(path, **kwargs)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    # The head pools the last token that is not pad_token_id; without one, batches > 1 fail.
    config.pad_token_id = pad_id
    config.problem_type = "single_label_classification"
    return config


def load_classifier(path: str, labels: list[str], pad_id: int, *, dtype: torch.dtype = torch.float32,
                    trust_remote_code: bool = False) -> nn.Module:
    """Loads a model directory as a classifier over ``labels``.

    The decoder weights come from ``path``; the head is new (initialised from the torch seed) unless
    ``path`` is a classifier saved by a full or freeze run, whose head is loaded.

    Args:
        path: a model directory with safetensors weights (``models.load.resolve_model_dir``).
        labels: class names; class i is ``labels[i]``.
        pad_id: the padding token id of the batches.

    Raises:
        ValueError: fewer than two labels.
    """
    if len(labels) < 2:
        raise ValueError(f"a classification head needs at least two labels, got {labels}; check data.label_column")
    config = _classifier_config(path, labels, pad_id, trust_remote_code=trust_remote_code)
    kwargs = {"config": config, "dtype": dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code,
              "output_loading_info": True}
    cls = _wrapper_class(config.model_type) if config.model_type in _WRAPPED else AutoModelForSequenceClassification
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
        warnings.warn(f"{path}: loading it as a classifier left decoder weights missing {missing[:8]} or unused "
                      f"{unexpected[:8]}; the checkpoint does not match its config", stacklevel=2)
    return model


def save_labels(directory: str | Path, labels: list[str], positive: str | None = None) -> Path:
    """Writes ``labels.json``: the class names in head order (class i is ``labels[i]``)."""
    path = Path(directory) / LABELS_FILE
    path.write_text(json.dumps({"labels": labels, "positive": positive}, indent=1, ensure_ascii=False), "utf-8")
    return path


def read_labels(directory: str | Path) -> list[str] | None:
    """The class names saved in a run directory, or None when it is not a classification run."""
    path = Path(directory) / LABELS_FILE
    return json.loads(path.read_text(encoding="utf-8"))["labels"] if path.is_file() else None
