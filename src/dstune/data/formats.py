"""The three data formats, how to tell them apart, and how each row becomes one example.

Every example leaves this module in one of three shapes, each with a ``source`` such as ``"f.json:row 3"``::

    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
    {"text": str}
    {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": label}], "label": label}

The third (classification) replies with the label name: the one training loop fine-tunes it as generative
classification, and ``label`` keeps the class for splitting, balance and metrics. Rows are untrusted: fields
are type-checked; a problem is a ``RowError``: a stable ``reason`` (lenient mode's count key), a ``detail``.
"""

from __future__ import annotations

from typing import Any

from dstune.errors import DstuneError

FORMATS = ("text", "alpaca", "messages", "classification", "preference", "kto", "prompt")

# What each format needs, quoted in the error when the format cannot be detected.
FORMAT_KEYS = {
    "text": "'text'",
    "alpaca": "'instruction' and 'output' (optional 'input', 'system', 'history')",
    "messages": "'messages' or 'conversations': a list of {'role', 'content'} or ShareGPT "
    "{'from', 'value'} turns",
    "classification": "'label' and a text column (text, review, sentence, content, comment, document)",
    "preference": "'chosen' and 'rejected' beside 'prompt' (or 'conversations')",
    "kto": "'prompt', 'completion' and a true/false 'label'",
    "prompt": "'prompt' alone (a string or messages), with the 'answer' a reward checks",
}

# Column names taken as the text of a classification row when no text column is given, in this order.
TEXT_COLUMNS = ("text", "review", "sentence", "content", "comment", "document")

# ShareGPT names ("human", "gpt") map to the roles chat templates know.
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


class DataError(DstuneError, ValueError):
    """A data problem, phrased for the person who owns the file: which file, which line, what is wrong."""


class RowError(Exception):
    """One unusable row. ``reason`` is short and stable (lenient mode counts by it); ``detail`` explains."""

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail or reason


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def detect_format(
    rows: list[Any],
    path: str,
    kind: str = "keys",
    label_column: str = "label",
    text_column: str | None = None,
) -> str | None:
    """Names the format of a file from the keys of its first rows.

    Args:
        rows: the first parsed rows of the file (anything that is not a dict is skipped).
        path: the file, for the error message.
        kind: what the keys are called in this file type ("keys", or "columns" for csv/parquet).
        label_column: the key that marks a classification row (beside a text column).
        text_column: the text key of a classification row; None accepts any of ``TEXT_COLUMNS``.

    Returns:
        "preference", "kto", "messages", "alpaca", "classification" or "text"; None when no row is a
        dict (the caller reports the rows).

    Raises:
        DataError: when dict rows exist but none has the keys of any format.
    """
    seen: set[str] = set()
    n = 0
    for row in rows:
        if not isinstance(row, dict):
            continue
        n += 1
        keys = set(row)
        # A row can carry several formats' keys; the richest one wins.
        if "chosen" in keys and "rejected" in keys:  # before messages: LLaMA-Factory pairs have conversations
            return "preference"
        if "completion" in keys and label_column in keys:
            return "kto"
        if "prompt" in keys and "completion" not in keys:  # prompt-only rows, for rewards (objective=grpo)
            return "prompt"
        if "messages" in keys or "conversations" in keys:
            return "messages"
        if "instruction" in keys and "output" in keys:
            return "alpaca"
        if label_column in keys and (
            text_column in keys if text_column else any(c in keys for c in TEXT_COLUMNS)
        ):
            return "classification"
        if "text" in keys:
            return "text"
        seen |= {str(k) for k in keys}
    if n == 0:
        return None
    needs = "; ".join(f"{name}: {keys}" for name, keys in FORMAT_KEYS.items())
    raise DataError(
        f"{path}: cannot tell the data format: the first {n} row(s) have the {kind} {sorted(seen)}. "
        f"Each format needs these {kind}: {needs}. Rename the {kind}, or set data.format."
    )


def _string(row: dict, key: str, *, required: bool, where: str = "") -> str | None:
    """Returns ``row[key]`` as a string, None for an absent optional field, or raises RowError."""
    if key not in row or (row[key] is None and not required):
        if required:
            raise RowError(
                f"missing field '{key}'", f"missing field '{key}'{where}; found {sorted(map(str, row))}"
            )
        return None
    value = row[key]
    if not isinstance(value, str):
        raise RowError(
            f"field '{key}' is not a string",
            f"field '{key}'{where} is {_type_name(value)} {value!r:.60}, expected a string",
        )
    return value


def _check_turns(messages: list[dict]) -> None:
    """Checks the order system? (user assistant)+ that every chat template renders the same way."""
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles and roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(body) // 2)
    if not body or body != expected or len(body) % 2:
        raise RowError(
            "bad turn order",
            f"turns are {roles}; expected an optional system turn, then user and "
            "assistant turns alternating, starting with user and ending with the assistant's reply",
        )
    for j, m in enumerate(messages):
        if not m["content"].strip():
            kind = "empty assistant reply" if m["role"] == "assistant" else f"empty {m['role']} message"
            raise RowError(kind, f"the {m['role']} turn (turn {j} of the conversation) is empty")


def _alpaca(row: dict) -> list[dict]:
    instruction = _string(row, "instruction", required=True)
    output = _string(row, "output", required=True)
    inp = _string(row, "input", required=False) or ""
    system = _string(row, "system", required=False)
    # LLaMA-Factory's alpaca layout: the prompt is instruction, a blank line, then the input.
    parts = [part for part in (instruction, inp) if part.strip()]
    user = "\n\n".join(parts) if parts else instruction
    messages = [{"role": "system", "content": system}] if system else []
    history = row.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise RowError(
                "bad history",
                f"field 'history' is {_type_name(history)}, expected a list of [user, assistant] pairs",
            )
        for j, pair in enumerate(history):
            if not (
                isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)
            ):
                raise RowError(
                    "bad history",
                    f"history item {j} is {pair!r:.60}; expected a [user, assistant] pair of strings",
                )
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    reply = {"role": "assistant", "content": output}
    # R1-distilled sets in alpaca layout carry the reasoning trace beside the answer.
    reasoning = _string(row, "reasoning_content", required=False)
    if reasoning:
        reply["reasoning_content"] = reasoning
    messages += [{"role": "user", "content": user}, reply]
    return messages


def _conversation(row: dict) -> list[dict]:
    key = "messages" if "messages" in row else "conversations"
    turns = row.get(key)
    if key not in row:
        raise RowError(
            "missing field 'messages'",
            f"missing field 'messages' (or 'conversations'); found {sorted(map(str, row))}",
        )
    if not isinstance(turns, list):
        raise RowError(
            f"field '{key}' is not a list", f"field '{key}' is {_type_name(turns)}, expected a list of turns"
        )
    messages = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError("bad turn", f"{key}[{j}] is {_type_name(turn)}, expected an object")
        # OpenAI style {role, content}, or ShareGPT style {from, value}.
        role_key, content_key = ("role", "content") if "role" in turn else ("from", "value")
        role = turn.get(role_key)
        if role not in ROLES:
            raise RowError(
                "unknown role", f"{key}[{j}] has {role_key}={role!r}; accepted: {', '.join(ROLES)}"
            )
        content = _string(turn, content_key, required=True, where=f" in {key}[{j}]")
        message = {"role": ROLES[role], "content": content}
        reasoning = _string(turn, "reasoning_content", required=False, where=f" in {key}[{j}]")
        if reasoning and message["role"] == "assistant":
            message["reasoning_content"] = reasoning
        messages.append(message)
    system = _string(
        row, "system", required=False
    )  # ShareGPT files may carry the system prompt beside the turns
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _classification(row: dict, text_column: str | None, label_column: str) -> tuple[str, str]:
    """The (text, label name) of a classification row; integer labels become their decimal string."""
    column = text_column or next((c for c in TEXT_COLUMNS if c in row), None)
    if column is None or column not in row:
        want = f"text column '{text_column}'" if text_column else f"a text column ({', '.join(TEXT_COLUMNS)})"
        raise RowError(
            "missing text column",
            f"has no {want}; found {sorted(map(str, row))}; name it with --text-column (data.text_column)",
        )
    text = _string(row, column, required=True)
    if label_column not in row:
        raise RowError(
            "missing label column",
            f"has no label column '{label_column}'; found "
            f"{sorted(map(str, row))}; name it with --label-column (data.label_column)",
        )
    label = row[label_column]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise RowError(
            "bad label",
            f"label '{label_column}' is {_type_name(label)} {label!r:.60}; expected a "
            "string or an integer class",
        )
    label = str(label).strip()
    if not text.strip():
        raise RowError("empty text", f"column '{column}' is empty")
    if not label:
        raise RowError("empty label", f"label column '{label_column}' is empty")
    return text, label


def strip_reasoning(example: dict) -> dict:
    """The example without reasoning: no ``reasoning_content``, no ``...</think>`` prefix in replies.

    Text before ``</think>`` is dropped whether or not ``<think>`` opens it, because R1's generation
    prompt already writes ``<think>`` and many traces start right after it (the official R1 template
    cuts replies the same way).
    """
    if "messages" not in example:
        return example
    messages = []
    for m in example["messages"]:
        m = {k: v for k, v in m.items() if k != "reasoning_content"}
        if m["role"] == "assistant" and "</think>" in m["content"]:
            m["content"] = m["content"].split("</think>")[-1].lstrip()
        messages.append(m)
    return {**example, "messages": messages}


def has_reasoning(example: dict) -> bool:
    """Whether an example carries a reasoning trace (``reasoning_content`` or a ``</think>`` block)."""
    return any(
        m.get("reasoning_content") or (m["role"] == "assistant" and "</think>" in m["content"])
        for m in example.get("messages", ())
    )


def to_example(
    row: Any,
    fmt: str,
    source: str,
    system: str | None = None,
    *,
    text_column: str | None = None,
    label_column: str = "label",
) -> dict:
    """Turns one parsed row into an example of the given format.

    Args:
        row: the parsed row (should be a dict).
        fmt: "text", "alpaca", "messages" or "classification".
        source: where the row came from, e.g. ``"data.jsonl:line 3"``; kept in the example.
        system: a system prompt to add to conversations that have none.
        text_column: the text of a classification row; None takes the first of ``TEXT_COLUMNS`` present.
        label_column: the label of a classification row.

    Returns:
        ``{"text": ..., "source": ...}``, ``{"messages": [...], "source": ...}``, or for classification
        ``{"messages": [user text, assistant label], "label": ..., "source": ...}``.

    Raises:
        RowError: naming what is wrong with the row.
    """
    if not isinstance(row, dict):
        raise RowError(
            "not an object", f"is {_type_name(row)}, expected an object with the fields of a {fmt} example"
        )
    if fmt in ("preference", "kto", "prompt"):
        from dstune.data.preference import to_preference_example  # it builds on this module's helpers

        return to_preference_example(row, fmt, source, system)
    if fmt == "text":
        text = _string(row, "text", required=True)
        if not text.strip():
            raise RowError("empty text", "field 'text' is empty")
        return _keep_origin(row, {"text": text, "source": source})
    label = None
    if fmt == "classification":
        text, label = _classification(row, text_column, label_column)
        messages = [{"role": "user", "content": text}, {"role": "assistant", "content": label}]
    else:
        messages = _alpaca(row) if fmt == "alpaca" else _conversation(row)
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    _check_turns(messages)
    example = {"messages": messages, "source": source}
    if label is not None:
        example["label"] = label
    return _keep_origin(row, example)


def _keep_origin(row: dict, example: dict) -> dict:
    """Carries ``dstune data augment``'s ``origin`` and ``group`` into the example (``split.split_rows``)."""
    for key in ("origin", "group"):
        if key in row:
            example[key] = row[key]
    return example
