"""The GPUs `dstune plan --gpu` knows, and memory sizes (`train.memory_budget`); light: no torch import,
so the config can check a budget without importing the planner."""

from __future__ import annotations

import re

from dstune.errors import UsageError

GIB = 1024**3
# Usable memory of each card, GiB, as torch.cuda.mem_get_info reports it on an idle card (the
# marketing "80 GB" of an H100 is 79.6 GiB; 24 GB cards report 23.6).
GPUS: dict[str, float] = {
    "H100": 79.6,
    "H200": 139.8,
    "A100-80GB": 79.2,
    "A100-40GB": 39.4,
    "L40S": 44.4,
    "A10G": 22.0,
    "RTX4090": 23.6,
    "RTX3090": 23.6,
    "V100": 31.7,
    "T4": 14.6,
}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*GB$", re.IGNORECASE)
_FINE = re.compile(r"^(\d+(?:\.\d+)?)\s*(MB|MiB|GiB)$", re.IGNORECASE)  # the budget's further units
_COUNT = re.compile(r"^(\d+)\s*x\s*(.+)$", re.IGNORECASE)


def _card(name: str) -> float | None:
    """Usable bytes of one card given as a size in GB or by a GPU name, or None."""
    if m := _SIZE.match(name):
        return float(m.group(1)) * 0.98 * GIB  # a little less than printed: the driver's share
    return next((gib * GIB for known, gib in GPUS.items() if known.lower() == name.lower()), None)


def parse_gpu(text: str) -> tuple[int, float]:
    """``24GB``, ``H100``, ``A100-40GB``, ``8xH100`` -> (count, usable bytes per card).

    Raises:
        UsageError: naming the value and the accepted names.
    """
    count, name = 1, text.strip()
    if m := _COUNT.match(name):
        count, name = int(m.group(1)), m.group(2).strip()
    if (size := _card(name)) is not None:
        return count, size
    raise UsageError(
        f"--gpu {text!r}: unknown GPU; use a size like 24GB or 80GB, or one of {', '.join(GPUS)}, "
        f"optionally with a count (8xH100)"
    )


def parse_budget(text: str) -> float:
    """``train.memory_budget``: ``512MB``, ``24GB`` (as the GPU sizes above), ``1.5GiB`` or a GPU name ->
    usable bytes of one device.

    Raises:
        ValueError: naming the value and the accepted forms (the config names the key).
    """
    name = text.strip()
    if m := _FINE.match(name):
        size = float(m.group(1)) * {"mb": 0.98 * 2**20, "mib": 2**20, "gib": GIB}[m.group(2).lower()]
    else:
        size = _card(name)
    if size:
        return size
    raise ValueError(
        f"{text!r} is not a memory size: use a size like 512MB, 24GB or 1.5GiB, or one of {', '.join(GPUS)}"
    )
