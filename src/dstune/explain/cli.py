"""The ``dstune explain`` command; cli.py registers it with one line (torch loads only when it runs).

The options' defaults and help come from ``explain.options.ExplainOptions``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from dstune.clikit import console
from dstune.clikit import fail as _fail
from dstune.errors import DstuneError
from dstune.explain.options import ExplainOptions

_FIELDS = {f.name: f for f in dataclasses.fields(ExplainOptions)}


def _option(name: str, *flags: str):
    """The typer option of an ``ExplainOptions`` field: its default, help and lower bound."""
    spec = _FIELDS[name]
    return typer.Option(spec.default, *flags, help=spec.metadata["help"], min=spec.metadata.get("min"))


def explain_command(
    target: str = typer.Argument(
        ...,
        help="run directory (an adapter, full or classifier run), or a model spec (smollm2, tiny:<family>)",
    ),
    prompt: str = typer.Option(
        ...,
        "--prompt",
        "-p",
        help="the user message; for a classifier the text to classify (bos + text, as trained)",
    ),
    system: Optional[str] = _option("system", "--system"),
    raw: bool = _option("raw", "--raw"),
    layers: str = _option("layers", "--layers"),
    heads: str = _option("heads", "--heads"),
    target_text: Optional[str] = _option("target", "--target"),
    new_tokens: int = _option("new_tokens", "--new-tokens"),
    top_k: int = _option("top_k", "--top-k"),
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        "-o",
        help="folder for the files (default: RUN/explain/; for a model spec runs/explain-<name>/)",
    ),
) -> None:
    """Explain one prompt: attention maps (PNG), gradient x input per token (HTML, PNG) and the logit lens
    (the top next tokens after each layer; PNG, JSON)."""
    from dstune.explain.run import explain

    options = ExplainOptions(system=system, raw=raw, layers=layers, heads=heads, target=target_text,
                             new_tokens=new_tokens, top_k=top_k)  # fmt: skip
    try:
        result = explain(target, prompt, out, options)
    except DstuneError as exc:
        _fail(str(exc))
    console.print(f"explained: {result.explained}\nwrote {len(result.written)} files in {result.out}:",
                  highlight=False)  # fmt: skip
    for path in result.written:
        console.print(f"  {path}", highlight=False, soft_wrap=True)
