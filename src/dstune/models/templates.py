"""DeepSeek chat templates, and the choice between them and a tokenizer's own.

They follow the ``chat_template`` in DeepSeek's ``tokenizer_config.json``, for system/user/assistant only:
V2/V3 https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/tokenizer_config.json (system messages
joined by a blank line as V3-0324 and V3.1 do); R1 (2025-02 revision; generation prompt ends ``<think>\\n``):
https://huggingface.co/deepseek-ai/DeepSeek-R1/blob/main/tokenizer_config.json. Layout::

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{reply}<｜end▁of▁sentence｜><｜User｜>...

Invariant: only earlier assistant turns lose ``...</think>``; the final reply keeps its reasoning, inline
or as ``reasoning_content`` (the official R1 template strips every turn: docs/benchmarks.md, 'templates.py').
"""

from __future__ import annotations

from typing import Any

from dstune.errors import DstuneError

_BOS = "{{- bos_token -}}"

# System messages are gathered first: DeepSeek puts the system prompt, untagged, right after BOS.
_SYSTEM = (
    (
        "{%- set ns = namespace(system='', first=true) -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}"
        "{%- if ns.first -%}{%- set ns.system = message['content'] -%}{%- set ns.first = false -%}"
        "{%- else -%}{%- set ns.system = ns.system + '\\n\\n' + message['content'] -%}{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )
    + _BOS
    + "{{- ns.system -}}"
)

_UNKNOWN_ROLE = (
    "{%- elif message['role'] != 'system' -%}"
    "{{- raise_exception('DeepSeek templates accept the roles system, user and assistant, got ' "
    "+ message['role']) -}}"
)

DEEPSEEK_V3_TEMPLATE = (
    _SYSTEM + "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- '<｜User｜>' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' -}}"
    + _UNKNOWN_ROLE
    + "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜>' -}}{%- endif -%}"
)
"""DeepSeek-V2/V3 chat template (also DeepSeek-V2.5, V3-0324 and the R1 layout without thinking)."""

DEEPSEEK_R1_TEMPLATE = (
    _SYSTEM + "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- '<｜User｜>' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set content = message['content'] -%}"
    "{%- if not loop.last -%}"
    # Earlier turns: drop the reasoning, as the official template does (R1 never sees old thoughts).
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' -}}"
    "{%- elif message.get('reasoning_content') -%}"
    "{{- '<｜Assistant｜><think>\\n' + message['reasoning_content'].strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') + '<｜end▁of▁sentence｜>' -}}"
    "{%- else -%}{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' -}}"
    "{%- endif -%}" + _UNKNOWN_ROLE + "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜><think>\\n' -}}{%- endif -%}"
)
"""DeepSeek-R1 chat template: generation prompt opens ``<think>``; history loses its reasoning."""

TEMPLATES = {"deepseek-v3": DEEPSEEK_V3_TEMPLATE, "deepseek-r1": DEEPSEEK_R1_TEMPLATE}
CHOICES = ("auto", "tokenizer", *TEMPLATES)


class TemplateError(DstuneError, ValueError):
    """A chat template that cannot be found, or that cannot be used to mask the loss."""


def tokenizer_template(tokenizer: Any) -> str | None:
    """Returns the tokenizer's own chat template, or None when it has none.

    Args:
        tokenizer: a transformers tokenizer.
    """
    template = getattr(tokenizer, "chat_template", None)
    # Some repos ship several named templates ({"default": ..., "tool_use": ...}).
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def resolve_chat_template(tokenizer: Any, choice: str, family: str | None = None) -> str:
    """Picks the Jinja chat template a run will use.

    Args:
        tokenizer: a transformers tokenizer.
        choice: ``"tokenizer"`` (the tokenizer's own; an error if it has none), ``"deepseek-v3"``,
            ``"deepseek-r1"``, or ``"auto"``: the tokenizer's own if it has one, else
            ``deepseek-r1`` when ``family`` contains "r1", else ``deepseek-v3``.
        family: the model family, e.g. ``"deepseek-r1-distill-qwen"``; used by ``"auto"``.

    Returns:
        The template as a Jinja string.

    Raises:
        TemplateError: for an unknown choice, or ``"tokenizer"`` with a tokenizer that has none.
    """
    own = tokenizer_template(tokenizer)
    if choice == "tokenizer":
        if own is None:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise TemplateError(
                f"model.chat_template=tokenizer, but the tokenizer {name!r} has no chat template; "
                f"use one of {', '.join(TEMPLATES)} (or auto)"
            )
        return own
    if choice in TEMPLATES:
        return TEMPLATES[choice]
    if choice == "auto":
        if own is not None:
            return own
        return DEEPSEEK_R1_TEMPLATE if family and "r1" in family.lower() else DEEPSEEK_V3_TEMPLATE
    raise TemplateError(f"unknown chat template {choice!r}; accepted: {', '.join(CHOICES)}")


def template_name(template: str, tokenizer: Any = None) -> str:
    """A short human name for a template, for error messages and reports.

    Args:
        template: the Jinja string.
        tokenizer: the tokenizer, to recognise its own template.
    """
    for name, text in TEMPLATES.items():
        if template == text:
            return name
    if tokenizer is not None and template == tokenizer_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        return f"the chat template of tokenizer {name!r}"
    head = " ".join(template.split())[:60]
    return f"the chat template starting {head!r}"
