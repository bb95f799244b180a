"""`dstune chat`: streamed multi-turn replies equal non-streamed greedy ones, R1 reasoning is hidden or
shown, and the CLI reads the conversation from standard input."""

import pytest
from rich.console import Console
from typer.testing import CliRunner

from dstune.chat import ThinkFilter, chat
from dstune.cli import app
from dstune.generate import generate_reply, load_for_inference


def _feed_all(chunks, thinking=False):
    f = ThinkFilter(thinking=thinking)
    pieces = [p for c in chunks for p in f.feed(c)] + f.flush()
    return pieces, "".join(f.answer)


def test_think_filter_splits_reasoning_across_chunk_boundaries():
    pieces, answer = _feed_all(["Hi <thi", "nk>let me", " see</th", "ink>The answer", " is 4.<"])
    assert answer == "Hi The answer is 4.<"
    assert "".join(t for t, r in pieces if r) == "let me see"


def test_think_filter_starts_inside_reasoning_for_r1_prompts():
    pieces, answer = _feed_all(["reasoning...", "</think>", "\n\nAnswer."], thinking=True)
    assert answer == "\n\nAnswer." and pieces[0] == ("reasoning...", True)


@pytest.fixture(scope="module")
def tiny_llm():
    return load_for_inference("tiny:deepseek-llm")


def test_streamed_multi_turn_chat_equals_greedy_replies(tiny_llm):
    lines = iter(["Who are you?", "And what can you do?", "/exit"])
    console = Console(record=True, width=200, force_terminal=False)
    history = chat(tiny_llm, system="Be brief.", temperature=0.0, max_new_tokens=6, read=lambda: next(lines),
                   console=console)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    system = [{"role": "system", "content": "Be brief."}]
    first = generate_reply(tiny_llm, system + history[:1], max_new_tokens=6)
    second = generate_reply(tiny_llm, system + history[:3], max_new_tokens=6)  # the second turn sees the first
    assert history[1]["content"] == first and history[3]["content"] == second
    assert console.export_text().count("assistant>") == 2


def test_a_streamed_reply_ends_with_its_generation_thread(tiny_llm):
    """An /exit typed right after a reply must not find generate() still running in its thread: Python
    then shut down under it and the process aborted ("terminate called", exit status 134)."""
    import threading

    from dstune.chat import stream_reply

    before = threading.active_count()
    pieces, _ = stream_reply(tiny_llm, [{"role": "user", "content": "hi"}], max_new_tokens=4, temperature=0.0)
    assert threading.active_count() == before + 1  # generating
    "".join(pieces)
    assert threading.active_count() == before


def test_cli_chat_reads_stdin_and_hides_or_shows_r1_thinking():
    runner = CliRunner()
    # tiny:r1-distill-qwen uses the R1 template, whose generation prompt opens a <think> block; a random
    # model never closes it, so everything it says is reasoning.
    args = ["chat", "tiny:r1-distill-qwen", "--temperature", "0", "--max-new-tokens", "4"]
    hidden = runner.invoke(app, args, input="hello\n/reset\nagain\n")
    shown = runner.invoke(app, args + ["--show-thinking"], input="hello\n/exit\n")
    assert hidden.exit_code == 0 and shown.exit_code == 0, hidden.output + shown.output
    assert "conversation forgotten" in hidden.output
    reply_hidden = hidden.output.split("assistant>")[1].split("you>")[0].strip()
    reply_shown = shown.output.split("assistant>")[1].split("you>")[0].strip()
    assert reply_hidden == "" and reply_shown != ""


def test_cli_chat_bad_target_is_explained():
    res = CliRunner().invoke(app, ["chat", "no/such-model-dir-xyz"], input="/exit\n")
    assert res.exit_code == 2 and "error" in res.output
