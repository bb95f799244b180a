"""Full fine-tuning and layer freezing (train only the top layers and chosen modules)."""

from __future__ import annotations

import re

import torch.nn as nn

from dstune.config import RunConfig
from dstune.core.facts import layer_index
from dstune.errors import UsageError


def prepare_full(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Trains every parameter."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def first_top_layer(model: nn.Module, top: int, key: str, lowest: int) -> int:
    """The index of the lowest of the top ``top`` decoder layers; ``key`` and ``lowest`` (the smallest value
    the setting accepts) go into the error.

    Raises:
        ValueError: when ``top`` exceeds the model's decoder layers.
    """
    n_layers = model.config.num_hidden_layers
    if top > n_layers:
        raise UsageError(f"{key}={top} but the model has {n_layers} decoder layers; use {lowest}..{n_layers}")
    return n_layers - top


def prepare_freeze(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Freezes everything, then unfreezes the top ``freeze.top_layers`` decoder layers, the parameters
    matching ``freeze.patterns``, and the output head when ``freeze.train_head`` is set.

    Top layers are the ones nearest the output: fine-tuning guides start there because lower layers
    hold the general features that a small domain set should not overwrite.
    """
    fz = cfg.freeze
    first_trained = first_top_layer(model, fz.top_layers, "freeze.top_layers", 0)
    patterns = [re.compile(p) for p in fz.patterns]
    head = model.get_output_embeddings()
    head_ids = {id(p) for p in head.parameters()} if (fz.train_head and head is not None) else set()
    for name, p in model.named_parameters():
        idx = layer_index(name)
        train = (
            (idx is not None and idx >= first_trained)
            or id(p) in head_ids
            or any(r.search(name) for r in patterns)
        )
        p.requires_grad_(train)
    return model
