"""``dstune data inspect``: what a data file holds and what the model will be trained on.

Shows the detected format, row counts (bad rows are counted, not fatal, so one look shows them all),
label balance, token-length statistics with the model's tokenizer and chat template, and a few examples
rendered exactly as they are tokenized, with the tokens that carry loss between ``[[`` and ``]]``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from dstune.data.clean import content
from dstune.data.formats import has_reasoning
from dstune.data.prepare import length_stats, load_tokenizer_for, token_lengths
from dstune.data.read import load_examples
from dstune.data.tokenize import IGNORE, tokenize_examples

OPEN, CLOSE = "[[", "]]"
_SHOW_CHARS = 2000  # a rendered example is cut here: one wiki_demo.txt line is 100,000 characters


def _cut(text: str) -> str:
    return (
        text
        if len(text) <= _SHOW_CHARS
        else f"{text[:_SHOW_CHARS]}... ({len(text) - _SHOW_CHARS} more characters)"
    )


def render_mask(tokenizer: Any, input_ids: list[int], labels: list[int]) -> str:
    """The decoded tokens, with each run of tokens that carry loss wrapped in ``[[ ]]``.

    Runs are decoded whole, not token by token, so characters split across byte-level tokens
    (most Chinese characters in DeepSeek's vocabulary) come out intact.
    """
    out, start = [], 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != IGNORE) != (labels[start] != IGNORE):
            text = tokenizer.decode(input_ids[start:i], skip_special_tokens=False)
            out.append(f"{OPEN}{text}{CLOSE}" if labels[start] != IGNORE else text)
            start = i
    return "".join(out)


def inspect_file(
    path: str | Path,
    *,
    model: str | None = None,
    fmt: str = "auto",
    text_column: str | None = None,
    label_column: str | None = None,
    examples: int = 3,
    max_length: int = 512,
    train_on: str = "assistant",
) -> dict:
    """Reads a data file leniently and describes it.

    Args:
        path: the data file.
        model: a model spec whose tokenizer and chat template render the examples; None shows the
            examples' fields and character lengths only.
        fmt, text_column, label_column: as for ``load_examples``.
        examples: how many examples to render.
        max_length: tokens per example, as ``data.max_length`` in training (longer ones are shown cut).
        train_on: "assistant" or "all", as ``data.train_on``.

    Returns:
        A JSON-ready dict: path, format, rows read, examples, dropped (by reason, with the first
        place), labels, rows with reasoning, character and token length statistics, rendered examples.

    Raises:
        DataError: for a file that cannot be read at all (missing, empty, unknown format).
    """
    loaded = load_examples(path, fmt, True, None, None, text_column=text_column, label_column=label_column)
    rows = loaded.examples
    report: dict[str, Any] = {
        "path": loaded.path,
        "format": loaded.format,
        "rows_read": loaded.rows_read,
        "examples": len(rows),
        "dropped": loaded.dropped,
        "first_dropped": loaded.first_dropped,
        "with_reasoning": sum(map(has_reasoning, rows)),
    }
    if loaded.format == "classification":
        report["labels"] = dict(sorted(Counter(ex["label"] for ex in rows).items()))
    chars = [len(content(ex)) for ex in rows]
    report["chars"] = {k: v for k, v in length_stats(chars).items() if k != "histogram"}
    shown = rows[:examples]
    if model is None:
        report["rendered"] = [{"source": ex["source"], "text": _cut(_plain(ex))} for ex in shown]
        return report
    tokenizer, template = load_tokenizer_for(model)
    report["model"] = model
    if loaded.format in ("preference", "kto", "prompt"):
        return _inspect_preference(report, rows, shown, tokenizer, template, max_length)
    report["tokens"] = length_stats(token_lengths(rows, tokenizer, template))
    tok = tokenize_examples(shown, tokenizer, template, max_length, "truncate", train_on)
    report["rendered"] = [
        {
            "source": r["source"],
            "tokens": len(r["input_ids"]),
            "trained_tokens": sum(t != IGNORE for t in r["labels"]),
            "text": _cut(render_mask(tokenizer, r["input_ids"], r["labels"])),
        }
        for r in tok.rows
    ]
    report["render_dropped"] = tok.dropped
    return report


def _inspect_preference(report, rows, shown, tokenizer, template, max_length: int) -> dict:
    """Token lengths of preference rows (prompt + longest answer) and the first rows rendered, each answer
    with its loss mask (the prompt carries none)."""
    from dstune.data.preference import tokenize_preference

    whole = tokenize_preference(rows, tokenizer, template, 1 << 30)
    report["tokens"] = length_stats(
        [max(len(r["input_ids"]), len(r.get("rejected_input_ids", ()))) for r in whole.rows]
    )
    tok = tokenize_preference(shown, tokenizer, template, max_length)
    report["rendered"] = []
    for r in tok.rows:
        if "prompt_text" in r:  # a prompt-only row (objective=grpo): the prompt as the model will continue it
            answer = f" (answer {r['answer']!r})" if r["answer"] is not None else " (no answer)"
            report["rendered"].append(
                {
                    "source": f"{r['source']} prompt{answer}",
                    "tokens": len(r["input_ids"]),
                    "trained_tokens": 0,
                    "text": _cut(r["prompt_text"]),
                }  # fmt: skip
            )
            continue
        sides = [("chosen" if "rejected_input_ids" in r else "completion", "")]
        sides += [("rejected", "rejected_")] if "rejected_input_ids" in r else []
        label = f" (label {'true' if r['desirable'] else 'false'})" if "desirable" in r else ""
        for name, prefix in sides:
            ids, labels = r[prefix + "input_ids"], r[prefix + "labels"]
            report["rendered"].append(
                {
                    "source": f"{r['source']} {name}{label}",
                    "tokens": len(ids),
                    "trained_tokens": sum(t != IGNORE for t in labels),
                    "text": _cut(render_mask(tokenizer, ids, labels)),
                }
            )
    report["render_dropped"] = tok.dropped
    return report


def _plain(ex: dict) -> str:
    if "text" in ex:
        return ex["text"]
    if "prompt" in ex:
        answers = [(k, ex[k]) for k in ("chosen", "rejected", "completion", "answer") if k in ex]
        return "\n".join(
            [f"{m['role']}: {m['content']}" for m in ex["prompt"]] + [f"{k}: {v}" for k, v in answers]
        )
    return "\n".join(f"{m['role']}: {m['content']}" for m in ex["messages"])


def render_inspection(report: dict) -> str:
    """The inspection as text for a terminal."""
    lines = [
        f"{report['path']}: format {report['format']}, {report['rows_read']} rows read, "
        f"{report['examples']} usable examples"
    ]
    for reason, n in report["dropped"].items():
        lines.append(f"  dropped {n} ({reason}), first at {report['first_dropped'][reason]}")
    if "labels" in report:
        total = sum(report["labels"].values())
        lines.append(
            "labels: " + ", ".join(f"{k}: {n} ({100 * n / total:.1f}%)" for k, n in report["labels"].items())
        )
    if report["with_reasoning"]:
        lines.append(f"reasoning traces: {report['with_reasoning']} examples")
    c = report["chars"]
    lines.append(
        f"characters of text per example: min {c['min']}, mean {c['mean']}, p50 {c['p50']}, "
        f"p90 {c['p90']}, max {c['max']}"
    )
    if "tokens" in report:
        t = report["tokens"]
        lines.append(
            f"tokens per example ({report['model']}): min {t['min']}, mean {t['mean']}, p50 {t['p50']}, "
            f"p90 {t['p90']}, p99 {t['p99']}, max {t['max']}"
        )
        lines.append("  histogram: " + ", ".join(f"{b}: {n}" for b, n in t["histogram"].items() if n))
        lines.append(f"\nexamples as tokenized; tokens that carry loss are between {OPEN} and {CLOSE}:")
    for item in report["rendered"]:
        extra = f" ({item['tokens']} tokens, {item['trained_tokens']} trained)" if "tokens" in item else ""
        lines += ["", f"--- {item['source']}{extra}", item["text"]]
    return "\n".join(lines)
