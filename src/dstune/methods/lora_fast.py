"""peft's LoRA Linear with its common case computed in fewer passes over the activations.

peft computes a LoRA layer as ``result = result + lora_B(lora_A(dropout(x))) * scaling``: the scaling
multiplies, and the sum allocates, a tensor as large as the layer's output, and backward runs both again;
SmolLM2 with LoRA on attention does that 120 times per forward. ``LeanLinear`` scales the rank-r
intermediate instead (r values per token rather than the output's width) and adds the update in place
into the frozen layer's output, which ``F.linear``'s backward does not keep. The maths is the same sum in
a different order (tested equal to float tolerance, values and gradients). It is written here rather than
taken from peft because peft has no such path; it is a class swap on the modules peft built, so saving,
merging, loading and ``disable_adapter`` stay peft's. Measured: docs/benchmarks.md, 'Training speed'.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from peft.tuners.lora.layer import Linear as PeftLinear


class LeanLinear(PeftLinear):
    """peft's ``lora.Linear``; the plain case (one active unmerged adapter, no variant such as DoRA, a
    plain ``nn.Linear`` base, input in the adapter's dtype or in autocast's, no extra arguments) takes the
    lean path; every other case is peft's own forward."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._lean_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        out = self.base_layer(x)
        update = self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x)) * self.scaling[name])
        if update.dtype != out.dtype:  # autocast: the sum in the base output's dtype, as peft returns it
            return (out + update).to(out.dtype)
        return out.add_(update)

    def _lean_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The adapter the lean path computes, or None where peft's forward must run."""
        active = self.active_adapters
        if args or kwargs or self.disable_adapters or self.merged or len(active) != 1:
            return None
        name = active[0]
        base = self.base_layer
        if name not in self.lora_A or name in self.lora_variant or type(base) is not nn.Linear:
            return None
        if base._forward_hooks:  # a hook may keep the output, which the lean path adds into
            return None
        # The adapter's dtype, or under autocast the dtype autocast computes in (bf16 autocast: x is bf16
        # and peft would cast it to the fp32 adapter's dtype, for autocast to cast it back for the matmul).
        device = x.device.type
        if x.dtype != self.lora_A[name].weight.dtype and not (
            torch.is_autocast_enabled(device) and x.dtype == torch.get_autocast_dtype(device)
        ):
            return None
        return name


def make_lean(model: nn.Module) -> int:
    """Switches every peft ``lora.Linear`` of ``model`` to ``LeanLinear`` in place; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is PeftLinear:
            module.__class__ = LeanLinear
            count += 1
    return count
