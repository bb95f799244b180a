"""Per-layer gradient norms and update-to-weight ratios every ``stability.diag_every`` steps.

The update-to-weight ratio ``|W_after - W_before| / |W_before|`` of a layer is the quantity Karpathy's
"A Recipe for Training Neural Networks" (2019) and CS231n suggest watching: around 1e-3 per step is
healthy for Adam; far above it the layer is being overwritten, far below it the layer barely learns.
A layer's gradient norm is compared with the median over layers: a ratio under
``stability.vanish_ratio`` (or a zero norm) is reported as vanishing, over ``stability.explode_ratio``
(or non-finite) as exploding. Both go to the metrics log (``split == "diag"``) and TensorBoard.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

import torch
import torch.nn as nn

from dstune.config import StabilityConfig
from dstune.core.facts import layer_index


def layer_key(name: str, embedding_ids: set[int] | None = None, p: torch.Tensor | None = None) -> str:
    """The group a parameter is reported under: ``layer_03``, ``embeddings``, ``head`` or ``other``."""
    index = layer_index(name)
    if index is not None:
        return f"layer_{index:02d}"
    if embedding_ids is not None and p is not None and id(p) in embedding_ids:
        return "embeddings"
    if "lm_head" in name:
        return "head"
    return "other"


def _grouped(model: nn.Module) -> dict[str, list[tuple[str, torch.Tensor]]]:
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[str, list[tuple[str, torch.Tensor]]] = defaultdict(list)
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[layer_key(name, embedding_ids, p)].append((name, p))
    return dict(sorted(groups.items()))


def _norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.detach().float().pow(2).sum()) for t in tensors))


class LayerDiagnostics:
    """Measures per-layer gradient norms before clipping and update ratios after the optimizer step.

    Args:
        cfg: the ``stability`` section (``diag_every``, ``vanish_ratio``, ``explode_ratio``).
        model: the unwrapped model.
        log: ``log(step, values)`` to the metrics log; ``say(text)`` prints a warning.
    """

    def __init__(self, cfg: StabilityConfig, model: nn.Module, log=None, say=None):
        self.cfg = cfg
        self.groups = _grouped(model) if cfg.diag_every else {}
        self.log, self.say = log or (lambda step, values: None), say or (lambda text: None)
        self._before: dict[str, list[torch.Tensor]] | None = None
        self._grads: dict[str, float] = {}
        self.warnings: list[str] = []

    def due(self, step: int) -> bool:
        return bool(self.cfg.diag_every) and step % self.cfg.diag_every == 0

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        """Call after backward and before clipping for step ``step`` (1-based): records gradient norms
        and a copy of the weights."""
        if not self.due(step):
            return
        self._grads = {
            k: _norm([p.grad for _, p in ps if p.grad is not None]) for k, ps in self.groups.items()
        }
        self._before = {k: [p.detach().clone() for _, p in ps] for k, ps in self.groups.items()}

    @torch.no_grad()
    def after_step(self, step: int) -> dict[str, float]:
        """Call after ``optimizer.step()``: logs grad norms and update ratios, warns about outliers.

        Returns:
            The logged values (empty when this step is not a diagnostics step).
        """
        if not self.due(step) or self._before is None:
            return {}
        values = {}
        for key, ps in self.groups.items():
            before = self._before[key]
            delta = _norm([p - b for (_, p), b in zip(ps, before)])
            values[f"grad_norm/{key}"] = self._grads[key]
            values[f"update_ratio/{key}"] = delta / max(_norm(before), 1e-12)
        self._before = None
        flagged = self.outliers(self._grads)
        for key, kind in flagged.items():
            text = f"step {step}: gradients {kind} in {key} (norm {self._grads[key]:.3g})"
            self.warnings.append(text)
            self.say(f"[yellow]diagnostics: {text}[/]")
        self.log(step, values | {"flagged_layers": len(flagged)})
        return values

    def outliers(self, norms: dict[str, float]) -> dict[str, str]:
        """Layers whose gradient norm is vanishing or exploding relative to the median layer."""
        finite = [v for v in norms.values() if math.isfinite(v) and v > 0]
        med = statistics.median(finite) if finite else 0.0
        out = {}
        for key, v in norms.items():
            if not math.isfinite(v) or (med > 0 and v > self.cfg.explode_ratio * med):
                out[key] = "explode"
            elif v == 0 or (med > 0 and v < self.cfg.vanish_ratio * med):
                out[key] = "vanish"
        return out
