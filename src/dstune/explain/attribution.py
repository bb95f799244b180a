"""Gradient x input: how much each input token's embedding pushes one output score.

The score of token i is ``sum_d x_id * d score / d x_id`` over its embedding ``x_i`` (Shrikumar et al. 2016,
arXiv:1605.01713). For a function linear in the embeddings the scores add up exactly to
``f(x) - f(0)``: it is then integrated gradients with a zero baseline, whose completeness axiom is that sum
(Sundararajan et al. 2017, arXiv:1703.01365, section 3); tests/test_explain.py checks that. For a
transformer the sum is only a first-order estimate, so the scores rank tokens, they do not split the logit.
"""

from __future__ import annotations

from typing import Callable

import torch

Score = Callable[[torch.Tensor], torch.Tensor]


def gradient_x_input(score: Score, embeddings: torch.Tensor) -> torch.Tensor:
    """Gradient x input of a scalar function of the input embeddings, one value per token.

    Args:
        score: maps embeddings shaped like ``embeddings`` to a scalar tensor.
        embeddings: ``(seq, hidden)`` or ``(1, seq, hidden)``; not modified.

    Returns:
        ``(seq,)`` on the CPU, in the embeddings' dtype: per token, the dot product of its embedding with
        the gradient.
    """
    x = embeddings.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(score(x), x)
    return (grad * x).sum(-1).detach().cpu().reshape(-1)


def next_token_score(model: torch.nn.Module, target_id: int) -> Score:
    """The log-probability a causal LM gives ``target_id`` after the last input position, as a function
    of the input embeddings ``(1, seq, hidden)``. The log-probability, not the raw logit: it is what the
    model's choice depends on, and it is comparable between targets (every logit moves it)."""

    def score(x: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        logits = model(inputs_embeds=x, attention_mask=mask).logits[0, -1].float()
        return torch.log_softmax(logits, -1)[target_id]

    return score


def label_score(model: torch.nn.Module, label_index: int) -> Score:
    """The classification head's logit of one label, as a function of the input embeddings: the logit
    (not the probability) is what the head computes linearly from the pooled hidden state."""

    def score(x: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        return model(inputs_embeds=x, attention_mask=mask).logits[0, label_index].float()

    return score


def input_embeddings(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """The model's input embeddings of ``ids``, ``(1, seq, hidden)``, detached."""
    table = model.get_input_embeddings()
    with torch.no_grad():
        return table(torch.tensor([ids], device=table.weight.device))
