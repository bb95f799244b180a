"""The one generation worker: a thread that runs queued requests one at a time.

A model is not thread-safe (and the active adapter is global state), so every request is a ``Job`` put on a
bounded queue; when the queue is full the request is refused at once (429) instead of waiting without
bound. The worker tokenizes the prompt, checks it against the context, generates with transformers'
``generate`` and reports back to the request's event loop: ``start`` (prompt tokens, whether R1's prompt
opened a ``<think>`` block), ``text`` pieces, then ``end`` (finish reason, tokens) or ``error``.
Generation stops early when the client goes away (``Job.cancel``), at the request's deadline, or at a
stop sequence, which is cut from the reply as OpenAI does; text that may be the start of a stop sequence
is held back until the next token decides.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from dstune.chat import CLOSE, OPEN
from dstune.core.facts import pad_id
from dstune.serve.host import ModelHost
from dstune.serve.schemas import ApiError

DEFAULT_MAX_TOKENS = 256  # a reply's length when the request names none (OpenAI: up to the context)
log = logging.getLogger("dstune.serve")


@dataclass
class Job:
    """One request for the worker.

    Attributes:
        model_id: the served id (picks the adapter).
        messages: chat messages, or None for a raw completion of ``prompt``.
        events: where the worker reports, read by the request's coroutine.
        cancel: set when the client disconnected; generation stops at the next token.
        deadline: ``time.monotonic()`` after which the request fails with 504.
    """

    model_id: str
    messages: list[dict] | None
    prompt: str | None
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    deadline: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, payload=None) -> None:
        """Hands an event to the request's coroutine (thread-safe)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class QueueFull(Exception):
    """The request queue holds ``max_queue`` waiting jobs already."""


class GenerationWorker:
    """Runs jobs from a bounded queue in one thread.

    Args:
        host: the loaded model and its served ids.
        max_queue: jobs that may wait while one runs; one more is refused with ``QueueFull``.
    """

    def __init__(self, host: ModelHost, max_queue: int = 16):
        self.host = host
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="dstune-serve-worker", daemon=True)
        self.busy = False
        self._current: Job | None = None
        self.served = 0  # jobs taken off the queue
        self.tokens = 0  # tokens generated, for /health and the load test

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ends the thread: the running job stops at its next token, queued jobs are answered 503."""
        if self._current is not None:
            self._current.cancel.set()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit("error", ApiError(503, "the server is shutting down", type="server_error"))
        self._queue.put(None)
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queues a job. Raises: QueueFull."""
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            self.busy, self._current = True, job
            try:
                if job.cancel.is_set():
                    continue
                if time.monotonic() > job.deadline:
                    job.emit("error", timeout_error())
                    continue
                with self.host.use(job.model_id):
                    self._generate(job)
            except ApiError as exc:
                job.emit("error", exc)
            except Exception as exc:  # noqa: BLE001 - a bug in one request must not stop the server
                log.exception("generation failed")
                job.emit(
                    "error",
                    ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error"),
                )
            finally:
                self.busy, self._current = False, None
                self.served += 1

    @torch.no_grad()
    def _generate(self, job: Job) -> None:
        tok, model = self.host.loaded.tokenizer, self.host.loaded.model
        ids, thinking = self._prompt(job)
        max_tokens = self._room(job, len(ids))
        job.emit("start", {"prompt_tokens": len(ids), "thinking": thinking})
        sink = _TextSink(tok, job.stop, job.emit)
        if job.seed is not None:
            torch.manual_seed(job.seed)
        sampling = (
            {"do_sample": True, "temperature": job.temperature, "top_p": job.top_p}
            if job.temperature > 0
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        device = next(model.parameters()).device
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_tokens,
            streamer=sink,
            stopping_criteria=StoppingCriteriaList([_Halt(job, sink)]),
            eos_token_id=tok.eos_token_id,
            pad_token_id=pad_id(tok),
            **sampling,
        )
        self.tokens += len(sink.ids)
        if job.cancel.is_set():
            return
        if sink.stopped is None and time.monotonic() > job.deadline:
            raise timeout_error()
        sink.flush()
        eos = bool(sink.ids) and sink.ids[-1] == tok.eos_token_id
        reason = "stop" if sink.stopped or eos else "length" if len(sink.ids) >= max_tokens else "stop"
        job.emit("end", {"finish_reason": reason, "completion_tokens": len(sink.ids)})

    def _prompt(self, job: Job) -> tuple[list[int], bool]:
        """The prompt's token ids, and whether it leaves R1's ``<think>`` block open."""
        loaded = self.host.loaded
        tok = loaded.tokenizer
        if job.messages is None:
            return tok(job.prompt, add_special_tokens=True)["input_ids"], False
        try:
            text = tok.apply_chat_template(
                job.messages, add_generation_prompt=True, tokenize=False, chat_template=loaded.chat_template
            )
        except Exception as exc:  # jinja2's TemplateError: a role or layout the template refuses
            raise ApiError(400, f"the chat template refused the messages: {exc}", param="messages") from exc
        return tok(text, add_special_tokens=False)["input_ids"], text.rfind(OPEN) > text.rfind(CLOSE)

    def _room(self, job: Job, prompt_tokens: int) -> int:
        """The reply's token limit, after checking that prompt and reply fit in the context."""
        context = self.host.context_length
        where = "prompt" if job.messages is None else "messages"
        wanted = job.max_tokens or min(DEFAULT_MAX_TOKENS, context - prompt_tokens)
        if prompt_tokens >= context:
            message = (
                f"This model's maximum context length is {context} tokens. However, your {where} "
                f"hold {prompt_tokens} tokens, which leaves no room for a reply. Please shorten the {where}."
            )
        elif prompt_tokens + wanted > context:
            message = (
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_tokens + wanted} tokens ({prompt_tokens} in the {where}, {wanted} in the "
                f"completion). Please reduce the length of the {where} or completion."
            )
        else:
            return wanted
        raise ApiError(400, message, param=where, code="context_length_exceeded")


def timeout_error() -> ApiError:
    return ApiError(
        504, "the request took longer than the server's --timeout", type="timeout", code="timeout"
    )


class _Halt(StoppingCriteria):
    """Stops generation when the client left, the deadline passed or a stop sequence appeared."""

    def __init__(self, job: Job, sink: _TextSink):
        self.job, self.sink = job, sink

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        halt = (
            self.job.cancel.is_set() or self.sink.stopped is not None or time.monotonic() > self.job.deadline
        )
        return torch.full((input_ids.shape[0],), halt, dtype=torch.bool, device=input_ids.device)


class _TextSink(BaseStreamer):
    """Receives generated token ids from ``generate`` and emits the new text, cut at a stop sequence.

    The whole reply is decoded again at every token (a few hundred tokens at most), so a character made of
    several tokens, or a space a tokenizer adds between tokens, is emitted only once it is complete.
    """

    def __init__(self, tokenizer, stops: list[str], emit):
        self.tok, self.stops, self.emit = tokenizer, stops, emit
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded reply already emitted
        self.stopped: str | None = None
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() hands the prompt over first
            self._prompt_seen = True
            return
        if self.stopped is not None:
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
            return
        cut = _first_stop(text, self.stops, max(0, self.sent - max(map(len, self.stops), default=0)))
        if cut is not None:
            at, self.stopped = cut
            self._send(text[:at])
            return
        self._send(text[: len(text) - _held_back(text, self.stops)])

    def end(self) -> None:
        pass

    def flush(self) -> None:
        """Sends the text held back as a possible stop sequence, once generation ended without one."""
        if self.stopped is None:
            self._send(self.tok.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd"))

    def _send(self, text: str) -> None:
        if len(text) > self.sent:
            self.emit("text", text[self.sent :])
            self.sent = len(text)


def _first_stop(text: str, stops: list[str], start: int) -> tuple[int, str] | None:
    """Where the earliest stop sequence begins in ``text`` (searched from ``start``), and which."""
    found = [(at, stop) for stop in stops if (at := text.find(stop, start)) >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop sequence."""
    return max(
        (k for stop in stops for k in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:k])),
        default=0,
    )
