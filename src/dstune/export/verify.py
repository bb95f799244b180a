"""Read an exported GGUF back and compare its next-token logits with the model it came from.

Two readers: transformers' own GGUF loader (independent of this exporter: it reads llama and qwen2),
and for deepseek2, which transformers does not read, ``gguf.GGUFReader`` plus ``gguf.quants.dequantize``
mapped back through :func:`dstune.export.gguf_arch.to_hf`. The second check is weaker: the same
mapping is used both ways, so a name or layout that is wrong symmetrically would pass; the names and
layouts themselves are taken from llama.cpp's converter (see gguf_arch.py).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch


def load_with_transformers(path: str | Path) -> torch.nn.Module:
    """Loads a GGUF file with transformers' GGUF loader (de-quantised to fp32)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def read_tensors(path: str | Path | Any) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file (a path, or a ``gguf.GGUFReader`` already open on it: opening one
    parses every metadata field, ~18 s for DeepSeek's 129,280-token vocabulary) de-quantised to fp32, in
    torch's dimension order."""
    import gguf

    reader = path if isinstance(path, gguf.GGUFReader) else gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        # GGUF lists dimensions innermost first, torch outermost first.
        out[t.name] = data.reshape(tuple(int(n) for n in reversed(t.shape)))
    return out


def load_with_reader(path: str | Path | Any, like: torch.nn.Module, arch: str) -> torch.nn.Module:
    """A copy of ``like`` holding the weights read back from ``path`` (a GGUF path or an open reader; any
    architecture)."""
    from dstune.export.gguf_arch import to_hf

    model = copy.deepcopy(like)
    model.load_state_dict(to_hf(read_tensors(path), model, arch), strict=True)
    return model.eval()


@torch.no_grad()
def next_token_logits(model: torch.nn.Module, rows: list[list[int]]) -> torch.Tensor:
    """The logits of the token after each row of ids, one row at a time (no padding), ``[rows, vocab]``."""
    return torch.stack([model(torch.tensor([row])).logits[0, -1].float() for row in rows])


def agreement(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and largest absolute logit difference between two ``[rows, vocab]`` tensors."""
    n_vocab = min(reference.shape[-1], other.shape[-1])  # a GGUF vocabulary is the model's rows
    ref, oth = reference[:, :n_vocab], other[:, :n_vocab]
    same = (ref.argmax(-1) == oth.argmax(-1)).float().mean().item()
    return {"top1": same, "max_abs_diff": (ref - oth).abs().max().item(), "rows": float(ref.shape[0])}
