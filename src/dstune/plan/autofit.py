"""The planner inside ``dstune train``: ``train.auto_fit`` applies its fastest single-device change that fits
before the run starts, and every run records the planner's prediction next to the peak it measured.

The device's memory is ``train.memory_budget`` when set, else the whole device: a CUDA card's total memory,
or on a CPU the machine's RAM (total, not what is free now, so that a resumed run fits the same way and
its config does not change). The prediction is per device; the measured figure is CUDA's own peak of
allocated memory on a GPU and the process's peak resident memory on a CPU, which also holds the Python
interpreter and the libraries, so on a CPU the two are printed side by side but are not the same quantity
(``benchmarks/bench_plan.py`` compares the estimate with tracked allocations instead).
"""

from __future__ import annotations

import os

import psutil
import torch
from rich.console import Console

from dstune.config import RunConfig
from dstune.config.deepspeed import ZERO_STAGE, offload_of
from dstune.core.facts import peak_rss_mb
from dstune.gpus import GIB, parse_budget
from dstune.plan.estimate import Setup, estimate
from dstune.plan.search import fit

_MIB = 2**20


def device_type() -> str:
    """Where a run of this process trains: the engine picks CUDA whenever torch sees a GPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_budget(cfg: RunConfig, kind: str) -> tuple[float, str]:
    """Bytes of one device for the planner, and where the figure came from."""
    if cfg.train.memory_budget:
        return parse_budget(cfg.train.memory_budget), f"train.memory_budget={cfg.train.memory_budget}"
    if kind == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return float(props.total_memory), f"{props.name}'s memory"
    return float(psutil.virtual_memory().total), "this machine's RAM"


def apply_auto_fit(cfg: RunConfig, console: Console) -> tuple[RunConfig, dict | None]:
    """``cfg`` itself, or with ``train.auto_fit`` the planner's fastest change of micro-batch (accumulation
    keeping the effective batch) and gradient checkpointing that fits; plus what was decided.

    Raises:
        UsageError: when nothing fits, with the estimate (before anything is written).
    """
    if not cfg.train.auto_fit:
        return cfg, None
    kind = device_type()
    budget, source = device_budget(cfg, kind)
    fitted, decision = fit(cfg, budget, run_setup(cfg, kind))
    console.print(f"auto-fit to {budget / GIB:.2f} GiB ({source}): {decision}", highlight=False)
    return fitted, {"budget_mb": round(budget / _MIB, 1), "source": source, "decision": decision}


def run_setup(cfg: RunConfig, kind: str) -> Setup:
    """The devices this process's run spreads over: torchrun's WORLD_SIZE ranks (LOCAL_WORLD_SIZE per
    machine); ``train.distributed: fsdp2`` shards weights, gradients and optimizer states as ZeRO-3 does."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    nodes = max(1, world // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    zero, offload = ZERO_STAGE[cfg.train.distributed], offload_of(cfg.train)
    return Setup(devices=world, nodes=nodes, zero=zero, offload=offload, device_type=kind)


def predicted_peak_mb(cfg: RunConfig) -> float | None:
    """The planner's per-device peak of the tensors one training step of ``cfg`` allocates (without the
    CUDA context and fragmentation margin it adds when fitting), or None where it cannot tell."""
    kind = device_type()
    try:
        breakdown = estimate(cfg, run_setup(cfg, kind))
    except Exception:  # the planner does not cover every config; a run never fails for its estimate
        return None
    return round(breakdown.allocated / _MIB, 1)


def measured_peak(device: torch.device) -> dict:
    """The run's measured peak for ``summary.json: memory``: CUDA's max allocated, or the peak RSS."""
    if device.type == "cuda":
        return {
            "measured_mb": round(torch.cuda.max_memory_allocated(device) / _MIB, 1),
            "measured": "cuda_max_allocated",
        }
    return {"measured_mb": round(peak_rss_mb(), 1), "measured": "peak_rss"}


def memory_line(memory: dict) -> str | None:
    """``memory: predicted ... measured ...`` for the end of a run, from its ``summary.json: memory``."""
    if memory.get("predicted_mb") is None or memory.get("measured_mb") is None:
        return None
    what = "CUDA max allocated" if memory["measured"] == "cuda_max_allocated" else "peak RSS of the process"
    return (
        f"memory: the planner predicted {memory['predicted_mb'] / 1024:.2f} GiB per device, the run measured "
        f"{memory['measured_mb'] / 1024:.2f} GiB ({what})"
    )
