"""``dstune data prepare``: read, clean, split and check data files, and write the splits with a report.

    report = prepare_files(["a.jsonl", "b.csv"], "data/prepared", PrepareOptions(model="tiny:deepseek-llm"))
    # data/prepared/{train,val,test}.jsonl, report.json, report.md

The steps, in order: read every input (strict: the first bad row stops with its file and line;
lenient: bad rows are dropped and counted), apply the reasoning policy, clean all inputs together
(``dstune.data.clean``), drop rows over ``max_tokens`` (with a model's tokenizer), split 8:1:1 from a
seed (per label for classification, so each split keeps the label balance), check the training rows
for n-gram overlap with the validation, test and any extra evaluation files (and remove them on
request), then write. The written files are read back by ``dstune train`` as they are.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dstune.data.clean import CleanOptions, clean_examples
from dstune.data.formats import DataError, has_reasoning, strip_reasoning
from dstune.data.overlap import DEFAULT_N, find_overlaps
from dstune.data.read import load_examples
from dstune.data.split import split_examples

SPLITS = ("train", "val", "test")
# Token-length histogram bins: powers of two, which is how max_length is usually chosen.
_EDGES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass
class PrepareOptions:
    """Everything ``prepare_files`` can be told; the defaults are the CLI's defaults.

    Attributes:
        fmt: "auto", "text", "alpaca", "messages" or "classification".
        text_column, label_column: classification columns (see ``load_examples``).
        lenient: drop and count bad rows instead of stopping at the first.
        system: system prompt for conversations without one.
        reasoning: "keep" or "strip" reasoning traces (``reasoning_content``, ``...</think>``).
        max_samples: read at most this many examples per input file.
        clean: the cleaning steps.
        split: train/val/test ratios.
        seed: split seed.
        stratify: split classification rows per label.
        eval_files: further held-out files to check the training rows against.
        ngram: units per n-gram of the contamination check.
        decontaminate: remove the overlapping rows from train.
        model: a model spec whose tokenizer measures lengths in tokens; None measures nothing.
        max_tokens: drop rows longer than this many tokens (needs ``model``).
    """

    fmt: str = "auto"
    text_column: str | None = None
    label_column: str | None = None
    lenient: bool = False
    system: str | None = None
    reasoning: str = "keep"
    max_samples: int | None = None
    clean: CleanOptions = field(default_factory=CleanOptions)
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 42
    stratify: bool = True
    eval_files: list[str] = field(default_factory=list)
    ngram: int = DEFAULT_N
    decontaminate: bool = False
    model: str | None = None
    max_tokens: int | None = None


def load_tokenizer_for(model: str) -> tuple[Any, str]:
    """The tokenizer of a model spec and the chat template dstune would train it with."""
    from dstune.models.load import load_tokenizer, resolve_model_dir
    from dstune.models.templates import resolve_chat_template

    resolved = resolve_model_dir(model)
    tokenizer = load_tokenizer(resolved.path)
    return tokenizer, resolve_chat_template(tokenizer, "auto", resolved.family)


def token_lengths(examples: list[dict], tokenizer: Any, template: str) -> list[int]:
    """Tokens of each example as it will be trained: text with bos/eos, conversations rendered with the
    chat template (so role headers and end-of-turn tokens count)."""
    texts = []
    for ex in examples:
        if "text" in ex:
            texts.append((tokenizer.bos_token or "") + ex["text"] + (tokenizer.eos_token or ""))
        else:
            texts.append(
                tokenizer.apply_chat_template(ex["messages"], tokenize=False, chat_template=template)
            )
    lengths = []
    for i in range(0, len(texts), 256):
        lengths += [len(ids) for ids in tokenizer(texts[i : i + 256], add_special_tokens=False)["input_ids"]]
    return lengths


def length_stats(lengths: list[int]) -> dict:
    """Count, min, mean, percentiles, max and a power-of-two histogram of token lengths."""
    if not lengths:
        return {"count": 0}
    s = sorted(lengths)

    def pct(p: float) -> int:  # nearest rank
        return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]

    bins = [f"<{_EDGES[0]}"] + [f"{a}-{b - 1}" for a, b in zip(_EDGES, _EDGES[1:])] + [f">={_EDGES[-1]}"]
    counts = Counter(bins[sum(n >= e for e in _EDGES)] for n in s)
    return {
        "count": len(s),
        "min": s[0],
        "mean": round(sum(s) / len(s), 1),
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "max": s[-1],
        "histogram": {b: counts.get(b, 0) for b in bins},
    }


def _output_format(formats: dict[str, str]) -> str:
    kinds = {"alpaca": "messages"}
    found = {kinds.get(f, f) for f in formats.values()}
    if len(found) > 1:
        listing = ", ".join(f"{path} ({fmt})" for path, fmt in formats.items())
        raise DataError(
            f"the inputs hold different kinds of data: {listing}; text, conversations "
            "(alpaca and messages mix) and classification rows must be prepared separately"
        )
    return found.pop()


def to_row(example: dict, fmt: str) -> dict:
    """The JSON row written for an example: ``{"text"}``, ``{"text", "label"}`` or ``{"messages"}``,
    each with its ``source`` (file and line it came from)."""
    if fmt == "text":
        return {"text": example["text"], "source": example["source"]}
    if fmt == "classification":
        return {
            "text": example["messages"][-2]["content"],
            "label": example["label"],
            "source": example["source"],
        }
    return {"messages": example["messages"], "source": example["source"]}


def _split(examples: list[dict], opts: PrepareOptions, classification: bool) -> dict[str, list[dict]]:
    if not (classification and opts.stratify):
        return dict(zip(SPLITS, split_examples(examples, tuple(opts.split), opts.seed)))
    groups: dict[str, list[dict]] = {}
    for ex in examples:
        groups.setdefault(ex["label"], []).append(ex)
    out: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for label in sorted(groups):
        for name, part in zip(SPLITS, split_examples(groups[label], tuple(opts.split), opts.seed)):
            out[name] += part
    for i, name in enumerate(SPLITS):  # labels would otherwise come in blocks
        random.Random(opts.seed + i).shuffle(out[name])
    return out


def _check_options(inputs: list[str | Path], opts: PrepareOptions) -> None:
    """Raises DataError for no inputs, ``max_tokens`` without a model, or an unknown reasoning policy."""
    if not inputs:
        raise DataError("no input files: give one or more data files to prepare")
    if opts.max_tokens is not None and not opts.model:
        raise DataError(
            "--max-tokens measures rows with a tokenizer: give --model too (e.g. --model tiny:deepseek-llm)"
        )
    if opts.reasoning not in ("keep", "strip"):
        raise DataError(f"unknown reasoning policy {opts.reasoning!r}; accepted: keep, strip")


def _read_inputs(
    inputs: list[str | Path], opts: PrepareOptions, report: dict, dropped: Counter
) -> tuple[list[dict], dict[str, str]]:
    """Reads the input files in order, noting each in the report; returns the examples and the formats."""
    examples, formats = [], {}
    for path in inputs:
        loaded = load_examples(
            path,
            opts.fmt,
            opts.lenient,
            opts.max_samples,
            opts.system,
            text_column=opts.text_column,
            label_column=opts.label_column,
        )
        made = next((e for e in loaded.examples if e.get("origin", "original") != "original"), None)
        if made is not None:  # deduplication would drop them and the split could validate on them
            raise DataError(
                f"{path}: {made['source']} was written by dstune data augment (origin: {made['origin']}); "
                f"prepare the original data first, then augment the train.jsonl it writes"
            )
        formats[loaded.path] = loaded.format
        dropped.update(loaded.dropped)
        report["inputs"].append(loaded.summary())
        examples += loaded.examples
    return examples, formats


def _clean(examples: list[dict], opts: PrepareOptions, report: dict, dropped: Counter) -> list[dict]:
    """Cleans the examples of all inputs together and records what the cleaning did in the report."""
    cleaned = clean_examples(examples, opts.clean)
    dropped.update(cleaned.dropped)
    report["cleaning"] = {
        "dropped": cleaned.dropped,
        "first_dropped": cleaned.first_dropped,
        "pii_replaced": cleaned.pii,
        "normalized_rows": cleaned.normalized,
        "duplicate_of": dict(list(cleaned.duplicate_of.items())[:50]),
    }
    return cleaned.examples


def _measure_tokens(
    examples: list[dict], opts: PrepareOptions, report: dict, dropped: Counter
) -> tuple[list[dict], dict[int, int]]:
    """Measures the examples in tokens (with ``opts.model``) and drops those over ``max_tokens``."""
    lengths: dict[int, int] = {}  # id(example) -> tokens; sources need not be unique across inputs
    if opts.model:
        tokenizer, template = load_tokenizer_for(opts.model)
        lengths = dict(zip(map(id, examples), token_lengths(examples, tokenizer, template)))
        if opts.max_tokens is not None:
            long = [ex for ex in examples if lengths[id(ex)] > opts.max_tokens]
            if long:
                dropped["too many tokens"] += len(long)
                report["cleaning"]["dropped"]["too many tokens"] = len(long)
                report["cleaning"]["first_dropped"]["too many tokens"] = long[0]["source"]
            examples = [ex for ex in examples if lengths[id(ex)] <= opts.max_tokens]
    return examples, lengths


def _check_contamination(
    splits: dict[str, list[dict]], opts: PrepareOptions, report: dict, dropped: Counter
) -> None:
    """Checks train for n-gram overlap with val, test and the eval files, removing the rows on request."""
    held = {"val": splits["val"], "test": splits["test"]}
    for path in opts.eval_files:
        held[Path(path).name] = load_examples(
            path,
            "auto",
            opts.lenient,
            None,
            None,
            text_column=opts.text_column,
            label_column=opts.label_column,
        ).examples
    overlaps = find_overlaps(splits["train"], held, opts.ngram)
    if opts.decontaminate and overlaps:
        bad = {hit["index"] for hit in overlaps}
        splits["train"] = [ex for i, ex in enumerate(splits["train"]) if i not in bad]
        dropped["contaminated"] += len(bad)
    report["contamination"] = {
        "ngram": opts.ngram,
        "checked_against": {k: len(v) for k, v in held.items()},
        "train_rows_overlapping": len(overlaps),
        "removed": bool(opts.decontaminate),
        "rows": overlaps[:50],
    }


def _write_outputs(out_dir: str | Path, splits: dict[str, list[dict]], fmt: str, report: dict) -> None:
    """Writes the splits as jsonl files, then the report as ``report.json`` and ``report.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
            for ex in rows:
                fh.write(json.dumps(to_row(ex, fmt), ensure_ascii=False) + "\n")
    report["files"] = {name: str(out / f"{name}.jsonl") for name in SPLITS}
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "report.md").write_text(render_report_md(report), encoding="utf-8")


def prepare_files(
    inputs: list[str | Path], out_dir: str | Path, options: PrepareOptions | None = None
) -> dict:
    """Prepares data files for training and writes the splits and a report into ``out_dir``.

    Args:
        inputs: data files (json, jsonl, csv, parquet, txt); all of one kind (text, conversations or
            classification), cleaned and split together.
        out_dir: where ``train.jsonl``, ``val.jsonl``, ``test.jsonl``, ``report.json`` and ``report.md``
            go; created if missing. Existing files of those names are replaced.
        options: what to do; None uses the defaults.

    Returns:
        The report (also written as ``report.json``).

    Raises:
        DataError: a bad file, a bad row in strict mode (naming file and line), inputs of different
            kinds, ``max_tokens`` without a model, or nothing left after cleaning.
    """
    opts = options or PrepareOptions()
    _check_options(inputs, opts)
    report: dict[str, Any] = {"inputs": [], "options": _options_report(opts)}
    dropped: Counter = Counter()
    examples, formats = _read_inputs(inputs, opts, report, dropped)
    fmt = _output_format(formats)
    report["format"] = fmt
    report["reasoning"] = {"policy": opts.reasoning, "rows_with_reasoning": sum(map(has_reasoning, examples))}
    if opts.reasoning == "strip":
        examples = [strip_reasoning(ex) for ex in examples]
    examples = _clean(examples, opts, report, dropped)
    examples, lengths = _measure_tokens(examples, opts, report, dropped)
    if not examples:
        why = ", ".join(f"{r}: {n}" for r, n in dropped.items())
        raise DataError(
            f"nothing left to write after cleaning ({why}); see the cleaning options in "
            "dstune data prepare --help"
        )

    splits = _split(examples, opts, fmt == "classification")
    _check_contamination(splits, opts, report, dropped)

    report["dropped"] = dict(dropped)
    report["split"] = {name: len(rows) for name, rows in splits.items()}
    if fmt == "classification":
        names = sorted({ex["label"] for ex in examples})
        report["labels"] = {
            "names": names,
            **{
                name: {label: sum(ex["label"] == label for ex in rows) for label in names}
                for name, rows in splits.items()
            },
        }
    if lengths:
        report["tokens"] = {
            "model": opts.model,
            **{name: length_stats([lengths[id(ex)] for ex in rows]) for name, rows in splits.items()},
        }
    _write_outputs(out_dir, splits, fmt, report)
    return report


def _options_report(opts: PrepareOptions) -> dict:
    d = asdict(opts)
    d["split"] = list(opts.split)
    return d


def render_report_md(report: dict) -> str:
    """A short human summary of a prepare report, as Markdown."""
    lines = [
        "# Data preparation report",
        "",
        f"Format written: **{report['format']}**",
        "",
        "## Inputs",
        "",
        "| file | format | rows read | examples | dropped |",
        "|---|---|---|---|---|",
    ]
    for item in report["inputs"]:
        bad = ", ".join(f"{r}: {n}" for r, n in item["dropped"].items()) or "-"
        lines.append(
            f"| {item['path']} | {item['format']} | {item['rows_read']} | {item['examples']} | {bad} |"
        )
    lines += ["", "## Dropped", "", "| reason | rows |", "|---|---|"]
    lines += [f"| {r} | {n} |" for r, n in report["dropped"].items()] or ["| (none) | 0 |"]
    pii = report["cleaning"]["pii_replaced"]
    lines += [
        "",
        "Sensitive information replaced: " + (", ".join(f"{k}: {n}" for k, n in pii.items()) or "none"),
        "",
        "## Splits",
        "",
        "| split | rows |",
        "|---|---|",
    ]
    lines += [f"| {name} | {n} |" for name, n in report["split"].items()]
    if "labels" in report:
        names = report["labels"]["names"]
        lines += [
            "",
            "## Label balance",
            "",
            "| split | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        for name in SPLITS:
            lines.append(f"| {name} | " + " | ".join(str(report["labels"][name][n]) for n in names) + " |")
    c = report["contamination"]
    lines += [
        "",
        "## Contamination",
        "",
        f"{c['train_rows_overlapping']} training rows share a {c['ngram']}-gram with "
        f"{', '.join(c['checked_against'])}"
        + (" (removed)." if c["removed"] else " (kept; --decontaminate removes them)."),
    ]
    for hit in c["rows"][:10]:
        lines.append(f"- {hit['source']} overlaps {hit['matches']}: \"{hit['ngram']}\"")
    if "tokens" in report:
        lines += [
            "",
            f"## Tokens ({report['tokens']['model']})",
            "",
            "| split | rows | min | mean | p50 | p90 | p99 | max |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name in SPLITS:
            t = report["tokens"][name]
            if t["count"]:
                lines.append(
                    f"| {name} | {t['count']} | {t['min']} | {t['mean']} | {t['p50']} "
                    f"| {t['p90']} | {t['p99']} | {t['max']} |"
                )
        hist = report["tokens"]["train"].get("histogram", {})
        lines += [
            "",
            "Train length histogram (tokens: rows): " + ", ".join(f"{b}: {n}" for b, n in hist.items() if n),
        ]
    return "\n".join(lines) + "\n"
