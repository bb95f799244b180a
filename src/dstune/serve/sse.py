"""OpenAI's response objects and server-sent events, for chat and completions.

A stream is ``data: {json}\\n\\n`` events ending with ``data: [DONE]``, as OpenAI sends them: a chat
stream opens with a ``role`` delta, carries ``content`` (and, for R1, ``reasoning_content`` as DeepSeek's
API does) deltas, and closes with an empty delta holding ``finish_reason``; with
``stream_options.include_usage`` a last chunk with no choices carries the token counts. An error after the
stream started is sent as one ``data: {"error": ...}`` event (the openai client raises it).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

DONE = "data: [DONE]\n\n"


def event(payload: dict) -> str:
    """One server-sent event holding ``payload`` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class Reply:
    """The ids and the shape of one response: ``chat`` (chat.completion) or a text completion."""

    model: str
    chat: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, content: str, reasoning: str | None, finish_reason: str, counts: dict) -> dict:
        """The non-streamed response."""
        if not self.chat:
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("text_completion"), "choices": [choice], "usage": counts}
        message = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("chat.completion"), "choices": [choice], "usage": counts}

    def chunk(
        self,
        text: str = "",
        *,
        reasoning: bool = False,
        first: bool = False,
        finish_reason: str | None = None,
    ) -> str:
        """One streamed event: a text piece (answer, or reasoning), the opening role, or the last one."""
        if not self.chat:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            return event({**self._head("text_completion"), "choices": [choice]})
        if first:
            delta = {"role": "assistant", "content": ""}
        elif finish_reason is not None:
            delta = {}
        else:
            delta = {"reasoning_content": text} if reasoning else {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return event({**self._head("chat.completion.chunk"), "choices": [choice]})

    def usage_chunk(self, counts: dict) -> str:
        """The last chunk of a stream that asked for ``include_usage``: no choices, the token counts."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return event({**self._head(obj), "choices": [], "usage": counts})
