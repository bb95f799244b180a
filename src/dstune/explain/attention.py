"""Attention weights of one forward pass, and the ``--layers`` / ``--heads`` choices of which to draw.

Only the eager attention path materialises the ``softmax(QK^T / sqrt(d))`` matrix: SDPA and flash attention
fuse it away and return ``None`` for ``output_attentions`` (transformers' attention interface), so the pass
runs with eager attention and puts the model's own choice back afterwards. Each row of a returned map is
one query's softmax over the keys and sums to 1.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from dstune.errors import UsageError

KEYWORDS = {"--layers": ("all",), "--heads": ("all", "mean")}


def parse_choice(spec: str, option: str) -> list[int] | str:
    """``"0,-1"`` -> ``[0, -1]``; ``"all"`` (and for ``--heads`` ``"mean"``) is kept as the word.

    Raises:
        UsageError: naming ``option``, for anything else.
    """
    spec = spec.strip().lower()
    if spec in KEYWORDS[option]:
        return spec
    try:
        values = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values:
        words = " or ".join(KEYWORDS[option])
        raise UsageError(f"{option} {spec!r}: give comma-separated indices (e.g. 0,-1) or {words}")
    return values


def resolve_indices(choice: list[int] | str, count: int, option: str, what: str) -> list[int]:
    """The non-negative indices ``choice`` names among ``count`` layers or heads (negative: from the end).

    Raises:
        UsageError: an index out of range, naming ``option`` and the range the model has.
    """
    if isinstance(choice, str):  # all / mean: every index
        return list(range(count))
    out = []
    for i in choice:
        if not -count <= i < count:
            raise UsageError(
                f"{option} {i}: the model has {count} {what} (0..{count - 1}, or -{count}..-1 from the end)"
            )
        out.append(i % count)
    return list(dict.fromkeys(out))


@contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Runs the block with eager attention (the only path that returns weights), then restores the
    implementation the model had (SDPA by default) so later passes keep their speed."""
    before = model.config._attn_implementation
    if before != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before != "eager":
            model.set_attn_implementation(before)


@torch.no_grad()
def attention_maps(model: torch.nn.Module, ids: list[int]) -> list[torch.Tensor]:
    """One ``(heads, queries, keys)`` float32 CPU tensor per decoder layer for the prompt ``ids``.

    Keys can outnumber queries (prefix tuning's virtual tokens come first); they are kept, so every row
    still sums to 1.
    """
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    with eager_attention(model):
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), output_attentions=True)
    if not out.attentions or out.attentions[0] is None:
        raise UsageError(
            f"{type(model).__name__} returned no attention weights even with eager attention; "
            "attention maps are not available for this architecture"
        )
    return [a[0].float().cpu() for a in out.attentions]


def select_heads(layer_map: torch.Tensor, heads: list[int] | str) -> list[tuple[str, torch.Tensor]]:
    """The panels to draw for one layer: ``(title, (queries, keys) map)`` per chosen head, or one panel
    with the mean over heads (a mean of softmax rows, so its rows sum to 1 too)."""
    if heads == "mean":
        return [(f"mean of {layer_map.shape[0]} heads", layer_map.mean(0))]
    chosen = range(layer_map.shape[0]) if heads == "all" else heads
    return [(f"head {h}", layer_map[h]) for h in chosen]
