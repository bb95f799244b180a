"""Typed run configuration: YAML in, dotted ``--set`` overrides, errors that name the key.

Every field has a default, so ``RunConfig()`` is a valid (if useless) run. The CLI builds a config
from a YAML file, then flags, then ``--set key.sub=value`` overrides, in that order.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


class _Section(BaseModel):
    # extra="forbid" turns a typo into an error instead of a silently ignored key.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field("tiny:deepseek-llm", description="hub id, local directory, .gguf file, or tiny:<family>")
    revision: str | None = Field(None, description="hub revision (commit, tag or branch)")
    trust_remote_code: bool = Field(False, description="run the model repo's own Python code; needs a pinned revision")
    allow_pickle: bool = Field(False, description="load pickled .bin/.pt weights when a model has no safetensors")
    chat_template: Literal["auto", "tokenizer", "deepseek-v3", "deepseek-r1"] = Field(
        "auto", description="auto: the tokenizer's own template if it has one, else DeepSeek's")

    @model_validator(mode="after")
    def _remote_code_needs_revision(self) -> "ModelConfig":
        if self.trust_remote_code and not self.revision:
            raise ValueError("model.trust_remote_code=true needs model.revision pinned to a commit, "
                             "so the code that runs is the code you reviewed")
        return self


class DataConfig(_Section):
    train: str | None = Field(None, description="training file (json, jsonl, csv, parquet, txt)")
    validation: str | None = Field(None, description="validation file; without it the train file is split")
    format: Literal["auto", "text", "alpaca", "messages"] = "auto"
    split: tuple[float, float, float] = Field((0.8, 0.1, 0.1), description="train/val/test ratios when no validation file")
    max_length: int = Field(512, ge=8, description="tokens per example")
    overflow: Literal["truncate", "drop"] = Field("truncate", description="what to do with over-long examples")
    train_on: Literal["assistant", "all"] = Field("assistant", description="which tokens carry loss")
    lenient: bool = Field(False, description="drop malformed rows and count them instead of stopping")
    max_samples: int | None = Field(None, ge=1, description="use only the first N rows of the train file")
    system: str | None = Field(None, description="system prompt added to examples that have none")

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(r < 0 for r in v) or abs(sum(v) - 1.0) > 1e-6 or v[0] <= 0:
            raise ValueError(f"data.split must be three non-negative ratios summing to 1 with train > 0, got {list(v)}")
        return v


class LoraConfig(_Section):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: str | list[str] = Field(
        "attention", description="attention | mlp | all-linear | a list of module names")


class FreezeConfig(_Section):
    top_layers: int = Field(2, ge=0, description="train the top N decoder layers")
    patterns: list[str] = Field(default_factory=list, description="also train parameters whose name matches one of these regexes")
    train_head: bool = Field(True, description="train the output head (lm_head) too")


class OptimConfig(_Section):
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="used when warmup_steps is 0")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a fraction of lr")
    max_grad_norm: float | None = Field(1.0, description="clip the global gradient norm; null turns it off")


class TrainConfig(_Section):
    micro_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    epochs: float = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    seed: int = 42
    log_every: int = Field(1, ge=1)
    eval_every: int = Field(0, ge=0, description="0: evaluate only at the end")
    save_every: int = Field(0, ge=0, description="0: checkpoint only at the end")
    keep_checkpoints: int = Field(3, ge=0, description="keep the newest K checkpoints; 0 keeps all")
    eval_batches: int | None = Field(None, ge=1, description="cap on validation micro-batches per evaluation")
    progress: bool = Field(True, description="show a progress bar")


class RunConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: Literal["full", "freeze", "lora"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: str = Field("runs/run", description="run directory")


# --------------------------------------------------------------------------- loading


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, dotted + "."))
    return keys


# Names users bring from other tools (HF TrainingArguments, peft, LLaMA-Factory), mapped to ours,
# because difflib alone maps "learning_rate" to "warmup_ratio".
_ALIASES = {
    "learning_rate": "optim.lr", "lr_scheduler_type": "optim.schedule", "max_grad_norm": "optim.max_grad_norm",
    "rank": "lora.r", "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "target_modules": "lora.targets", "lora_target": "lora.targets",
    "batch_size": "train.micro_batch_size", "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "num_train_epochs": "train.epochs",
    "cutoff_len": "data.max_length", "max_seq_length": "data.max_length", "bf16": "train.precision",
    "output_dir": "output", "model_name_or_path": "model.name", "dataset": "data.train",
}


def _closest(key: str) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if leaf in _ALIASES:
        return f"; did you mean '{_ALIASES[leaf]}'?"
    candidates = _known_keys(RunConfig)
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not match:  # try the last component alone: "optim.learning_rate" -> "optim.lr"
        leaf = key.rsplit(".", 1)[-1]
        leaves = {c.rsplit(".", 1)[-1]: c for c in candidates}
        hit = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.5)
        match = [leaves[hit[0]]] if hit else []
    return f"; did you mean '{match[0]}'?" if match else ""


def _explain(err: ValidationError, source: str) -> ConfigError:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'{_closest(key)}")
        else:
            value = e.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            lines.append(f"{key or 'config'}: {e['msg']}{shown}")
    return ConfigError(f"invalid config in {source}:\n  " + "\n  ".join(lines))


def parse_value(text: str) -> Any:
    """Parses the right-hand side of ``--set key=value`` as YAML, so 2e-4, true, [a, b] and null work."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict, dotted: str, value: Any) -> None:
    """Sets ``data[a][b][c] = value`` for ``dotted == 'a.b.c'``, naming the key when it does not exist."""
    parts = dotted.split(".")
    known = set(_known_keys(RunConfig))
    if dotted not in known:
        raise ConfigError(f"unknown key '{dotted}' in --set{_closest(dotted)}")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                values: dict[str, Any] | None = None) -> RunConfig:
    """Builds a RunConfig from a YAML file, then ``values`` (dotted keys), then ``key=value`` overrides.

    Args:
        path: YAML file, or None for the defaults.
        overrides: strings like ``"optim.lr=2e-4"`` as given to ``--set``.
        values: dotted keys already parsed, e.g. from CLI flags; None values are ignored.

    Raises:
        ConfigError: naming the file, the key and the closest valid key.
    """
    data: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, ...)")
        data = loaded
    for key, value in (values or {}).items():
        if value is not None:
            apply_override(data, key, value)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key.sub=value, got '{item}'")
        key, text = item.split("=", 1)
        apply_override(data, key.strip(), parse_value(text))
    if overrides:
        source += " with --set overrides"
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise _explain(err, source) from None


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Writes the resolved config as YAML, loadable by ``load_config``."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True),
                          encoding="utf-8")
