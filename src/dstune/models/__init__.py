"""Models: loading (hub id, local dir, GGUF, tiny:<family>), chat templates, architecture facts.

The loading API lives in :mod:`dstune.models.load` and the architecture facts in
:mod:`dstune.models.inspect`; their public names are re-exported here. Model facts are data, in
``families.yaml``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load": [
        "ModelSpecError",
        "ResolvedModel",
        "cache_dir",
        "family_info",
        "family_of",
        "find_release",
        "load_config_only",
        "load_model",
        "load_tokenizer",
        "model_facts",
        "resolve_model_dir",
        "tiny_families",
    ],
    "inspect": [
        "KINDS",
        "architecture_report",
        "count_params_by_kind",
        "inspect_model",
        "param_kind",
        "render_report",
    ],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): `import dstune.models.templates` should not pay for importing torch and transformers.
    if name in _WHERE:
        return getattr(importlib.import_module(f"dstune.models.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'dstune.models' has no attribute '{name}'")
