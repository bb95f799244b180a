"""Small facts used across the package, each computed in exactly one place.

The pad id of a tokenizer, the decoder-layer index in a parameter name, a file's SHA-256 and a snapshot
of the trainable parameters: each was once repeated in several modules and drifted between them.
"""

from __future__ import annotations

import hashlib
import re
import resource
import sys
from pathlib import Path

import torch

# ``model.layers.3.mlp`` and ``base_model.model.model.layers.3.self_attn`` alike; also at the start of a name.
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def layer_index(name: str) -> int | None:
    """The decoder-layer number in a parameter or module name, or None outside the decoder layers."""
    match = LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def numel(p: torch.Tensor) -> int:
    """A parameter's element count, also when DeepSpeed ZeRO-3 has partitioned it (then ``numel()`` is 0
    and ``ds_numel`` holds the whole count)."""
    return getattr(p, "ds_numel", None) or p.numel()


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's shape, also when DeepSpeed ZeRO-3 has partitioned it (an empty ``shape``, the whole
    one in ``ds_shape``)."""
    return getattr(p, "ds_shape", None) or p.shape


def file_sha256(path: str | Path | None) -> str | None:
    """SHA-256 of a file (hex), read in 1 MiB blocks; None when there is no such file."""
    if not path or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def snapshot_trainable(model: torch.nn.Module, copy: bool = True) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, detached, contiguous, on the CPU.

    Args:
        copy: always copy (for a snapshot kept while training goes on: on the CPU ``.cpu()`` would alias
            the live weights); False lets CPU tensors be shared (for writing them out at once).
    """
    return {
        n: (p.detach().to("cpu", copy=True) if copy else p.detach().cpu()).contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def restore_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copies a ``snapshot_trainable`` back into the model's parameters, in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


_MB = 2**20


def peak_rss_mb() -> float:
    """The process's peak resident memory (Linux reports ``ru_maxrss`` in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _MB if sys.platform == "darwin" else peak / 1024


class HostPeak:
    """The host memory a block of code adds at its peak (MB): ``VmHWM`` reset when the block starts (Linux's
    ``/proc/self/clear_refs``), read when it ends, less the resident memory at the start; None where the
    kernel has no such files."""

    mb: float | None = None

    def __enter__(self) -> "HostPeak":
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.start = _status_mb("VmRSS")
        except OSError:
            self.start = None
        return self

    def __exit__(self, *exc) -> None:
        if self.start is not None:
            self.mb = round(_status_mb("VmHWM") - self.start, 1)


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"/proc/self/status has no {key}")


def native_bf16(device_type: str) -> str | None:
    """Why this machine computes bf16 matmuls natively (a line for the run's log), or None when it would
    emulate them: a CUDA GPU torch says supports bf16 (Ampere and later), or a CPU with ``avx512_bf16``
    (AMD Zen 4, Intel Cooper Lake and later) or AMX (Intel Sapphire Rapids and later), as torch's own
    cpuinfo reads its flags. Emulated bf16 is slower than fp32 (measured: docs/benchmarks.md)."""
    if device_type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return f"{torch.cuda.get_device_name()} computes bf16 natively" if ok else None
    if device_type != "cpu":
        return None
    try:
        flags = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # a torch without it, or a CPU cpuinfo does not know
        return None
    found = [f for f in ("amx_bf16", "avx512_bf16") if flags.get(f)]
    return f"this CPU computes bf16 natively ({found[0]})" if found else None


def resolve_precision(setting: str, device_type: str) -> tuple[str, str]:
    """``train.precision`` as the dtype a run computes in, and why: ``auto`` is bf16 autocast (fp32
    master weights) where the device computes bf16 natively, else fp32; other settings are kept."""
    if setting != "auto":
        return setting, f"train.precision={setting}"
    why = native_bf16(device_type)
    return ("bf16", f"auto: {why}") if why else ("fp32", f"auto: no native bf16 on this {device_type}")
