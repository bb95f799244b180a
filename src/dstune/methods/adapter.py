"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP").

Each adapter is down-projection -> non-linearity -> up-projection with a residual connection, on the output
of a decoder layer's attention and/or MLP block, before the block's own residual add (Houlsby et al.,
fig. 2); ``adapter.where=mlp`` is Pfeiffer et al. 2021's single-adapter placement (AdapterFusion, sec. 4).
The bottleneck is ``hidden_size / adapter.reduction`` wide. peft has no such method, so it is written here in
peft's style: the block is wrapped (``base_layer`` holds the original; nothing copied), and only the adapters
are saved (``bottleneck_adapter.safetensors`` + ``bottleneck_adapter.json``). Invariant: the up-projection
starts at zero, so the adapted model starts exactly as the base model. The non-linearity means an adapter
cannot be folded into the base weights: it cannot be merged.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from dstune.config import AdapterConfig, RunConfig
from dstune.errors import UsageError

WEIGHTS = "bottleneck_adapter.safetensors"
CONFIG = "bottleneck_adapter.json"
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)$")


class Bottleneck(nn.Module):
    """``h + up(act(down(h)))``; ``up`` is zero-initialised, so it starts as the identity."""

    def __init__(self, hidden_size: int, bottleneck: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


class AdaptedBlock(nn.Module):
    """Runs the wrapped attention or MLP block, then a bottleneck adapter on its output."""

    def __init__(self, base_layer: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        if isinstance(out, tuple):  # attention returns (hidden states, attention weights)
            return (self.adapter(out[0]), *out[1:])
        return self.adapter(out)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # callers that read e.g. self_attn.layer_idx see the wrapped block
            return getattr(super().__getattr__("base_layer"), name)


class AdapterModel(nn.Module):
    """A transformers model with bottleneck adapters; saves and loads only the adapters.

    Attributes the loop and ``generate`` need (``config``, ``generate``, ``get_output_embeddings``, ...)
    are the base model's.
    """

    def __init__(self, model: nn.Module, settings: dict):
        super().__init__()
        self.base_model = model
        self.settings = settings

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_model"), name)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter weights by name (relative to the base model)."""
        # A classification head (task: classification) is new and trained, so it is saved beside the adapters.
        return {
            n: p.detach().cpu().contiguous()
            for n, p in self.base_model.named_parameters()
            if ".adapter." in n or n.startswith("score.")
        }

    def save_pretrained(self, save_directory: str | Path, **_: object) -> None:
        """Writes ``bottleneck_adapter.safetensors`` and ``bottleneck_adapter.json`` (what to rebuild)."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        save_file(self.adapter_state(), str(out / WEIGHTS), metadata={"format": "pt"})
        info = dict(self.settings, base_model_name_or_path=getattr(self.base_model, "name_or_path", None))
        (out / CONFIG).write_text(json.dumps(info, indent=2), encoding="utf-8")


def add_adapters(model: nn.Module, ac: AdapterConfig) -> AdapterModel:
    """Wraps every decoder layer's attention and/or MLP block with a bottleneck adapter, in place.

    Args:
        model: a transformers causal LM; its weights are frozen.
        ac: the ``adapter`` section.

    Raises:
        ValueError: when no block matched or the reduction leaves no bottleneck.
    """
    hidden = model.config.hidden_size
    bottleneck = hidden // ac.reduction
    if bottleneck < 1:
        raise UsageError(
            f"adapter.reduction={ac.reduction} leaves no bottleneck for hidden_size {hidden}; use 1..{hidden}"
        )
    kinds = {"both": ("self_attn", "mlp"), "attention": ("self_attn",), "mlp": ("mlp",)}[ac.where]
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        m = _BLOCK.search(name)
        if m and m.group(2) in kinds and not isinstance(module, AdaptedBlock):
            model.set_submodule(name, AdaptedBlock(module, Bottleneck(hidden, bottleneck, ac.activation)))
            wrapped.append(name)
    if not wrapped:
        raise UsageError(
            f"adapter.where={ac.where}: no 'layers.N.self_attn' or 'layers.N.mlp' block in "
            f"{type(model).__name__}"
        )
    device = next(model.parameters()).device
    model.to(device)
    settings = {
        "method": "adapter",
        "reduction": ac.reduction,
        "where": ac.where,
        "activation": ac.activation,
        "hidden_size": hidden,
        "bottleneck": bottleneck,
        "blocks": wrapped,
    }
    return AdapterModel(model, settings)


def prepare_adapter(model: nn.Module, cfg: RunConfig) -> AdapterModel:
    """Adds trainable bottleneck adapters (``adapter.*``); the base model is frozen."""
    return add_adapters(model, cfg.adapter)


def is_adapter_dir(path: str | Path) -> bool:
    """True when ``path`` holds bottleneck adapters saved by ``AdapterModel.save_pretrained``."""
    return (Path(path) / CONFIG).is_file()


def load_adapter(base: nn.Module, adapter_dir: str | Path) -> AdapterModel:
    """Rebuilds the adapters saved in ``adapter_dir`` on ``base`` and loads their weights.

    Raises:
        ValueError: when the saved adapters do not fit the base model, naming the keys.
    """
    info = json.loads((Path(adapter_dir) / CONFIG).read_text(encoding="utf-8"))
    ac = AdapterConfig(reduction=info["reduction"], where=info["where"], activation=info["activation"])
    model = add_adapters(base, ac)
    state = load_file(str(Path(adapter_dir) / WEIGHTS))
    expected = set(model.adapter_state())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UsageError(
            f"{adapter_dir}: adapter weights do not fit this base model "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    model.base_model.load_state_dict(state, strict=False)
    return model.eval()
