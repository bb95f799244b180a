"""Typed run configuration: YAML in, dotted ``--set`` overrides, errors that name the key.

Every field has a default, so ``RunConfig()`` is a valid (if useless) run. The CLI builds a config from a
YAML file (its relative paths taken from the file's folder), then flags, then ``--set key.sub=value``
overrides, in that order. Every rule that ties two keys together is a validator of ``RunConfig``, so a
bad config is refused before anything is written. The sections are in ``sections.py``, the method and
task registry in ``registry.py``.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from dstune.config.objectives import DistillConfig, GrpoConfig, PreferenceConfig, RewardSpec
from dstune.config.registry import (
    BUILTIN_REWARDS,
    GENERATION_METRICS,
    GRPO_METRICS,
    METHODS,
    OBJECTIVE_FORMATS,
    OBJECTIVES,
    PREFERENCE_METRICS,
    TASK_METRICS,
    MethodSpec,
)
from dstune.config.sections import (
    AdapterConfig,
    ClassifyConfig,
    DataConfig,
    FreezeConfig,
    Ia3Config,
    LoraConfig,
    MixSource,
    ModelConfig,
    OptimConfig,
    PromptConfig,
    QloraConfig,
    RegularizeConfig,
    StabilityConfig,
    TrainConfig,
    TuneConfig,
    _Section,
)
from dstune.errors import DstuneError


class ConfigError(DstuneError, ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


__all__ = [  # the sections and the registry are re-exported: callers import everything from dstune.config
    "ConfigError", "RunConfig", "load_config", "save_config", "apply_override", "parse_value",
    "METHODS", "MethodSpec", "TASK_METRICS", "GENERATION_METRICS", "OBJECTIVES", "OBJECTIVE_FORMATS",
    "PREFERENCE_METRICS", "GRPO_METRICS", "BUILTIN_REWARDS",
    "PreferenceConfig", "GrpoConfig", "RewardSpec", "DistillConfig",
    "AdapterConfig", "ClassifyConfig", "DataConfig", "FreezeConfig", "Ia3Config", "LoraConfig", "MixSource",
    "ModelConfig", "OptimConfig", "PromptConfig", "QloraConfig", "RegularizeConfig", "StabilityConfig",
    "TrainConfig", "TuneConfig",
]  # fmt: skip


class RunConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: Literal[tuple(TASK_METRICS)] = Field(  # type: ignore[valid-type]
        "lm",
        description="lm: next-token loss (classification data trains generatively, the reply is the label); "
        "classification: a [classes, hidden] head on the last token replaces the LM head",
    )
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig)
    objective: Literal[tuple(OBJECTIVES)] = Field(  # type: ignore[valid-type]
        "sft", description="; ".join(f"{k}: {v}" for k, v in OBJECTIVES.items())
    )
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: Literal[tuple(METHODS)] = Field("lora", description=" | ".join(METHODS))  # type: ignore[valid-type]
    lora: LoraConfig = Field(default_factory=LoraConfig)
    qlora: QloraConfig = Field(default_factory=QloraConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    ia3: Ia3Config = Field(default_factory=Ia3Config)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    regularize: RegularizeConfig = Field(default_factory=RegularizeConfig)
    stability: StabilityConfig = Field(default_factory=StabilityConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    output: str = Field("runs/run", description="run directory")

    @model_validator(mode="after")
    def _classification_settings(self) -> "RunConfig":
        if self.task == "classification":
            if self.train.packing:
                raise ValueError(
                    "task=classification cannot pack examples (each row is one example with one "
                    "label): set train.packing=false"
                )
        elif self.classify.class_weights != "none":
            raise ValueError("classify.class_weights needs task=classification (a classification head)")
        elif self.classify.pooling != "last":
            raise ValueError("classify.pooling needs task=classification (a classification head)")
        return self

    @model_validator(mode="after")
    def _distill_settings(self) -> "RunConfig":
        if self.model.keep_layers and self.method not in ("full", "freeze"):
            raise ValueError(
                f"model.keep_layers={self.model.keep_layers} makes a smaller model than the base on disk, so "
                f"only method=full or freeze (which save the whole model) can keep it; method={self.method} "
                f"would save weights for the base"
            )
        if self.objective != "distill":
            return self
        if self.distill.teacher is None:
            raise ValueError(
                "objective=distill needs distill.teacher: a run directory or model spec (same tokenizer), or "
                "'base' for the student's own base model with its adapter disabled"
            )
        if self.distill.teacher == "base" and self.method not in ("lora", "qlora", "ia3"):
            raise ValueError(
                f"distill.teacher=base is the student's base with its adapter disabled: method={self.method} "
                f"has no adapter to disable; name the teacher's run directory or model instead"
            )
        if self.task != "lm":
            raise ValueError(f"objective=distill trains a language model: it needs task=lm, not {self.task}")
        if self.distill.mode == "sequence" and self.train.packing:
            raise ValueError(
                "distill.mode=sequence replaces each example's answer with the teacher's, one example per "
                "row: set train.packing=false"
            )
        return self

    @model_validator(mode="after")
    def _preference_settings(self) -> "RunConfig":
        if self.objective in ("sft", "distill"):
            return self
        if self.task != "lm":
            raise ValueError(
                f"objective={self.objective} trains a language model: it needs task=lm, not task={self.task}"
            )
        if self.train.packing:
            # Each pair's log-probabilities are sums over one row's answer tokens; packed rows would mix
            # examples, and pairs are short enough that padding costs little. GRPO generates its rows.
            raise ValueError(f"objective={self.objective} cannot pack examples: set train.packing=false")
        if self.train.eval_generate:
            what = "the rewards of its own completions" if self.objective == "grpo" else "preference metrics"
            raise ValueError(
                f"train.eval_generate scores generated answers of supervised data; objective="
                f"{self.objective} validates {what}: set train.eval_generate=0"
            )
        fmt, want = self.data.format, OBJECTIVE_FORMATS[self.objective]
        if fmt not in ("auto", want):
            raise ValueError(
                f"objective={self.objective} reads data.format={want} rows, not data.format={fmt}"
            )
        if self.regularize.label_smoothing:
            raise ValueError(
                "regularize.label_smoothing smooths the next-token loss of objective=sft; for DPO use "
                "preference.label_smoothing"
            )
        if self.objective == "grpo" and self.data.max_length <= self.grpo.max_new_tokens:
            raise ValueError(
                f"data.max_length={self.data.max_length} is the prompt plus its completion, so it must be "
                f"larger than grpo.max_new_tokens={self.grpo.max_new_tokens}"
            )
        if self.objective == "grpo" and self.grpo.generation == "vllm":
            _vllm_generation_settings(self)
        if self.preference.rpo_alpha and self.objective != "dpo":
            raise ValueError(
                f"preference.rpo_alpha adds the chosen answer's NLL to objective=dpo, not objective="
                f"{self.objective} (ORPO has that term already, weighted against its odds ratio by "
                f"preference.beta): set preference.rpo_alpha=0"
            )
        return self

    def validation_metrics(self) -> tuple[str, ...]:
        """The metrics the run's validation computes (``train.best_metric`` must be one of them)."""
        if self.objective == "grpo":
            return GRPO_METRICS + tuple(f"reward/{r.key}" for r in self.grpo.rewards)
        if self.objective not in ("sft", "distill"):
            return PREFERENCE_METRICS
        generate = self.train.eval_generate and self.task == "lm"
        return TASK_METRICS[self.task] + (GENERATION_METRICS if generate else ())

    @model_validator(mode="after")
    def _best_metric_is_computed(self) -> "RunConfig":
        name, generate = self.train.best_metric, self.train.eval_generate and self.task == "lm"
        if self.objective not in ("sft", "distill"):
            if name not in self.validation_metrics():
                raise ValueError(
                    f"train.best_metric={name!r} is not computed by the validation of objective="
                    f"{self.objective}; choose one of {list(self.validation_metrics())}"
                )
            return self
        if name in GENERATION_METRICS and self.task == "lm" and not generate:
            raise ValueError(
                f"train.best_metric={name!r} needs answers at each evaluation: set train.eval_generate "
                f"to the number of validation prompts to answer (e.g. 32)"
            )
        known = TASK_METRICS[self.task] + (GENERATION_METRICS if generate else ())
        if name not in known:
            raise ValueError(
                f"train.best_metric={name!r} is not computed by the validation of task={self.task}; "
                f"choose one of {list(known)}"
            )
        return self

    @model_validator(mode="after")
    def _early_stopping_needs_evaluations(self) -> "RunConfig":
        rc = self.regularize
        for key, on in (
            ("regularize.keep_best", rc.keep_best),
            ("regularize.early_stop_patience", rc.early_stop_patience),
        ):
            if on and not self.train.eval_every:
                raise ValueError(
                    f"{key} needs periodic validation, but train.eval_every is 0 (evaluate only at "
                    f"the end): set train.eval_every to a number of steps, e.g. --set train.eval_every=50"
                )
        return self

    @model_validator(mode="after")
    def _sharding_settings(self) -> "RunConfig":
        tc, engine = self.train, self.train.distributed
        zero = engine in ("zero2", "zero3")
        if tc.offload != "none" and not zero or tc.offload == "all" and engine != "zero3":
            need = "zero3 (weights offloaded)" if tc.offload == "all" else "zero2 or zero3"
            raise ValueError(f"train.offload={tc.offload} needs train.distributed={need} (DeepSpeed)")
        if tc.deepspeed is not None and not zero:
            raise ValueError("train.deepspeed (a DeepSpeed JSON) needs train.distributed=zero2 or zero3")
        if engine == "auto":
            return self
        # DeepSpeed keeps the fp32 master weights and optimizer states in its own partitions and clips
        # inside its step, so what reads or restores them from the model is refused with ZeRO.
        refused = {
            "train.precision=fp16": (tc.precision == "fp16", "use bf16 (fp16 needs a loss scaler)"),
            "objective=grpo": (
                self.objective == "grpo",
                "each rank samples its own prompts, so the ranks' forward passes would not line up",
            ),
            "regularize.ewc_lambda": (
                bool(self.regularize.ewc_lambda),
                "EWC's Fisher estimate reads whole gradients, which the engine holds in shards",
            ),
            "train.split_by_length=on": (
                tc.split_by_length == "on",
                "each rank would cut its own micro-batches, and every pass gathers weights from all ranks",
            ),
            "stability.policy=rollback": (
                zero and self.stability.policy == "rollback",
                "DeepSpeed's master weights live in its partitions (skip and halt work)",
            ),
            "regularize.keep_best": (zero and self.regularize.keep_best, "it restores weights in place"),
            "optim.max_grad_norm=null": (
                zero and self.optim.max_grad_norm is None,
                "DeepSpeed reports the gradient norm when it clips; set a bound",
            ),
            "optim.agc_clip / optim.clip_value": (
                zero and (self.optim.agc_clip is not None or self.optim.clip_value is not None),
                "the gradients live in DeepSpeed's partitions, not in .grad",
            ),
            "stability.diag_every": (zero and bool(self.stability.diag_every), "it reads .grad per layer"),
            f"lora.init={self.lora.init}": (
                self.method in ("lora", "qlora") and self.lora.init in ("pissa", "pissa_fast", "olora"),
                "peft converts the trained adapter to plain LoRA at the final save by loading the initial "
                "one into the model, which a sharded model's gathered weights bypass",
            ),
        }
        for key, (on, why) in refused.items():
            if on:
                raise ValueError(
                    f"{key} does not run with train.distributed={engine}: {why}; use train.distributed=auto "
                    f"(one process, or DDP with --nproc)"
                )
        if zero:
            from dstune.config.deepspeed import deepspeed_config

            deepspeed_config(tc, self.optim)  # the user's JSON: read and checked now, filled at launch
        return self

    def absolute(self, base: str | Path | None = None) -> "RunConfig":
        """A copy whose file paths (data files, a local model, ``output``) are absolute, relative paths taken
        from ``base`` (default: the working directory). A run saves this copy, so its ``config.yaml``
        reproduces the run from any folder."""
        data = self.model_dump(mode="json")
        _absolute_paths(data, Path(base or Path.cwd()), output=True)
        return RunConfig.model_validate(data)

    @model_validator(mode="after")
    def _task_weights(self) -> "RunConfig":
        weighted = [f"data.mix[{i}].loss_weight" for i, s in enumerate(self.data.mix) if s.loss_weight != 1.0]
        if weighted and self.objective != "sft":
            raise ValueError(
                f"{weighted[0]} weights a task's token (or classification row) losses, which only "
                f"objective=sft has (this run: objective={self.objective}); use data.mix[i].weight to "
                f"sample a data set more or less often instead"
            )
        if self.classify.heads == "per_task" and (self.task != "classification" or not self.data.mix):
            raise ValueError(
                "classify.heads=per_task gives each data.mix classification set a head of its own: it needs "
                f"task=classification and data.mix (this run: task={self.task}, "
                f"{'data.mix' if self.data.mix else 'data.train'}); use auto or shared"
            )
        if self.classify.heads == "per_task" and self.data.validation:
            raise ValueError(
                "classify.heads=per_task needs the task of every validation row: leave data.validation "
                "unset, so each data.mix file is split into its own validation rows"
            )
        return self

    @model_validator(mode="after")
    def _curriculum(self) -> "RunConfig":
        stages = self.train.curriculum
        if not stages:
            return self
        lengths = [s.max_length for s in stages]
        before_last = sum(s.steps or 0 for s in stages[:-1])
        checks = [
            (len(stages) == 1, "needs two or more stages, got 1"),
            (any(b <= a for a, b in zip(lengths, lengths[1:])), f"max_length must rise, got {lengths}"),
            (
                lengths[-1] > self.data.max_length,
                f"max_length {lengths[-1]} is above data.max_length={self.data.max_length}, the length at "
                f"which the rows are tokenised",
            ),
            (
                any(s.steps is None for s in stages[:-1]) or stages[-1].steps is not None,
                "needs steps on every stage but the last, which runs to the end of the run",
            ),
            (
                bool(self.train.max_steps) and before_last >= (self.train.max_steps or 0),
                f"takes {before_last} steps before its last stage; train.max_steps={self.train.max_steps} "
                f"leaves none for it",
            ),
            (
                self.task != "lm" or self.objective != "sft",
                f"trains token rows with objective=sft; this run has task={self.task}, "
                f"objective={self.objective}",
            ),
        ]
        for failed, why in checks:
            if failed:
                raise ValueError(f"train.curriculum {why}")
        return self

    @model_validator(mode="after")
    def _retrain_needs_one_file(self) -> "RunConfig":
        if self.tune.retrain and self.data.validation:
            raise ValueError(
                "tune.retrain merges the train and validation splits of data.train; with a separate "
                "data.validation file, retrain by hand after the search: dstune train STUDY/best.yaml"
            )
        return self

    def best_metric_sign(self) -> int:
        """+1 when a lower ``train.best_metric`` is better (loss, ppl), -1 when higher is."""
        mode = self.train.best_mode
        if mode == "auto":
            low = ("loss", "ppl", "rewards/rejected", "completion_length", "truncated")
            mode = "min" if self.train.best_metric in low else "max"
        return 1 if mode == "min" else -1

    def shape_keys(self) -> list[str]:
        """The dotted keys that decide the shapes of what a checkpoint holds (a resume cannot change them)."""
        keys = ["model.name", "model.revision", "task", "method", "optim.optimizer", "objective"]
        for section in METHODS[self.method].sections:
            keys += [
                f"{section}.{k}" for k in type(getattr(self, section)).model_fields if k not in _SHAPE_FREE
            ]
        return keys


# Method keys that change values, not shapes: a resume may change them like any other recorded change.
_SHAPE_FREE = {"alpha", "dropout", "init", "use_rslora", "alpha_pattern", "init_text", "compute_dtype"}


# --------------------------------------------------------------------------- loading


def _vllm_generation_settings(cfg: RunConfig) -> None:
    """``grpo.generation=vllm`` pushes the policy's weights to vLLM's own copy of the base model before
    each rollout: the method must train weights that merge into that model's."""
    if cfg.method not in ("lora", "full", "freeze") or cfg.method == "lora" and cfg.lora.use_dora:
        what = "lora.use_dora" if cfg.method == "lora" else f"method={cfg.method}"
        raise ValueError(
            f"grpo.generation=vllm does not run with {what}: vLLM samples from its own copy of the base "
            f"model, into which only plain LoRA, full and freeze weights are merged before each rollout; "
            f"use method lora (without DoRA), full or freeze, or grpo.generation=transformers"
        )
    if cfg.model.keep_layers:
        raise ValueError(
            "grpo.generation=vllm loads the base model's architecture from disk, which model.keep_layers "
            "changes: use grpo.generation=transformers"
        )


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
    "learning_rate": "optim.lr",
    "lr_scheduler_type": "optim.schedule",
    "max_grad_norm": "optim.max_grad_norm",
    "rank": "lora.r",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "target_modules": "lora.targets",
    "lora_target": "lora.targets",
    "batch_size": "train.micro_batch_size",
    "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "num_train_epochs": "train.epochs",
    "cutoff_len": "data.max_length",
    "max_seq_length": "data.max_length",
    "bf16": "train.precision",
    "output_dir": "output",
    "model_name_or_path": "model.name",
    "dataset": "data.train",
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
            shown = "" if isinstance(value, (dict, BaseModel)) else f" (got {value!r})"
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg}{shown}" if key else msg)
    return ConfigError(f"invalid config in {source}:\n  " + "\n  ".join(lines))


def _absolute_paths(data: dict, base: Path, output: bool = False) -> None:
    """Makes the file paths of a config dict absolute against ``base``, in place: data files always; the
    model when ``base/name`` exists (else it is a hub id or a preset); ``output`` only when asked (a config
    file's ``output`` stays relative to where dstune runs, like other tools' ``output_dir``)."""
    section = data.get("data")
    if isinstance(section, dict):
        for key in ("train", "validation"):
            if isinstance(section.get(key), str):
                section[key] = str((base / os.path.expanduser(section[key])).absolute())
        for source in section.get("mix") or []:
            if isinstance(source, dict) and isinstance(source.get("path"), str):
                source["path"] = str((base / os.path.expanduser(source["path"])).absolute())
    for reward in (data.get("grpo") or {}).get(
        "rewards"
    ) or []:  # a reward in a user's file: path.py:function
        name = reward.get("name") if isinstance(reward, dict) else reward
        if isinstance(name, str) and ".py:" in name and (base / name.rsplit(":", 1)[0]).is_file():
            path, function = name.rsplit(":", 1)
            absolute = f"{(base / os.path.expanduser(path)).absolute()}:{function}"
            if isinstance(reward, dict):
                reward["name"] = absolute
            else:
                data["grpo"]["rewards"][data["grpo"]["rewards"].index(reward)] = absolute
    regularize = data.get("regularize")  # the previous task's data for EWC
    if isinstance(regularize, dict) and isinstance(regularize.get("ewc_data"), str):
        regularize["ewc_data"] = str((base / os.path.expanduser(regularize["ewc_data"])).absolute())
    distill = data.get("distill")  # a teacher run directory or local model, like model.name
    if isinstance(distill, dict) and isinstance(distill.get("teacher"), str) and distill["teacher"] != "base":
        if (base / distill["teacher"]).exists():
            distill["teacher"] = str((base / distill["teacher"]).absolute())
    train = data.get("train")  # a DeepSpeed JSON
    if isinstance(train, dict) and isinstance(train.get("deepspeed"), str):
        train["deepspeed"] = str((base / os.path.expanduser(train["deepspeed"])).absolute())
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("name"), str) and (base / model["name"]).exists():
        model["name"] = str((base / model["name"]).absolute())
    if output and isinstance(data.get("output"), str):
        data["output"] = str((base / data["output"]).absolute())


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


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, values: dict[str, Any] | None = None
) -> RunConfig:
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
        _absolute_paths(data, path.parent)  # a config's files are where the config says, from any folder
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
    Path(path).write_text(
        yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True), encoding="utf-8"
    )
