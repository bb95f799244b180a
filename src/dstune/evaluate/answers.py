"""Generation metrics during training: the model answers validation prompts, scored like ``dstune eval``.

Validation rows are already token rows (``input_ids`` and ``labels`` with -100 on the prompt), so the
prompt and the reference are read off the row rather than rendered again: the prompt is every token
before the row's last labelled span (the last assistant reply) and the reference is that span. The
prompt therefore ends exactly where the template's generation prompt ends in training, and the reply is
decoded and scored as ``dstune eval`` scores it (reasoning before ``</think>`` left out of both).
"""

from __future__ import annotations

import torch

from dstune.core.facts import pad_id
from dstune.data.tokenize import IGNORE
from dstune.evaluate import metrics as M


def last_reply_span(labels: list[int]) -> tuple[int, int]:
    """``(start, end)`` of the last run of labelled positions in a row: the last assistant reply.

    Raises:
        ValueError: the row has no labelled token.
    """
    end = max((i for i, t in enumerate(labels) if t != IGNORE), default=-1) + 1
    if end == 0:
        raise ValueError("the row has no labelled token: nothing to answer")
    start = end - 1
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return start, end


def answer_text(text: str) -> str:
    """A reply without its reasoning: the text after the last ``</think>``."""
    return text.split("</think>")[-1].strip()


@torch.no_grad()
def answer_rows(model, rows: list[dict], tokenizer, max_new_tokens: int) -> tuple[list[str], list[str]]:
    """Greedy answers to each row's prompt and the row's reference reply, both without reasoning.

    Args:
        model: a transformers or peft causal LM (unwrapped from accelerate).
        rows: token rows of a conversation task (``data.tokenize`` rows).
        tokenizer: the run's tokenizer.
        max_new_tokens: the longest answer generated.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    special = set(tokenizer.all_special_ids)
    pad = pad_id(tokenizer)
    hyps, refs = [], []
    for row in rows:
        start, end = last_reply_span(row["labels"])
        reference = row["labels"][start:end]
        stop = [tokenizer.eos_token_id] + ([reference[-1]] if reference[-1] in special else [])
        prompt = torch.tensor([row["input_ids"][:start]], device=device)
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop,
            pad_token_id=pad,
        )
        hyps.append(answer_text(tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)))
        refs.append(answer_text(tokenizer.decode(reference, skip_special_tokens=True)))
    if was_training:
        model.train()
    return hyps, refs


def evaluate_answers(model, rows: list[dict], tokenizer, limit: int, max_new_tokens: int) -> dict[str, float]:
    """BLEU, ROUGE-1/2/L and exact match of greedy answers to the first ``limit`` validation rows.

    Args:
        model: the model being trained (a transformers or peft model, unwrapped from accelerate).
        rows: validation token rows of a conversation task (``data.tokenize`` rows).
        tokenizer: the run's tokenizer.
        limit: rows to answer (the first ones, in file order: the same rows at every evaluation).
        max_new_tokens: the longest answer generated.

    Returns:
        ``{"bleu", "rouge1", "rouge2", "rougeL", "exact_match", "answered"}``, over the rows whose reply
        ``data.max_length`` did not cut (``answered`` of them); empty when there are none.
    """
    special = set(tokenizer.all_special_ids)
    rows = [r for r in rows[:limit] if isinstance(r["labels"], list) and complete_reply(r, special)]
    if not rows:
        return {}
    hyps, refs = answer_rows(model, rows, tokenizer, max_new_tokens)
    rouge = M.rouge(hyps, refs)
    return {
        "bleu": M.bleu(hyps, refs)["bleu"],
        "rouge1": rouge["rouge1"],
        "rouge2": rouge["rouge2"],
        "rougeL": rouge["rougeL"],
        "exact_match": M.exact_match(hyps, refs),
        "answered": len(rows),
    }


def complete_reply(row: dict, special_ids: set[int]) -> bool:
    """Whether the row's last reply ends with its end-of-turn token (one of the tokenizer's
    ``special_ids``), i.e. ``data.max_length`` did not cut it.

    A cut reply is no reference: a model that wrote the whole answer would be scored down for it.
    """
    _, end = last_reply_span(row["labels"])
    return row["labels"][end - 1] in special_ids
