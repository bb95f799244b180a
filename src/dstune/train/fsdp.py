"""``train.distributed: fsdp2``: torch FSDP2 (``fully_shard``), the engine behind the same loop.

Each decoder layer is one FSDP unit and the root module (embeddings, final norm, output layer) another:
every rank keeps 1/N of each parameter, its gradient and its optimizer states, and gathers a layer's
weights only while that layer computes. accelerate is not used here on purpose: on a CPU it silently
drops its FSDP plugin and wraps the model in plain DDP (DESIGN.md), so this engine calls torch directly
and has the methods of ``accelerate.Accelerator`` the loop uses (``engine.Engine``).

Checkpoints and the final adapter are gathered with torch's state-dict API
(``torch.distributed.checkpoint.state_dict``) into the same safetensors files a one-process run writes;
rank 0 holds the gathered trainable state in CPU memory while it writes them (see ``gather_state``). A
full model's final save gathers one weight at a time as it writes (``stream_save``).
torch's own sharded checkpoint files (DCP) are not used: their metadata is a pickle.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from dstune.errors import UsageError
from dstune.train.checkpoint import Trainable, group_names
from dstune.train.dist import ProcessGroupEngine
from dstune.train.stream_save import gathered


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that become one FSDP unit each: transformers names them in ``_no_split_modules``
    (``LlamaDecoderLayer``, ``DeepseekV3DecoderLayer``...), the classes it never splits across devices."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UsageError(
            f"train.distributed=fsdp2: {type(base).__name__} names no decoder layer class "
            f"(_no_split_modules), so dstune cannot tell which modules to shard; use train.distributed=auto"
        )
    return layers


class Fsdp2Engine(ProcessGroupEngine):
    """FSDP2 over all ranks of the process group; the interface of ``engine.Engine``."""

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """Shards ``model`` layer by layer and points ``optimizer`` at the sharded parameters.

        ``fully_shard`` replaces every parameter with a new (DTensor) one of the same name, so the
        optimizer, built on the plain model, gets the new objects by name; it has no state yet.
        """
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        groups = group_names(model, optimizer)
        # bf16: gathered weights and activations in bf16, the sharded fp32 trainable weights stay the
        # master copy and gradients are reduced in fp32 (what autocast gives a one-process run).
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.precision == "bf16"
            else MixedPrecisionPolicy()
        )
        # QLoRA's frozen 4-bit weights (bitsandbytes Params4bit) carry their quantisation state beside the
        # data, which a DTensor shard would lose: they stay whole on every rank (half a byte a weight).
        kept = {p for p in model.parameters() if type(p).__name__ == "Params4bit"} or None
        if kept:
            model.to(self.device)
        # Otherwise fully_shard moves each layer to the device as it shards it, so a GPU never holds more
        # than one whole layer (model.to first would put the whole model on every GPU).
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=policy, ignored_params=kept)
        fully_shard(model, mp_policy=policy, ignored_params=kept)
        sharded = dict(model.named_parameters())
        for group, names in zip(optimizer.param_groups, groups):
            group["params"] = [sharded[n] for n in names]
        return model, optimizer

    def unwrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # FSDP2 shards the module in place: its class and parameter names stay

    @contextmanager
    def no_sync(self, model: torch.nn.Module):
        """Accumulates this micro-batch's gradient locally; the last one of the window reduce-scatters."""
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
        return full(norm)

    # -------------------------------------------------------------- gathered state (all ranks call these)

    def gather_state(self, model, optimizer) -> Trainable:
        """The trainable weights and the optimizer state, gathered whole on rank 0's CPU (empty on the
        other ranks). Rank 0 holds them all at once: small for adapters; for full fine-tuning, 12 bytes
        per parameter of CPU memory (fp32 weights and two AdamW moments)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        weights = {n: t for n, t in get_model_state_dict(model, options=opts).items() if n in trainable}
        by_name = get_optimizer_state_dict(model, optimizer, options=opts)
        return Trainable.from_named(weights, by_name) if self.is_main_process else Trainable.empty()

    def load_state(self, model, optimizer, trainable: Trainable) -> None:
        """Puts whole (unsharded) trainable weights and optimizer state into the sharded model; every
        rank passes the same full dicts and keeps its own shard."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)  # strict: the frozen weights too
        set_model_state_dict(model, trainable.weights, options=options)
        by_name = trainable.named_optimizer()
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))

    def final_state(self, model):
        """What ``save_pretrained`` writes: an adapter's weights gathered on rank 0 (frozen base weights are
        not saved with an adapter), or, for a full or partly frozen model, every weight gathered one at a
        time as it is written (``stream_save``), so rank 0 never holds the whole model."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if not hasattr(model, "peft_config"):
            return gathered(model, lambda name, t: full(t), self.is_main_process)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(model, options=opts)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every rank calls it), or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
