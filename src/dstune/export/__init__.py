"""``dstune export``: a run or model as one GGUF file (plus an Ollama Modelfile) or as a quantised
safetensors checkpoint.

A run is merged first, in fp32 and in memory, with ``dstune.merge``'s functions (no server applies
adapters on routed experts, vLLM #10446). Everything refusable (a method that cannot merge, a
classifier, an architecture without a GGUF layout, a bad ``--quant``, an occupied ``--out``) is refused
before weights are loaded, and every file appears by rename, so a failed export leaves nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from dstune.errors import UsageError

# Nothing heavy is imported here: cli.py imports this package at start-up to register the command.
FORMATS = ("gguf", "safetensors")

__all__ = ["FORMATS", "ExportResult", "export_model"]


@dataclass
class ExportResult:
    """What ``export_model`` wrote.

    Attributes:
        path: the GGUF file or the checkpoint folder.
        format: ``gguf`` or ``safetensors``.
        quant: the quantisation written.
        family: the model's family; ``arch`` is llama.cpp's name for it (GGUF only).
        modelfile: the Ollama Modelfile beside a GGUF.
        ollama_name: the name the printed ``ollama create`` command uses.
    """

    path: Path
    format: str
    quant: str
    family: str
    arch: str = ""
    modelfile: Path | None = None
    ollama_name: str = ""
    size_bytes: int = field(default=0)


def _gguf_target(out: Path, name: str, quant: str) -> Path:
    path = out if out.suffix == ".gguf" else out / f"{name}-{quant}.gguf"
    if path.exists():
        raise UsageError(f"{path} exists; choose another --out (nothing was written)")
    return path


def export_model(target: str, out: str | Path, *, fmt: str = "gguf", quant: str = "f16") -> ExportResult:
    """Exports a run directory or a model spec.

    Args:
        target: a run directory written by ``dstune train``, or a model spec.
        out: for GGUF a ``.gguf`` file or a folder (the file is ``<name>-<quant>.gguf`` in it);
            for safetensors an empty or new folder.
        fmt: ``gguf`` or ``safetensors``.
        quant: GGUF: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1; safetensors: int8, nf4.

    Raises:
        ExportError: the run or model cannot be exported this way (the reason is in the message).
        UsageError: a bad format, quantisation or output path. Nothing is written in either case.
    """
    from dstune.export.gguf_file import check_quant
    from dstune.export.quantized import SAFETENSORS_QUANTS
    from dstune.export.source import ExportError, check_exportable, load_source

    out = Path(out)
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "gguf":
        check_quant(quant)
    elif quant not in SAFETENSORS_QUANTS:
        raise ExportError(
            f"--quant {quant!r} is not a safetensors quantisation; accepted: {', '.join(SAFETENSORS_QUANTS)}"
        )
    if fmt == "safetensors" and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} is not an empty folder; choose another --out (nothing was written)")
    family = check_exportable(target, fmt)
    src = load_source(target)
    if fmt == "safetensors":
        from dstune.export.quantized import write_quantized

        path = write_quantized(src, out, quant)
        size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        return ExportResult(path, fmt, quant, family, size_bytes=size)
    return _export_gguf(src, out, quant, family)


def _export_gguf(src, out: Path, quant: str, family: str) -> ExportResult:
    from dstune.export.gguf_file import write_gguf
    from dstune.export.modelfile import write_modelfile
    from dstune.export.source import GGUF_ARCH

    if out.suffix != ".gguf":
        out.mkdir(parents=True, exist_ok=True)
    path = _gguf_target(out, src.name, quant)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(src, path, quant)
    context = min(src.model.config.max_position_embeddings, 4096)  # Ollama allocates the whole window
    modelfile = write_modelfile(path, src.chat_template, src.tokenizer.eos_token, context)
    name = re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).strip("-.") or "dstune-model"
    return ExportResult(path, "gguf", quant, family, GGUF_ARCH[family], modelfile, name, path.stat().st_size)
