"""The sections of a run config (model, data, method settings, optim, train, tune, ...), one model each.

Every field has a default and a description (``--help`` and the README's reference are written from
them); ``extra="forbid"`` turns a typo into an error that names the closest key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
    keep_layers: int | None = Field(
        None,
        ge=1,
        description="keep only the first N decoder layers (a smaller student for objective=distill); "
        "method full or freeze, which save the whole smaller model",
    )
    rope_scaling: dict[str, float | int | str] | None = Field(
        None,
        description="RoPE scaling for longer inputs, merged into the model config's rope_parameters: "
        "{rope_type: yarn, factor: 4, original_max_position_embeddings: 4096}, {rope_type: linear, "
        "factor: 2}, dynamic, longrope or llama3",
    )

    @field_validator("rope_scaling")
    @classmethod
    def _known_rope(cls, value: dict | None) -> dict | None:
        kinds = ("linear", "dynamic", "yarn", "longrope", "llama3")
        if value is not None and value.get("rope_type") not in kinds:
            raise ValueError(f"model.rope_scaling.rope_type must be one of {', '.join(kinds)}, got {value}")
        return value

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
    task: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="task name in the logs (loss/<task>); default: the file's name without its suffix",
    )
    loss_weight: float = Field(
        1.0,
        gt=0,
        description="multiplies this task's token losses (classification: row losses) in the training loss "
        "(1: unweighted)",
    )


class DataConfig(_Section):
    train: str | None = Field(None, description="training file (json, jsonl, csv, parquet, txt)")
    mix: list[MixSource] = Field(
        default_factory=list, description="several data sets with sampling weights, instead of data.train"
    )
    validation: str | None = Field(None, description="validation file; without it the train file is split")
    format: Literal["auto", "text", "alpaca", "messages", "classification", "preference", "kto", "prompt"] = (
        Field(
            "auto",
            description="auto: detected from the keys; preference: prompt/chosen/rejected pairs; kto: "
            "prompt/completion/label rows; prompt: prompt-only rows with an answer (objective=grpo)",
        )
    )
    split: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/val/test ratios when no validation file"
    )
    max_length: int = Field(512, ge=8, description="tokens per example")
    overflow: Literal["truncate", "drop"] = Field(
        "truncate", description="what to do with over-long examples"
    )
    train_on: Literal["assistant", "all"] = Field("assistant", description="which tokens carry loss")
    lenient: bool = Field(False, description="drop malformed rows and count them instead of stopping")
    max_samples: int | None = Field(
        None, ge=1, description="use only the first N rows of the train file (of each data.mix file)"
    )
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
        named = [s.task for s in self.mix if s.task]
        unnamed = [Path(s.path).stem for s in self.mix if not s.task]  # default names: the files' stems
        if len(set(named)) < len(named) or set(named) & set(unnamed):
            raise ValueError(
                f"data.mix: task names must differ, got {named} (and {unnamed} from the unnamed entries' "
                f"file names)"
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
        "adamw", description="adamw (fused kernel), adamw8bit (bitsandbytes), adafactor (transformers)"
    )
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(
        0.0, ge=0, description="decoupled weight decay; never on norms, biases, embeddings"
    )
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    fused: bool | None = Field(None, description="fused AdamW kernel; null: on (CPU and CUDA)")
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
    ewc_lambda: float = Field(
        0.0, ge=0, description="elastic weight consolidation strength against forgetting (0: off)"
    )
    ewc_data: str | None = Field(
        None, description="EWC: the previous task's data file, on which the Fisher information is estimated"
    )
    ewc_samples: int = Field(64, ge=1, description="EWC: examples of ewc_data in the Fisher estimate")

    @model_validator(mode="after")
    def _ewc_needs_data(self) -> "RegularizeConfig":
        if self.ewc_lambda and not self.ewc_data:
            raise ValueError(
                "regularize.ewc_lambda needs regularize.ewc_data: the previous task's data file, on which "
                "the Fisher information of what to keep is estimated"
            )
        return self

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


class CurriculumStage(_Section):
    """One stage of ``train.curriculum`` (short-to-long training)."""

    max_length: int = Field(ge=8, description="tokens per row in this stage (rows are cut to it)")
    steps: int | None = Field(
        None, ge=1, description="optimizer steps of this stage; the last stage has none: it runs to the end"
    )


class TrainConfig(_Section):
    micro_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    epochs: float = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 autocast where the device computes bf16 natively (a CUDA GPU from Ampere on, "
        "a CPU with avx512_bf16 or AMX), fp32 elsewhere; bf16: autocast with fp32 master weights (frozen "
        "weights are kept in bf16); fp32: no autocast",
    )
    distributed: Literal["auto", "fsdp2", "zero2", "zero3"] = Field(
        "auto",
        description="auto: one process, or DDP (replicated weights) when launched with --nproc/torchrun; "
        "fsdp2: torch FSDP2, each decoder layer's weights, gradients and optimizer states sharded; "
        "zero2: DeepSpeed ZeRO-2 (optimizer states and gradients sharded); zero3: ZeRO-3 (weights too)",
    )
    offload: Literal["none", "optimizer", "all"] = Field(
        "none",
        description="zero2/zero3: keep the optimizer states (and fp32 master weights) in CPU memory; "
        "all (zero3): the weights too",
    )
    deepspeed: str | None = Field(
        None,
        description="zero2/zero3: your DeepSpeed JSON; its \"auto\" values are filled from this config "
        "(micro-batch, accumulation, clipping, precision, bucket sizes), other values must agree with it",
    )
    gradient_checkpointing: bool = False
    auto_fit: bool = Field(
        False,
        description="before the run, lower micro_batch_size (raising grad_accum to keep the effective batch) "
        "and/or turn on gradient checkpointing until dstune plan's estimate fits train.memory_budget",
    )
    memory_budget: str | None = Field(
        None,
        description="memory of one device for auto_fit: 24GB, 512MB, or a GPU name (H100); default: the "
        "device's total memory (on a CPU, the machine's RAM)",
    )
    seed: int = 42
    log_every: int = Field(1, ge=1)
    eval_every: int = Field(0, ge=0, description="0: evaluate only at the end")
    save_every: int = Field(0, ge=0, description="0: checkpoint only at the end")
    keep_checkpoints: int = Field(3, ge=0, description="keep the newest K checkpoints; 0 keeps all")
    save_shard_size: str = Field(
        "5GB",
        description="the largest safetensors file of final/ when a sharded run (fsdp2, zero2, zero3) saves a "
        "whole model: rank 0 gathers and holds one such file at a time",
    )
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
    curriculum: list[CurriculumStage] = Field(
        default_factory=list,
        description="short-to-long training: stages of rising max_length (each cuts the rows to its length "
        "and re-packs them with train.packing), e.g. [{max_length: 256, steps: 100}, {max_length: 1024}]",
    )
    split_by_length: Literal["auto", "on", "off"] = Field(
        "auto",
        description="cut each micro-batch into sub-batches of similar length when that saves padded "
        "compute (exact: same examples, same loss); auto: on CPU",
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

    @field_validator("save_shard_size")
    @classmethod
    def _shard_size(cls, value: str) -> str:
        from dstune.core.shards import parse_size

        try:
            parse_size(value)
        except Exception:
            raise ValueError(f"{value!r}: give a size such as 5GB, 500MB or 1GiB") from None
        return value

    @field_validator("split_by_length", "liger", mode="before")
    @classmethod
    def _yaml_on_off(cls, value):  # YAML 1.1 reads a bare on/off (as in --set train.liger=off) as a bool
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("memory_budget")
    @classmethod
    def _known_budget(cls, value: str | None) -> str | None:
        from dstune.gpus import parse_budget

        if value is not None:
            parse_budget(value)  # a ValueError naming the accepted forms
        return value


class ClassifyConfig(_Section):
    """Settings of ``task: classification`` (a sequence-classification head)."""

    class_weights: Literal["none", "balanced"] | dict[str, float] = Field(
        "none",
        description="loss weight per class: none, balanced (n / (classes x count)), or {label: weight}",
    )
    pooling: Literal["last", "mean"] = Field(
        "last", description="what the head reads: the last real token (transformers' way) or the mean of all"
    )
    heads: Literal["auto", "shared", "per_task"] = Field(
        "auto",
        description="data.mix of classification sets: one head per task (per_task), one head over all "
        "labels (shared), or auto: per_task when the tasks' label sets differ",
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
    preset: str | None = Field(
        None, description="built-in space: lora-default, full-default, method, lr, preference"
    )
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
