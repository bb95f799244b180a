"""The files of ``dstune explain``: attention heatmaps, the attribution as HTML and a bar chart, the logit
lens as a table per predicted token.

PNG labels are ASCII: matplotlib's default fonts have no CJK glyphs and would draw empty boxes (as
``report.charts.plot_confusion`` avoids too), so a token is shown as its position and its escaped text
(``3 \\u4f60``); the HTML, which a browser renders with its own fonts, shows the real text.
"""

from __future__ import annotations

import html
import math
import unicodedata
from pathlib import Path
from typing import Sequence

import torch

from dstune.report.charts import _pyplot

_MAX_LABEL = 18  # characters of a token's text on an axis; the HTML and JSON keep all of it


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's own text, decoded alone; a piece of a character is shown as its bytes, ``<e5 a5>``.

    Byte-level BPE (DeepSeek, Qwen, SmolLM2) splits a character it has no token for into byte tokens, and
    decoding one alone gives U+FFFD; its token string maps back to the bytes (GPT-2's byte-to-unicode
    table). Other tokenizers' byte tokens already read ``<0xE5>``.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    out = []
    for i in ids:
        text = tokenizer.decode([int(i)], skip_special_tokens=False)
        if "\ufffd" in text:
            raw = tokenizer.convert_ids_to_tokens(int(i))
            text = (
                "<" + " ".join(f"{byte_of[c]:02x}" for c in raw) + ">"
                if all(c in byte_of for c in raw)
                else raw
            )
        out.append(text)
    return out


def ascii_label(text: str, index: int | None = None) -> str:
    """``text`` escaped to ASCII (``\\n``, ``\\u4f60``) and shortened, after its position if given."""
    # NFKC turns the full-width bars of DeepSeek's special tokens (<｜User｜>) into ASCII ones; U+2581 is
    # SentencePiece's word-boundary mark in them (begin▁of▁sentence)
    escaped = ascii(unicodedata.normalize("NFKC", text).replace("\u2581", "_"))[1:-1]
    escaped = f"'{escaped}'" if not escaped.strip() else escaped  # a space token, visible
    escaped = escaped if len(escaped) <= _MAX_LABEL else escaped[: _MAX_LABEL - 1] + "~"
    return escaped if index is None else f"{index} {escaped}"


def ascii_title(title: str) -> str:
    """A PNG title with its non-ASCII characters escaped (a run name, a token or label it names)."""
    return title.encode("ascii", "backslashreplace").decode("ascii")


def axis_labels(texts: Sequence[str], length: int) -> list[str]:
    """Labels for an attention axis of ``length`` positions: the tokens last, virtual tokens of prompt or
    prefix tuning (positions the prompt does not have) first."""
    extra = length - len(texts)
    return [f"virtual {j}" for j in range(extra)] + [ascii_label(t, i) for i, t in enumerate(texts)]


def plot_attention(
    panels: list[tuple[str, torch.Tensor]], texts: Sequence[str], path: str | Path, title: str
) -> Path:
    """One layer's attention as heatmaps, a panel per head (or one for their mean): query tokens down the
    rows, key tokens across the columns, each row a softmax over what that token attends to."""
    plt = _pyplot()
    from matplotlib.colors import PowerNorm

    queries, keys = panels[0][1].shape
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    # inches per panel; the height has room for the rotated key labels under the map
    width, height = min(max(0.16 * keys + 2.0, 3.5), 12.0), min(max(0.16 * queries + 3.6, 3.5), 13.6)
    fig, axes = plt.subplots(
        rows, cols, figsize=(width * cols + 1.5, height * rows), dpi=100, squeeze=False, layout="constrained"
    )
    font = max(4.0, min(8.0, 300 / max(keys, 1)))
    # square-root colours: the first token often takes most of every row (an "attention sink", Xiao et al.
    # 2023, arXiv:2309.17453), and on a linear scale the rest of the map would be one dark colour
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
    for ax, (name, matrix) in zip(axes.flat, panels):
        image = ax.imshow(matrix.numpy(), cmap="viridis", norm=norm)
        ax.set_xticks(range(keys), axis_labels(texts, keys), rotation=90, fontsize=font)
        ax.set_yticks(range(queries), axis_labels(texts, queries), fontsize=font)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("key (attended to)", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    fig.suptitle(ascii_title(title))
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _colour(score: float, top: float) -> str:
    """Red for a positive score, blue for a negative one, opacity by its share of the largest |score|."""
    alpha = abs(score) / top if top > 0 else 0.0
    return f"rgba(220, 38, 38, {alpha:.3f})" if score >= 0 else f"rgba(37, 99, 235, {alpha:.3f})"


def attribution_html(texts: Sequence[str], scores: Sequence[float], path: str | Path, title: str) -> Path:
    """The prompt as coloured spans, one per token, its score in the title tooltip."""
    top = max((abs(s) for s in scores), default=0.0)
    spans = "".join(
        f'<span class="t" style="background:{_colour(s, top)}" title="token {i}: {html.escape(repr(t))} '
        f'score {s:+.4g}">{html.escape(t)}</span>'
        for i, (t, s) in enumerate(zip(texts, scores))
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; line-height: 1.9; }}
.t {{ white-space: pre-wrap; border: 1px solid #ddd; border-radius: 3px; padding: 1px 0; }}
.key span {{ padding: 0 .5em; }}
</style></head><body>
<h2>{html.escape(title)}</h2>
<p class="key">gradient x input per token: <span style="background:{_colour(1, 1)}">pushes the score up</span>
<span style="background:{_colour(-1, 1)}">pushes it down</span> (strength: share of the largest |score|,
{top:.4g}); hover a token for its score.</p>
<div>{spans}</div>
</body></html>
"""
    Path(path).write_text(page, encoding="utf-8")
    return Path(path)


def plot_attribution(texts: Sequence[str], scores: Sequence[float], path: str | Path, title: str) -> Path:
    """The attribution as horizontal bars, first token at the top, red positive and blue negative."""
    plt = _pyplot()
    n = len(scores)
    fig, ax = plt.subplots(figsize=(7, min(0.2 * n + 1.5, 40)), dpi=100)
    ax.barh(range(n), scores, color=["#dc2626" if s >= 0 else "#2563eb" for s in scores])
    ax.set_yticks(range(n), [ascii_label(t, i) for i, t in enumerate(texts)], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xlabel("gradient x input")
    ax.set_title(ascii_title(title), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_lens(
    layers: list[list[tuple[str, float]]], path: str | Path, title: str, row_name: str = "layer"
) -> Path:
    """The logit lens of one prediction as a table: a row per layer (the first at the top), its top-k
    candidates across, each cell the candidate's escaped text and probability, coloured by probability."""
    plt = _pyplot()
    k = max(len(row) for row in layers)
    probs = [[p for _, p in row] + [0.0] * (k - len(row)) for row in layers]
    fig, ax = plt.subplots(figsize=(1.5 * k + 2, 0.45 * len(layers) + 1.6), dpi=100)
    ax.imshow(probs, cmap="Oranges", vmin=0.0, vmax=1.0, aspect="auto")
    for r, row in enumerate(layers):
        for c, (text, p) in enumerate(row):
            colour = "white" if p > 0.6 else "black"
            ax.text(
                c,
                r,
                f"{ascii_label(text)}\n{p:.2f}" if p >= 0.01 else f"{ascii_label(text)}\n{p:.1e}",
                ha="center",
                va="center",
                fontsize=7,
                color=colour,
            )
    ax.set_xticks(range(k), [f"top {c + 1}" for c in range(k)], fontsize=8)
    ax.set_yticks(range(len(layers)), [f"{row_name} {r}" for r in range(len(layers))], fontsize=8)
    ax.set_title(ascii_title(title), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
