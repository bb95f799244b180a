"""The served models: one base model in memory, with zero or more peft adapters switched per request.

``dstune serve RUN --adapter NAME=RUN2`` loads RUN as ``dstune chat`` does, then puts each further LoRA run
on the same base with peft's multi-adapter API (``load_adapter``; ``set_adapter`` picks one per request,
``disable_adapter`` serves the bare base). A request's ``model`` field picks the adapter by its served id:
the run directory's name, each ``--adapter`` NAME, and the base model's name (the run's ``model.name``).
Only one request runs at a time (see ``worker.py``), so switching the active adapter is safe.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from dstune.errors import UsageError
from dstune.generate import Loaded, check_generates, load_for_inference
from dstune.rundir import NotARunError, RunDir

BASE = None  # the adapter "name" of the bare base model: adapters disabled


@dataclass
class ModelHost:
    """The loaded model and the served ids, each mapped to a peft adapter name (or ``BASE``).

    Attributes:
        loaded: model, tokenizer and chat template.
        adapters: served id -> peft adapter name; ``BASE`` serves the model with adapters disabled.
        default: the id of RUN_OR_MODEL itself, listed first.
    """

    loaded: Loaded
    adapters: dict[str, str | None]
    default: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def context_length(self) -> int:
        """Most tokens (prompt + reply) the model takes: its ``max_position_embeddings``."""
        config = self.loaded.model.config
        return int(getattr(config, "max_position_embeddings", None) or 2048)

    @contextlib.contextmanager
    def use(self, model_id: str) -> Iterator[None]:
        """Makes ``model_id``'s adapter the active one for the duration of one generation."""
        model, adapter = self.loaded.model, self.adapters[model_id]
        if not _is_peft(model):
            yield
        elif adapter is BASE:
            with model.disable_adapter():
                yield
        else:
            model.set_adapter(adapter)
            yield


def _is_peft(model) -> bool:
    import peft

    return isinstance(model, peft.PeftModel)


def load_host(target: str, adapters: list[tuple[str, str]] | None = None) -> ModelHost:
    """Loads RUN_OR_MODEL and puts each ``(name, run)`` LoRA adapter on the same base.

    Raises:
        UsageError: a classification run (it predicts labels and cannot write replies), an adapter run
            trained on another base, a method that peft cannot switch, or a served id used twice.
    """
    loaded = load_for_inference(target)
    check_generates(loaded, target)
    rd = RunDir(target)
    is_run = rd.run_json.is_file()
    default = Path(target).resolve().name if is_run else target
    info = rd.read_json(RunDir.RUN) if is_run else {}
    base_id = info.get("model") or "base"
    hosted = {default: "default" if _is_peft(loaded.model) else BASE}
    for name, run in adapters or []:
        if name in hosted or name == base_id:
            raise UsageError(f"--adapter {name}={run}: the served id {name!r} is already taken; pick another")
        final = _lora_final(name, run, info.get("base_model") or _model_dir(target))
        if not _is_peft(loaded.model):  # a bare base model: the first adapter wraps it
            from dstune.methods import peft_model

            loaded.model = peft_model.load(loaded.model, final)
            hosted[name] = "default"
        elif _peft_type(loaded.model) != "LORA":
            raise UsageError(
                f"--adapter needs RUN_OR_MODEL to be a model or a LoRA run; {target} is a "
                f"{_peft_type(loaded.model)} run: serve it alone, or merge it with 'dstune merge'"
            )
        else:
            loaded.model.load_adapter(str(final), adapter_name=name)
            hosted[name] = name
        loaded.model.eval()
    if is_run and _is_peft(loaded.model):  # a model spec is its own base id already
        hosted[base_id] = BASE
    return ModelHost(loaded, hosted, default)


def _peft_type(model) -> str:
    config = model.peft_config[model.active_adapter]
    return str(getattr(config.peft_type, "value", config.peft_type))


def _model_dir(target: str) -> str:
    from dstune.models.load import resolve_model_dir

    return str(resolve_model_dir(target).path)


def _lora_final(name: str, run: str, base_model: str) -> Path:
    """The ``final/`` adapter directory of an ``--adapter`` run, checked to be LoRA on ``base_model``."""
    rd = RunDir(run)
    if not rd.run_json.is_file():
        raise NotARunError(f"--adapter {name}={run}: {run} is not a run directory (no {RunDir.RUN})")
    info, final = rd.read_json(RunDir.RUN), rd.final
    config_file = final / "adapter_config.json"
    if not config_file.is_file():
        raise UsageError(
            f"--adapter {name}={run}: the run has no peft adapter at {config_file} (method "
            f"{info.get('method')}); only LoRA runs can share a base: serve it alone"
        )
    peft_type = json.loads(config_file.read_text(encoding="utf-8")).get("peft_type")
    if peft_type != "LORA" or info.get("method") == "qlora":
        raise UsageError(
            f"--adapter {name}={run}: a {info.get('method')} run ({peft_type}); only LoRA runs can share a "
            f"base with peft's adapter switching: serve it alone"
        )
    if Path(info["base_model"]).resolve() != Path(base_model).resolve():
        raise UsageError(
            f"--adapter {name}={run}: trained on {info.get('model') or info['base_model']}, not on the "
            f"served base {base_model}"
        )
    return final
