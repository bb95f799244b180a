"""``build(cfg) -> Run``: everything a run computes with, made once and in one order.

The engine (accelerate), tokenizer and chat template, the data (tokenised, packed), the model pipeline
(load, kernels, method, regularisation, frozen-weight casting, gradient checkpointing, compile), the
objective, the optimizer, the scheduler and the micro-batch stream. ``train``, ``lr_find`` and each
search trial call it, so they cannot drift apart. It writes nothing; the order of its seeded steps is
fixed, so a run is reproducible from its config alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from rich.console import Console

from dstune.config import OBJECTIVE_FORMATS, RunConfig
from dstune.core.facts import pad_id as pad_id_of
from dstune.core.facts import peak_rss_mb, resolve_precision
from dstune.core.forward import chunk_size
from dstune.core.loss import TaskLosses
from dstune.data import DataError, PreparedData, dropped_rows_warning
from dstune.data.mix import task_names
from dstune.data.pack import pack_rows, padding_share
from dstune.errors import UsageError
from dstune.methods import prepare_model, trainable_summary
from dstune.methods.summary import render_summary
from dstune.models.load import load_tokenizer, resolve_model_dir
from dstune.models.templates import resolve_chat_template
from dstune.plan.autofit import device_type
from dstune.train.accel import (
    apply_attention,
    apply_experts,
    apply_liger,
    compile_layers,
    describe,
    fused_ce_loss,
    plan_liger,
)
from dstune.train.batching import MicroBatches, Stage
from dstune.train.curriculum import curriculum_steps, stage_rows
from dstune.train.engine import Engine, make_engine
from dstune.train.objective import Objective, SupervisedObjective
from dstune.train.optim import build_optimizer, build_scheduler, render_groups
from dstune.train.regularize import apply_regularization
from dstune.train.tasks import TASKS

_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PADDING_HINT = 0.3  # padding share above which a run without packing is told about train.packing


@dataclass
class Run:
    """What ``build`` made: the run's objects, prepared by its engine, and what it says about them."""

    cfg: RunConfig
    engine: Engine
    resolved: object  # models.load.Resolved: the model's local path and family
    tokenizer: object
    template: str | None
    data: PreparedData
    model: torch.nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    batches: MicroBatches
    steps: int
    pad_id: int
    speed: dict
    trainable: dict
    notes: list[str] = field(default_factory=list)  # printed once before training, by the main process
    penalty: object = None  # regularize.ewc_lambda: the EWC penalty (train/ewc.py), added to the gradients

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.engine.unwrap_model(self.model)

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]


def resolve_auto_precision(cfg: RunConfig) -> tuple[RunConfig, str]:
    """``cfg`` with ``train.precision: auto`` decided for this process's device (validated again, so a
    DeepSpeed JSON that disagrees is refused), and the decision with its reason, for the log."""
    precision, why = resolve_precision(cfg.train.precision, device_type())
    if precision == cfg.train.precision:
        return cfg, precision
    data = cfg.model_dump(mode="json")
    data["train"]["precision"] = precision
    return RunConfig.model_validate(data), f"{precision} ({why})"


def total_steps(cfg: RunConfig, micro_batches_per_epoch: int) -> int:
    """Optimizer steps of the run: ``train.max_steps``, else ``epochs`` over the data."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * micro_batches_per_epoch / cfg.train.grad_accum))


def build(cfg: RunConfig, console: Console | None = None, schedule: list[dict] | None = None) -> Run:
    """Builds a run from its config, in the fixed, seeded order; writes nothing.

    Args:
        cfg: the validated run config.
        console: where the main process prints the data, model and optimizer summaries (None: silent).
        schedule: the lr schedule's phases (``TrainState.schedule``); None: one phase over the whole run.
    """
    cfg, precision = resolve_auto_precision(cfg)
    tc = cfg.train
    engine = make_engine(cfg)
    torch.manual_seed(tc.seed)
    resolved = resolve_model_dir(
        cfg.model.name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
    )
    tokenizer = load_tokenizer(resolved.path)
    template = resolve_chat_template(tokenizer, cfg.model.chat_template, resolved.family)
    data, notes = build_data(cfg, tokenizer, template)
    pad = pad_id_of(tokenizer)
    with engine.loading(resolved.path):
        model, speed, objective, regularization = build_model(
            cfg, resolved, data.labels, pad, engine.device, data.heads
        )
    objective = sampling_objective(cfg, tokenizer, template, pad, model, data, engine, resolved) or objective
    trainable = trainable_summary(model)
    is_moe = bool(
        getattr(model.config, "n_routed_experts", None) or getattr(model.config, "num_experts", None)
    )
    notes = [
        f"{cfg.method} on {cfg.model.name} ({resolved.family}); {len(data.train)} train / "
        f"{len(data.val)} val examples",
        *notes,
        render_summary(trainable, is_moe),
    ]
    batches = MicroBatches(
        data.train,
        tc.micro_batch_size,
        tc.seed,
        pad,
        num_shards=engine.num_processes,
        shard=engine.process_index,
        group_by_length=tc.group_by_length,
        stages=[Stage(**s) for s in data.report.get("curriculum_stages", [])],
    )
    steps = curriculum_steps(cfg, batches.per_epoch) if tc.curriculum else total_steps(cfg, batches.per_epoch)
    optimizer = build_optimizer(model, cfg.optim, engine.device)
    schedule = schedule if schedule is not None else []
    if not schedule:  # a new run: one phase over the whole run (the list is the caller's TrainState.schedule)
        schedule.append({"start": 0, "total": steps})
    scheduler = build_scheduler(optimizer, schedule, cfg.optim)
    notes.append(render_groups(optimizer) + (f"\n{regularization}" if regularization else ""))
    speed["precision"] = precision
    notes.append(f"speed: {speed}")
    model, optimizer = engine.prepare(model, optimizer)
    speed["startup_peak_mb"] = round(peak_rss_mb(), 1)  # host memory once loaded and sharded
    penalty = before_first_step(cfg, engine, model, objective, data, tokenizer, template, pad, notes)
    run = Run(
        cfg,
        engine,
        resolved,
        tokenizer,
        template,
        data,
        model,
        objective,
        optimizer,
        scheduler,
        batches,
        steps,
        pad,
        speed,
        trainable,
        notes,
        penalty,
    )
    if console is not None and engine.is_main_process:
        for note in notes:
            console.print(note, markup=False, highlight=False)
    return run


def sampling_objective(cfg: RunConfig, tokenizer, template, pad: int, model, data, engine, resolved):
    """The objectives that generate with the tokenizer or a teacher (grpo, distill), or None. They come
    before the micro-batches: GRPO numbers the rows, sequence distillation rewrites them."""
    if cfg.objective == "grpo":  # it samples with the tokenizer and scores the rows' answers
        from dstune.train.grpo import make_grpo

        return make_grpo(cfg, tokenizer, template, pad, model, data, resolved.path)
    if cfg.objective == "distill":  # the teacher is loaded once; sequence mode rewrites the training rows
        from dstune.train.distill import make_distill

        return make_distill(cfg, tokenizer, template, pad, model, data, engine)
    return None


def before_first_step(cfg: RunConfig, engine, model, objective, data, tokenizer, template, pad: int, notes):
    """What is computed from the starting weights, on the engine's device: the cached reference
    log-probabilities of full/freeze DPO and KTO, and the EWC penalty's Fisher (returned, or None)."""
    if getattr(objective, "reference", None) == "cached":
        for rows in (data.train, data.val):
            objective.cache_reference(model, rows, cfg.train.micro_batch_size, engine)
        notes.append(f"reference log-probabilities of {len(data.train) + len(data.val)} examples computed")
    if not cfg.regularize.ewc_lambda:
        return None
    from dstune.train.ewc import make_ewc

    penalty = make_ewc(cfg, engine.unwrap_model(model), tokenizer, template, pad, engine.device)
    notes.append(f"EWC: Fisher information of {len(penalty.fisher)} tensors on {cfg.regularize.ewc_data}")
    return penalty


def build_data(cfg: RunConfig, tokenizer, template: str | None) -> tuple[PreparedData, list[str]]:
    """The run's data (packed when asked) and the lines that describe it (format, drops, warnings)."""
    tc, task = cfg.train, TASKS[cfg.task]
    data = task.data(cfg, tokenizer, template)
    check_objective_data(cfg, data.report.get("format"), data)
    share = round(padding_share(data.train, tc.micro_batch_size), 4) if data.train else 0.0
    data.report["padding_share"] = share
    notes = [data_line(data.report)]
    if warning := dropped_rows_warning(data.report, cfg.data.max_length):
        data.report["warning"] = warning  # in data_report.json too: tune says it for its quiet trials
        notes.append(warning)
    if tc.curriculum:  # every stage's rows, cut to its length (and packed, with packing)
        data.train, stages, data.report["curriculum"] = stage_rows(cfg, data.train)
        data.report["curriculum_stages"] = [vars(s) for s in stages]
        notes.append(
            "curriculum: "
            + ", then ".join(
                f"{s['max_length']} tokens ({s['rows']} rows, {s['steps'] or 'the remaining'} steps)"
                for s in data.report["curriculum"]
            )
        )
    elif tc.packing:  # validation stays unpacked: its loss is comparable across runs with and without packing
        data.train = pack_rows(data.train, cfg.data.max_length, tc.seed)
        data.report["packed"] = {
            "rows": len(data.train),
            "padding_share": round(padding_share(data.train, tc.micro_batch_size), 4),
        }
    elif share > PADDING_HINT and task.tokens_per_row:
        notes.append(
            f"hint: {share:.0%} of the tokens in these micro-batches are padding; "
            f"--set train.packing=true packs several examples per row and computes none of them"
        )
    if not data.train:
        raise UsageError(
            f"data.train: no training examples left in {cfg.data.train or 'data.mix'} after "
            f"tokenising; see data_report.json and `dstune data inspect`"
        )
    return data, notes


def check_answers(cfg: RunConfig, data: PreparedData) -> None:
    """Refuses prompt rows without an ``answer`` when the accuracy reward, which checks it, is on."""
    if any(r.name == "accuracy" for r in cfg.grpo.rewards):
        for row in data.train + data.val:
            if row["answer"] is None:
                raise DataError(
                    f"{row['source']}: no 'answer' field, which the accuracy reward (grpo.rewards) checks; "
                    f"add answers, or drop accuracy from grpo.rewards"
                )


def check_objective_data(cfg: RunConfig, fmt: str | None, data: PreparedData | None = None) -> None:
    """Refuses data the objective cannot train on: pairs for sft, conversations for dpo, and so on."""
    want = OBJECTIVE_FORMATS.get(cfg.objective)
    source = cfg.data.train or "data.mix"
    if want and fmt != want:
        keys = {"preference": "prompt/chosen/rejected pairs", "kto": "prompt/completion/label rows",
                "prompt": "prompt-only rows (prompt, answer)"}[want]  # fmt: skip
        raise DataError(
            f"{source}: objective={cfg.objective} trains on {keys}, but the file is in {fmt} format"
        )
    if cfg.objective == "grpo" and fmt == "prompt" and data is not None:
        check_answers(cfg, data)
    if not want and fmt in ("preference", "kto", "prompt"):
        fix = {"preference": "dpo, orpo or simpo", "kto": "kto", "prompt": "grpo"}[fmt]
        raise DataError(
            f"{source} holds {fmt} rows; supervised training cannot use them: set objective={fix}"
        )


def data_line(report: dict) -> str:
    """One line on what was read: the detected format, rows read and the rows dropped (lenient mode)."""
    reads = report.get("read") or {"train": report}
    parts = []
    for name, r in reads.items():
        if not isinstance(r, dict) or "format" not in r:
            continue
        dropped = sum(r.get("dropped", {}).values())
        why = f" ({', '.join(f'{k}: {n}' for k, n in r['dropped'].items())})" if dropped else ""
        parts.append(f"{name}: {r['format']} format, {r['rows_read']} rows read, {dropped} dropped{why}")
    return "data: " + ("; ".join(parts) or f"{report.get('format', '?')} format")


def build_model(
    cfg: RunConfig,
    resolved,
    labels: list[str],
    pad: int,
    device: torch.device,
    heads: dict | None = None,
):
    """The model pipeline: load, kernels, method, regularisation, casting, checkpointing, compile.

    Returns:
        The trainable model, the speed settings in use, the objective that computes its loss, and the
        regularisation in use (a line of text, or None).
    """
    tc = cfg.train
    model = TASKS[cfg.task].model(cfg, resolved, labels, pad, heads)
    if cfg.model.keep_layers:
        keep_first_layers(model, cfg.model.keep_layers)
    # Kernels are chosen on the plain model, before adapters wrap its modules (see train/accel.py).
    attention = apply_attention(model, tc.attention, device.type, tc.precision)
    experts = apply_experts(model, tc.experts_implementation)
    liger = apply_liger(
        model, plan_liger(tc.liger, model.config.model_type, device.type == "cuda"), strict=tc.liger == "on"
    )
    fused_ce = fused_ce_loss(cfg.regularize.label_smoothing) if liger.fused_ce else None
    torch.manual_seed(tc.seed)  # adapter initialisation is seeded, independent of what loading consumed
    model = prepare_model(model, cfg)
    regularization = apply_regularization(model, cfg.regularize)
    cast_frozen(model, tc.precision)
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    speed = describe(device, attention, liger, compile_layers(model, tc.compile), experts)
    chunk = (
        chunk_size(tc.chunk_tokens, model.get_output_embeddings().weight.shape[0])
        if TASKS[cfg.task].tokens_per_row and tc.distributed != "zero3"
        else 0
    )
    if tc.distributed == "zero3":  # ZeRO-3 frees the head's weight after the forward: logits come from it
        fused_ce = None
    speed["chunk_tokens"] = chunk
    speed["split_by_length"] = length_split_overhead(tc.split_by_length, device.type, tc.distributed)
    tasks = task_losses(cfg)
    if tasks is not None:  # liger's fused loss has no per-token weights or per-token losses: the chunks do
        fused_ce = None
    objective = SupervisedObjective(cfg.regularize.label_smoothing, chunk, fused_ce, tasks)
    if OBJECTIVE_FORMATS.get(cfg.objective) in ("preference", "kto"):  # dpo, orpo, simpo, kto
        from dstune.train.preference import make_objective

        objective = make_objective(cfg, pad, model)
    return model, speed, objective, regularization


def task_losses(cfg: RunConfig) -> TaskLosses | None:
    """Multi-task bookkeeping for a supervised run on ``data.mix`` (each data set a task: its tokens' or
    rows' loss weight, and ``loss/<task>`` in the logs), else None."""
    if not cfg.data.mix or cfg.objective != "sft":
        return None
    return TaskLosses(task_names(cfg.data.mix), [s.loss_weight for s in cfg.data.mix])


# One more forward/backward pass over fewer rows costs about as much as this many padded tokens on a
# CPU (SmolLM2, 2 cores: splitting micro-batches of 4 into single rows saved nothing; into two groups of
# similar length, 10%; docs/benchmarks.md "Where the time goes"). Not measured on GPUs, hence CPU only.
LENGTH_SPLIT_OVERHEAD = 128


def length_split_overhead(setting: str, device_type: str, distributed: str = "auto") -> int:
    """``train.split_by_length`` as the overhead ``batching.split_by_length`` weighs (0: off). Off under
    FSDP2 and ZeRO: each rank cuts its own rows, so the ranks could make different numbers of passes,
    and every pass gathers weights from all of them (the config refuses ``on`` there)."""
    if distributed != "auto":
        return 0
    return LENGTH_SPLIT_OVERHEAD if setting == "on" or (setting == "auto" and device_type == "cpu") else 0


def keep_first_layers(model: torch.nn.Module, n: int) -> None:
    """Cuts the decoder to its first ``n`` layers, in place (a smaller student that keeps the pretrained
    embeddings, lower layers, final norm and head), and says so in the model's config, which is saved."""
    layers = model.get_decoder().layers
    if n >= len(layers):
        raise UsageError(f"model.keep_layers={n}: the model has {len(layers)} decoder layers; keep fewer")
    model.get_decoder().layers = layers[:n]
    model.config.num_hidden_layers = n
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = model.config.layer_types[:n]


def cast_frozen(model: torch.nn.Module, precision: str) -> None:
    """Keeps frozen weights in the compute dtype under bf16/fp16: they get no updates, so fp32 copies
    only cost memory. Trainable weights stay fp32 (master weights) for stable optimizer updates."""
    if precision == "fp32":
        return
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(_DTYPE[precision])
