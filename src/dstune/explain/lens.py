"""The logit lens: what the model would predict if it stopped after each decoder layer.

Each layer's hidden state at the last position goes through the model's final norm and output head
(nostalgebraist, "interpreting GPT: the logit lens", LessWrong 2020); the last layer's reading is then the
model's own output. The raw layer outputs are taken with forward hooks: transformers' ``hidden_states``
puts the final norm into its last entry already, and a second norm would be a different function.
A classifier is read the same way through its head (``score``) at the position (or mean) it pools.
Generation is greedy and one full forward per token (no cache): a few tokens of one prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from dstune.core.heads import block_softmax, model_heads
from dstune.errors import UsageError


@dataclass
class LensStep:
    """One predicted token (or label): the model's choice and the top candidates after each layer.

    Attributes:
        chosen: the token id (or label index) the full model picked.
        layers: per decoder layer, ``[(id, probability), ...]``, most probable first.
    """

    chosen: int
    layers: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass
class Readout:
    """The parts of a model the lens needs: its decoder layers, final norm and output head."""

    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Module
    pooling: str  # "last" or "mean": where a classifier's head reads; a causal LM reads the last position


def readout(model: nn.Module) -> Readout:
    """Finds the decoder layers, final norm and head of a causal LM or classifier, also under a peft
    wrapper (``get_base_model``).

    Raises:
        UsageError: the architecture does not have them where Llama, Qwen2 and DeepSeek put them.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, base.base_model_prefix, None) if hasattr(base, "base_model_prefix") else None
    head = getattr(base, "score", None)  # a classifier's head; get_output_embeddings() is None there
    head = base.get_output_embeddings() if head is None else head
    layers, norm = getattr(decoder, "layers", None), getattr(decoder, "norm", None)
    if layers is None or norm is None or head is None:
        raise UsageError(
            f"{type(base).__name__} has no decoder layers, final norm and output head where the logit lens "
            "looks for them (model.layers, model.norm, lm_head or score)"
        )
    return Readout(layers, norm, head, getattr(base.config, "classifier_pooling", None) or "last")


@torch.no_grad()
def _layer_outputs(model: nn.Module, parts: Readout, input_ids: torch.Tensor):
    """The model's logits (``(seq, vocab)``, a classifier's ``(labels,)``) and each decoder layer's raw
    output ``(seq, hidden)``, for one row."""
    captured: list[torch.Tensor] = []

    def keep(module, args, output):
        captured.append((output[0] if isinstance(output, tuple) else output)[0])

    handles = [layer.register_forward_hook(keep) for layer in parts.layers]
    try:
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[0]
    finally:
        for h in handles:
            h.remove()
    return logits, captured


def _top(logits: torch.Tensor, k: int, heads: dict | None = None) -> list[tuple[int, float]]:
    """The ``k`` most probable ids; with a head per task, probabilities within each task's head."""
    probs = block_softmax(logits.float().reshape(1, -1), heads)[0]
    values, ids = probs.topk(min(k, probs.shape[-1]))
    return [(int(i), float(v)) for i, v in zip(ids, values)]


@torch.no_grad()
def logit_lens(
    model: nn.Module, ids: list[int], *, new_tokens: int, top_k: int, eos_id=None
) -> list[LensStep]:
    """The lens over the first ``new_tokens`` greedily generated tokens of a causal LM.

    Args:
        ids: the prompt's token ids.
        eos_id: generation stops after this token (it is the last step); None never stops early.

    Returns:
        One ``LensStep`` per generated token, in order; ``chosen`` is the generated token.
    """
    parts = readout(model)
    device = next(model.parameters()).device
    current, steps = list(ids), []
    for _ in range(new_tokens):
        logits, hidden = _layer_outputs(model, parts, torch.tensor([current], device=device))
        chosen = int(logits[-1].argmax())
        layers = [_top(parts.head(parts.norm(h[-1:]))[0], top_k) for h in hidden]
        steps.append(LensStep(chosen, layers))
        current.append(chosen)
        if eos_id is not None and chosen == eos_id:
            break
    return steps


@torch.no_grad()
def classifier_lens(model: nn.Module, ids: list[int], *, top_k: int) -> LensStep:
    """The lens of a classifier: its head applied after each layer, at the last position or, for
    ``classify.pooling: mean``, the mean over the tokens, as the head reads. Ids are label indices; with a
    head per task (``core.heads``) probabilities are per task, and the chosen label is the surest of all."""
    parts, heads = readout(model), model_heads(model)
    device = next(model.parameters()).device
    logits, hidden = _layer_outputs(model, parts, torch.tensor([ids], device=device))

    def pooled(h: torch.Tensor) -> torch.Tensor:  # as the head reads the final layer (models.classify)
        normed = parts.norm(h)
        return normed.mean(0, keepdim=True) if parts.pooling == "mean" else normed[-1:]

    chosen = int(block_softmax(logits.float().reshape(1, -1), heads).argmax())
    return LensStep(chosen, [_top(parts.head(pooled(h))[0], top_k, heads) for h in hidden])
