"""Checks on a model directory before any weight is read.

A model directory is untrusted input: a shard index can name files outside the directory, and a
safetensors header announces its own length, which a hostile file sets to many gigabytes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from dstune.errors import DstuneError

# The safetensors format caps a header at 100 MB (MAX_HEADER_SIZE in the safetensors crate); we refuse
# anything larger before the library allocates for it, with an error that names the file.
MAX_HEADER_BYTES = 100_000_000


class UnsafeModelError(DstuneError, ValueError):
    """A model directory that dstune refuses to load, naming the file and the reason."""


def check_model_dir(path: str | Path) -> None:
    """Refuses shard indexes that point outside ``path`` and safetensors files with oversized headers.

    Raises:
        UnsafeModelError: naming the index entry or the file.
    """
    root = Path(path).resolve()
    for index in root.glob("*.safetensors.index.json"):
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        for tensor, shard in weight_map.items():
            target = (root / shard).resolve()
            if Path(shard).is_absolute() or root not in target.parents:
                raise UnsafeModelError(
                    f"{index}: tensor '{tensor}' points to '{shard}', outside the model "
                    f"directory {root}; refusing to load it"
                )
    for weights in root.glob("*.safetensors"):
        with open(weights, "rb") as fh:
            head = fh.read(8)
        if len(head) < 8:
            raise UnsafeModelError(f"{weights}: truncated safetensors file (no header)")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER_BYTES or size > weights.stat().st_size - 8:
            raise UnsafeModelError(
                f"{weights}: safetensors header claims {size:,} bytes (file is "
                f"{weights.stat().st_size:,} bytes, limit {MAX_HEADER_BYTES:,}); refusing it"
            )
