"""``dstune merge``: fold a run's adapter into its base model and write one standalone checkpoint.

Merging happens in fp32 whatever the training precision: adding a low-rank update to bf16 weights
rounds every weight to 8 significant bits again, so a bf16 merge drifts from the model that was
trained (peft docs, "merge_and_unload": merge on a full-precision base). A QLoRA run is merged into
the de-quantised base (the weights its adapter was trained against), never re-quantised.

Methods that change the computation in a way no weight matrix can hold (prefix, P-tuning and prompt
tuning add positions; bottleneck adapters add a non-linearity) cannot merge: ``merge_run`` refuses them
with the reason and writes nothing (a copy of the adapter would be a folder that no loader takes as a
model); their run directory is what ``dstune generate``/``chat`` load.

A classification run (``task: classification``, ``labels.json``) merges into the decoder with its trained
head, a ``*ForSequenceClassification`` checkpoint (``AutoModelForSequenceClassification`` loads it; the
head's ``classifier_pooling`` is kept in its config for ``dstune chat``/``eval``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from dstune.config import load_config
from dstune.core.facts import pad_id
from dstune.errors import UsageError
from dstune.merge_shards import MergeError, NotShardable, merge_by_shards, plan_shard_merge
from dstune.methods import MERGEABLE, load_trained
from dstune.models.load import load_model, load_tokenizer
from dstune.models.templates import resolve_chat_template
from dstune.rundir import NotARunError, RunDir

_WHY_NOT = {
    "prefix": "prefix tuning adds learned key/value positions to every layer; no weight matrix can hold them",
    "ptuning": "P-tuning adds virtual-token positions to the input; no weight matrix can hold them",
    "prompt": "prompt tuning adds virtual-token positions to the input; no weight matrix can hold them",
    "adapter": "bottleneck adapters apply a non-linearity (down, activation, up), which a linear weight "
    "cannot express",
}


@dataclass
class MergeResult:
    """What ``merge_run`` wrote."""

    out_dir: Path
    merged: bool
    method: str
    reason: str = ""
    labels: list[str] | None = (
        None  # a classifier's class names: the checkpoint is *ForSequenceClassification
    )
    mode: str = "memory"  # shards: tensor by tensor (dstune.merge_shards); memory: the whole model loaded
    why_memory: str = ""  # mode auto: why the run could not merge shard by shard


def merge_model(model: nn.Module) -> nn.Module:
    """Folds a peft adapter into the base weights in fp32 and returns the plain transformers model.

    A model without an adapter (full or freeze fine-tuning) is returned as it is.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    model = model.to(torch.float32)
    return model.merge_and_unload(safe_merge=True)  # safe_merge: checks for NaNs before writing weights


def load_run_for_merge(run_dir: Path) -> tuple[nn.Module, dict, object]:
    """Loads a run's trained model in fp32, with a QLoRA base de-quantised first.

    Returns:
        ``(model, run_info, cfg)``; the model still carries its adapter (unmerged).
    """
    from dstune.methods import peft_model, quantize_like_training
    from dstune.methods.qlora import dequantize_
    from dstune.models.classify import load_classifier, read_heads, read_labels

    rd = RunDir(run_dir)
    info, final = rd.read_json(RunDir.RUN), rd.final
    if not final.is_dir():
        raise NotARunError(
            f"{run_dir} has no finished model at {final}; did the run end? "
            f"Resume it with: dstune train {rd.config} --resume"
        )
    cfg = load_config(rd.config)
    labels = read_labels(run_dir)  # a classifier: the base gets a head of its labels before the adapter
    heads = read_heads(run_dir)  # and its task blocks (a head per task), kept in the merged config.json
    pad = _pad_id(final) if labels else None
    if cfg.method == "qlora":
        base = (
            load_classifier(info["base_model"], labels, pad, pooling=cfg.classify.pooling, heads=heads)
            if labels
            else load_model(info["base_model"], dtype=torch.float32, rope_scaling=cfg.model.rope_scaling)
        )
        quantize_like_training(base, final, cfg)
        dequantize_(base)  # the adapter was trained against these de-quantised weights
        return peft_model.load(base, final), info, cfg
    return load_trained(final, info["base_model"], cfg, labels=labels, pad_id=pad, heads=heads), info, cfg


def _pad_id(final: Path) -> int:
    return pad_id(load_tokenizer(str(final)))


def merge_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    max_shard_size: str = "2GB",
    dtype: str = "fp32",
    mode: str = "auto",
) -> MergeResult:
    """Merges a run's adapter into its base and writes a standalone checkpoint, or exports the adapter.

    Args:
        run_dir: a run directory written by ``dstune train``.
        out_dir: where to write; must not exist or be empty.
        max_shard_size: safetensors shard size (transformers' ``max_shard_size``).
        dtype: ``fp32`` or ``bf16`` for the written weights (the merge itself is always fp32).
        mode: ``shards`` merges tensor by tensor without loading the model (``dstune.merge_shards``: a
            LoRA run), ``memory`` loads the whole model, ``auto`` takes shards where the run allows it.

    Returns:
        A MergeResult of the written checkpoint.

    Raises:
        MergeError: the run's method cannot merge (the reason is in the message); nothing is written.
        UsageError: when ``out_dir`` holds files.
        NotARunError: when ``run_dir`` is not a finished run.
    """
    from dstune.models.classify import read_labels

    run, out = Path(run_dir), Path(out_dir)
    if not RunDir(run).run_json.is_file():
        raise NotARunError(
            f"{run} is not a run directory (no run.json); pass the --output of a dstune train run"
        )
    method = RunDir(run).read_json(RunDir.RUN)["method"]
    if method not in MERGEABLE:
        raise MergeError(
            f"a {method} run cannot be merged: {_WHY_NOT.get(method, 'its method is not mergeable')}. "
            f"Nothing was written; use the run directory itself: dstune generate {run} (or chat, eval)"
        )
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} is not empty; choose another --out (nothing was written)")
    plan, why = _shard_plan(run, mode)
    info = RunDir(run).read_json(RunDir.RUN)
    tokenizer = load_tokenizer(str(RunDir(run).final))
    tokenizer.chat_template = resolve_chat_template(tokenizer, "auto", info.get("family", ""))
    merged = None
    if plan is None:
        merged = merge_model(load_run_for_merge(run)[0])
        if dtype == "bf16":
            merged = merged.to(torch.bfloat16)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        if plan is not None:
            merge_by_shards(plan, out, dtype=dtype, max_shard_size=max_shard_size)
        else:
            merged.save_pretrained(str(out), max_shard_size=max_shard_size, safe_serialization=True)
        tokenizer.save_pretrained(str(out))
    except BaseException:  # a full disk, Ctrl-C: no half-written checkpoint is left to be mistaken for one
        _clear(out, created)
        raise
    mode_used = "shards" if plan is not None else "memory"
    return MergeResult(out, True, method, labels=read_labels(run), mode=mode_used, why_memory=why)


def _shard_plan(run: Path, mode: str):
    """The shard-by-shard plan of ``run`` (or None to merge in memory) and, under ``auto``, why not."""
    if mode not in ("auto", "shards", "memory"):
        raise UsageError(f"--mode {mode!r}: choose auto, shards or memory")
    if mode == "memory":
        return None, ""
    try:
        return plan_shard_merge(run), ""
    except NotShardable as exc:
        if mode == "shards":
            raise MergeError(f"--mode shards: {exc}; nothing was written (--mode memory merges in memory)")
        return None, str(exc)


def _clear(out: Path, created: bool) -> None:
    """Removes what a failed merge wrote: ``out`` itself when the merge created it, else its contents
    (it was empty before)."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for path in out.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
