"""The verdict on a GPU and the fastest configuration that fits, searched over what a user can change.

Candidates are ordered by a relative step-time cost, so the first that fits is the fastest: a smaller
micro-batch with more accumulation (same effective batch) costs least, then gradient checkpointing (one
more forward, about +33%: Chen et al. 2016), ZeRO-3's parameter gathering, CPU offload (PCIe-bound), and
QLoRA (de-quantising every weight each step). When nothing fits on the devices given, the device count
is doubled (ZeRO-3) until it does: the answer to "how many GPUs". ``fit`` is the single-device subset
that a later ``train --auto-fit`` applies: micro-batch and checkpointing only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from dstune.config import RunConfig
from dstune.errors import UsageError
from dstune.gpus import parse_gpu
from dstune.models.load import load_config_only
from dstune.plan.estimate import GIB, Breakdown, Setup, estimate, meta_model

# Relative step time of each change (1.0: as configured); rough, only their order matters.
_COST = {"ckpt": 1.33, "zero3": 1.15, "offload:optimizer": 1.5, "offload:all": 2.5, "qlora": 1.3}
_HALVING = 1.05  # each halving of the micro-batch (same effective batch): less parallel work per kernel


@dataclass
class Candidate:
    """A configuration the search tried: the config, the setup, its estimate and what it changed."""

    cfg: RunConfig
    setup: Setup
    breakdown: Breakdown
    changes: list[str]
    cost: float


def _variants(
    cfg: RunConfig, setup: Setup, *, engines: bool, offload: bool
) -> list[tuple[float, RunConfig, Setup, list]]:
    """Every combination of the changes, with its relative cost (cheapest first). Offload needs a ZeRO
    engine: optimizer offload runs on ZeRO-2 or 3 (ZeRO-Offload), parameter offload on ZeRO-3 only."""
    tc = cfg.train
    effective = tc.micro_batch_size * tc.grad_accum
    micros = [m for m in (2**i for i in range(12)) if m <= tc.micro_batch_size and effective % m == 0]
    micros = sorted(set(micros) | {tc.micro_batch_size}, reverse=True)
    ckpts = [tc.gradient_checkpointing] + ([True] if not tc.gradient_checkpointing else [])
    zeros = [setup.zero] + ([3] if engines and setup.devices > 1 and setup.zero < 3 else [])
    offloads = [setup.offload] + ([o for o in ("optimizer", "all") if o != setup.offload] if offload else [])
    methods = [cfg.method] + (["qlora"] if engines and cfg.method == "lora" else [])
    out = []
    for micro, ckpt, zero, where, method in itertools.product(micros, ckpts, zeros, offloads, methods):
        zero = max(zero, {"none": 0, "optimizer": 2, "all": 3}[where])
        changes, cost = [], 1.0
        if micro != tc.micro_batch_size:
            changes.append(f"micro-batch {tc.micro_batch_size} -> {micro}, accumulation {effective // micro}")
            cost *= _HALVING ** (tc.micro_batch_size // micro).bit_length()
        if ckpt != tc.gradient_checkpointing:
            changes.append("gradient checkpointing on")
            cost *= _COST["ckpt"]
        if zero != setup.zero:
            changes.append(f"ZeRO-{zero} over {setup.devices} devices")
            cost *= _COST["zero3"]
        if where != setup.offload:
            changes.append(f"offload {where} to the CPU")
            cost *= _COST[f"offload:{where}"]
        if method != cfg.method:
            changes.append("QLoRA (4-bit NF4 base) instead of LoRA")
            cost *= _COST["qlora"]
        data = cfg.model_dump()
        data["method"] = method
        data["train"].update(
            micro_batch_size=micro, grad_accum=effective // micro, gradient_checkpointing=ckpt
        )
        out.append((cost, RunConfig.model_validate(data), replace(setup, zero=zero, offload=where), changes))
    return sorted(out, key=lambda t: t[0])


def search(
    cfg: RunConfig,
    budget: float,
    setup: Setup,
    config=None,
    *,
    engines: bool = True,
    offload: bool = True,
    grow: bool = True,
) -> Candidate | None:
    """The cheapest configuration whose estimated total fits ``budget`` bytes per device, or None.

    Args:
        cfg, setup: what the user asked for.
        budget: usable bytes of one device.
        config: the model's transformers config (default: loaded without weights).
        engines: also try ZeRO-3 and QLoRA (False: micro-batch and checkpointing only).
        offload: also try CPU offload (with ``engines``).
        grow: when nothing fits, double the devices (ZeRO-3) up to 4,096 before giving up.
    """
    config = config or load_config_only(cfg.model.name, revision=cfg.model.revision)
    model, cache = meta_model(config), {}
    devices = setup.devices
    while True:
        trial = replace(
            setup, devices=devices, nodes=max(setup.nodes, -(-devices // 8)) if devices > 8 else 1
        )
        if devices != setup.devices:
            trial = replace(trial, zero=3)
        for cost, c, s, changes in _variants(cfg, trial, engines=engines, offload=engines and offload):
            b = estimate(c, s, config, model=model, cache=cache)
            if b.total <= budget:
                if devices != setup.devices:
                    changes = [
                        f"{devices} GPUs ({s.nodes} node{'s' if s.nodes > 1 else ''}), ZeRO-3"
                    ] + changes
                return Candidate(c, s, b, changes, cost)
        if not grow or devices >= 4096:
            return None
        devices *= 2


def fit(cfg: RunConfig, budget_bytes: float, setup: Setup | None = None) -> tuple[RunConfig, str]:
    """The fastest change of ``cfg`` that fits ``budget_bytes`` per device of ``setup`` (default: one
    CUDA device): for ``train --auto-fit``.

    Only micro-batch (with accumulation keeping micro x accumulation) and gradient checkpointing change.

    Returns:
        The config to run and one line saying what changed and why.

    Raises:
        UsageError: when even micro-batch 1 with checkpointing does not fit, with the estimate.
    """
    setup = setup or Setup()
    found = search(cfg, budget_bytes, setup, engines=False, grow=False)
    if found is None:
        need = estimate(_smallest(cfg), setup).total
        raise UsageError(
            f"{cfg.model.name} with method={cfg.method} needs {need / GIB:.2f} GiB even at micro-batch 1 "
            f"with gradient checkpointing; the budget is {budget_bytes / GIB:.2f} GiB: try method=qlora, "
            f"a shorter data.max_length, or more devices (dstune plan)"
        )
    if not found.changes:
        return found.cfg, f"fits as configured ({found.breakdown.total / GIB:.2f} GiB)"
    return found.cfg, "; ".join(found.changes) + f" (estimate {found.breakdown.total / GIB:.2f} GiB)"


def _smallest(cfg: RunConfig) -> RunConfig:
    data = cfg.model_dump()
    data["train"].update(micro_batch_size=1, gradient_checkpointing=True)
    return RunConfig.model_validate(data)


def plan(cfg: RunConfig, gpu: str, setup: Setup) -> tuple[Breakdown, float, Setup, Candidate | None]:
    """The estimate of ``cfg`` as given, the usable bytes of one ``gpu``, the setup it was counted for
    (``gpu``'s count, ``8xH100``, is the cards per node: devices = count x nodes), and the fastest
    setup that fits (None when the one asked for fits, or nothing does)."""
    count, budget = parse_gpu(gpu)
    setup = replace(setup, devices=count * max(1, setup.nodes))
    config = load_config_only(cfg.model.name, revision=cfg.model.revision)
    asked = estimate(cfg, setup, config)
    best = None if asked.total <= budget else search(cfg, budget, setup, config)
    return asked, budget, setup, best


def gpus_needed(cfg: RunConfig, gpu: str, config=None) -> Candidate | None:
    """The fewest GPUs of kind ``gpu`` (ZeRO-3, no offload) on which ``cfg`` fits: "how many GPUs"."""
    _, budget = parse_gpu(gpu)
    return search(cfg, budget, Setup(), config, offload=False)
