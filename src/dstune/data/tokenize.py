"""Examples to token ids and labels, with the loss on exactly the tokens the model should learn to write.

For a conversation the loss covers each assistant reply and the end-of-turn token(s) that close it
(``<｜end▁of▁sentence｜>`` in DeepSeek templates), never the role header or the user and system turns.
The mask is found from the rendered text, not from per-template knowledge, so it works for any Jinja
chat template, including position-dependent ones (R1 drops reasoning from earlier turns, Qwen3 adds an
empty think block to the last one):

1. render the whole conversation once to a string;
2. for each assistant turn, render the conversation again with that reply replaced by a sentinel:
   the text before the sentinel is the prompt side (the reply starts where the two renderings part),
   the text after it is what follows the reply (the reply ends where they meet again);
3. extend the reply over the closing text the template writes after it (eos, ``<|im_end|>``), and
   leave out any opening the generation prompt already supplies (R1's ``<think>\\n``);
4. tokenize the string once with character offsets and mark tokens that start inside a reply.

transformers' own ``return_assistant_tokens_mask`` needs ``{% generation %}`` tags that few templates
(DeepSeek's included) have, which is why this is done here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from dstune.core.loss import IGNORE
from dstune.errors import UsageError
from dstune.models.templates import TemplateError, template_name, tokenizer_template

_SENTINEL = "\ue000dstune-reply\ue001"  # private-use characters: no template writes them
_CHUNK = 64  # examples tokenized per batch call


@dataclass
class Tokenized:
    """Token rows ready for batching.

    Attributes:
        rows: ``{"input_ids": [...], "labels": [...], "source": "file:line"}``; labels are -100 where
            no loss is taken.
        dropped: reason -> count ("too long", "no trainable tokens", "contains a control token").
        truncated: rows cut to ``max_length`` (and kept).
    """

    rows: list[dict]
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0

    @property
    def tokens(self) -> int:
        """All tokens in the kept rows."""
        return sum(len(r["input_ids"]) for r in self.rows)

    @property
    def trainable_tokens(self) -> int:
        """Tokens that carry loss."""
        # A classification-head row (``data.classify``) has one class index as its label: one target.
        return sum(
            1 if isinstance(r["labels"], int) else sum(1 for t in r["labels"] if t != IGNORE)
            for r in self.rows
        )


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _common_suffix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[-1 - i] == b[-1 - i]:
        i += 1
    return i


def render_with_spans(
    tokenizer: Any, template: str, messages: list[dict]
) -> tuple[str, list[tuple[int, int]]]:
    """Renders a conversation and finds the character span of each assistant reply.

    Args:
        tokenizer: a transformers tokenizer (for ``apply_chat_template`` and its special tokens).
        template: the Jinja chat template.
        messages: ``[{"role", "content"}, ...]`` starting with a system or user turn.

    Returns:
        The rendered string, and ``[start, end)`` spans covering each reply and its end-of-turn text.

    Raises:
        TemplateError: when the template does not render a conversation's start as a prefix of the
            whole, or renders a reply more than once, so no reliable loss mask exists.
    """

    def render(msgs: list[dict], gen: bool = False) -> str:
        return tokenizer.apply_chat_template(
            msgs, tokenize=False, chat_template=template, add_generation_prompt=gen
        )

    def fail(why: str) -> TemplateError:
        return TemplateError(
            f"cannot mask the loss with {template_name(template, tokenizer)}: {why}; "
            "use a template that renders each turn in order "
            "(e.g. model.chat_template=deepseek-v3) or data.train_on=all"
        )

    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i])
        if not full.startswith(before):
            raise fail(f"rendering the first {i} messages is not a prefix of rendering all {len(messages)}")
        blank = {"role": "assistant", "content": _SENTINEL}
        marked = render(messages[:i] + [blank] + messages[i + 1 :])
        if marked.count(_SENTINEL) != 1:
            raise fail(f"the reply in turn {i} appears {marked.count(_SENTINEL)} times in the rendering")
        cut = marked.index(_SENTINEL)
        head, tail = marked[:cut], marked[cut + len(_SENTINEL) :]
        start = max(len(before), _common_prefix(full, head))
        prompt = render(messages[:i], gen=True)
        if full.startswith(prompt):  # the reply opens with what the generation prompt writes: that is prompt
            start = max(start, len(prompt))
        stop = max(start, len(full) - _common_suffix(full[start:], tail))
        # What the template writes right after a final reply is its end-of-turn text (eos, "<|im_end|>\n").
        last = marked if i == len(messages) - 1 else render(messages[:i] + [blank])
        closing = last[last.index(_SENTINEL) + len(_SENTINEL) :]
        closing = closing[: _common_prefix(full[stop:], closing)]
        # Trailing newlines after the end-of-turn token are layout, not something the model generates.
        spans.append((start, stop + len(closing.rstrip())))
    return full, spans


def _control_tokens(tokenizer: Any, template: str | None) -> re.Pattern | None:
    """The special tokens that must not come from the data: bos, eos and those the template writes.

    A reply containing the literal text "<｜end▁of▁sentence｜>" would be tokenized as eos and teach the
    model to stop mid-answer; a user turn containing "<｜Assistant｜>" would forge a turn. Think tags
    are data (reasoning traces), so they are allowed.
    """
    found = {t for t in (tokenizer.bos_token, tokenizer.eos_token) if t}
    if template:
        for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
            text = str(token)
            if text.strip() and text in template:
                found.add(text)
    found -= {"<think>", "</think>"}
    return re.compile("|".join(map(re.escape, sorted(found, key=len, reverse=True)))) if found else None


def _uses_bos(tokenizer: Any, template: str | None) -> bool:
    """Whether text examples start with bos: the tokenizer adds one itself, or the template writes one."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids and ids[0] == tokenizer.bos_token_id) or bool(template and "bos_token" in template)


def _check_options(overflow: str, train_on: str, max_length: int) -> None:
    """Raises UsageError for a bad ``overflow``, ``train_on`` or ``max_length``."""
    if overflow not in ("truncate", "drop"):
        raise UsageError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    if train_on not in ("assistant", "all"):
        raise UsageError(f"train_on must be 'assistant' or 'all', got {train_on!r}")
    if max_length < 2:
        raise UsageError(f"max_length must be at least 2, got {max_length}")


def _require_template(examples: list[dict], tokenizer: Any, template: str | None) -> None:
    """Raises TemplateError when the examples hold conversations but there is no chat template."""
    if template is None and any("messages" in ex for ex in examples):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise TemplateError(
            f"the data holds conversations but tokenizer {name!r} has no chat template; "
            "set model.chat_template (deepseek-v3 or deepseek-r1)"
        )


def _count_drop(out: Tokenized, reason: str) -> None:
    """Counts one row dropped for ``reason``."""
    out.dropped[reason] = out.dropped.get(reason, 0) + 1


def _render_chunk(
    chunk: list[dict],
    tokenizer: Any,
    template: str | None,
    train_on: str,
    control: re.Pattern | None,
    out: Tokenized,
) -> tuple[list[str], list, list[dict]]:
    """Renders examples to strings and reply spans (None: plain text), dropping any with a control token."""
    texts, spans, kept = [], [], []
    for ex in chunk:
        strings = [ex["text"]] if "text" in ex else [m["content"] for m in ex["messages"]]
        if control is not None and any(control.search(s) for s in strings):
            _count_drop(out, "contains a control token")
            continue
        if "text" in ex:
            texts.append(ex["text"])
            spans.append(None)
        elif train_on == "all":
            texts.append(
                tokenizer.apply_chat_template(ex["messages"], tokenize=False, chat_template=template)
            )
            spans.append([])
        else:
            text, found = render_with_spans(tokenizer, template, ex["messages"])
            texts.append(text)
            spans.append(found)
        kept.append(ex)
    return texts, spans, kept


def _ids_and_labels(
    ids: list[int], offsets: list, found: list | None, train_on: str, bos: list[int], eos: list[int]
) -> tuple[list[int], list[int]]:
    """The token ids of one rendered example and their labels (IGNORE outside the reply spans)."""
    if found is None:  # plain text: everything is learned
        ids = bos + list(ids) + eos
        return ids, list(ids)
    if train_on == "all":
        return ids, list(ids)
    return ids, [t if any(s <= a < e for s, e in found) else IGNORE for t, (a, _) in zip(ids, offsets)]


def _truncate(
    example: dict, text: str, offsets: list, ids: list[int], labels: list[int], max_length: int
) -> tuple[list[int], list[int]]:
    """Cuts a row to ``max_length`` tokens (a classification row: from the end of its text, not the label)."""
    if "label" in example:  # classification: cut the text, keep the reply that is the label
        return _cut_text(example, text, offsets, list(ids), labels, max_length)
    return ids[:max_length], labels[:max_length]


def tokenize_examples(
    examples: list[dict],
    tokenizer: Any,
    chat_template: str | None,
    max_length: int,
    overflow: str = "truncate",
    train_on: str = "assistant",
) -> Tokenized:
    """Turns examples into token ids and labels.

    Text examples become bos (when the model uses one) + tokens + eos, every token carrying loss.
    Conversations are rendered with the chat template; the loss covers the assistant replies and the
    end-of-turn text closing each (``train_on="assistant"``) or every token (``train_on="all"``).

    Args:
        examples: ``{"text"|"messages": ..., "source": ...}`` dicts from ``load_examples``.
        tokenizer: a fast transformers tokenizer (offsets are needed for the mask).
        chat_template: Jinja template; None uses the tokenizer's own.
        max_length: tokens per row.
        overflow: "truncate" (keep the first ``max_length`` tokens) or "drop" the row.
        train_on: "assistant" or "all".

    Returns:
        The rows, with counts of dropped and truncated ones. A row whose labels are all -100 (for
        instance, a long prompt that truncation left without any reply) is dropped and counted as
        "no trainable tokens", never kept silently.

    Raises:
        ValueError: for a bad ``overflow``/``train_on``/``max_length``.
        TemplateError: conversations without a template, or with one that cannot be masked.
    """
    _check_options(overflow, train_on, max_length)
    template = chat_template or tokenizer_template(tokenizer)
    _require_template(examples, tokenizer, template)
    control = _control_tokens(tokenizer, template)
    bos = [tokenizer.bos_token_id] if _uses_bos(tokenizer, template) else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = Tokenized(rows=[])
    for first in range(0, len(examples), _CHUNK):
        chunk = examples[first : first + _CHUNK]
        texts, spans, kept = _render_chunk(chunk, tokenizer, template, train_on, control, out)
        if not kept:
            continue
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for ex, text, found, ids, offsets in zip(kept, texts, spans, enc["input_ids"], enc["offset_mapping"]):
            ids, labels = _ids_and_labels(ids, offsets, found, train_on, bos, eos)
            truncated = len(ids) > max_length
            if truncated:
                if overflow == "drop":
                    _count_drop(out, "too long")
                    continue
                ids, labels = _truncate(ex, text, offsets, ids, labels, max_length)
            # Labels are shifted by one in the loss, so a lone trainable first token teaches nothing either.
            if all(t == IGNORE for t in labels[1:]):
                _count_drop(out, "no trainable tokens")
                continue
            out.truncated += truncated
            row = {"input_ids": list(ids), "labels": labels, "source": ex["source"]}
            if "task" in ex:  # data.mix: the row's data set (data/mix.py)
                row["task"] = ex["task"]
            out.rows.append(row)
    return out


def _cut_text(
    example: dict, text: str, offsets: list, ids: list[int], labels: list[int], max_length: int
) -> tuple[list[int], list[int]]:
    """Shortens a classification row by dropping the end of its text, keeping what follows the text
    (the assistant header, the label and the end of turn).

    Cutting the row's end instead would cut the label, the only token it trains on, and the row
    would be dropped: with max_length 128, 4 of 30 ChnSentiCorp reviews. When the tail alone does
    not fit, the row is cut at ``max_length`` like any other.
    """
    body = example["messages"][-2]["content"]
    end = text.rfind(body) + len(body) if body in text else -1
    keep_from = next((i for i, (a, _) in enumerate(offsets) if a >= end), len(ids)) if end >= 0 else len(ids)
    tail = len(ids) - keep_from
    if end < 0 or tail >= max_length:
        return ids[:max_length], labels[:max_length]
    head = max_length - tail
    return ids[:head] + ids[keep_from:], labels[:head] + labels[keep_from:]
