"""Preference data: pairs (``prompt``/``chosen``/``rejected``) and unpaired KTO rows (``prompt``/
``completion``/``label``), read in the shapes users have them and tokenized prompt-then-answer.

Accepted rows (TRL's "standard" and "conversational" shapes, and LLaMA-Factory's)::

    {"prompt": "text", "chosen": "text", "rejected": "text"}
    {"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}
    {"conversations": [{"from": "human", "value": ...}], "chosen": {"from": "gpt", "value": ...},
     "rejected": {"from": "gpt", "value": ...}}
    {"prompt": "text" | [...], "completion": "text" | [...], "label": true | false}
    {"prompt": "text" | [...], "answer": "135", ...}      (prompt-only, for GRPO's rewards)

Each becomes ``{"prompt": [messages], "chosen": str, "rejected": str, "source"}`` (or ``"completion"`` and
``"desirable"``; or ``"answer"`` and the row's other ``"fields"``, which reward functions receive).
Tokenizing renders the prompt exactly as at inference (the chat template with its generation prompt,
including R1's prefilled ``<think>``); the answer's tokens follow it: the reply, then the end-of-turn text
the template writes after a reply. Labels mask the prompt. Prompt and answer are tokenized separately (as
TRL does), so the prompt's tokens are those the model sees when it generates.
"""

from __future__ import annotations

from typing import Any

from dstune.core.loss import IGNORE
from dstune.data.formats import ROLES, RowError, _check_turns, _conversation, _string, _type_name
from dstune.data.tokenize import _SENTINEL, Tokenized, _control_tokens, _count_drop, _require_template
from dstune.models.templates import tokenizer_template


def _prompt(row: dict) -> list[dict]:
    """The prompt turns of a row: ``prompt`` as a string or a message list, or LLaMA-Factory's
    ``conversations``; it must end with a user turn."""
    if "prompt" not in row and "conversations" in row:
        messages = _conversation({k: v for k, v in row.items() if k in ("conversations", "system")})
    else:
        value = row.get("prompt")
        if isinstance(value, list):
            messages = _conversation({"messages": value, "system": row.get("system")})
        else:
            text = _string(row, "prompt", required=True)
            messages = [{"role": "user", "content": text}]
            if system := _string(row, "system", required=False):
                messages.insert(0, {"role": "system", "content": system})
    # The prompt plus a one-turn reply must be a valid conversation (ends with user, no empty turns).
    _check_turns(messages + [{"role": "assistant", "content": "x"}])
    return messages


def _answer(row: dict, key: str) -> str:
    """The assistant reply in ``row[key]``: a string, one message object, or a list holding one
    assistant message (TRL's conversational shape)."""
    if key not in row:
        raise RowError(f"missing field '{key}'", f"missing field '{key}'; found {sorted(map(str, row))}")
    value = row[key]
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict):
            raise RowError(
                f"bad field '{key}'",
                f"field '{key}' holds {len(value)} items; expected one assistant message",
            )
        turn = value[0]
        role_key, content_key = ("role", "content") if "role" in turn else ("from", "value")
        if ROLES.get(turn.get(role_key)) != "assistant":
            raise RowError(
                f"bad field '{key}'",
                f"field '{key}' has {role_key}={turn.get(role_key)!r}; expected assistant",
            )
        text = _string(turn, content_key, required=True, where=f" in '{key}'")
    elif isinstance(value, str):
        text = value
    else:
        raise RowError(
            f"field '{key}' is not a string",
            f"field '{key}' is {_type_name(value)} {value!r:.60}, expected a string or an assistant message",
        )
    if not text.strip():
        raise RowError(f"empty '{key}'", f"field '{key}' is empty")
    return text


def to_preference_example(row: Any, fmt: str, source: str, system: str | None = None) -> dict:
    """One parsed row as a pair (``fmt="preference"``) or an unpaired KTO example (``fmt="kto"``).

    Raises:
        RowError: naming the field that is missing, empty or of the wrong type.
    """
    if not isinstance(row, dict):
        raise RowError(
            "not an object", f"is {_type_name(row)}, expected an object with the fields of a {fmt} row"
        )
    prompt = _prompt(row)
    if system and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": system})
    if fmt == "preference":
        return {"prompt": prompt, "chosen": _answer(row, "chosen"), "rejected": _answer(row, "rejected"),
                "source": source}  # fmt: skip
    if fmt == "prompt":
        return _prompt_only(row, prompt, source)
    label = row.get("label")
    if not isinstance(label, bool):
        raise RowError(
            "bad label", f"field 'label' is {_type_name(label)} {label!r:.60}; expected true or false"
        )
    return {"prompt": prompt, "completion": _answer(row, "completion"), "desirable": label, "source": source}


def _prompt_only(row: dict, prompt: list[dict], source: str) -> dict:
    """A prompt-only row: its ``answer`` (a string or number, or absent) and its other JSON fields, which
    reward functions receive as keyword arguments (as TRL passes a data set's columns)."""
    answer = row.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float, type(None))):
        raise RowError(
            "bad answer",
            f"field 'answer' is {_type_name(answer)} {answer!r:.60}; expected a string or number",
        )
    if isinstance(answer, str) and not answer.strip():
        raise RowError("empty 'answer'", "field 'answer' is empty")
    skip = ("prompt", "system", "conversations", "answer")
    fields = {k: v for k, v in row.items() if k not in skip and isinstance(v, (str, int, float, bool))}
    return {"prompt": prompt, "answer": None if answer is None else str(answer), "fields": fields,
            "source": source}  # fmt: skip


def render_prompt_answer(tokenizer: Any, template: str, prompt: list[dict], answer: str) -> tuple[str, str]:
    """The prompt as rendered for generation and the answer text the model should write after it.

    The answer is the reply and the end-of-turn text the template writes after a final reply (trailing
    newlines dropped, as in the supervised mask). When the generation prompt already opens the reply
    (R1 writes ``<think>\\n``), a reply that repeats the opening is not doubled.
    """
    gen = tokenizer.apply_chat_template(
        prompt, tokenize=False, chat_template=template, add_generation_prompt=True
    )
    marked = tokenizer.apply_chat_template(
        prompt + [{"role": "assistant", "content": _SENTINEL}], tokenize=False, chat_template=template
    )
    closing = marked[marked.index(_SENTINEL) + len(_SENTINEL) :].rstrip() if _SENTINEL in marked else ""
    head = marked[: marked.index(_SENTINEL)] if _SENTINEL in marked else gen
    opened = gen[len(head) :] if gen.startswith(head) else ""  # what the generation prompt adds
    if opened and answer.startswith(opened.strip()):
        answer = answer[len(opened.strip()) :].lstrip("\n")
    return gen, answer + closing


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _row(prompt_ids: list[int], answer_ids: list[int], max_length: int, overflow: str) -> tuple | str:
    """(input_ids, labels) of prompt + answer cut to ``max_length``, or the reason the row is dropped."""
    ids = prompt_ids + answer_ids
    if len(ids) > max_length:
        if overflow == "drop":
            return "too long"
        ids = ids[:max_length]
    labels = [IGNORE] * len(prompt_ids) + ids[len(prompt_ids) :]
    if len(labels) <= len(prompt_ids):
        return "no trainable tokens"
    return ids, labels


def tokenize_preference(
    examples: list[dict],
    tokenizer: Any,
    chat_template: str | None,
    max_length: int,
    overflow: str = "truncate",
) -> Tokenized:
    """Token rows of preference examples (and of prompt-only rows).

    A prompt-only row gives its prompt's tokens as ``input_ids`` (no labels: GRPO samples the answers),
    the rendered ``prompt_text``, ``answer`` and ``fields``; one longer than ``max_length`` is dropped.
    A pair gives ``{"input_ids", "labels"}`` (prompt + chosen) and ``{"rejected_input_ids",
    "rejected_labels"}``; a KTO row gives its own tokens, ``"desirable"`` (1 or 0) and ``"kl_input_ids"``,
    ``"kl_labels"``: its prompt with the completion of the next row of the split (the last takes the first),
    the mismatched pairs whose log-ratio estimates the KL term (KTO paper, sec. 4.1; TRL's KTOTrainer
    shifts completions within a batch the same way). Over-long rows keep their prompt and lose the end of
    the answer (``overflow="truncate"``) or are dropped; a pair is dropped when either side is.
    """
    template = chat_template or tokenizer_template(tokenizer)
    _require_template([{"messages": []}], tokenizer, template)
    control = _control_tokens(tokenizer, template)
    out = Tokenized(rows=[])
    if examples and "answer" in examples[0]:
        return _tokenize_prompts(examples, tokenizer, template, control, max_length)
    kept = []
    for ex in examples:
        answers = [ex["chosen"], ex["rejected"]] if "chosen" in ex else [ex["completion"]]
        if control is not None and any(
            control.search(s) for s in answers + [m["content"] for m in ex["prompt"]]
        ):
            _count_drop(out, "contains a control token")
            continue
        kept.append(ex)
    rendered = [
        [render_prompt_answer(tokenizer, template, ex["prompt"], a) for a in _answers(ex)] for ex in kept
    ]
    prompts = _encode(tokenizer, [r[0][0] for r in rendered]) if kept else []
    answers = [_encode(tokenizer, [a for _, a in r]) for r in rendered]
    for i, ex in enumerate(kept):
        if "chosen" in ex:
            row = _pair_row(prompts[i], answers[i], max_length, overflow)
        else:
            j = (i + 1) % len(kept)
            row = _kto_row(prompts[i], answers[i][0], answers[j][0], ex["desirable"], max_length, overflow)
        if isinstance(row, str):
            _count_drop(out, row)
            continue
        out.truncated += len(prompts[i]) + max(map(len, answers[i])) > max_length
        out.rows.append({**row, "source": ex["source"]})
    return out


def _tokenize_prompts(examples: list[dict], tokenizer, template: str, control, max_length: int) -> Tokenized:
    out = Tokenized(rows=[])
    for ex in examples:
        if control is not None and any(control.search(m["content"]) for m in ex["prompt"]):
            _count_drop(out, "contains a control token")
            continue
        text = tokenizer.apply_chat_template(
            ex["prompt"], tokenize=False, chat_template=template, add_generation_prompt=True
        )
        ids = _encode(tokenizer, [text])[0]
        if len(ids) >= max_length:
            _count_drop(out, "prompt too long")
            continue
        out.rows.append({"input_ids": ids, "labels": [IGNORE] * len(ids), "prompt_text": text,
                         "answer": ex["answer"], "fields": ex["fields"], "source": ex["source"]})  # fmt: skip
    return out


def _answers(ex: dict) -> list[str]:
    return [ex["chosen"], ex["rejected"]] if "chosen" in ex else [ex["completion"]]


def _pair_row(prompt: list[int], answers: list[list[int]], max_length: int, overflow: str) -> dict | str:
    chosen, rejected = (_row(prompt, a, max_length, overflow) for a in answers)
    for side in (chosen, rejected):
        if isinstance(side, str):
            return side
    return {"input_ids": chosen[0], "labels": chosen[1], "rejected_input_ids": rejected[0],
            "rejected_labels": rejected[1]}  # fmt: skip


def _kto_row(
    prompt: list[int], answer: list[int], other: list[int], desirable: bool, max_length: int, overflow: str
) -> dict | str:
    own, kl = _row(prompt, answer, max_length, overflow), _row(prompt, other, max_length, "truncate")
    if isinstance(own, str):
        return own
    if isinstance(kl, str):
        return kl
    return {"input_ids": own[0], "labels": own[1], "desirable": int(desirable), "kl_input_ids": kl[0],
            "kl_labels": kl[1]}  # fmt: skip
