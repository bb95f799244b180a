"""Batched generation for training objectives: GRPO's sampled groups and sequence-level distillation's
teacher answers, with transformers' ``generate`` (KV cache) on left-padded prompts."""

from __future__ import annotations

import torch

from dstune.data.preference import render_prompt_answer


@torch.no_grad()
def generate_ids(
    model,
    prompts: list[list[int]],
    engine,
    pad_id: int,
    stop_ids: list[int],
    max_new_tokens: int,
    *,
    n: int = 1,
    sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[list[int]]:
    """``n`` completions of each prompt (prompt-major order), each cut after its first stop token.

    Prompts are left-padded so every completion starts at the same column. Sampling draws from the full
    distribution (``top_k=0``; temperature and top-p only), so the completions are the policy's own; it
    uses the global torch generator, which checkpoints save. The model is put in eval mode for the call.
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    net = engine.unwrap_model(model)
    was_training = net.training
    net.eval()
    sampling = dict(temperature=temperature, top_p=top_p, top_k=0) if sample else {}
    with engine.autocast():
        out = net.generate(
            input_ids=ids.repeat_interleave(n, 0).to(engine.device),
            attention_mask=mask.repeat_interleave(n, 0).to(engine.device),
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            pad_token_id=pad_id,
            eos_token_id=stop_ids,
            **sampling,
        )
    if was_training:
        net.train()
    completions = []
    for seq in out[:, width:].tolist():
        end = next((i for i, t in enumerate(seq) if t in stop_ids), None)
        completions.append(seq if end is None else seq[: end + 1])
    return completions


def stop_ids(tokenizer, template: str | None) -> list[int]:
    """The tokens that end a completion: the tokenizer's end of sequence and the template's end of turn
    (ChatML's ``<|im_end|>``) when that is one token."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    closing = render_prompt_answer(tokenizer, template, [{"role": "user", "content": "hi"}], "")[1].strip()
    if closing:
        encoded = tokenizer(closing, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1:
            ids.add(encoded[0])
    return sorted(ids)
