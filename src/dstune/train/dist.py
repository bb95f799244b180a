"""What the engines that call torch.distributed themselves (FSDP2, DeepSpeed ZeRO) share: joining the
process group, rank facts, reductions, barriers. Both exist because accelerate on a CPU silently drops
its FSDP and DeepSpeed plugins and wraps the model in DDP (DESIGN.md), so dstune calls the engines
directly; their other methods (``prepare``, ``no_sync``, the gathered state) are each engine's own.
"""

from __future__ import annotations

import atexit
import os
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist

from dstune.config import RunConfig

_REDUCE = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def start_process_group(timeout_s: float) -> None:
    """Joins the run's process group: the one torchrun describes in the environment, or a group of one
    (a plain ``python`` process runs the same code, unsharded). gloo on CPUs, NCCL on GPUs."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if "WORLD_SIZE" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())


class ProcessGroupEngine:
    """The rank facts and collectives of ``engine.Engine``, over torch.distributed's default group.

    ``DSTUNE_DIST_TIMEOUT`` (seconds, default 1800) bounds every collective: a rank that never arrives
    (a crashed or hung peer) becomes an error instead of a hang.
    """

    def __init__(self, cfg: RunConfig):
        start_process_group(float(os.environ.get("DSTUNE_DIST_TIMEOUT", 1800)))
        self.num_processes = dist.get_world_size()
        self.process_index = dist.get_rank()
        self.is_main_process = self.process_index == 0
        if torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.precision = cfg.train.precision

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def autocast(self):
        return nullcontext()  # the engine casts the weights it gathers (its mixed-precision setting)

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        out = tensor.detach().clone()
        if reduction == "mean":  # gloo has no AVG
            dist.all_reduce(out, dist.ReduceOp.SUM)
            return out / self.num_processes
        dist.all_reduce(out, _REDUCE[reduction])
        return out

    def unscale_gradients(self) -> None:
        pass  # no loss scaling: fp16 is refused with these engines (config), bf16 needs none

    def wait_for_everyone(self) -> None:
        dist.barrier()

    def loading(self, model_dir: str):
        """Around the model's load and method setup: every rank loads the whole model (the engine shards
        it in ``prepare``), except under ZeRO-3 (``train/zero.py``)."""
        return nullcontext()
