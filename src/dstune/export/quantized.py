"""A bitsandbytes-quantised safetensors checkpoint (int8 LLM.int8() or 4-bit NF4) that plain
transformers loads (``AutoModelForCausalLM.from_pretrained(dir)``: the quantisation config is in
``config.json``).

bitsandbytes is what the field uses for both (QLoRA's NF4, transformers' ``load_in_8bit``), dstune
already depends on it for QLoRA, and since 0.45 it runs on CPU too; torchao and optimum-quanto are
not installed here and their checkpoints need the same package at load time anyway. The merged fp32
model is saved once to a temporary folder and re-loaded through ``BitsAndBytesConfig``, the path
transformers documents for quantising a checkpoint; the output folder appears by rename at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from dstune.errors import MissingExtra
from dstune.export.source import ExportError, Source

SAFETENSORS_QUANTS = ("int8", "nf4")


def _bnb_config(quant: str):
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    # fp32 compute: CPUs have no fast fp16 matmul, and it keeps perplexity closest to the fp32 model.
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )


def write_quantized(src: Source, out: Path, quant: str) -> Path:
    """Writes a bitsandbytes-quantised checkpoint of ``src`` (weights, config, tokenizer) to ``out``.

    Args:
        src: the merged fp32 model.
        out: a folder that does not exist yet or is empty.
        quant: ``int8`` or ``nf4``.

    Raises:
        ExportError: an unknown ``quant``.
        MissingExtra: bitsandbytes is not installed.
    """
    from transformers import AutoModelForCausalLM

    if quant not in SAFETENSORS_QUANTS:
        raise ExportError(
            f"--quant {quant!r} is not a safetensors quantisation; accepted: {', '.join(SAFETENSORS_QUANTS)}"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MissingExtra("quantised safetensors need bitsandbytes: pip install 'dstune[bnb]'") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with tempfile.TemporaryDirectory(dir=out.parent) as plain:
        try:
            src.model.save_pretrained(plain)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            model = AutoModelForCausalLM.from_pretrained(
                plain, quantization_config=_bnb_config(quant), device_map=device, dtype=torch.float32
            )
            model.save_pretrained(str(tmp))
            src.tokenizer.chat_template = src.chat_template
            src.tokenizer.save_pretrained(str(tmp))
            if out.exists():
                out.rmdir()  # empty (checked by the caller); os.replace cannot replace a directory
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
