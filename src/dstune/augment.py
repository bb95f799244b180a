"""``dstune data augment`` and ``dstune data pseudo-label``: more training rows for small data sets (the
low-resource chapter of the fine-tuning guides: fewer than 10K examples).

Edits, after EDA (Wei and Zou 2019, "Easy Data Augmentation"): ``swap`` exchanges two words, ``delete`` drops
each word with probability ``rate``, ``synonym`` replaces words found in a thesaurus: by default the two
that ship in ``dstune/assets`` (English from Moby Thesaurus II, public domain; Chinese from HIT's Tongyici
Cilin (Extended); built by ``benchmarks/build_thesaurus.py``, nothing is downloaded), or the user's
``--synonyms FILE``. Words are jieba's for text with Chinese characters and whitespace-separated otherwise;
an English word is looked up without the punctuation around it and, when lowercase or capitalised at the
start of a sentence, in lowercase, and its replacement gets the same capital and punctuation.
``paraphrase`` asks a model the user names (anything ``dstune generate`` loads) to restate the text, or,
with ``via``, to translate it into that language and back (back-translation). Only what the model reads is
changed: a classification row's text, a conversation's user turns, a plain text row; labels and answers
stay.

Pseudo-labelling runs a trained classification run over an unlabelled file and keeps the rows it labels
with at least ``min_confidence``.

Every written row says where it came from: ``origin`` (``original``, the edit, ``paraphrase`` or
``pseudo-label``) and ``group`` (the index of the input row it was made from; none for pseudo-labels). The
training split (``data.split``) splits the original rows only, and an augmented row goes to training when
its original did and is left out otherwise, so no augmented copy of a validation or test row is trained
on and none is ever validated on (``dstune.data.split.split_rows``).
"""

from __future__ import annotations

import functools
import gzip
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from dstune.data.prepare import to_row
from dstune.data.read import load_examples
from dstune.errors import UsageError
from dstune.rundir import write_text_atomic

EDITS = ("swap", "delete", "synonym")
OPS = (*EDITS, "paraphrase")
_CJK = re.compile(r"[\u3400-\u9fff]")
_AFFIXED = re.compile(r"(\W*)(\w+)(\W*)")  # a whitespace-separated word: punctuation, the word, punctuation
BUILTIN = "builtin"  # --synonyms builtin: the thesauri in dstune/assets (the default)
THESAURI = ("thesaurus_en.tsv.gz", "thesaurus_zh.tsv.gz")


@dataclass
class AugmentOptions:
    ops: tuple[str, ...] = ("swap", "delete")
    copies: int = 1  # rows made per op per input row
    rate: float = 0.1  # share of the words an edit touches (EDA's alpha)
    seed: int = 0
    synonyms: str | None = None  # ``synonym``: a thesaurus file; None or "builtin": the bundled ones
    model: str | None = None  # ``paraphrase``: the model that restates (or translates) the text
    via: str | None = None  # ``paraphrase``: back-translation through this language
    max_new_tokens: int = 256
    fmt: str = "auto"


@functools.cache
def builtin_thesaurus() -> dict[str, list[str]]:
    """The bundled thesauri, English and Chinese in one dict (read once; callers must not change it)."""
    from importlib import resources

    out: dict[str, list[str]] = {}
    for name in THESAURI:
        data = gzip.decompress((resources.files("dstune") / "assets" / name).read_bytes())
        for line in data.decode("utf-8").splitlines():
            word, *syns = line.split("\t")
            out[word] = syns
    return out


def load_thesaurus(spec: str | None) -> dict[str, list[str]]:
    """``--synonyms``: the bundled thesauri for None or ``builtin``, else the user's file."""
    return builtin_thesaurus() if spec in (None, "", BUILTIN) else read_thesaurus(spec)


def read_thesaurus(path: str) -> dict[str, list[str]]:
    """A thesaurus: JSON ``{word: [synonyms]}``, or text lines ``word syn1 syn2 ...`` (tabs or spaces)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--synonyms {path}: no such file")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--synonyms {path}: not JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise UsageError(f"--synonyms {path}: expected an object of word -> list of synonyms")
        return {str(k): [str(s) for s in v if str(s) != str(k)] for k, v in data.items() if v}
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > 1:
            out.setdefault(parts[0], []).extend(s for s in parts[1:] if s != parts[0])
    return out


def words(text: str) -> tuple[list[str], str]:
    """The words of ``text`` and the string that joins them back: jieba's words (joined by nothing) for
    text with Chinese characters, whitespace-separated ones (joined by a space) otherwise."""
    if _CJK.search(text):
        import logging

        import jieba

        jieba.setLogLevel(logging.WARNING)  # it logs the dictionary loading on first use
        return [w for w in jieba.lcut(text) if w.strip()], ""
    return text.split(), " "


def edit(text: str, op: str, rate: float, rng: random.Random, thesaurus: dict[str, list[str]]) -> str:
    """``text`` with one EDA edit applied (``swap``, ``delete`` or ``synonym``)."""
    ws, glue = words(text)
    real = [i for i, w in enumerate(ws) if any(c.isalnum() for c in w)]  # punctuation is never edited
    if len(real) < 2:
        return text
    n = max(1, round(rate * len(real)))
    if op == "swap":
        for _ in range(n):
            i, j = rng.sample(real, 2)
            ws[i], ws[j] = ws[j], ws[i]
    elif op == "delete":
        gone = {i for i in real if rng.random() < rate}
        if len(gone) == len(real):
            gone.discard(rng.choice(real))  # a row keeps at least one word
        ws = [w for i, w in enumerate(ws) if i not in gone]
    else:
        choices = {i: synonyms_of(ws[i], thesaurus, i == 0 or ws[i - 1][-1] in ".!?") for i in real}
        candidates = [i for i in real if choices[i]]
        for i in rng.sample(candidates, min(n, len(candidates))):
            ws[i] = rng.choice(choices[i])
    return glue.join(ws)


def synonyms_of(word: str, thesaurus: dict[str, list[str]], sentence_start: bool = False) -> list[str]:
    """What ``word`` can be replaced with: its thesaurus entry as it is; else, for a word with punctuation
    around it or capitals, the entry of the bare word in lowercase (when all lowercase, or capitalised at a
    ``sentence_start``: "Good" -> "Fine", but "John" mid-sentence is a name), given the word's capital and
    punctuation back. An all-capitals word (an acronym) is only looked up as it is."""
    if thesaurus.get(word):
        return thesaurus[word]
    m = _AFFIXED.fullmatch(word)
    if m is None:
        return []
    before, bare, after = m.groups()
    capital = bare[:1].isupper() and (bare[1:].islower() or len(bare) == 1)
    if not (bare.islower() or (capital and sentence_start)):
        return []
    found = thesaurus.get(bare.lower()) or []
    return [before + (s[:1].upper() + s[1:] if capital else s) + after for s in found]


def model_text(example: dict) -> list[tuple[str, int | None]]:
    """Where an example's model-read text is: ``("text", None)``, or ``("messages", i)`` for each user turn
    (a classification row's text is its user turn)."""
    if "text" in example:
        return [("text", None)]
    return [("messages", i) for i, m in enumerate(example["messages"]) if m["role"] == "user"]


def _get(example: dict, where: tuple[str, int | None]) -> str:
    return example["text"] if where[0] == "text" else example["messages"][where[1]]["content"]


def _with(example: dict, where: tuple[str, int | None], text: str) -> dict:
    out = json.loads(json.dumps(example))
    if where[0] == "text":
        out["text"] = text
    else:
        out["messages"][where[1]]["content"] = text
    return out


def output_row(example: dict, origin: str, group: int | None) -> dict:
    """An example as ``dstune data prepare`` writes it (``data.prepare.to_row``), with ``origin`` and
    ``group`` in place of its ``source``."""
    fmt = "classification" if "label" in example else "text" if "text" in example else "messages"
    row = to_row(example, fmt)
    del row["source"]
    return {**row, "origin": origin, "group": group}


def augment_file(path: str, out: str, opts: AugmentOptions) -> dict:
    """Writes ``out`` (JSON lines): every row of ``path`` (``origin: original``), then the augmented rows.

    Returns:
        The counts: ``{"input": n, "written": m, "by_op": {op: k}}``.
    """
    unknown = [op for op in opts.ops if op not in OPS]
    if unknown or not opts.ops:
        raise UsageError(f"--ops {','.join(opts.ops)}: choose from {', '.join(OPS)}")
    if "paraphrase" in opts.ops and not opts.model:
        raise UsageError("--ops paraphrase needs --model: the model that restates the text")
    if not 0 < opts.rate < 1:
        raise UsageError(f"--rate {opts.rate}: the share of words an edit touches, between 0 and 1")
    user_file = opts.synonyms not in (None, "", BUILTIN)  # checked even when unused, as the user named it
    thesaurus = load_thesaurus(opts.synonyms) if "synonym" in opts.ops or user_file else {}
    examples = load_examples(path, opts.fmt).examples
    rng = random.Random(opts.seed)
    rows = [output_row(e, "original", g) for g, e in enumerate(examples)]
    by_op: dict[str, int] = {}
    for op in (o for o in opts.ops if o in EDITS):
        for g, e in enumerate(examples):
            for _ in range(opts.copies):
                changed = e
                for where in model_text(e):
                    changed = _with(changed, where, edit(_get(e, where), op, opts.rate, rng, thesaurus))
                if changed != e:  # an edit that changed nothing (a one-word text) is no new row
                    rows.append(output_row(changed, op, g))
                    by_op[op] = by_op.get(op, 0) + 1
    if "paraphrase" in opts.ops:
        made = paraphrases(examples, opts)
        rows += [output_row(e, "paraphrase", g) for g, e in made]
        by_op["paraphrase"] = len(made)
    write_jsonl(out, rows)
    return {"input": len(examples), "written": len(rows), "by_op": by_op}


def paraphrases(examples: list[dict], opts: AugmentOptions) -> list[tuple[int, dict]]:
    """``(group, example)`` with each model-read text restated by ``opts.model`` (greedy), ``copies`` times
    with sampling after the first; a reply that is empty or the text itself is left out."""
    from dstune.generate import load_for_inference

    loaded = load_for_inference(opts.model)
    out = []
    for copy in range(opts.copies):
        sample = {"temperature": 0.8, "seed": opts.seed + copy} if copy else {}
        for g, e in enumerate(examples):
            changed = e
            for where in model_text(e):
                text = _get(e, where)
                new = _restate(loaded, text, opts, sample)
                if new and new.strip() != text.strip():
                    changed = _with(changed, where, new.strip())
            if changed != e:
                out.append((g, changed))
    return out


def _restate(loaded, text: str, opts: AugmentOptions, sample: dict) -> str:
    from dstune.generate import generate_replies

    def ask(prompt: str) -> str:
        return generate_replies(loaded, [[{"role": "user", "content": prompt}]],
                                max_new_tokens=opts.max_new_tokens, **sample)[0]  # fmt: skip

    if opts.via is None:
        return ask(f"Rewrite the following text in other words, in the same language, keeping its meaning. "
                   f"Reply with the rewritten text only.\n\n{text}")  # fmt: skip
    back = "Chinese" if _CJK.search(text) else "English"
    there = ask(f"Translate the following text into {opts.via}. Reply with the translation only.\n\n{text}")
    return ask(f"Translate the following text into {back}. Reply with the translation only.\n\n{there}")


def unlabelled_texts(path: str, text_column: str | None = None) -> list[str]:
    """The texts of an unlabelled file: its ``text_column``, else the first of ``text``, ``review``,
    ``sentence``, ... a row has (a .txt file: one text per line); a label column, if any, is ignored."""
    from dstune.data import DataError
    from dstune.data.formats import TEXT_COLUMNS
    from dstune.data.read import READERS

    p = Path(path)
    if p.suffix.lower() not in READERS or not p.is_file():
        raise UsageError(f"{path}: no such data file (.json, .jsonl, .csv, .parquet or .txt)")
    texts = []
    for where, value, problem in READERS[p.suffix.lower()](p):
        if problem is not None:
            raise DataError(f"{path}, {where}: {problem.detail}")
        names = [text_column] if text_column else [c for c in TEXT_COLUMNS if c in value]
        if not isinstance(value, dict) or not names or not isinstance(value.get(names[0]), str):
            raise DataError(f"{path}, {where}: no text in column {names[0] if names else TEXT_COLUMNS}")
        texts.append(value[names[0]])
    return texts


def pseudo_label(
    path: str,
    run: str,
    out: str,
    min_confidence: float,
    text_column: str | None = None,
    max_rows: int | None = None,
    task: str | None = None,
) -> dict:
    """Labels the texts of ``path`` with the classification run ``run`` and writes those predicted with at
    least ``min_confidence`` to ``out`` (``origin: pseudo-label``, their ``confidence``); ``max_rows``: only
    the first rows of the file. A run with a head per task (``classify.heads``) labels with the head of
    ``task``, and the rows get that task's own label names.

    Returns:
        ``{"input": n, "written": m, "by_label": {label: k}}``.
    """
    from dstune.core.facts import pad_id
    from dstune.evaluate.loss import classifier_outputs
    from dstune.generate import classifier_ids, load_for_inference

    if not 0 <= min_confidence <= 1:
        raise UsageError(f"--min-confidence {min_confidence}: a probability, between 0 and 1")
    loaded = load_for_inference(run)
    if loaded.labels is None:
        raise UsageError(f"{run} is not a classification run (task: classification); it cannot label rows")
    start, end = _head_block(loaded, run, task)
    names = [name.split(":", 1)[1] if task else name for name in loaded.labels[start:end]]
    texts = unlabelled_texts(path, text_column)[:max_rows]
    rows = [{"input_ids": classifier_ids(loaded, t), "labels": start} for t in texts]
    _, probs, _ = classifier_outputs(loaded.model, rows, 8, pad_id(loaded.tokenizer))
    kept, by_label = [], {}
    for text, p in zip(texts, probs):
        p = p[start:end]
        best = max(range(len(p)), key=p.__getitem__)
        if p[best] >= min_confidence:
            label = names[best]
            kept.append({"text": text, "label": label, "origin": "pseudo-label", "group": None,
                         "confidence": round(p[best], 6)})  # fmt: skip
            by_label[label] = by_label.get(label, 0) + 1
    write_jsonl(out, kept)
    return {"input": len(texts), "written": len(kept), "by_label": by_label}


def _head_block(loaded, run: str, task: str | None) -> tuple[int, int]:
    """The classes that label: the whole head, or the block of ``task`` for a head per task."""
    from dstune.core.heads import model_heads

    heads = model_heads(loaded.model)
    if heads and task not in heads:
        raise UsageError(
            f"{run} has a head per task ({', '.join(heads)}): choose the one that labels with --task"
            + (f" (not {task!r})" if task else "")
        )
    if not heads and task is not None:
        raise UsageError(f"--task {task}: {run} was not trained with a head per task (classify.heads)")
    return tuple(heads[task]) if heads else (0, len(loaded.labels))


def write_jsonl(path: str, rows: list[dict]) -> None:
    """Writes ``rows`` as JSON lines, atomically (never half-written)."""
    write_text_atomic(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
