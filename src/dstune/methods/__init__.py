"""Fine-tuning methods: each turns a loaded model into a trainable one.

A method is a plain function ``(model, cfg) -> model`` that decides which parameters train (and may
wrap modules, as peft does). The training loop never branches on the method; adding one is a new
module, one line in ``METHODS`` here and one ``MethodSpec`` line in ``config.METHODS`` (its config
sections, whether it merges, its help line: ``--help`` and the README table are checked against it).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from dstune.config import METHODS as METHOD_SPECS
from dstune.config import RunConfig
from dstune.errors import UsageError
from dstune.methods.adapter import is_adapter_dir, load_adapter, prepare_adapter
from dstune.methods.freeze import prepare_freeze, prepare_full
from dstune.methods.lora import prepare_lora
from dstune.methods.prompt import prepare_ia3, prepare_prefix, prepare_prompt, prepare_ptuning
from dstune.methods.qlora import prepare_qlora
from dstune.methods.summary import trainable_summary

PrepareFn = Callable[[nn.Module, RunConfig], nn.Module]

# The prepare function of each method in config.METHODS (which holds its config sections, whether it
# merges and its help line); a test checks that the two name the same methods.
METHODS: dict[str, PrepareFn] = {
    "full": prepare_full,
    "freeze": prepare_freeze,
    "lora": prepare_lora,
    "qlora": prepare_qlora,
    "adapter": prepare_adapter,
    "prefix": prepare_prefix,
    "ptuning": prepare_ptuning,
    "prompt": prepare_prompt,
    "ia3": prepare_ia3,
}

# Methods whose result folds into the base weights (a linear change of Linear layers). The others add
# computation that no weight matrix can express: prompts/prefixes (extra positions) and bottleneck
# adapters (a non-linearity).
MERGEABLE = {name for name, spec in METHOD_SPECS.items() if spec.merges}


def prepare_model(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Applies ``cfg.method`` to ``model`` and returns the model to train.

    Raises:
        ValueError: if no trainable parameter remains, naming the method settings to change.
    """
    prepared = METHODS[cfg.method](model, cfg)
    train_head(prepared)
    if not any(p.requires_grad for p in prepared.parameters()):
        raise UsageError(
            f"method '{cfg.method}' left no trainable parameter; check the "
            f"'{cfg.method}' section of the config (e.g. freeze.top_layers, lora.targets)"
        )
    return prepared


def train_head(model: nn.Module) -> None:
    """Makes a classification head (``score``, ``task: classification``) trainable, whatever the method.

    The head is new, so it must learn. peft methods already train a copy of it (``modules_to_save``;
    the original, ``original_module``, stays frozen); full, freeze and bottleneck adapters get it here.
    """
    for name, p in model.named_parameters():
        leaf = name.split(".")
        if "score" in leaf and "original_module" not in leaf:
            p.requires_grad_(True)


def load_trained(
    final_dir: str | Path,
    base_path: str,
    cfg: RunConfig | None = None,
    labels: list[str] | None = None,
    pad_id: int | None = None,
    heads: dict[str, list[int]] | None = None,
) -> nn.Module:
    """Loads what ``train`` saved in ``final_dir`` for inference: adapter on its base, or a full model.

    Args:
        final_dir: a run's ``final/`` directory.
        base_path: the base model directory the run started from (``run.json``'s ``base_model``).
        cfg: the run's config; needed for QLoRA, whose base is quantised again the same way.
        labels, pad_id: a classification run's labels (``labels.json``) and padding id: the base is
            rebuilt with a head of that size, then the adapter (and its trained head) goes on top.
        heads: the task blocks of a head per task (``labels.json``, ``core.heads``).
    """
    from dstune.models.load import load_model

    if labels is not None:
        from dstune.models.classify import load_classifier

        pooling = cfg.classify.pooling if cfg is not None else None  # None: the saved config's, else last

        def load_model(path, dtype=torch.float32):  # noqa: F811 - the same call, with the head
            return load_classifier(str(path), labels, pad_id, dtype=dtype, pooling=pooling, heads=heads)

    if labels is None and cfg is not None and cfg.model.rope_scaling:  # the base as it was trained
        load_model = functools.partial(load_model, rope_scaling=cfg.model.rope_scaling)  # noqa: F811
    final = Path(final_dir)
    if is_adapter_dir(final):
        return load_adapter(load_model(base_path, dtype=torch.float32), final)
    if (final / "adapter_config.json").is_file():
        from dstune.methods import peft_model

        base = load_model(base_path, dtype=torch.float32)
        if cfg is not None and cfg.method == "qlora":
            quantize_like_training(base, final, cfg)
        return peft_model.load(base, final)
    return load_model(str(final), dtype=torch.float32).eval()


def quantize_like_training(base: nn.Module, adapter_dir: Path, cfg: RunConfig) -> None:
    """Quantises a freshly loaded base exactly as ``prepare_qlora`` did (same layers kept)."""
    import json

    from dstune.methods.qlora import quantize_

    adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    keep = {
        p[: -len(".weight")]: "LoRA through target_parameters"
        for p in adapter_cfg.get("target_parameters") or []
        if p.endswith(".weight")
    }
    quantize_(base, cfg.qlora, keep)


__all__ = ["MERGEABLE", "METHODS", "load_trained", "prepare_model", "train_head", "trainable_summary"]
