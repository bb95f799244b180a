"""DeepSeek chat templates and the loss mask, checked token by token on the real DeepSeek tokenizer."""

import pytest

from dstune.data import tokenize_examples
from dstune.data.tokenize import IGNORE, render_with_spans
from dstune.models.templates import (
    DEEPSEEK_R1_TEMPLATE,
    DEEPSEEK_V3_TEMPLATE,
    TemplateError,
    resolve_chat_template,
    template_name,
)

USER, ASSISTANT, BOS, EOS, THINK, END_THINK = 128803, 128804, 0, 1, 128821, 128822

TWO_TURNS = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 is 4."},
]

# ChatML as SmolLM2-Instruct ships it (its tokenizer_config.json), a template of another family.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Qwen3-style: the last reply always gets a think block, earlier ones never do (position-dependent).
QWEN3_LIKE = (
    "{%- for message in messages -%}{%- if message.role == 'assistant' and loop.last -%}"
    "{{- '<|im_start|>assistant\n<think>\n' + (message.reasoning_content or '') + '\n</think>\n\n' + message.content"
    " + '<|im_end|>\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}")


def _row(tok, messages, template, **kw):
    out = tokenize_examples([{"messages": messages, "source": "t:1"}], tok, template, 512, **kw)
    assert len(out.rows) == 1, out.dropped
    return out.rows[0]


def _trained_text(tok, row):
    return tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE])


def test_v3_golden_ids_and_mask(deepseek_tokenizer):
    tok = deepseek_tokenizer
    text = tok.apply_chat_template(TWO_TURNS, tokenize=False, chat_template=DEEPSEEK_V3_TEMPLATE)
    assert text == ("<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>Hi!<｜Assistant｜>Hello! How can I help?"
                    "<｜end▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜>2+2 is 4.<｜end▁of▁sentence｜>")
    row = _row(tok, TWO_TURNS, DEEPSEEK_V3_TEMPLATE)
    assert row["input_ids"] == [
        BOS, 3476, 477, 260, 11502, 22896, 16,       # <bos>You are a helpful assistant.
        USER, 23166, 3,                              # <｜User｜>Hi!
        ASSISTANT, 19923, 3, 1730, 588, 342, 1694, 33, EOS,  # <｜Assistant｜>Hello! How can I help?<eos>
        USER, 3085, 344, 223, 20, 13, 20, 33,         # <｜User｜>What is 2+2?
        ASSISTANT, 20, 13, 20, 344, 223, 22, 16, EOS]  # <｜Assistant｜>2+2 is 4.<eos>
    x = IGNORE
    assert row["labels"] == [
        x, x, x, x, x, x, x,
        x, x, x,
        x, 19923, 3, 1730, 588, 342, 1694, 33, EOS,
        x, x, x, x, x, x, x, x,
        x, 20, 13, 20, 344, 223, 22, 16, EOS]


def test_r1_golden_ids_and_mask(deepseek_tokenizer):
    """History loses its reasoning; the final reply keeps it; the prompt-supplied "<think>\\n" is not trained."""
    tok = deepseek_tokenizer
    messages = [{"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "<think>\ngreet\n</think>\n\nHello!"},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "2 plus 2 is 4."}]
    text = tok.apply_chat_template(messages, tokenize=False, chat_template=DEEPSEEK_R1_TEMPLATE)
    assert text == ("<｜begin▁of▁sentence｜><｜User｜>Hi!<｜Assistant｜>\n\nHello!<｜end▁of▁sentence｜><｜User｜>What is 2+2?"
                    "<｜Assistant｜><think>\n2 plus 2 is 4.\n</think>\n\n4<｜end▁of▁sentence｜>")
    row = _row(tok, messages, DEEPSEEK_R1_TEMPLATE)
    assert row["input_ids"] == [
        BOS, USER, 23166, 3,                          # <bos><｜User｜>Hi!
        ASSISTANT, 271, 19923, 3, EOS,                # <｜Assistant｜>\n\nHello!<eos>
        USER, 3085, 344, 223, 20, 13, 20, 33,          # <｜User｜>What is 2+2?
        ASSISTANT, THINK, 201,                         # <｜Assistant｜><think>\n
        20, 5582, 223, 20, 344, 223, 22, 603,          # 2 plus 2 is 4.\n
        END_THINK, 271, 22, EOS]                       # </think>\n\n4<eos>
    x = IGNORE
    assert row["labels"] == [
        x, x, x, x,
        x, 271, 19923, 3, EOS,
        x, x, x, x, x, x, x, x,
        x, x, x,
        20, 5582, 223, 20, 344, 223, 22, 603,
        END_THINK, 271, 22, EOS]


def test_generation_prompts(deepseek_tokenizer):
    tok, first = deepseek_tokenizer, TWO_TURNS[:2]
    assert tok.apply_chat_template(first, tokenize=False, add_generation_prompt=True,
                                   chat_template=DEEPSEEK_V3_TEMPLATE).endswith("Hi!<｜Assistant｜>")
    assert tok.apply_chat_template(first, tokenize=False, add_generation_prompt=True,
                                   chat_template=DEEPSEEK_R1_TEMPLATE).endswith("Hi!<｜Assistant｜><think>\n")


def test_r1_keeps_inline_reasoning_of_the_final_reply(deepseek_tokenizer):
    tok = deepseek_tokenizer
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHey"}]
    row = _row(tok, messages, DEEPSEEK_R1_TEMPLATE)
    assert _trained_text(tok, row) == "hmm\n</think>\n\nHey<｜end▁of▁sentence｜>"


def test_several_system_messages_are_joined(deepseek_tokenizer):
    messages = [{"role": "system", "content": "A."}, {"role": "system", "content": "B."},
                {"role": "user", "content": "u"}]
    text = deepseek_tokenizer.apply_chat_template(messages, tokenize=False, chat_template=DEEPSEEK_V3_TEMPLATE)
    assert text == "<｜begin▁of▁sentence｜>A.\n\nB.<｜User｜>u"


def test_unknown_role_is_an_error(deepseek_tokenizer):
    with pytest.raises(Exception, match="system, user and assistant, got tool"):
        deepseek_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False,
                                               chat_template=DEEPSEEK_V3_TEMPLATE)


REASONED = TWO_TURNS[:-1] + [dict(TWO_TURNS[-1], reasoning_content="Add them.")]


@pytest.mark.parametrize("template, messages, expected", [
    (CHATML, TWO_TURNS, ["Hello! How can I help?<|im_end|>", "2+2 is 4.<|im_end|>"]),
    # The empty think block the template always writes is prompt; written reasoning is trained.
    (QWEN3_LIKE, TWO_TURNS, ["Hello! How can I help?<|im_end|>", "2+2 is 4.<|im_end|>"]),
    (QWEN3_LIKE, REASONED, ["Hello! How can I help?<|im_end|>", "Add them.\n</think>\n\n2+2 is 4.<|im_end|>"]),
])
def test_mask_works_for_other_templates(deepseek_tokenizer, template, messages, expected):
    """The mask comes from the rendered text, so it needs no knowledge of the template."""
    text, spans = render_with_spans(deepseek_tokenizer, template, messages)
    assert [text[s:e] for s, e in spans] == expected


def test_train_on_all_and_a_template_that_is_not_prefix_stable(deepseek_tokenizer):
    tok = deepseek_tokenizer
    row = _row(tok, TWO_TURNS, DEEPSEEK_V3_TEMPLATE, train_on="all")
    assert row["labels"] == row["input_ids"]
    backwards = "{% for m in messages|reverse %}{{ m['role'] + ':' + m['content'] + '\n' }}{% endfor %}"
    with pytest.raises(TemplateError, match="chat template starting .*not a prefix"):
        tokenize_examples([{"messages": TWO_TURNS, "source": "t:1"}], tok, backwards, 512)


class _NoTemplate:
    chat_template = None
    name_or_path = "some/model"


class _OwnTemplate:
    chat_template = CHATML
    name_or_path = "own/model"


def test_resolve_chat_template():
    assert resolve_chat_template(_NoTemplate(), "auto") == DEEPSEEK_V3_TEMPLATE
    assert resolve_chat_template(_NoTemplate(), "auto", "deepseek-r1-distill-qwen") == DEEPSEEK_R1_TEMPLATE
    assert resolve_chat_template(_OwnTemplate(), "auto", "deepseek-r1") == CHATML
    assert resolve_chat_template(_OwnTemplate(), "tokenizer") == CHATML
    assert resolve_chat_template(_OwnTemplate(), "deepseek-r1") == DEEPSEEK_R1_TEMPLATE
    with pytest.raises(TemplateError, match="'some/model' has no chat template"):
        resolve_chat_template(_NoTemplate(), "tokenizer")
    with pytest.raises(TemplateError, match="accepted: auto, tokenizer, deepseek-v3, deepseek-r1"):
        resolve_chat_template(_NoTemplate(), "llama3")
    assert template_name(DEEPSEEK_R1_TEMPLATE) == "deepseek-r1"
    assert "own/model" in template_name(CHATML, _OwnTemplate())


def test_conversations_without_any_template_are_an_error(deepseek_tokenizer):
    with pytest.raises(TemplateError, match="no chat template; set model.chat_template"):
        tokenize_examples([{"messages": TWO_TURNS, "source": "t:1"}], deepseek_tokenizer, None, 512)
