"""What ``dstune explain`` can be asked: each choice's default and description in one place, from which
the command's ``--help`` is made (explain.cli), so the two cannot disagree. Imports nothing heavy: cli.py
reads it at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field


def _field(default, description: str, **limits):
    return field(default=default, metadata={"help": description, **limits})


@dataclass
class ExplainOptions:
    """The choices of ``explain.run.explain`` besides the run and the prompt."""

    system: str | None = _field(None, "system prompt (generators)")
    raw: bool = _field(False, "tokenize the prompt as it is, without the chat template (generators)")
    layers: str = _field("0,-1", "attention layers: indices like 0,-1 (negative: from the end) or all")
    heads: str = _field("all", "attention heads: indices like 0,1, all (a panel each) or mean (one panel)")
    target: str | None = _field(
        None,
        "attribute towards this text's first token (a classifier: this label) instead of the model's "
        "prediction",
    )
    new_tokens: int = _field(3, "greedily generated tokens the logit lens follows", min=1)
    top_k: int = _field(5, "candidates per layer in the logit lens", min=1)
