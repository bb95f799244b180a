"""Request bodies of the OpenAI API that ``dstune serve`` accepts, and its error shape.

Fields follow OpenAI's chat and legacy completions APIs (https://platform.openai.com/docs/api-reference);
ranges are OpenAI's (temperature 0-2, top_p in (0, 1], at most 4 stop sequences), so a bad value fails
validation naming the field. Unknown fields are ignored, as clients send more than a server reads; the
options that would change the answer and that are not implemented (``n`` > 1, ``logprobs``, ``echo``,
tools) are refused rather than silently dropped.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        """The JSON body of the error response (also sent as the last event of a broken stream)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class Sampling(BaseModel):
    """The fields the chat and completions requests share."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(description="served model id: the run, an adapter name, or the base (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, description="longest reply; default: 256 or the room left")
    temperature: float | None = Field(None, ge=0, le=2, description="0 decodes greedily; default 1")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass; default 1")
    seed: int | None = Field(None, ge=0, description="sampling seed: the same seed gives the same reply")
    stop: str | list[str] | None = Field(
        None, description="up to 4 strings that end the reply (not included)"
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1, description="only 1 reply per request is served")
    logprobs: bool | int | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        if stops is not None and any(s == "" for s in stops):
            raise ValueError("a stop sequence cannot be empty")
        return stops or None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value:
            raise ValueError("logprobs are not served by dstune serve")
        return value


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"] = Field(description="only text parts are served")
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None

    def as_template_message(self) -> dict:
        """The message as the chat template reads it (text parts joined; ``developer`` is a system prompt)."""
        content = self.content if isinstance(self.content, str) or self.content is None else None
        if content is None:
            content = "".join(part.text for part in self.content or [])
        message = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.reasoning_content:
            message["reasoning_content"] = self.reasoning_content
        return message


class ChatRequest(Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[Message] = Field(min_length=1)
    # Newer OpenAI clients send this instead of max_tokens; the same limit.
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None

    @model_validator(mode="after")
    def _checks(self) -> ChatRequest:
        if self.tools:
            raise ValueError("tools (function calling) are not served by dstune serve")
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionRequest(Sampling):
    """``POST /v1/completions``: raw text in, its continuation out (no chat template)."""

    prompt: str | list[str] = Field(description="the text to continue; a list must hold exactly one")
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError(f"one prompt per request is served, got a list of {len(value)}")
            value = value[0]
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not served by dstune serve")
        return value
