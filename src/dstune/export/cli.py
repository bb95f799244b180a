"""The ``dstune export`` command; cli.py registers it with one line."""

from __future__ import annotations

from pathlib import Path

import typer

from dstune.errors import DstuneError


def export_command(
    target: str = typer.Argument(..., help="run directory written by dstune train, or a model spec"),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="GGUF: a .gguf file or a folder (file <name>-<quant>.gguf); safetensors: a new folder",
    ),
    fmt: str = typer.Option("gguf", "--format", "-f", help="gguf | safetensors [default: gguf]"),
    quant: str = typer.Option(
        "f16",
        "--quant",
        "-q",
        help="gguf: f32 | f16 | bf16 | q8_0 | q4_0 | q4_1 | q5_0 | q5_1; "
        "safetensors: int8 | nf4 [default: f16]",
    ),
) -> None:
    """Export a run (merged in fp32) or a model as one GGUF file with an Ollama Modelfile, or as a
    bitsandbytes-quantised safetensors checkpoint."""
    from dstune.clikit import console
    from dstune.clikit import fail as _fail
    from dstune.export import export_model

    try:
        result = export_model(target, out, fmt=fmt, quant=quant)
    except DstuneError as exc:
        _fail(str(exc))
    size = f"{result.size_bytes / 2**20:.1f} MiB"
    if result.format == "safetensors":
        console.print(
            f"wrote {result.quant} safetensors checkpoint {result.path} ({size}); load it with "
            f"AutoModelForCausalLM.from_pretrained('{result.path}') (needs bitsandbytes)",
            highlight=False,
        )
        return
    console.print(
        f"wrote {result.path} ({result.arch}, {result.quant}, {size}) and {result.modelfile}\n"
        f"run it with Ollama:\n  cd {result.path.parent} && ollama create {result.ollama_name} -f Modelfile\n"
        f"  ollama run {result.ollama_name}",
        highlight=False,
    )
