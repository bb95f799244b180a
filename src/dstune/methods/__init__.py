"""Fine-tuning methods: each turns a loaded model into a trainable one.

A method is a plain function ``(model, cfg) -> model`` that decides which parameters train (and may
wrap modules, as peft does). The training loop never branches on the method; adding one is a new
module and one line in ``METHODS``.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from dstune.config import RunConfig
from dstune.methods.freeze import prepare_freeze, prepare_full
from dstune.methods.lora import prepare_lora
from dstune.methods.summary import trainable_summary

PrepareFn = Callable[[nn.Module, RunConfig], nn.Module]

METHODS: dict[str, PrepareFn] = {
    "full": prepare_full,
    "freeze": prepare_freeze,
    "lora": prepare_lora,
}


def prepare_model(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Applies ``cfg.method`` to ``model`` and returns the model to train.

    Raises:
        ValueError: if no trainable parameter remains, naming the method settings to change.
    """
    prepared = METHODS[cfg.method](model, cfg)
    if not any(p.requires_grad for p in prepared.parameters()):
        raise ValueError(f"method '{cfg.method}' left no trainable parameter; check the "
                         f"'{cfg.method}' section of the config (e.g. freeze.top_layers, lora.targets)")
    return prepared


__all__ = ["METHODS", "prepare_model", "trainable_summary"]
