"""``dstune merge`` shard by shard: a LoRA run folded into its base one safetensors tensor at a time.

The in-memory merge (``dstune.merge``) loads the whole base model, so merging a LoRA trained on
DeepSeek-V3/R1 (671B parameters, 1.3 TB in bf16) would need that much RAM. Here the base checkpoint's
shards are read lazily (``safetensors.safe_open``), each tensor is taken alone, an adapted weight gets its
update ``W + (B @ A) x scaling`` in fp32 (the order and precision of peft's ``merge_and_unload``, so the
result equals it: tested bitwise), FP8 weights of the official V3/R1 checkpoints are de-quantised first
(e4m3 values x their ``weight_scale_inv`` per block, the block layout of ``quantization_config``), and the
written shards are cut at ``--max-shard-size``. Peak memory is one output shard plus one tensor plus the
adapter, whatever the model's size; no GPU is needed.

It takes what a plain LoRA adapter can express tensor by tensor: ``peft_type: LORA`` on 2-D weights that
the checkpoint stores under the adapted module's name (``target_modules``, and ``target_parameters`` of
2-D weights, which V2/V3's dense MLPs use), with rsLoRA, per-module rank/alpha and converted PiSSA/OLoRA
adapters. Everything else (DoRA's norm, fused MoE experts, a classifier's head, a QLoRA base that was
trained de-quantised from 4 bits, a cut or RoPE-scaled base) is refused with the reason by
``plan_shard_merge``; ``merge_run`` then merges in memory.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from dstune.core.shards import parse_size, write_shards  # noqa: F401  (parse_size: re-exported)
from dstune.errors import DstuneError
from dstune.rundir import RunDir

_FP8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_PREFIX = "base_model.model."  # peft's adapter keys: base_model.model.<module>.lora_A.weight


class MergeError(DstuneError, ValueError):
    """A run that cannot be merged (its method adds computation no weight can hold), or a merge that
    would write NaN or inf."""


class NotShardable(DstuneError, ValueError):
    """A run whose adapter cannot be folded tensor by tensor (the reason is the message)."""


@dataclass
class ShardPlan:
    """What ``merge_by_shards`` needs: the base's shards and the update of each adapted weight."""

    base: Path
    files: list[Path]  # the base's safetensors files
    updates: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # checkpoint weight -> (A, B, scaling)
    block: tuple[int, int] | None = None  # FP8 checkpoints: quantization_config.weight_block_size


def plan_shard_merge(run_dir: str | Path) -> ShardPlan:
    """Checks that a run can merge shard by shard and reads its adapter.

    Raises:
        NotShardable: the run, its adapter or its base is outside what the module doc lists.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from dstune.config import load_config

    rd = RunDir(run_dir)
    info, cfg = rd.read_json(RunDir.RUN), load_config(rd.config)
    why = _refusal(rd, cfg)
    if why:
        raise NotShardable(why)
    adapter = json.loads((rd.final / "adapter_config.json").read_text(encoding="utf-8"))
    if why := _adapter_refusal(adapter):
        raise NotShardable(why)
    base = Path(info["base_model"])
    files = _base_files(base)
    shapes = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    tensors = load_file(str(rd.final / "adapter_model.safetensors"))
    updates = {}
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        module = key[len(_PREFIX) : -len(".lora_A.weight")] if key.startswith(_PREFIX) else None
        a, b = tensors[key], tensors.get(key.replace(".lora_A.", ".lora_B."))
        name = f"{module}.weight"
        rows = b.shape[0] if b is not None else "?"
        if module is None or b is None or shapes.get(name) != [rows, a.shape[1]]:
            raise NotShardable(
                f"the adapter's {key} has no 2-D weight {name} of shape [{rows}, {a.shape[1]}] in the base "
                f"checkpoint {base} (fused experts, or names the checkpoint stores differently)"
            )
        updates[name] = (a, b, _scaling(adapter, module, a.shape[0]))
    if not updates:
        raise NotShardable(f"{rd.final}: the adapter holds no LoRA weights")
    quant = json.loads((base / "config.json").read_text(encoding="utf-8")).get("quantization_config") or {}
    block = tuple(quant.get("weight_block_size") or ()) if quant.get("quant_method") == "fp8" else None
    return ShardPlan(base, files, updates, block or None)


def _refusal(rd: RunDir, cfg) -> str | None:
    """Why the run's method or base rules the shard-by-shard merge out, or None."""
    if cfg.method != "lora":
        return f"method {cfg.method}: only LoRA adapters merge tensor by tensor"
    if rd.labels.is_file():
        return "a classification run: its head is a module the base checkpoint does not have"
    if cfg.model.keep_layers:
        return f"model.keep_layers={cfg.model.keep_layers}: the base was cut after loading"
    if cfg.model.rope_scaling:
        return "model.rope_scaling: the merged config is the scaled one transformers builds on load"
    if not (rd.final / "adapter_model.safetensors").is_file():
        return f"{rd.final} holds no peft adapter (adapter_model.safetensors)"
    return None


def _adapter_refusal(adapter: dict) -> str | None:
    if adapter.get("peft_type") != "LORA":
        return f"peft_type {adapter.get('peft_type')}: only LoRA"
    for key, why in (
        ("use_dora", "DoRA rescales each weight by its norm"),
        ("fan_in_fan_out", "fan_in_fan_out layers store the weight transposed"),
        ("modules_to_save", "modules_to_save replaces whole modules"),
        ("trainable_token_indices", "trainable tokens change embedding rows"),
        ("lora_bias", "LoRA biases add a bias term"),
    ):
        if adapter.get(key):
            return f"{key}: {why}"
    return None


def _scaling(adapter: dict, module: str, rank: int) -> float:
    """peft's scaling of ``module``: alpha / r, or alpha / sqrt(r) with rsLoRA, per-module patterns first."""
    from peft.utils.other import get_pattern_key

    r = adapter.get("rank_pattern", {}).get(
        get_pattern_key(adapter.get("rank_pattern", {}), module), adapter["r"]
    )
    alpha_pattern = adapter.get("alpha_pattern", {})
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern, module), adapter["lora_alpha"])
    if r != rank:
        raise NotShardable(f"{module}: the adapter's rank {rank} is not the config's r={r}")
    return alpha / math.sqrt(r) if adapter.get("use_rslora") else alpha / r


def _base_files(base: Path) -> list[Path]:
    index = base / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [base / n for n in names]
    if (base / "model.safetensors").is_file():
        return [base / "model.safetensors"]
    raise NotShardable(f"{base} has no safetensors checkpoint (model.safetensors or its index)")


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """An FP8 weight of the official V3/R1 checkpoints in fp32: each ``block`` of values times its scale."""
    rows, cols = q.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return q.float() * scale[:rows, :cols]


def merged_tensors(plan: ShardPlan, dtype: torch.dtype):
    """Yields ``(name, tensor)`` of the merged checkpoint, shard after shard, one tensor at a time."""
    from safetensors import safe_open

    for path in plan.files:
        with safe_open(str(path), "pt") as f:
            names = list(f.keys())
        for name in names:
            if name.endswith(".weight_scale_inv") and plan.block:
                continue  # folded into its weight below
            # The shard is mapped for one tensor at a time: the pages read stay in the process's resident
            # memory while the file is open, which for a 4 GB V3 shard would be 4 GB.
            with safe_open(str(path), "pt") as f:
                tensor = f.get_tensor(name)
                if tensor.dtype in _FP8 and plan.block:
                    scale = name + "_scale_inv"
                    if scale not in names:
                        raise NotShardable(f"{path.name}: FP8 weight {name} has no {scale} in the same shard")
                    tensor = dequantize_fp8(tensor, f.get_tensor(scale), plan.block)
            if name in plan.updates:
                a, b, scaling = plan.updates[name]
                tensor = tensor.float()
                tensor += (b.float() @ a.float()) * scaling  # peft's get_delta_weight, then its add
                if not torch.isfinite(tensor.sum()):  # a NaN or inf anywhere makes the sum one (peft's check)
                    raise MergeError(f"merging the adapter into {name} gives NaN or inf; nothing is kept")
            yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor


def write_config(plan: ShardPlan, out: Path, dtype: str) -> None:
    """The base's config with the written dtype, and without the FP8 ``quantization_config`` once
    de-quantised; its generation config and, for remote code (``auto_map``), its Python files."""
    config = json.loads((plan.base / "config.json").read_text(encoding="utf-8"))
    if plan.block:
        config.pop("quantization_config", None)
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = (
        "float32" if dtype == "fp32" else "bfloat16"
    )
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    if (plan.base / "generation_config.json").is_file():
        shutil.copyfile(plan.base / "generation_config.json", out / "generation_config.json")
    if config.get("auto_map"):
        for py in plan.base.glob("*.py"):
            shutil.copyfile(py, out / py.name)


def merge_by_shards(plan: ShardPlan, out: Path, *, dtype: str = "fp32", max_shard_size: str = "2GB") -> None:
    """Writes the merged weights and config of ``plan`` into ``out`` (the caller writes the tokenizer and
    clears ``out`` on failure)."""
    write_shards(merged_tensors(plan, _DTYPES[dtype]), out, parse_size(max_shard_size))
    write_config(plan, out, dtype)


def dequantize_checkpoint(
    base: str | Path, out: Path, *, dtype: str = "bf16", max_shard_size: str = "5GB"
) -> int:
    """``dstune dequantize``: an FP8 checkpoint (the official V3/R1/V3.2 weights) rewritten as plain
    ``dtype`` weights, one tensor at a time (DeepSeek's ``fp8_cast_bf16.py`` does the same). A plain
    checkpoint is what DeepSpeed ZeRO-3 partitions while it loads (``zero.Init``); transformers loads an
    FP8 one whole in every process. Returns the number of tensors de-quantised.

    Raises:
        NotShardable: ``base`` is not a safetensors checkpoint with an FP8 ``quantization_config``.
    """
    base = Path(base)
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "fp8" or not quant.get("weight_block_size"):
        raise NotShardable(
            f"{base}/config.json has no quantization_config with quant_method fp8 and a weight_block_size: "
            "its weights are not FP8, nothing to de-quantise"
        )
    plan = ShardPlan(base, _base_files(base), {}, tuple(quant["weight_block_size"]))
    scales = sum(name.endswith(".weight_scale_inv") for name in _keys(plan.files))
    out.mkdir(parents=True, exist_ok=True)
    merge_by_shards(plan, out, dtype=dtype, max_shard_size=max_shard_size)  # no updates: de-quantised only
    skip = {"config.json", "model.safetensors.index.json", "generation_config.json"}
    for path in base.iterdir():  # tokenizer, chat template and the like, as they are
        if (
            path.is_file()
            and path.suffix != ".safetensors"
            and path.name not in skip
            and not path.name.endswith(".py")
        ):
            shutil.copyfile(path, out / path.name)
    return scales


def _keys(files: list[Path]):
    """The tensor names of safetensors ``files``, read from their headers."""
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), "pt") as f:
            yield from f.keys()
