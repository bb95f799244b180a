"""What an export starts from: a merged fp32 model, its tokenizer, family and chat template.

A run directory is merged in memory with ``dstune.merge``'s own functions (fp32, QLoRA de-quantised
first), so an export and ``dstune merge`` can never disagree about the merged weights. A model spec
(directory, hub id, ``.gguf``, ``smollm2``, ``tiny:<family>``) is loaded as it is. Everything that can be
refused (a method that cannot merge, a classifier, an architecture no GGUF reader runs) is refused from
``run.json`` and ``config.json`` alone, before any weight is loaded or any file written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

from dstune.errors import DstuneError
from dstune.rundir import RunDir

# llama.cpp architecture per dstune family (convert_hf_to_gguf.py: LlamaModel, Qwen2Model, DeepseekV2Model).
GGUF_ARCH = {
    "deepseek-llm": "llama",
    "r1-distill-llama": "llama",
    "llama": "llama",
    "r1-distill-qwen": "qwen2",
    "qwen2": "qwen2",
    "deepseek-v2": "deepseek2",
    "deepseek-v3": "deepseek2",
}
_WHY_NOT_GGUF = {
    "deepseek-v32": "DeepSeek-V3.2's sparse attention indexer (DSA) has no GGUF layout this exporter writes "
    "(llama.cpp's deepseek32 support postdates the gguf package installed here)",
    "deepseek-v4": "DeepSeek-V4's compressed sparse attention and hash-routed experts have no GGUF layout "
    "that a released GGUF reader runs",
}


class ExportError(DstuneError, ValueError):
    """A run or model that cannot be exported in the asked format; the message says why."""


@dataclass
class Source:
    """A model ready to export: merged weights in fp32 and what to embed beside them.

    Attributes:
        model: a plain transformers causal LM (no adapter), fp32, eval mode.
        tokenizer: its tokenizer.
        tokenizer_dir: the directory holding ``tokenizer.json`` (read by gguf.SpecialVocab for merges).
        family: dstune's family name (families.yaml).
        chat_template: the Jinja template the model was trained with.
        name: a short name for the file and the Ollama model.
    """

    model: torch.nn.Module
    tokenizer: object
    tokenizer_dir: str
    family: str
    chat_template: str
    name: str


def check_exportable(target: str, fmt: str) -> str:
    """Refuses what cannot be exported, before loading weights; returns the family.

    Args:
        target: a run directory or a model spec.
        fmt: ``gguf`` or ``safetensors``.

    Raises:
        ExportError: naming the reason (method, task or architecture) and that nothing was written.
    """
    from dstune.merge import _WHY_NOT  # one table of why a method cannot merge
    from dstune.methods import MERGEABLE

    rd = RunDir(target)
    if rd.run_json.is_file():
        info = rd.read_json(RunDir.RUN)
        method = info.get("method", "")
        if method not in MERGEABLE:
            raise ExportError(
                f"a {method} run cannot be exported: {_WHY_NOT.get(method, 'its method cannot merge')}, "
                "and every export format holds plain weights. Nothing was written"
            )
        if rd.labels.is_file():
            raise ExportError(
                "a classification run cannot be exported: its trained head predicts labels, and GGUF "
                "readers and Ollama run language models only. Nothing was written; use dstune merge"
            )
        family = info.get("family", "")
    else:
        from dstune.models.load import resolve_model_dir

        resolved = resolve_model_dir(target)
        config = AutoConfig.from_pretrained(resolved.path)
        if any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
            raise ExportError(f"{target} is a sequence classifier; only language models export")
        family = resolved.family
    if fmt == "gguf" and family not in GGUF_ARCH:
        reason = _WHY_NOT_GGUF.get(family, "llama.cpp has no architecture this exporter maps it to")
        raise ExportError(
            f"family {family!r} cannot be exported to GGUF: {reason}. Exportable: "
            f"{', '.join(sorted(GGUF_ARCH))}. Nothing was written"
        )
    return family


def load_source(target: str) -> Source:
    """Loads a run (merged in fp32, in memory) or a model spec for export.

    Args:
        target: a run directory written by ``dstune train`` or a model spec.
    """
    from dstune.merge import load_run_for_merge, merge_model
    from dstune.models.load import load_model, load_tokenizer, resolve_model_dir
    from dstune.models.templates import resolve_chat_template

    rd = RunDir(target)
    if rd.run_json.is_file():
        model, info, _ = load_run_for_merge(Path(target))
        model = merge_model(model)
        tokenizer_dir, family = str(rd.final), info.get("family", "")
        name = Path(target).resolve().name
    else:
        resolved = resolve_model_dir(target)
        model = load_model(resolved, dtype=torch.float32)
        tokenizer_dir, family = resolved.path, resolved.family
        name = Path(target.replace(":", "-")).name
    tokenizer = load_tokenizer(tokenizer_dir)
    template = resolve_chat_template(tokenizer, "auto", family)
    model = model.to(torch.float32).eval()
    return Source(model, tokenizer, tokenizer_dir, family, template, name)
