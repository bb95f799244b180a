"""Typed run configuration: YAML in, dotted ``--set`` overrides, errors that name the key.

Every field has a default, so ``RunConfig()`` is a valid (if useless) run. The CLI builds a config
from a YAML file, then flags, then ``--set key.sub=value`` overrides, in that order.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dstune.errors import DstuneError


class ConfigError(DstuneError, ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


@dataclass(frozen=True)
class MethodSpec:
    """What the rest of dstune needs to know about a method; its ``prepare`` function is in ``methods``.

    Args:
        sections: the config sections it reads (their keys decide the checkpoint's shapes).
        merges: whether ``dstune merge`` can fold it into the base weights.
        help: one line for ``--help`` and the README's method table.
    """

    sections: tuple[str, ...]
    merges: bool
    help: str


# The one registry of methods: adding a method is a line here and its prepare function in methods.METHODS.
METHODS: dict[str, MethodSpec] = {
    "full": MethodSpec((), True, "every parameter"),
    "freeze": MethodSpec(("freeze",), True, "the top decoder layers (freeze.top_layers) and the head"),
    "lora": MethodSpec(("lora",), True, "LoRA adapters (peft) on lora.targets"),
    "qlora": MethodSpec(("lora", "qlora"), True, "LoRA on a 4- or 8-bit quantised base (bitsandbytes)"),
    "adapter": MethodSpec(("adapter",), False, "bottleneck adapters after attention and/or MLP"),
    "prefix": MethodSpec(("prompt",), False, "learned key/value prefixes in every layer (peft)"),
    "ptuning": MethodSpec(("prompt",), False, "virtual-token embeddings from a prompt encoder (peft)"),
    "prompt": MethodSpec(("prompt",), False, "learned input embeddings (peft prompt tuning)"),
    "ia3": MethodSpec(("ia3",), True, "IA3 vectors rescaling keys, values and MLP activations (peft)"),
}
# The validation metrics each task computes; with train.eval_generate an LM run also scores its answers.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "lm": ("loss", "ppl"),
    "classification": ("loss", "accuracy", "precision_macro", "recall_macro", "f1_macro"),
}
GENERATION_METRICS = ("bleu", "rouge1", "rouge2", "rougeL", "exact_match")


class _Section(BaseModel):
    # extra="forbid" turns a typo into an error instead of a silently ignored key.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field(
        "tiny:deepseek-llm", description="hub id, local directory, .gguf file, or tiny:<family>"
    )
    revision: str | None = Field(None, description="hub revision (commit, tag or branch)")
    trust_remote_code: bool = Field(
        False, description="run the model repo's own Python code; needs a pinned revision"
    )
    allow_pickle: bool = Field(
        False, description="load pickled .bin/.pt weights when a model has no safetensors"
    )
    chat_template: Literal["auto", "tokenizer", "deepseek-v3", "deepseek-r1"] = Field(
        "auto", description="auto: the tokenizer's own template if it has one, else DeepSeek's"
    )

    @model_validator(mode="after")
    def _remote_code_needs_revision(self) -> "ModelConfig":
        if self.trust_remote_code and not self.revision:
            raise ValueError(
                "model.trust_remote_code=true needs model.revision pinned to a commit, "
                "so the code that runs is the code you reviewed"
            )
        return self


class MixSource(_Section):
    """One data set of a mixture (``data.mix``)."""

    path: str = Field(description="data file (json, jsonl, csv, parquet, txt)")
    weight: float = Field(gt=0, description="sampling weight; shares are weight / sum of weights")


class DataConfig(_Section):
    train: str | None = Field(None, description="training file (json, jsonl, csv, parquet, txt)")
    mix: list[MixSource] = Field(
        default_factory=list, description="several data sets with sampling weights, instead of data.train"
    )
    validation: str | None = Field(None, description="validation file; without it the train file is split")
    format: Literal["auto", "text", "alpaca", "messages", "classification"] = "auto"
    split: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/val/test ratios when no validation file"
    )
    max_length: int = Field(512, ge=8, description="tokens per example")
    overflow: Literal["truncate", "drop"] = Field(
        "truncate", description="what to do with over-long examples"
    )
    train_on: Literal["assistant", "all"] = Field("assistant", description="which tokens carry loss")
    lenient: bool = Field(False, description="drop malformed rows and count them instead of stopping")
    max_samples: int | None = Field(None, ge=1, description="use only the first N rows of the train file")
    system: str | None = Field(None, description="system prompt added to examples that have none")
    text_column: str | None = Field(
        None, description="classification: the text column (default: text, review, ...)"
    )
    label_column: str | None = Field(None, description="classification: the label column (default: label)")
    reasoning: Literal["keep", "strip"] = Field(
        "keep",
        description="reasoning traces (reasoning_content, <think> blocks): keep, or strip to train on "
        "answers",
    )
    cache: bool = Field(
        True, description="keep tokenised data in the dstune cache dir; a second run loads it"
    )

    @model_validator(mode="after")
    def _train_or_mix(self) -> "DataConfig":
        if self.mix and self.train:
            raise ValueError(
                "data.train and data.mix are both set: give one file as data.train, or list every "
                "data set (the train file included) under data.mix with a weight each"
            )
        return self

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(r < 0 for r in v) or abs(sum(v) - 1.0) > 1e-6 or v[0] <= 0:
            raise ValueError(
                f"data.split must be three non-negative ratios summing to 1 with train > 0, got {list(v)}"
            )
        return v


class LoraConfig(_Section):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: str | list[str] = Field(
        "attention", description="attention | mlp | all-linear | a list of module names"
    )
    experts: Literal["none", "shared", "routed", "all"] = Field(
        "none", description="MoE experts to adapt too: shared experts, the fused routed experts, or both"
    )
    top_layers: int | None = Field(
        None, ge=1, description="adapt only the top N decoder layers (null: all); backward stops below them"
    )
    use_dora: bool = Field(False, description="DoRA: learn a magnitude per output and a LoRA direction")
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha/sqrt(r) instead of alpha/r")
    init: Literal["default", "gaussian", "pissa", "pissa_fast", "olora"] = Field(
        "default",
        description="default (B=0), gaussian, pissa (SVD of W), pissa_fast (16 power iterations), olora",
    )
    rank_pattern: dict[str, int] = Field(
        default_factory=dict, description="per-module rank: {regex or module name: r}"
    )
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict, description="per-module alpha: {regex or module name: alpha}"
    )


class QloraConfig(_Section):
    bits: Literal[4, 8] = Field(4, description="4: NF4/FP4 weights (QLoRA); 8: LLM.int8 weights")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; NF4 is QLoRA's")
    double_quant: bool = Field(True, description="quantise the 4-bit block scales too (QLoRA sec. 3)")
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="dtype of the de-quantised matmul; auto: bf16 on CUDA, fp32 on CPU"
    )
    keep: list[str] = Field(default_factory=list, description="further module names to keep unquantised")


class AdapterConfig(_Section):
    reduction: int = Field(16, ge=1, description="bottleneck size = hidden_size / reduction")
    where: Literal["both", "attention", "mlp"] = Field(
        "both", description="after attention and MLP (Houlsby), or one of them (mlp: Pfeiffer)"
    )
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"


class PromptConfig(_Section):
    virtual_tokens: int = Field(20, ge=1, description="prefix / prompt length in virtual tokens")
    init_text: str | None = Field(None, description="prompt: initialise the virtual tokens from this text")
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="ptuning: the prompt encoder")
    encoder_hidden_size: int | None = Field(
        None, ge=1, description="ptuning: encoder width (null: hidden_size)"
    )
    prefix_projection: bool = Field(
        False, description="prefix: reparameterise through an MLP (Li & Liang sec. 4.3)"
    )


class Ia3Config(_Section):
    targets: str | list[str] = Field(
        "default",
        description="default: key/value projections (MLA: kv_b_proj) and MLP down projections; or module "
        "names",
    )


class FreezeConfig(_Section):
    top_layers: int = Field(2, ge=0, description="train the top N decoder layers")
    patterns: list[str] = Field(
        default_factory=list, description="also train parameters whose name matches one of these regexes"
    )
    train_head: bool = Field(True, description="train the output head (lm_head) too")


class OptimConfig(_Section):
    optimizer: Literal["adamw", "adamw8bit", "adafactor"] = Field(
        "adamw", description="adamw (fused on CUDA), adamw8bit (bitsandbytes), adafactor (transformers)"
    )
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(
        0.0, ge=0, description="decoupled weight decay; never on norms, biases, embeddings"
    )
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    fused: bool | None = Field(None, description="fused AdamW kernel; null: on when the device is CUDA")
    schedule: Literal["constant", "linear", "cosine", "cosine_restarts", "polynomial", "wsd"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="used when warmup_steps is 0")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a fraction of lr")
    restart_steps: int | None = Field(
        None, ge=1, description="cosine_restarts: steps of the first cycle (T_0)"
    )
    restart_mult: float = Field(
        1.0, ge=1, description="cosine_restarts: each cycle is this much longer (T_mult)"
    )
    power: float = Field(1.0, gt=0, description="polynomial: exponent of the decay")
    decay_ratio: float = Field(
        0.1, gt=0, le=1, description="wsd: fraction of the post-warmup steps spent decaying"
    )
    layer_decay: float = Field(
        1.0, gt=0, le=1, description="layer-wise lr decay: lr x decay^(depth from top)"
    )
    lora_plus_ratio: float = Field(1.0, ge=1, description="LoRA+: lr of the B matrices = ratio x lr (1: off)")
    embedding_lr: float | None = Field(
        None, gt=0, description="lr of the input embeddings (null: layer-wise rule)"
    )
    head_lr: float | None = Field(None, gt=0, description="lr of the output head (null: lr)")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="clip the global gradient norm; null turns it off"
    )
    agc_clip: float | None = Field(
        None, gt=0, description="adaptive clipping: max unit-wise |grad|/|param| (lambda)"
    )
    clip_value: float | None = Field(None, gt=0, description="clip every gradient element to [-v, v]")

    @model_validator(mode="after")
    def _restarts_need_period(self) -> "OptimConfig":
        if self.schedule == "cosine_restarts" and self.restart_steps is None:
            raise ValueError(
                "optim.schedule=cosine_restarts needs optim.restart_steps (steps of the first "
                "cycle, T_0), e.g. --set optim.restart_steps=100"
            )
        return self


class RegularizeConfig(_Section):
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="training loss only; validation loss is plain"
    )
    neftune_alpha: float = Field(
        0.0, ge=0, description="NEFTune embedding noise alpha (0: off; paper uses 5)"
    )
    layerdrop: float | list[float] = Field(
        0.0,
        description="probability of skipping each decoder layer in training: one number, or one per layer",
    )
    attention_dropout: float | None = Field(
        None, ge=0, lt=1, description="override the attention-probability dropout"
    )
    hidden_dropout: float | None = Field(
        None, ge=0, lt=1, description="dropout on each attention/MLP output before the residual add"
    )
    early_stop_patience: int = Field(
        0, ge=0, description="stop after N evaluations without improvement (0: off)"
    )
    early_stop_min_delta: float = Field(
        0.0, ge=0, description="smallest val-loss decrease that counts as improvement"
    )
    keep_best: bool = Field(False, description="save the weights of the best validation loss as final/")

    @field_validator("layerdrop")
    @classmethod
    def _probabilities(cls, v: float | list[float]) -> float | list[float]:
        values = v if isinstance(v, list) else [v]
        if any(not 0.0 <= p <= 1.0 for p in values):
            raise ValueError(f"regularize.layerdrop must be probabilities in [0, 1], got {v!r}")
        return v


class StabilityConfig(_Section):
    policy: Literal["off", "skip", "rollback", "halt"] = Field(
        "skip", description="what a detected fault does: skip the update, roll back, or halt"
    )
    spike_window: int = Field(50, ge=4, description="steps of history for spike detection")
    spike_k: float = Field(10.0, gt=0, description="spike: value > median + k * 1.4826 * MAD of the window")
    spike_ratio: float = Field(3.0, ge=1, description="... and value > ratio x median (guards a tiny MAD)")
    detect_loss_spikes: bool = Field(True, description="treat loss spikes as faults")
    detect_grad_spikes: bool = Field(True, description="treat gradient-norm spikes as faults")
    rollback_lr_factor: float = Field(0.5, gt=0, le=1, description="rollback: multiply the lr by this")
    snapshot_every: int = Field(1, ge=1, description="rollback: steps between in-memory snapshots")
    max_rollbacks: int = Field(5, ge=1, description="halt after this many rollbacks")
    max_consecutive_skips: int = Field(
        20, ge=1, description="skip: halt after this many faulty steps in a row (the run is not training)"
    )
    inject: list[str] = Field(
        default_factory=list, description="fault injection for tests: nan_loss@K, grad_scale@K:FACTOR"
    )
    diag_every: int = Field(0, ge=0, description="steps between per-layer gradient diagnostics (0: off)")
    vanish_ratio: float = Field(
        1e-3, gt=0, description="warn when a layer's grad norm < ratio x median layer"
    )
    explode_ratio: float = Field(
        1e3, gt=1, description="warn when a layer's grad norm > ratio x median layer"
    )


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
    packing: bool = Field(
        False, description="pack several examples per row (no padding; attention stays per example)"
    )
    chunk_tokens: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="compute the output layer this many tokens at a time (exact); auto: sized to the "
        "vocabulary, 1024 for DeepSeek's; 0: all at once",
    )
    group_by_length: bool = Field(
        False, description="without packing: batch rows of similar length (less padding)"
    )
    prefetch: int = Field(2, ge=0, description="micro-batches collated ahead on a thread (0: none)")
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="attention kernel; auto: flash_attention_2 on CUDA when installed, else sdpa"
    )
    liger: Literal["auto", "on", "off"] = Field(
        "auto", description="liger-kernel fused RMSNorm/RoPE/SwiGLU/linear-CE (Llama, Qwen2; CUDA only)"
    )
    compile: bool = Field(False, description="torch.compile each decoder layer")
    experts_implementation: Literal["auto", "eager", "batched_mm", "grouped_mm"] = Field(
        "auto", description="MoE experts: transformers' per-expert loop (eager) or batched/grouped matmuls"
    )
    eval_batches: int | None = Field(None, ge=1, description="cap on validation micro-batches per evaluation")
    eval_generate: int = Field(
        0,
        ge=0,
        description="conversations: at each evaluation also answer the first N "
        "validation prompts greedily and score bleu, rouge1/2/L, exact_match (N generations)",
    )
    eval_max_new_tokens: int = Field(
        128, ge=1, description="longest answer generated for train.eval_generate"
    )
    best_metric: str = Field(
        "loss",
        description="validation metric that picks the best checkpoint: loss, ppl; "
        "task=classification also accuracy, f1_macro, precision_macro, recall_macro; "
        "with train.eval_generate also bleu, rouge1, rouge2, rougeL, exact_match",
    )
    best_mode: Literal["auto", "min", "max"] = Field("auto", description="auto: min for loss/ppl, else max")
    progress: bool = Field(True, description="show a progress bar")


class ClassifyConfig(_Section):
    """Settings of ``task: classification`` (a sequence-classification head)."""

    class_weights: Literal["none", "balanced"] | dict[str, float] = Field(
        "none",
        description="loss weight per class: none, balanced (n / (classes x count)), or {label: weight}",
    )
    pooling: Literal["last", "mean"] = Field(
        "last", description="what the head reads: the last real token (transformers' way) or the mean of all"
    )


class TuneConfig(_Section):
    """Hyperparameter search (``dstune tune``); ignored by ``dstune train``."""

    trials: int = Field(20, ge=1, description="trials in the study (all workers together)")
    sampler: Literal["tpe", "random", "grid", "gp", "cmaes"] = Field("tpe", description="optuna sampler")
    pruner: Literal["none", "median", "asha", "hyperband"] = Field(
        "asha", description="stops weak trials at evaluations (needs train.eval_every > 0)"
    )
    objective: str = Field("loss", description="validation metric to optimise (loss, ppl, ...)")
    direction: Literal["minimize", "maximize"] | None = Field(
        None, description="null: minimize loss/ppl, else maximize"
    )
    preset: str | None = Field(None, description="built-in space: lora-default, full-default, method")
    space: dict[str, dict] = Field(
        default_factory=dict,
        description="dotted key -> {type: float|int|categorical, low, high, log, choices}",
    )
    max_steps: int | None = Field(
        None, ge=1, description="optimizer steps per trial (overrides train.max_steps)"
    )
    timeout: float | None = Field(None, gt=0, description="stop starting new trials after this many seconds")
    storage: str | None = Field(
        None, description="optuna storage URL; null: SQLite file in the study directory"
    )
    study_name: str | None = Field(None, description="null: the study directory's name")
    output: str = Field("studies/study", description="study directory (trial run directories, tables, plots)")
    retrain: bool = Field(False, description="retrain the best configuration on train+val at the end")
    startup_trials: int = Field(
        3,
        ge=0,
        description="tpe, gp, cmaes: trials drawn at random before the model "
        "proposes; median pruner: finished trials before it prunes. asha and hyperband do "
        "not wait for them: they may stop the second trial",
    )
    random_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="tpe: this share of the trials after the start-up ones is drawn at random, "
        "evenly spaced (BOHB's random fraction is 1/3); 0: off",
    )
    tpe_gamma: float | None = Field(
        0.25,
        gt=0,
        le=1,
        description="tpe: share of the trials (at most 25) its 'good' density is fitted to; "
        "null: optuna's own default, 0.1",
    )
    min_resource: int | None = Field(
        None,
        ge=1,
        description="steps a trial runs before ASHA/Hyperband may stop it; null: a quarter of its steps",
    )
    reduction_factor: int = Field(
        3,
        ge=2,
        description="ASHA/Hyperband: a trial goes on past a rung if its value is in the best 1/N there; "
        "rungs at min_resource x N^k steps",
    )
    seed: int = Field(0, description="sampler seed")


class RunConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: Literal[tuple(TASK_METRICS)] = Field(  # type: ignore[valid-type]
        "lm",
        description="lm: next-token loss (classification data trains generatively, the reply is the label); "
        "classification: a [classes, hidden] head on the last token replaces the LM head",
    )
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig)
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
    def _best_metric_is_computed(self) -> "RunConfig":
        name, generate = self.train.best_metric, self.train.eval_generate and self.task == "lm"
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

    def absolute(self, base: str | Path | None = None) -> "RunConfig":
        """A copy whose file paths (data files, a local model, ``output``) are absolute, relative paths taken
        from ``base`` (default: the working directory). A run saves this copy, so its ``config.yaml``
        reproduces the run from any folder."""
        data = self.model_dump(mode="json")
        _absolute_paths(data, Path(base or Path.cwd()), output=True)
        return RunConfig.model_validate(data)

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
            mode = "min" if self.train.best_metric in ("loss", "ppl") else "max"
        return 1 if mode == "min" else -1

    def shape_keys(self) -> list[str]:
        """The dotted keys that decide the shapes of what a checkpoint holds (a resume cannot change them)."""
        keys = ["model.name", "model.revision", "task", "method", "optim.optimizer"]
        for section in METHODS[self.method].sections:
            keys += [
                f"{section}.{k}" for k in type(getattr(self, section)).model_fields if k not in _SHAPE_FREE
            ]
        return keys


# Method keys that change values, not shapes: a resume may change them like any other recorded change.
_SHAPE_FREE = {"alpha", "dropout", "init", "use_rslora", "alpha_pattern", "init_text", "compute_dtype"}


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
