"""``dstune plan``: the per-device memory of a run before it is launched, a verdict, and what would fit.

Lives apart from ``dstune.cli`` (which registers it in one line) to keep that file short and the import
graph acyclic; prints and fails through ``dstune.clikit`` like every subcommand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dstune.clikit import console, fail
from dstune.config import METHODS, load_config
from dstune.errors import DstuneError, UsageError
from dstune.gpus import GIB, GPUS

_LABELS = {
    "weights": "weights (frozen, compute dtype / 4-bit)",
    "trainable": "trainable parameters",
    "gradients": "gradients",
    "optimizer": "optimizer states",
    "activations": "activations",
    "logits": "output layer (logit chunk, head grad)",
    "workspace": "workspace (backward, gathers, dequant)",
    "overlap": "not live at the peak moment",
}


def _gib(n: float) -> str:
    return f"{n / GIB:9.2f} GiB"


def render(cfg, setup, b, budget: float) -> str:
    """The breakdown as aligned lines, with the total against one GPU's usable memory."""
    from dstune.plan.estimate import with_planned_precision

    tc = with_planned_precision(cfg, setup).train
    head = (
        f"{cfg.model.name}: {cfg.method}, {tc.precision}, micro-batch {tc.micro_batch_size} x "
        f"{cfg.data.max_length} tokens (accumulation {tc.grad_accum}), checkpointing "
        f"{'on' if tc.gradient_checkpointing else 'off'}; {setup.devices} device(s), ZeRO-{setup.zero}, "
        f"offload {setup.offload}"
    )
    lines = [head, f"  parameters {b.facts['total_params']:,}, trainable {b.facts['trainable_params']:,}"]
    lines += [f"  {_LABELS[k]:<40}{_gib(v)}" for k, v in b.parts.items()]
    lines.append(f"  {'margin (CUDA context, fragmentation)':<40}{_gib(b.margin)}")
    lines.append(f"  {'total per device':<40}{_gib(b.total)}   of {budget / GIB:.1f} GiB usable")
    if b.cpu_bytes:
        lines.append(f"  {'CPU memory per node (offload)':<40}{_gib(b.cpu_bytes)}")
    return "\n".join(lines)


def plan_command(
    config: Optional[Path] = typer.Argument(None, help="YAML run config; flags and --set override it"),
    model: Optional[str] = typer.Option(
        None, "--model", help="hub id, release name, local dir, tiny:<family>"
    ),
    method: Optional[str] = typer.Option(None, "--method", help=" | ".join(METHODS)),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="tokens per row (data.max_length)"),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="rows per micro-batch"),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="micro-batches per optimizer step"),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="auto | fp32 | bf16 | fp16 (auto: bf16 on a GPU)"
    ),
    checkpointing: Optional[bool] = typer.Option(
        None, "--checkpointing/--no-checkpointing", help="gradient checkpointing (default: the config's)"
    ),
    gpu: str = typer.Option("80GB", "--gpu", help=f"24GB, 80GB, {', '.join(GPUS)}, or a count: 8xH100"),
    nodes: int = typer.Option(1, "--nodes", min=1, help="machines, each with the --gpu count of cards"),
    zero: Optional[int] = typer.Option(
        None,
        "--zero",
        min=0,
        max=3,
        help="ZeRO stage: 0 replicated, 1, 2, 3 (default: the config's train.distributed; fsdp2 shards as "
        "ZeRO-3 does)",
    ),
    offload: str = typer.Option(
        "none", "--offload", help="none | optimizer | all (to the CPU; default: the config's train.offload)"
    ),
    set_: list[str] = typer.Option([], "--set", help="override any config field: --set lora.r=16"),
) -> None:
    """Estimate a run's peak memory per GPU from the model's config alone, and find what fits."""
    values = {
        "model.name": model,
        "method": method,
        "data.max_length": max_length,
        "train.micro_batch_size": micro_batch,
        "train.grad_accum": grad_accum,
        "train.precision": precision,
        "train.gradient_checkpointing": checkpointing,
    }
    try:
        if offload not in ("none", "optimizer", "all"):
            raise UsageError(f"--offload {offload!r}: use none, optimizer or all")
        from dstune.config.deepspeed import ZERO_STAGE, offload_of
        from dstune.plan.estimate import Setup
        from dstune.plan.search import plan

        cfg = load_config(config, overrides=set_, values=values)
        if zero is None:  # the config's engine: FSDP2 shards as ZeRO-3 does
            zero = ZERO_STAGE[cfg.train.distributed]
        if offload == "none":
            offload = offload_of(cfg.train)
        setup = Setup(nodes=nodes, zero=zero, offload=offload)
        asked, budget, setup, best = plan(cfg, gpu, setup)
    except DstuneError as exc:
        fail(str(exc))
    console.print(render(cfg, setup, asked, budget), markup=False, highlight=False)
    if asked.total <= budget:
        console.print(f"verdict: fits ({asked.total / GIB:.1f} of {budget / GIB:.1f} GiB)", highlight=False)
        return
    console.print(
        f"verdict: does not fit ({asked.total / GIB:.1f} GiB needed, {budget / GIB:.1f} GiB usable)",
        highlight=False,
    )
    if best is None:
        console.print("nothing fits, even on 4,096 GPUs with ZeRO-3 and offload", highlight=False)
        return
    console.print("fastest configuration that fits: " + "; ".join(best.changes), highlight=False)
    console.print(render(best.cfg, best.setup, best.breakdown, budget), markup=False, highlight=False)
