"""``dstune chat``: a multi-turn conversation in the terminal with a model or a trained run, streamed.

Replies stream token by token through transformers' ``TextIteratorStreamer`` (generation runs in a
thread and the text is printed as it arrives). R1-style reasoning (``<think>...</think>``) is hidden
unless ``show_thinking`` is set; R1's template opens the ``<think>`` block in the generation prompt
itself, so a reply may start inside the reasoning without an opening tag. Only the answer is kept in
the conversation history: DeepSeek's R1 guidance drops earlier turns' reasoning from the context, and
its chat template strips it too.

Commands typed instead of a message: ``/exit`` (or end of input) ends the chat, ``/reset`` forgets the
conversation.

A classification run (``task: classification``) has a head instead of a language-model head and cannot
write replies: ``chat`` then classifies each line typed, tokenized as the run was trained (``bos + text``,
cut to ``data.max_length``), and prints the predicted label with its probability (``classify_chat``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from threading import Thread
from typing import Callable, Iterable, Iterator

import torch
from rich.console import Console
from rich.markup import escape

from dstune.core.facts import pad_id
from dstune.errors import UsageError
from dstune.generate import Loaded, classifier_ids
from dstune.quiet import output_console

OPEN, CLOSE = "<think>", "</think>"


@dataclass
class ThinkFilter:
    """Splits streamed text into reasoning and answer, across chunk boundaries.

    Attributes:
        thinking: whether the text so far is inside a ``<think>`` block.
    """

    thinking: bool = False
    _pending: str = ""
    answer: list[str] = field(default_factory=list)

    def feed(self, text: str) -> list[tuple[str, bool]]:
        """Returns ``(text, is_reasoning)`` pieces that are safe to print now."""
        buf, out = self._pending + text, []
        while buf:
            tag = CLOSE if self.thinking else OPEN
            at = buf.find(tag)
            if at >= 0:
                if at:
                    out.append((buf[:at], self.thinking))
                buf, self.thinking = buf[at + len(tag) :], not self.thinking
                continue
            keep = next(
                (k for k in range(len(tag) - 1, 0, -1) if buf.endswith(tag[:k])), 0
            )  # a tag split in two
            if len(buf) > keep:
                out.append((buf[: len(buf) - keep], self.thinking))
            buf = buf[len(buf) - keep :] if keep else ""
            break
        self._pending = buf
        self.answer.extend(t for t, reasoning in out if not reasoning)
        return out

    def flush(self) -> list[tuple[str, bool]]:
        """What is left at the end of a reply."""
        rest, self._pending = self._pending, ""
        if rest and not self.thinking:
            self.answer.append(rest)
        return [(rest, self.thinking)] if rest else []


def stream_reply(
    loaded: Loaded,
    messages: list[dict],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int | None = None,
) -> tuple[Iterable[str], bool]:
    """Starts generating the next assistant turn and returns its text pieces as they are produced.

    Returns:
        ``(pieces, starts_thinking)``: an iterator of decoded text, and whether the prompt left a
        ``<think>`` block open (R1's generation prompt ends with ``<think>\\n``).
    """
    from transformers import TextIteratorStreamer

    tok = loaded.tokenizer
    text = tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, chat_template=loaded.chat_template
    )
    starts_thinking = text.rfind(OPEN) > text.rfind(CLOSE)
    enc = tok(text, add_special_tokens=False, return_tensors="pt")
    device = next(loaded.model.parameters()).device
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if temperature > 0
        else {"do_sample": False}
    )
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = dict(
        input_ids=enc["input_ids"].to(device),
        attention_mask=enc["attention_mask"].to(device),
        max_new_tokens=max_new_tokens,
        streamer=streamer,
        eos_token_id=tok.eos_token_id,
        pad_token_id=pad_id(tok),
        **sampling,
    )
    worker = Thread(target=torch.no_grad()(loaded.model.generate), kwargs=kwargs, daemon=True)
    worker.start()

    def pieces() -> Iterator[str]:
        yield from streamer
        # The streamer ends before generate() returns: wait for it, or an /exit right after a reply
        # shuts Python down under a thread still inside torch ("terminate called", exit status 134).
        worker.join()

    return pieces(), starts_thinking


def chat(
    loaded: Loaded,
    *,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.95,
    show_thinking: bool = False,
    seed: int | None = None,
    read: Callable[[], str | None] | None = None,
    console: Console | None = None,
) -> list[dict]:
    """Runs the conversation until ``/exit`` or the end of input.

    Args:
        loaded: the model, tokenizer and chat template (``dstune.generate.load_for_inference``).
        system: system prompt for the whole conversation.
        max_new_tokens: longest reply.
        temperature: 0 decodes greedily; otherwise sampling with ``top_p``.
        top_p: nucleus sampling mass.
        show_thinking: print R1-style reasoning (dimmed) before the answer.
        seed: seed for sampling, for reproducible replies.
        read: returns the next user line, or None at the end of input; defaults to standard input.
        console: where replies are printed.

    Returns:
        The conversation, as chat messages (answers only, without reasoning).
    """
    console = console or output_console()
    read = read or _read_stdin
    if loaded.labels is not None:
        if system:
            console.print("[dim](a classifier reads each text alone: the system prompt is not used)[/]")
        return classify_chat(loaded, read=read, console=console)
    history: list[dict] = []
    console.print("[dim]chat: /reset forgets the conversation, /exit ends it[/]")
    while True:
        console.print("[bold]you>[/] ", end="")
        line = read()
        if line is None or line.strip() in ("/exit", "/quit"):
            console.print()
            return history
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            history = []
            console.print("[dim](conversation forgotten)[/]")
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        pieces, starts_thinking = stream_reply(
            loaded, messages, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
        )
        think = ThinkFilter(thinking=starts_thinking)
        console.print("[bold]assistant>[/] ", end="")
        for piece in pieces:
            _show(console, think.feed(piece), show_thinking)
        _show(console, think.flush(), show_thinking)
        console.print()
        history.append({"role": "assistant", "content": "".join(think.answer).strip()})


def classify_text(loaded: Loaded, text: str) -> dict[str, float]:
    """The class probabilities of one text from a classifier, label -> probability in head order (with a
    head per task, ``<task>:<label>`` names and each task's probabilities summing to 1).

    Raises:
        UsageError: the text holds a control token of the tokenizer, which training drops too.
    """
    from dstune.evaluate.loss import classifier_outputs

    rows = [{"input_ids": classifier_ids(loaded, text), "labels": 0}]
    _, probs, _ = classifier_outputs(loaded.model, rows, 1, pad_id(loaded.tokenizer))
    return dict(zip(loaded.labels, probs[0]))


def classify_chat(loaded: Loaded, *, read: Callable[[], str | None], console: Console) -> list[dict]:
    """Classifies each line read until ``/exit`` or the end of input, printing the most probable label.

    Returns:
        The lines and their predictions, as chat messages (the assistant's content is the label).
    """
    history: list[dict] = []
    console.print(
        f"[dim]classifier over labels {escape(', '.join(loaded.labels))}: type a text to classify it, "
        f"/exit ends[/]",
        highlight=False,
    )
    while True:
        console.print("[bold]text>[/] ", end="")
        line = read()
        if line is None or line.strip() in ("/exit", "/quit"):
            console.print()
            return history
        line = line.strip()
        if not line or line == "/reset":  # nothing to forget: every line is classified alone
            continue
        try:
            probs = classify_text(loaded, line)
        except UsageError as exc:
            console.print(f"[yellow]not classified:[/] {exc}", highlight=False)
            continue
        chosen = []
        for group in _per_head(loaded, probs):  # a head per task: a label from each task's head
            label = max(group, key=group.__getitem__)
            others = ", ".join(f"{name} {p:.4f}" for name, p in group.items() if name != label)
            console.print(
                f"[bold]label>[/] {escape(label)} (probability {group[label]:.4f}; {escape(others)})",
                highlight=False,
            )
            chosen.append(label)
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": ", ".join(chosen)}]


def _per_head(loaded: Loaded, probs: dict[str, float]) -> list[dict[str, float]]:
    """The class probabilities of each head: one dict, or one per task (``core.heads``)."""
    from dstune.core.heads import model_heads

    heads = model_heads(loaded.model)
    items = list(probs.items())
    return [dict(items[s:e]) for s, e in heads.values()] if heads else [probs]


def _show(console: Console, pieces: list[tuple[str, bool]], show_thinking: bool) -> None:
    for text, reasoning in pieces:
        if reasoning and not show_thinking:
            continue
        console.print(text, end="", style="dim" if reasoning else None, markup=False, highlight=False)


def _read_stdin() -> str | None:
    line = sys.stdin.readline()
    return line if line else None
