"""The engine seam: what the loop asks of the thing that places, wraps and synchronises the model.

``train.distributed: auto`` is accelerate's ``Accelerator`` (one process, or DDP under ``torchrun``), which
has this interface already; ``AccelerateEngine`` adds the three methods that say what a checkpoint and the
final save hold. ``fsdp2`` (``train/fsdp.py``) and ``zero2``/``zero3`` (``train/zero.py``, DeepSpeed) are
other objects with the same methods; the loop does not change.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Iterator, Protocol

import torch

from dstune.config import RunConfig
from dstune.train.checkpoint import Trainable, apply_local, local_state

_MIXED = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


class Engine(Protocol):
    """The methods of ``accelerate.Accelerator`` the loop, evaluation and checkpoints use."""

    device: torch.device
    is_main_process: bool
    num_processes: int
    process_index: int

    def prepare(self, *objects): ...
    def unwrap_model(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def no_sync(self, model: torch.nn.Module) -> AbstractContextManager: ...
    def autocast(self) -> AbstractContextManager: ...
    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor: ...
    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor: ...
    def unscale_gradients(self) -> None: ...
    def wait_for_everyone(self) -> None: ...
    def gather_state(self, model, optimizer) -> Trainable: ...
    def load_state(self, model, optimizer, trainable: Trainable) -> None: ...
    def final_state(self, model) -> dict | Iterator | None: ...
    def loading(self, model_dir: str) -> AbstractContextManager: ...


def make_engine(cfg: RunConfig) -> Engine:
    """The engine ``train.distributed`` names: FSDP2, or an ``Accelerator`` for this run's precision.

    accelerate keeps one process-wide state and refuses a second Accelerator with another mixed precision
    ("AcceleratorState has already been initialized"), which would stop a search whose trials differ in
    precision, or any program that calls ``train`` twice. Only the precision part of that state is reset;
    the process group (``PartialState``) stays, so this is safe under DDP.
    """
    if cfg.train.distributed == "fsdp2":
        from dstune.train.fsdp import Fsdp2Engine

        return Fsdp2Engine(cfg)
    if cfg.train.distributed in ("zero2", "zero3"):
        from dstune.train.zero import ZeroEngine

        return ZeroEngine(cfg)
    from accelerate.state import AcceleratorState

    precision = _MIXED[cfg.train.precision]
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    # Without a GPU, accelerate only forms a multi-process (gloo) group when told the run is on the CPU;
    # otherwise every rank of `torchrun --nproc-per-node 2` would train alone and write the same run dir.
    on_cpu = not torch.cuda.is_available() and not (hasattr(torch, "xpu") and torch.xpu.is_available())
    return accelerate_engine(precision, on_cpu)


def accelerate_engine(precision: str, cpu: bool) -> Engine:
    """accelerate's ``Accelerator`` (imported only here: ``dstune --help`` does not load it)."""
    from accelerate import Accelerator

    class AccelerateEngine(Accelerator):
        """Every process holds the whole model, so a checkpoint is what this process has."""

        def gather_state(self, model, optimizer) -> Trainable:
            return local_state(model, optimizer)

        def load_state(self, model, optimizer, trainable: Trainable) -> None:
            apply_local(model, optimizer, trainable)

        def final_state(self, model) -> None:
            return None  # save_pretrained reads the model's own weights

        def loading(self, model_dir: str):
            return nullcontext()  # every process loads the whole model

    return AccelerateEngine(mixed_precision=precision, cpu=cpu)
