"""Safetensors shards written one tensor at a time, named and indexed as ``save_pretrained`` names them.

Shared by ``dstune merge`` shard by shard (``merge_shards``) and the final save of a sharded run
(``train/stream_save.py``): both produce a model too large to hold whole in one process's memory, so
neither can hand a whole state dict to ``save_pretrained``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path


def write_shards(tensors, out: Path, max_bytes: int) -> dict[str, str]:
    """Writes ``tensors`` into safetensors shards of at most ``max_bytes`` (one tensor may exceed it) named as
    ``save_pretrained`` names them, and the index when there are several. Returns the weight map."""
    from safetensors.torch import save_file

    parts, current, size = [], {}, 0

    def flush() -> None:
        nonlocal current, size
        if current:
            part = out / f".part-{len(parts):05d}.safetensors"
            save_file(current, str(part), metadata={"format": "pt"})
            parts.append((part, list(current)))
            current, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            flush()
        current[name] = tensor.contiguous()
        size += nbytes
    flush()
    weight_map: dict[str, str] = {}
    for i, (part, names) in enumerate(parts):
        final = (
            "model.safetensors" if len(parts) == 1 else f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        )
        part.rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    if len(parts) > 1:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        index["metadata"]["total_size"] = sum((out / f).stat().st_size for f in set(weight_map.values()))
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return weight_map


def parse_size(text: str) -> int:
    """``--max-shard-size`` in bytes: ``2GB``, ``500MB``, ``1GiB`` or a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        from dstune.errors import UsageError

        raise UsageError(f"--max-shard-size {text!r}: give a size such as 2GB, 500MB or 1GiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    power = "BKMGT".index(unit[0]) if unit != "B" else 0
    return int(number * (1024 if "I" in unit else 1000) ** power)
