"""The final model of a sharded full or partly frozen run, gathered and written one tensor at a time.

``save_pretrained`` takes a whole state dict, so handing it a sharded model's weights means gathering
the whole model on rank 0 first: the "out of memory while saving" that users of sharded engines hit
with models larger than one machine's memory. Here every rank walks the model's tensors in the same
order; each is gathered whole (a collective over the ranks: FSDP2's ``full_tensor``, DeepSpeed's fp32
master or ``GatheredParameters``), rank 0 moves it to its CPU memory and writes it into the current
safetensors shard, which is flushed at ``max_shard_size`` (``core/shards.py``). Rank 0 holds one shard
and one decoder layer at most, whatever the model's size.

The files are those ``save_pretrained`` writes: the config, generation config and remote code come from
``save_pretrained`` itself (called with no weights), tied weights are written once under the name
transformers keeps, and transformers' weight conversions (DeepSeek-V2/V3's fused experts back to one
tensor per expert) are reverted one decoder layer at a time, as ``save_pretrained`` does for offloaded
models, so ``from_pretrained`` loads the result as it loads a one-process run's (tests/test_sharded.py).
"""

from __future__ import annotations

from itertools import groupby
from pathlib import Path
from typing import Callable, Iterator

import torch

from dstune.core.facts import layer_index
from dstune.core.shards import write_shards


def saved_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The parameters (a tied weight once, under the first name, as ``named_parameters`` gives it) and the
    persistent buffers of ``model``: what its state dict holds, without duplicates."""
    keys = set(model.state_dict().keys())  # sharded engines give sharded or empty tensors here: no gather
    named = list(model.named_parameters())
    named += [(n, b) for n, b in model.named_buffers() if n in keys]
    return named


def gathered(
    model: torch.nn.Module, whole: Callable[[str, torch.Tensor], torch.Tensor], is_main: bool
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Every saved tensor of ``model`` (``saved_tensors``), gathered one at a time by ``gathered_named``."""
    return gathered_named(saved_tensors(model), whole, is_main)


def gathered_named(
    named: list[tuple[str, torch.Tensor]], whole: Callable[[str, torch.Tensor], torch.Tensor], is_main: bool
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Each of ``named`` gathered by ``whole`` (every rank calls it, in the same order) and copied to rank
    0's CPU memory; the other ranks get None."""
    for name, tensor in named:
        value = whole(name, tensor)
        yield name, value.detach().to("cpu", copy=True) if is_main else None
        del value


def drain(tensors: Iterator) -> None:
    """What a rank other than 0 does with ``gathered``: take part in every gather, write nothing."""
    for _ in tensors:
        pass


def checkpoint_format(
    model, tensors: Iterator[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """``tensors`` (in ``named_parameters`` order) under the names and shapes of the model's checkpoint:
    transformers' weight conversions reverted one decoder layer at a time, as ``save_pretrained`` does."""
    from transformers.core_model_loading import revert_weight_conversion

    for _, layer in groupby(tensors, key=lambda item: layer_index(item[0])):
        yield from revert_weight_conversion(model, dict(layer)).items()


def save_streamed(model, tensors: Iterator[tuple[str, torch.Tensor]], out: Path, max_bytes: int) -> None:
    """Rank 0: writes the model's config files with ``save_pretrained`` and its weights from ``tensors``
    in files of at most ``max_bytes`` (``train.save_shard_size``: rank 0's memory bound while it writes),
    reverting transformers' weight conversions per decoder layer."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), state_dict={}, safe_serialization=True)  # config files, no weights
    for stale in [*out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json")]:
        stale.unlink()
    write_shards(checkpoint_format(model, tensors), out, max_bytes)
