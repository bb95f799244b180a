"""A run's DeepSpeed config: the user's JSON (``train.deepspeed``) with its ``"auto"`` values filled from
the dstune config, as Hugging Face's Trainer and LLaMA-Factory fill theirs, or dstune's own from
``train.distributed`` and ``train.offload``. Pure dictionaries: checked when the config is loaded, before
anything is written; ``train/zero.py`` passes the result to ``deepspeed.initialize``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

AUTO = "auto"
# The ZeRO stage each train.distributed value shards like: FSDP2 shards weights, gradients and optimizer
# states, as ZeRO-3 does; auto (one process or DDP) shards nothing.
ZERO_STAGE = {"auto": 0, "zero2": 2, "zero3": 3, "fsdp2": 3}
# The bucket sizes Hugging Face's Trainer derives from the model's hidden size for "auto".
_SIZED = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def read_deepspeed_json(path: str) -> dict:
    """The JSON object in ``path``; a clear error names the file and what is wrong."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"train.deepspeed: file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"train.deepspeed: {path} is not valid JSON (line {exc.lineno}: {exc.msg})"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"train.deepspeed: {path} must hold a JSON object (a DeepSpeed config)")
    return data


def _agree(path: str, key: str, value: Any, ours: Any, source: str) -> None:
    if value != AUTO and value != ours:
        raise ValueError(
            f"train.deepspeed: {path} sets {key} to {value!r}, but {source} is {ours!r}; set it to \"auto\" "
            f"(dstune fills it) or to {ours!r}"
        )


def deepspeed_config(train, optim, world: int = 1, hidden: int | None = None) -> dict:
    """The config ``deepspeed.initialize`` gets for ``train`` (TrainConfig) and ``optim`` (OptimConfig).

    dstune's loop accumulates the micro-batches of a step itself (it tells DeepSpeed which backward ends
    the window), so DeepSpeed sees one micro-batch per step; the user's batch keys must be "auto" or agree
    with ``train.*``. The optimizer and lr schedule are dstune's (``optim.*``), so a JSON that names its own
    is refused. ``hidden``: the model's hidden size for the "auto" bucket sizes (None: checks only).

    Raises:
        ValueError: naming the file and key that dstune cannot accept, and what would be accepted.
    """
    stage = ZERO_STAGE[train.distributed]
    path = train.deepspeed
    user = read_deepspeed_json(path) if path else {}
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise ValueError(
                f"train.deepspeed: {path} has a {key!r} section; dstune builds the optimizer and lr schedule "
                f"from optim.* (so checkpoints and the stability guard know them): remove it"
            )
    checks = [
        ("train_micro_batch_size_per_gpu", train.micro_batch_size, "train.micro_batch_size"),
        ("gradient_accumulation_steps", train.grad_accum, "train.grad_accum"),
        ("gradient_clipping", optim.max_grad_norm, "optim.max_grad_norm"),
    ]
    for key, ours, source in checks:
        _agree(path, key, user.get(key, AUTO), ours, source)
    # train.precision=auto is compared once a run decided it (train.build.resolve_auto_precision).
    for precision in ("bf16", "fp16") if train.precision != "auto" else ():
        enabled = (user.get(precision) or {}).get("enabled", AUTO)
        _agree(
            path,
            f"{precision}.enabled",
            enabled,
            train.precision == precision,
            f"train.precision={precision}",
        )
    zero = dict(user.get("zero_optimization") or {})
    _agree(
        path,
        "zero_optimization.stage",
        zero.get("stage", AUTO),
        stage,
        f"train.distributed={train.distributed}",
    )
    zero["stage"] = stage
    if train.offload in ("optimizer", "all"):
        zero.setdefault("offload_optimizer", {"device": "cpu"})
    if train.offload == "all":
        zero.setdefault("offload_param", {"device": "cpu"})
    for key, value in zero.items():
        if value == AUTO:
            if key not in _SIZED:
                raise ValueError(f"train.deepspeed: {path} sets zero_optimization.{key} to \"auto\", which "
                                 f"dstune cannot fill; give a value")  # fmt: skip
            if hidden is not None:
                zero[key] = _SIZED[key](hidden)
    out = {k: v for k, v in user.items() if k not in ("train_batch_size", "zero_optimization")}
    left = [k for k, v in out.items() if v == AUTO and k not in {c[0] for c in checks}]
    if left:
        raise ValueError(
            f"train.deepspeed: {path} sets {left[0]} to \"auto\", which dstune cannot fill; give a value"
        )
    out.update(
        train_micro_batch_size_per_gpu=1,  # the loop owns accumulation: one DeepSpeed micro-step per window
        gradient_accumulation_steps=1,
        train_batch_size=world,
        gradient_clipping=optim.max_grad_norm,
        bf16={**(user.get("bf16") or {}), "enabled": train.precision == "bf16"},
        zero_optimization=zero,
        zero_allow_untested_optimizer=True,  # dstune's torch optimizer (AdamW, its parameter groups)
    )
    out.pop("fp16", None)
    out.setdefault("steps_per_print", 10**9)  # the run's own log reports progress
    if "offload_optimizer" in zero:
        out["zero_force_ds_cpu_optimizer"] = False  # the offloaded states are updated by dstune's optimizer
    return out


def offload_of(train) -> str:
    """What the run keeps in CPU memory: ``train.offload``, or what the user's DeepSpeed JSON offloads."""
    zero = (read_deepspeed_json(train.deepspeed).get("zero_optimization") or {}) if train.deepspeed else {}
    device = lambda key: (zero.get(key) or {}).get("device", "none")  # noqa: E731
    if train.offload == "all" or device("offload_param") != "none":
        return "all"
    return "optimizer" if train.offload == "optimizer" or device("offload_optimizer") != "none" else "none"
