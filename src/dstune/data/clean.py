"""Cleaning examples: unicode normalisation, sensitive-information scrubbing, length filters, exact and
near duplicates. Every step takes examples as ``load_examples`` returns them and can be switched off.

Invariant, the order: 1. NFKC (full-width digits and letters become ASCII; zero-width and control characters
removed; ``unicode_form="NFC"`` keeps Chinese full-width punctuation, which NFKC makes ASCII); 2. e-mail,
phone, Chinese ID-card and bank-card numbers replaced by ``<EMAIL>``, ``<PHONE>``, ``<ID_CARD>``,
``<BANK_CARD>``; 3. empty, too-short and too-long rows dropped (characters of the user/assistant text, or the
text); 4. exact duplicates of the normalised text (case folded, whitespace collapsed) dropped, first kept;
5. near duplicates dropped by MinHash LSH (datasketch) on character 5-gram shingles at estimated Jaccard
>= 0.8, confirmed on the two signatures. Dropping is deliberate filtering, not a data error: counted by
reason in strict and lenient mode. Why this order and these shingles: docs/benchmarks.md, 'clean.py'.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from dstune.errors import UsageError

PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "id_card": "<ID_CARD>", "bank_card": "<BANK_CARD>"}


@dataclass
class CleanOptions:
    """Which cleaning steps run and their limits (every step is on by default).

    Attributes:
        normalize: unicode normalisation and removal of zero-width and control characters.
        unicode_form: "NFKC" (compatibility: full-width forms to ASCII) or "NFC" (canonical only).
        scrub_pii: replace e-mail addresses, phone numbers, ID-card and bank-card numbers by placeholders.
        min_chars: drop rows with fewer characters (after normalisation and stripping).
        max_chars: drop rows with more characters; None keeps any length.
        dedup: drop exact duplicates of the normalised text.
        near_dedup: drop near duplicates (MinHash LSH).
        near_threshold: Jaccard similarity of character shingles at which two rows are near duplicates.
        shingle: characters per shingle.
        num_perm: MinHash permutations (more: a closer Jaccard estimate, slower).
        seed: MinHash seed, so the same rows are dropped on every run.
    """

    normalize: bool = True
    unicode_form: str = "NFKC"
    scrub_pii: bool = True
    min_chars: int = 2
    max_chars: int | None = 20_000
    dedup: bool = True
    near_dedup: bool = True
    near_threshold: float = 0.8
    shingle: int = 5
    num_perm: int = 128
    seed: int = 1


@dataclass
class Cleaned:
    """The examples that survived, and what cleaning did.

    Attributes:
        examples: the kept examples, in input order.
        dropped: reason -> rows dropped ("empty", "too short", "too long", "exact duplicate",
            "duplicate with another label", "near duplicate").
        first_dropped: reason -> ``source`` of the first row dropped for it, to go and look.
        duplicate_of: ``source`` of a dropped duplicate -> ``source`` of the row kept in its place.
        pii: kind -> placeholders written ("email", "phone", "id_card", "bank_card").
        normalized: examples that NFKC normalisation changed.
    """

    examples: list[dict]
    dropped: dict[str, int] = field(default_factory=dict)
    first_dropped: dict[str, str] = field(default_factory=dict)
    duplicate_of: dict[str, str] = field(default_factory=dict)
    pii: dict[str, int] = field(default_factory=dict)
    normalized: int = 0


# --------------------------------------------------------------------------- normalisation

# Zero-width characters and the BOM survive NFKC, look like nothing, and make equal strings differ.
_INVISIBLE = re.compile("[\u200b-\u200f\u2060-\u2064\ufeff\u00ad]")


def normalize_text(text: str, form: str = "NFKC") -> str:
    """Normalises ``text`` (NFKC by default) and removes zero-width and control characters (tabs and
    newlines stay)."""
    text = unicodedata.normalize(form, text.replace("\r\n", "\n"))
    text = _INVISIBLE.sub("", text)
    return "".join(c for c in text if c in "\t\n" or unicodedata.category(c) != "Cc")


def dedup_key(text: str) -> str:
    """The text as compared for duplicates: case folded, runs of whitespace as one space, stripped."""
    return " ".join(text.casefold().split())


# --------------------------------------------------------------------------- sensitive information

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# Chinese resident ID (GB 11643-1999): 6-digit region, birth date YYYYMMDD, 3-digit sequence, check digit.
_ID_CARD = re.compile(r"(?<![0-9A-Za-z])[1-9][0-9]{16}[0-9Xx](?![0-9A-Za-z])")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
# 13-19 digits written together, or in groups of four separated by a space or a dash.
_BANK_CARD = re.compile(
    r"(?<![0-9])(?:[0-9]{13,19}|[0-9]{4}(?:[ -][0-9]{4}){2,3}(?:[ -][0-9]{1,3})?)(?![0-9])"
)
_PHONES = [
    # Chinese mobile 1[3-9]xxxxxxxxx, optionally +86/0086 and 3-4-4 groups.
    re.compile(r"(?<![0-9])(?:(?:\+|00)86[ -]?)?1[3-9][0-9](?:[ -]?[0-9]{4}){2}(?![0-9])"),
    # Chinese landline with its area code: 010-12345678, 0755-1234567.
    re.compile(r"(?<![0-9])0[1-9][0-9]{1,2}-[0-9]{7,8}(?![0-9])"),
    # North American (555) 123-4567 or 555-123-4567.
    re.compile(r"(?<![0-9])(?:\([2-9][0-9]{2}\) ?|[2-9][0-9]{2}[-. ])[0-9]{3}[-. ][0-9]{4}(?![0-9])"),
    # Any international number written with a leading +: 8 to 15 digits (E.164).
    re.compile(r"\+[1-9][0-9 ()-]{6,18}[0-9](?![0-9])"),
]


def id_card_valid(number: str) -> bool:
    """Whether an 18-character string is a well-formed Chinese ID number: a plausible birth date and
    the ISO 7064 MOD 11-2 check digit of GB 11643-1999."""
    if len(number) != 18 or not number[:17].isdigit():
        return False
    year, month, day = int(number[6:10]), int(number[10:12]), int(number[12:14])
    if not (1900 <= year <= 2099 and 1 <= month <= 12 and 1 <= day <= 31):
        return False
    check = "10X98765432"[sum(int(d) * w for d, w in zip(number, _ID_WEIGHTS)) % 11]
    return number[17].upper() == check


def luhn_valid(digits: str) -> bool:
    """Whether a string of digits passes the Luhn check that payment-card numbers carry (ISO/IEC 7812)."""
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def scrub_pii(text: str) -> tuple[str, Counter]:
    """Replaces sensitive information in ``text`` by placeholders.

    E-mail addresses first (they may hold digits), then ID-card numbers (checksum and date valid),
    then bank-card numbers (Luhn valid, 13-19 digits), then phone numbers. Numbers that fail their
    check are left alone: an order number is not a card number.

    Returns:
        The scrubbed text and the number of replacements per kind.
    """
    counts: Counter = Counter()

    def sub(pattern: re.Pattern, kind: str, valid: Callable[[str], bool] | None, s: str) -> str:
        def repl(m: re.Match) -> str:
            if valid is not None and not valid(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        return pattern.sub(repl, s)

    if "@" in text:
        text = sub(_EMAIL, "email", None, text)
    if not any(c.isdigit() for c in text):
        return text, counts
    text = sub(_ID_CARD, "id_card", id_card_valid, text)
    text = sub(
        _BANK_CARD, "bank_card", lambda s: 13 <= len(d := re.sub("[ -]", "", s)) <= 19 and luhn_valid(d), text
    )
    for pattern in _PHONES:
        text = sub(pattern, "phone", lambda s: 8 <= sum(c.isdigit() for c in s) <= 15, text)
    return text, counts


# --------------------------------------------------------------------------- examples


def map_texts(example: dict, fn: Callable[[str], str]) -> dict:
    """A copy of ``example`` with ``fn`` applied to its text, message contents and reasoning; a
    classification example's label is left as it is."""
    if "text" in example:
        return {**example, "text": fn(example["text"])}
    messages = []
    for i, m in enumerate(example["messages"]):
        m = dict(m)
        is_label = "label" in example and i == len(example["messages"]) - 1
        if not is_label:
            m["content"] = fn(m["content"])
            if m.get("reasoning_content"):
                m["reasoning_content"] = fn(m["reasoning_content"])
        messages.append(m)
    return {**example, "messages": messages}


def content(example: dict) -> str:
    """The text an example is measured and compared by: the text, a classification row's text, or the
    user and assistant turns (with reasoning) joined by newlines. System prompts are left out: they
    are usually shared by every row and would make all rows look alike."""
    if "text" in example:
        return example["text"]
    if "prompt" in example:  # a preference pair, KTO row or prompt-only row (data.preference)
        turns = [m["content"] for m in example["prompt"] if m["role"] != "system"]
        keys = ("chosen", "rejected", "completion", "answer")
        return "\n".join(turns + [example[k] for k in keys if isinstance(example.get(k), str)])
    if "label" in example:
        return example["messages"][-2]["content"]
    parts = []
    for m in example["messages"]:
        if m["role"] != "system":
            parts += [m.get("reasoning_content") or "", m["content"]]
    return "\n".join(p for p in parts if p)


def _shingles(key: str, n: int) -> set[bytes]:
    if len(key) <= n:
        return {key.encode("utf-8")}
    return {key[i : i + n].encode("utf-8") for i in range(len(key) - n + 1)}


def clean_examples(examples: list[dict], options: CleanOptions | None = None) -> Cleaned:
    """Runs the cleaning steps of ``options`` over ``examples`` (see the module docstring for the order).

    Args:
        examples: examples from ``load_examples`` (each with a ``source``), all files together, so
            duplicates are found across files.
        options: the steps and limits; None uses the defaults.

    Returns:
        The kept examples and counts of what was dropped and replaced.
    """
    opts = options or CleanOptions()
    if opts.unicode_form not in ("NFKC", "NFC"):
        raise UsageError(f"unicode_form must be NFKC or NFC, got {opts.unicode_form!r}")
    out = Cleaned(examples=[])
    pii: Counter = Counter()

    def drop(reason: str, ex: dict) -> None:
        out.dropped[reason] = out.dropped.get(reason, 0) + 1
        out.first_dropped.setdefault(reason, ex["source"])

    candidates = []
    for ex in examples:
        if opts.normalize:
            normalized = map_texts(ex, lambda s: normalize_text(s, opts.unicode_form))
            out.normalized += normalized != ex
            ex = normalized
        if opts.scrub_pii:

            def scrub(s: str) -> str:
                s, counts = scrub_pii(s)
                pii.update(counts)
                return s

            ex = map_texts(ex, scrub)
        n = len(content(ex).strip())
        if n == 0 or any(
            m["role"] == "assistant" and not m["content"].strip() for m in ex.get("messages", ())
        ):
            drop("empty", ex)
        elif n < opts.min_chars:
            drop("too short", ex)
        elif opts.max_chars is not None and n > opts.max_chars:
            drop("too long", ex)
        else:
            candidates.append(ex)

    kept_by_key: dict[str, dict] = {}
    unique = []
    for ex in candidates:
        key = dedup_key(
            content(ex)
        )  # a classification row's key is its text: equal texts, other labels conflict
        first = kept_by_key.get(key) if opts.dedup else None
        if first is None:
            kept_by_key[key] = ex
            unique.append((key, ex))
            continue
        conflict = "label" in ex and ex["label"] != first["label"]
        drop("duplicate with another label" if conflict else "exact duplicate", ex)
        out.duplicate_of[ex["source"]] = first["source"]

    if opts.near_dedup and len(unique) > 1:
        unique = _drop_near_duplicates(unique, opts, drop, out.duplicate_of)
    out.examples = [ex for _, ex in unique]
    out.pii = dict(pii)
    return out


def _drop_near_duplicates(
    unique: list[tuple[str, dict]], opts: CleanOptions, drop: Callable, duplicate_of: dict[str, str]
) -> list[tuple[str, dict]]:
    from datasketch import MinHash, MinHashLSH  # imported here: only near-dedup pays for it

    # MinHash.bulk shares one set of permutations across all signatures; one MinHash() per row draws
    # them again each time (measured on 6,000 ChnSentiCorp reviews: 0.7 s against 1.4 s).
    signatures = MinHash.bulk(
        [_shingles(key, opts.shingle) for key, _ in unique], num_perm=opts.num_perm, seed=opts.seed
    )
    try:
        lsh = MinHashLSH(threshold=opts.near_threshold, num_perm=opts.num_perm)
    except ValueError as exc:  # e.g. 0.99 with 128 permutations leaves fewer than 2 LSH bands
        raise UsageError(
            f"near-duplicate threshold {opts.near_threshold} with {opts.num_perm} permutations: {exc}; "
            "use a threshold of at most 0.98"
        ) from None
    kept = []
    for i, ((key, ex), sig) in enumerate(zip(unique, signatures)):
        twin = next((j for j in lsh.query(sig) if signatures[j].jaccard(sig) >= opts.near_threshold), None)
        if twin is not None:
            drop("near duplicate", ex)
            duplicate_of[ex["source"]] = unique[twin][1]["source"]
            continue
        lsh.insert(i, sig)
        kept.append((key, ex))
    return kept
