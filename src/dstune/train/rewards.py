"""Reward functions of ``objective: grpo``: the built-in ones and the user's own, named in the config.

A reward function has TRL's signature, so functions written for TRL's ``GRPOTrainer`` work unchanged::

    def my_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]

``prompts`` are the rendered prompts (chat template applied, generation prompt included), ``completions``
the decoded completions, one per sampled completion (a prompt appears once per completion of its group).
``kwargs`` hold ``answer`` (the rows' answers, None where a row has none), the rows' other fields by name,
``completion_ids`` (token ids) and ``max_new_tokens``. ``None`` means "not applicable": it adds nothing to
the total and is left out of the function's mean. User code is imported only when the config names it
(``grpo.rewards: [{name: my_rewards.py:my_reward}]`` or ``my_package.rewards:my_reward``).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from pathlib import Path
from typing import Callable

from dstune.errors import UsageError

RewardFn = Callable[..., list]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
# R1's format (DeepSeek-R1 paper, sec. 2.2.2: "format rewards"): reasoning inside <think>...</think>, then
# a non-empty answer with no further think tags.
_R1_FORMAT = re.compile(r"^\s*<think>(?P<think>.*?)</think>(?P<answer>.*)$", re.DOTALL)


def final_answer(completion: str) -> str | None:
    """The answer a completion gives: the text after ``</think>`` when it thinks, then the last
    ``\\boxed{...}``, else the last number, else the last non-empty line."""
    text = completion.rsplit("</think>", 1)[-1]
    if boxed := _BOXED.findall(text):
        return boxed[-1].strip()
    if numbers := _NUMBER.findall(text):
        return numbers[-1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def _as_number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text.replace(",", "").strip().rstrip("."))
    except ValueError:
        return None


def answers_match(given: str | None, expected: str) -> bool:
    """Numbers compare as numbers (``1,469`` = ``1469.0``); other answers as text, ignoring case and
    surrounding whitespace and full stops."""
    a, b = _as_number(given), _as_number(expected)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=0, abs_tol=1e-9)
    return given is not None and given.strip().strip(".").casefold() == expected.strip().strip(".").casefold()


def accuracy(prompts: list[str], completions: list[str], answer: list, **kwargs) -> list[float | None]:
    """1.0 when the completion's final answer equals the row's ``answer``, else 0.0 (None: no answer)."""
    return [
        None if expected is None else float(answers_match(final_answer(text), expected))
        for text, expected in zip(completions, answer)
    ]


def format_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """1.0 for ``<think>...</think>`` followed by an answer, else 0.0. When the prompt already opened the
    reply with ``<think>`` (R1's template prefills it), the completion starts inside the thinking."""
    out = []
    for prompt, text in zip(prompts, completions):
        if prompt.rstrip().endswith("<think>"):
            text = "<think>" + text
        m = _R1_FORMAT.match(text)
        ok = m is not None and m["answer"].strip() and "<think>" not in m["think"] + m["answer"]
        ok = ok and "</think>" not in m["answer"]  # one thinking block: a second close is not the format
        out.append(1.0 if ok else 0.0)
    return out


def length(
    prompts: list[str], completions: list[str], completion_ids: list, max_new_tokens: int, length_cache: int,
    **kwargs,
) -> list[float]:  # fmt: skip
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to ``max_new_tokens - length_cache``
    tokens, then linearly down to -1 at ``max_new_tokens``."""
    soft = max_new_tokens - length_cache
    return [
        0.0 if len(ids) <= soft else max(-1.0, (soft - len(ids)) / length_cache) for ids in completion_ids
    ]


BUILTIN: dict[str, RewardFn] = {"accuracy": accuracy, "format": format_reward, "length": length}


def load_reward(name: str) -> RewardFn:
    """A reward function by name: a built-in one, ``path/to/file.py:function`` or ``module:function``.

    Raises:
        UsageError: the file or module cannot be imported, or has no such function.
    """
    if name in BUILTIN:
        return BUILTIN[name]
    where, _, function = name.rpartition(":")
    key = f"grpo.rewards: {name!r}"
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise UsageError(f"{key}: no such file {path}")
            spec = importlib.util.spec_from_file_location(f"dstune_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)  # the user's own file, named in their config
        else:
            module = importlib.import_module(where)
    except UsageError:
        raise
    except Exception as exc:  # an import error in user code: say which entry, with the cause
        raise UsageError(f"{key}: cannot import {where}: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, function, None)
    if not callable(fn):
        raise UsageError(f"{key}: {where} has no function {function!r}")
    return fn


def score(
    fns: list[tuple[str, RewardFn]],
    prompts: list[str],
    completions: list[str],
    kwargs: dict,
) -> dict[str, list[float]]:
    """Each function's rewards (None as NaN), checked to be one number per completion."""
    out = {}
    for name, fn in fns:
        values = fn(prompts, completions, **kwargs)
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise UsageError(
                f"grpo.rewards: {name!r} returned {got} values for {len(completions)} completions; a reward "
                f"function returns a list with one float (or None) per completion"
            )
        out[name] = [math.nan if v is None else float(v) for v in values]
    return out
