"""``dstune data``: prepare (clean, deduplicate, split, check), augment, pseudo-label and inspect data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dstune.clikit import console
from dstune.clikit import fail as _fail
from dstune.errors import DstuneError

data_app = typer.Typer(
    no_args_is_help=True, help="Prepare (clean, split, check), augment, pseudo-label and inspect data files."
)


# fmt: off
# One option per line reads as a table of the command's options; the formatter would spread each over four.
@data_app.command("prepare")
def data_prepare(
    inputs: list[Path] = typer.Argument(..., help="data files (json, jsonl, csv, parquet, txt), cleaned and "
                                        "split together"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory for train/val/test.jsonl and report"),
    format_: str = typer.Option("auto", "--format", help="auto | text | alpaca | messages | classification"),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="classification text column "
                                              "(default: text, review, ...)"),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="classification label column "
                                               "(default: label)"),
    lenient: bool = typer.Option(False, "--lenient", help="drop and count bad rows instead of stopping"),
    system: Optional[str] = typer.Option(None, "--system", help="system prompt for chats without one"),
    reasoning: str = typer.Option("keep", "--reasoning", help="keep | strip reasoning traces"),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="read at most N examples per file"),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="unicode normalisation, "
                                   "zero-width characters removed"),
    unicode_form: str = typer.Option("NFKC", "--unicode-form", help="NFKC (full-width to ASCII) | NFC "
                                     "(keeps Chinese punctuation)"),
    scrub_pii: bool = typer.Option(True, "--scrub-pii/--no-scrub-pii", help="replace e-mails, phones, ID and "
                                   "bank cards by placeholders"),
    min_chars: int = typer.Option(2, "--min-chars", help="drop rows with fewer characters"),
    max_chars: Optional[int] = typer.Option(20000, "--max-chars", help="drop rows with more characters"),
    dedup: bool = typer.Option(True, "--dedup/--no-dedup", help="drop exact duplicates (normalised text)"),
    near_dedup: bool = typer.Option(True, "--near-dedup/--no-near-dedup", help="drop near duplicates"),
    near_threshold: float = typer.Option(0.8, "--near-threshold", help="Jaccard of character 5-grams"),
    split: tuple[float, float, float] = typer.Option((0.8, 0.1, 0.1), "--split", help="train val test"),
    seed: int = typer.Option(42, "--seed", help="split seed"),
    stratify: bool = typer.Option(True, "--stratify/--no-stratify", help="split labels evenly"),
    eval_file: list[Path] = typer.Option([], "--eval-file", help="further held-out file to check train "
                                         "against (repeatable)"),
    ngram: int = typer.Option(13, "--ngram", help="n-gram length of the contamination check (words; CJK "
                              "characters)"),
    decontaminate: bool = typer.Option(False, "--decontaminate", help="remove train rows that overlap "
                                       "held-out rows"),
    model: Optional[str] = typer.Option(None, "--model", help="model whose tokenizer measures token lengths"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="drop rows longer than N tokens "
                                             "(needs --model)"),
) -> None:
    """Clean, deduplicate, scrub, split 8:1:1 and check for contamination; write the splits and a report."""
    from dstune.data.clean import CleanOptions
    from dstune.data.prepare import PrepareOptions, prepare_files, render_report_md

    clean = CleanOptions(
        normalize=normalize,
        unicode_form=unicode_form,
        scrub_pii=scrub_pii,
        min_chars=min_chars,
        max_chars=max_chars,
        dedup=dedup,
        near_dedup=near_dedup,
        near_threshold=near_threshold,
    )
    options = PrepareOptions(
        fmt=format_,
        text_column=text_column,
        label_column=label_column,
        lenient=lenient,
        system=system,
        reasoning=reasoning,
        max_samples=max_samples,
        clean=clean,
        split=split,
        seed=seed,
        stratify=stratify,
        eval_files=[str(f) for f in eval_file],
        ngram=ngram,
        decontaminate=decontaminate,
        model=model,
        max_tokens=max_tokens,
    )
    try:
        report = prepare_files(inputs, out, options)
    except DstuneError as exc:
        _fail(str(exc))
    console.print(render_report_md(report), markup=False, highlight=False)
    console.print(f"wrote {out}/train.jsonl, val.jsonl, test.jsonl, report.json, report.md", highlight=False)


@data_app.command("augment")
def data_augment(
    file: Path = typer.Argument(..., help="training data (json, jsonl, csv, parquet, txt): augment the train "
                                "split, e.g. dstune data prepare's train.jsonl"),
    out: Path = typer.Option(..., "--out", "-o", help="output .jsonl: the original rows, then the new ones"),
    ops: str = typer.Option("swap,delete", "--ops", help="comma-separated: swap, delete, synonym, "
                            "paraphrase (needs --model)"),
    copies: int = typer.Option(1, "--copies", "-n", help="new rows per operation per input row"),
    rate: float = typer.Option(0.1, "--rate", help="share of the words an edit swaps, deletes or replaces"),
    synonyms: Optional[str] = typer.Option(None, "--synonyms", help="synonym: 'builtin' (default: the "
                                           "bundled English and Chinese thesauri) or your file, JSON "
                                           "{word: \\[synonyms]} or lines 'word syn1 syn2'"),
    model: Optional[str] = typer.Option(None, "--model", help="paraphrase: the model (or run) that restates "
                                        "each text"),
    via: Optional[str] = typer.Option(None, "--via", help="paraphrase by back-translation through this "
                                      "language (e.g. English)"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="paraphrase: longest reply"),
    format_: str = typer.Option("auto", "--format", help="auto | text | alpaca | messages | classification"),
    seed: int = typer.Option(0, "--seed", help="seed of the edits"),
) -> None:
    """More training rows: word swaps, deletions, synonyms, paraphrases; each row marked with its origin."""
    from dstune.augment import AugmentOptions, augment_file

    opts = AugmentOptions(ops=tuple(o.strip() for o in ops.split(",") if o.strip()), copies=copies, rate=rate,
                          seed=seed, synonyms=synonyms, model=model, via=via, max_new_tokens=max_new_tokens,
                          fmt=format_)
    try:
        counts = augment_file(str(file), str(out), opts)
    except DstuneError as exc:
        _fail(str(exc))
    made = ", ".join(f"{op} {n}" for op, n in counts["by_op"].items()) or "none"
    new = counts["written"] - counts["input"]
    console.print(f"wrote {out}: {counts['input']} original rows and {new} new ({made})", highlight=False)


@data_app.command("pseudo-label")
def data_pseudo_label(
    file: Path = typer.Argument(..., help="unlabelled texts (json, jsonl, csv, parquet, txt)"),
    run: str = typer.Option(..., "--run", help="the classification run (task: classification) that labels"),
    out: Path = typer.Option(..., "--out", "-o", help="output .jsonl of the confidently labelled rows"),
    min_confidence: float = typer.Option(0.9, "--min-confidence", help="keep rows whose top class has at "
                                         "least this probability"),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="the text column (default: text, "
                                              "review, ...)"),
    max_rows: Optional[int] = typer.Option(None, "--max-rows", help="label only the first N rows"),
    task: Optional[str] = typer.Option(None, "--task", help="a run with a head per task (classify.heads): "
                                       "the task whose head labels the texts"),
) -> None:
    """Label unlabelled texts with a trained classifier; keep the confident ones as training rows."""
    from dstune.augment import pseudo_label

    try:
        counts = pseudo_label(str(file), run, str(out), min_confidence, text_column, max_rows, task)
    except DstuneError as exc:
        _fail(str(exc))
    console.print(f"wrote {out}: {counts['written']} of {counts['input']} rows labelled with confidence >= "
                  f"{min_confidence} ({counts['by_label']})", highlight=False)


# fmt: on


@data_app.command("inspect")
def data_inspect(
    file: Path = typer.Argument(..., help="data file"),
    model: str = typer.Option(
        "tiny:deepseek-llm",
        "--model",
        help="tokenizer and chat template to render with (default: DeepSeek's); 'none' skips tokens",
    ),
    format_: str = typer.Option("auto", "--format", help="auto | text | alpaca | messages | classification"),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="classification text column"),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="classification label column"),
    examples: int = typer.Option(3, "--examples", "-n", help="examples to render"),
    max_length: int = typer.Option(512, "--max-length", help="tokens per example, as data.max_length"),
) -> None:
    """Show a data file's format, counts, token lengths and examples with the trained tokens in [[ ]]."""
    from dstune.data.inspect import inspect_file, render_inspection

    try:
        report = inspect_file(
            file,
            model=None if model.lower() == "none" else model,
            fmt=format_,
            text_column=text_column,
            label_column=label_column,
            examples=examples,
            max_length=max_length,
        )
    except DstuneError as exc:
        _fail(str(exc))
    console.print(render_inspection(report), markup=False, highlight=False)
