"""The one training loop: ``train(cfg) -> RunResult``, shared by every method, the demo and each trial.

It runs on accelerate, so one process, DDP and FSDP are the same code. It keeps no module-level state:
a search trial or a test calls it as a function.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from rich.console import Console

from dstune.config import RunConfig, save_config
from dstune.data import dropped_rows_warning
from dstune.data.cache import cached_prepare
from dstune.data.pack import pack_rows, padding_share
from dstune.evaluate.answers import GENERATION_METRICS, evaluate_answers
from dstune.evaluate.loss import CLASSIFICATION_METRICS, evaluate_classifier, evaluate_loss
from dstune.methods import prepare_model, trainable_summary
from dstune.methods.summary import render_summary
from dstune.models.load import load_model, load_tokenizer, resolve_model_dir
from dstune.models.templates import resolve_chat_template
from dstune.report.logger import MetricsLogger
from dstune.report.plots import plot_loss
from dstune.train.accel import (apply_attention, apply_experts, apply_liger, compile_layers, describe,
                                fused_ce_loss, plan_liger)
from dstune.train.batching import MicroBatches, Prefetcher
from dstune.train.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from dstune.train.faults import Faults
from dstune.train.rundir import RunDirError, check_resume, check_run_dir, file_sha256
from dstune.train.signals import StopRequest, TrainingInterrupted
from dstune.core.forward import loss_sum as forward_loss
from dstune.core.loss import count_loss_tokens
from dstune.train.diagnostics import LayerDiagnostics
from dstune.train.guard import StabilityGuard
from dstune.train.optim import build_optimizer, build_scheduler, clip_gradients, render_groups
from dstune.train.regularize import EarlyStopping, apply_regularization
from dstune.train.schedules import current_lr

_MIXED = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RunResult:
    """What a finished run produced; every path is inside ``run_dir``."""

    run_dir: Path
    steps: int
    train_losses: list[float]
    val: dict[str, float] = field(default_factory=dict)
    final_dir: Path | None = None
    summary: dict = field(default_factory=dict)
    model: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def final_loss(self) -> float:
        return self.train_losses[-1] if self.train_losses else math.nan


def total_steps(cfg: RunConfig, micro_batches_per_epoch: int) -> int:
    """Optimizer steps of the run: ``train.max_steps``, else ``epochs`` over the data."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * micro_batches_per_epoch / cfg.train.grad_accum))


def _accelerator(precision: str) -> Accelerator:
    """An Accelerator for this run's precision.

    accelerate keeps one process-wide state and refuses a second Accelerator with another mixed
    precision ("AcceleratorState has already been initialized"), which would stop a search whose trials
    differ in precision, or any program that calls ``train`` twice. Only the precision part of that
    state is reset; the process group (``PartialState``) stays, so this is safe under DDP.
    """
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != _MIXED[precision]:
        AcceleratorState._reset_state(reset_partial_state=False)
    # Without a GPU, accelerate only forms a multi-process (gloo) group when told the run is on the CPU;
    # otherwise every rank of `torchrun --nproc-per-node 2` would train alone and write the same run dir.
    on_cpu = not torch.cuda.is_available() and not (hasattr(torch, "xpu") and torch.xpu.is_available())
    return Accelerator(mixed_precision=_MIXED[precision], cpu=on_cpu)


def _cast_frozen(model: torch.nn.Module, precision: str) -> None:
    """Keeps frozen weights in the compute dtype under bf16/fp16: they get no updates, so fp32 copies
    only cost memory. Trainable weights stay fp32 (master weights) for stable optimizer updates."""
    if precision == "fp32":
        return
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(_DTYPE[precision])


def save_final(model, tokenizer, chat_template: str | None, out: Path) -> Path:
    """Saves the trained model: an adapter in peft's format, or a full model, plus the tokenizer.

    ``save_pretrained`` writes safetensors in both cases, so plain transformers/peft load the result.
    """
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    if chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(out))
    return out


def train(cfg: RunConfig, *, resume: bool = False, allow_config_change: bool = False,
          console: Console | None = None,
          on_eval: Callable[[int, dict[str, float]], None] | None = None) -> RunResult:
    """Fine-tunes ``cfg.model`` on ``cfg.data`` with ``cfg.method`` and writes a run directory.

    Args:
        cfg: the resolved run configuration.
        resume: continue from the newest complete checkpoint in ``cfg.output``.
        allow_config_change: resume even if the lr, batch, seed or data changed (recorded).
        on_eval: called with (step, validation metrics) after every evaluation; a hyperparameter search
            reports to its pruner here and may raise to stop the run (e.g. ``optuna.TrialPruned``).
        console: where to print; defaults to stdout.

    Returns:
        RunResult with per-step training losses, final validation metrics and paths.
    """
    console = console or Console()
    tc = cfg.train
    run_dir = Path(cfg.output)
    check_run_dir(run_dir, resume)
    if resume:
        check_resume(run_dir, cfg, allow_config_change)
    faults = Faults()
    accelerator = _accelerator(tc.precision)
    is_main = accelerator.is_main_process
    torch.manual_seed(tc.seed)

    resolved = resolve_model_dir(cfg.model.name, revision=cfg.model.revision,
                                 trust_remote_code=cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(resolved.path)
    template = resolve_chat_template(tokenizer, cfg.model.chat_template, resolved.family)
    best_metric, best_sign = checkpoint_metric(cfg)
    data = task_data(cfg, tokenizer, template)
    data.report["padding_share"] = round(padding_share(data.train, tc.micro_batch_size), 4) if data.train else 0.0
    if warning := dropped_rows_warning(data.report, cfg.data.max_length):
        data.report["warning"] = warning  # in data_report.json too: tune says it for its quiet trials
    if tc.packing:  # validation stays unpacked: its loss is comparable across runs with and without packing
        data.train = pack_rows(data.train, cfg.data.max_length, tc.seed)
        data.report["packed"] = {"rows": len(data.train),
                                 "padding_share": round(padding_share(data.train, tc.micro_batch_size), 4)}
    if not data.train:
        raise ValueError(f"no training examples left in {cfg.data.train} after tokenising; see the data report")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = task_model(cfg, resolved, data.labels, pad_id)
    # Kernels are chosen on the plain model, before adapters wrap its modules (see train/accel.py).
    attention = apply_attention(model, tc.attention, accelerator.device.type, tc.precision)
    experts = apply_experts(model, tc.experts_implementation)
    liger = apply_liger(model, plan_liger(tc.liger, model.config.model_type, accelerator.device.type == "cuda"),
                        strict=tc.liger == "on")
    fused_ce = fused_ce_loss(cfg.regularize.label_smoothing) if liger.fused_ce else None
    torch.manual_seed(tc.seed)  # adapter initialisation is seeded, independent of what loading consumed
    model = prepare_model(model, cfg)
    regularization = apply_regularization(model, cfg.regularize)
    _cast_frozen(model, tc.precision)
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    speed = describe(accelerator.device, attention, liger, compile_layers(model, tc.compile), experts)
    summary = trainable_summary(model)
    is_moe = bool(getattr(model.config, "n_routed_experts", None) or getattr(model.config, "num_experts", None))
    if is_main:
        console.print(f"[bold]{cfg.method}[/] on {cfg.model.name} ({resolved.family}); "
                      f"{len(data.train)} train / {len(data.val)} val examples")
        console.print(render_summary(summary, is_moe), markup=False, highlight=False)
        if "warning" in data.report:
            console.print(data.report["warning"], style="yellow", markup=False, highlight=False)

    batches = MicroBatches(data.train, tc.micro_batch_size, tc.seed, pad_id,
                           num_shards=accelerator.num_processes, shard=accelerator.process_index,
                           group_by_length=tc.group_by_length)
    steps = total_steps(cfg, batches.per_epoch)
    optimizer = build_optimizer(model, cfg.optim, accelerator.device)
    scheduler = build_scheduler(optimizer, steps, cfg.optim)
    if is_main:
        console.print(render_groups(optimizer) + (f"\n{regularization}" if regularization else ""),
                      markup=False, highlight=False)
    model, optimizer = accelerator.prepare(model, optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]

    step, losses, order, events = 0, [], [], {"oom_backoffs": 0, "eval_oom_backoffs": 0}
    split = 1  # each micro-batch is cut into this many pieces after an out-of-memory back-off
    if resume:
        ckpt = latest_checkpoint(run_dir)
        loop_state = load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler)
        step, losses, batches.position = loop_state["step"], loop_state["losses"], loop_state["position"]
        order, split = loop_state.get("order", []), loop_state.get("split", 1)
        if is_main:
            console.print(f"resumed from {ckpt} at step {step}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "data_report.json").write_text(json.dumps(data.report, indent=2, ensure_ascii=False), "utf-8")
        (run_dir / "run.json").write_text(json.dumps({
            "base_model": resolved.path, "model": cfg.model.name, "family": resolved.family,
            "method": cfg.method, "final": "final", "data_sha256": file_sha256(cfg.data.train),
            "task": cfg.task}, indent=2), "utf-8")
        if cfg.task == "classification":
            from dstune.models.classify import save_labels

            save_labels(run_dir, data.labels)
    logger = MetricsLogger(run_dir, enabled=is_main)

    val_seen: dict = {}  # the last validation (step, value of train.best_metric), for keeping the best checkpoint
    best: dict = json.loads((run_dir / "best_checkpoint.json").read_text("utf-8")) \
        if resume and (run_dir / "best_checkpoint.json").exists() else {}

    pending: list[torch.Tensor] = []  # per-step losses still on the device, read at logging steps

    def flush_losses() -> None:
        if pending:
            losses.extend(torch.stack(pending).float().tolist())  # one host-device sync for all of them
            pending.clear()

    def checkpoint() -> Path:
        flush_losses()
        path = run_dir / "checkpoints" / f"step-{step:06d}"
        if is_main:
            state = {"step": step, "losses": losses, "order": order, "position": batches.position, "split": split}
            save_checkpoint(path, accelerator.unwrap_model(model), optimizer, scheduler, state,
                            fault=lambda: faults.kill("save", step))
            note_best(path)
            prune_checkpoints(run_dir, tc.keep_checkpoints, keep={Path(best["path"])} if "path" in best else set())
        accelerator.wait_for_everyone()
        return path

    def note_best(path: Path) -> None:
        # Retention keeps the newest K and the checkpoint with the best train.best_metric so far.
        if val_seen.get("step") != step or not math.isfinite(val_seen["value"]):
            return
        if best_sign * val_seen["value"] < best_sign * best.get("value", best_sign * math.inf):
            best.update(metric=best_metric, mode="min" if best_sign > 0 else "max", value=val_seen["value"],
                        loss=val_seen["loss"], path=str(path), step=step)
            (run_dir / "best_checkpoint.json").write_text(json.dumps(best, indent=1), "utf-8")

    def validate() -> dict[str, float]:
        # An out-of-memory here halves the evaluation batch only: the training batch never changes.
        micro = tc.micro_batch_size
        while True:
            try:
                faults.oom("eval", step)
                if cfg.task == "classification":
                    metrics = evaluate_classifier(model, data.val, micro, pad_id, accelerator, tc.eval_batches)
                else:
                    metrics = evaluate_loss(model, data.val, micro, pad_id, accelerator, tc.eval_batches,
                                            tc.chunk_tokens)
                break
            except torch.OutOfMemoryError:
                if micro == 1:
                    raise
                micro //= 2
                events["eval_oom_backoffs"] += 1
                _free_memory(accelerator)
                if is_main:
                    console.print(f"[yellow]out of memory in evaluation: evaluation micro-batch -> {micro}[/]")
        # Answers are generated one row at a time, so halving the batch above would not help them.
        if metrics and tc.eval_generate and cfg.task != "classification":
            metrics.update(evaluate_answers(accelerator.unwrap_model(model), data.val, tokenizer,
                                            tc.eval_generate, tc.eval_max_new_tokens))
        if metrics:
            logger.log(step, "val", metrics)
            val_seen.update(step=step, loss=metrics["loss"], value=metrics[best_metric])
            if on_eval is not None:
                on_eval(step, metrics)
        return metrics

    say = console.print if is_main else None
    unwrapped = accelerator.unwrap_model(model)
    guard = StabilityGuard(cfg.stability, unwrapped, optimizer, scheduler, tc.precision, data.train,
                           log=lambda s, v: logger.log(s, "stability", v), say=say)
    diagnostics = LayerDiagnostics(cfg.stability, unwrapped, log=lambda s, v: logger.log(s, "diag", v), say=say)
    early = EarlyStopping(cfg.regularize, tc.eval_every, best_metric, best_sign)
    progress = _progress(console, enabled=is_main and tc.progress)
    task = progress.add_task("training", total=steps, completed=step, loss=float("nan"))
    model.train()
    t0, tokens_seen, padded_seen = time.perf_counter(), 0, 0
    micro_done = step * tc.grad_accum
    stop = StopRequest(accelerator)
    # The next micro-batches are collated (and pinned, on CUDA) on a thread while this step computes.
    feed = Prefetcher(batches, tc.prefetch, pin_memory=accelerator.device.type == "cuda")
    if is_main:
        console.print(f"speed: {speed}", markup=False, highlight=False)
    with progress, stop, feed:
        while step < steps:
            served = [feed.next() for _ in range(tc.grad_accum)]
            window = [b for b, _ in served]
            order.append(_order_hash([data.train[i].get("source", str(i)) for _, idx in served for i in idx]))

            def after_micro() -> None:
                nonlocal micro_done
                micro_done += 1
                faults.kill("micro", micro_done)

            while True:
                try:
                    faults.oom("step", step + 1)
                    loss_sum, n_global = backward_window(model, _split_window(window, split), accelerator, after_micro,
                                                         cfg.regularize.label_smoothing, tc.chunk_tokens, fused_ce)
                    break
                except torch.OutOfMemoryError:
                    # Halve the micro-batch and double accumulation: the same examples, the same tokens
                    # per optimizer step, so the update is unchanged (the loss is normalised per token).
                    optimizer.zero_grad(set_to_none=True)
                    _free_memory(accelerator)
                    if max(len(b["input_ids"]) for b in window) // split <= 1:
                        raise
                    split *= 2
                    events["oom_backoffs"] += 1
                    if is_main:
                        console.print(f"[yellow]out of memory at step {step + 1}: micro-batch "
                                      f"{tc.micro_batch_size} -> {-(-tc.micro_batch_size // split)}, "
                                      f"accumulation x{split}; retrying the step[/]")
            tokens_seen += sum(int(b["attention_mask"].sum()) for b in window)  # host tensors: no device sync
            padded_seen += sum(b["attention_mask"].numel() for b in window)
            loss_sum = guard.inject(step + 1, loss_sum, trainable)
            diagnostics.before_step(step + 1)
            grad_norm = clip_gradients(trainable, cfg.optim, accelerator)
            loss_t = (accelerator.reduce(loss_sum, "sum") / n_global).detach()
            # The stability guard decides this step's update from its loss and gradient norm, so it reads
            # them now (a host-device sync per step); with stability.policy=off nothing is read from the
            # device except at logging steps (flush_losses), and the GPU runs ahead of the host.
            loss = loss_t.item() if cfg.stability.policy != "off" else loss_t
            action = guard.check(step + 1, loss, grad_norm, [i for _, idx in served for i in idx])
            if action == "halt":  # the weights stay those of the previous step; the end of run saves them
                order.pop()
                break
            if action == "step":
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            diagnostics.after_step(step)
            guard.after_step(step)
            pending.append(loss_t)
            progress.update(task, advance=1)
            if step % tc.log_every == 0 or step == steps:
                flush_losses()
                progress.update(task, loss=losses[-1])
                elapsed = time.perf_counter() - t0
                logger.log(step, "train", {"loss": losses[-1], "lr": current_lr(scheduler, cfg.optim),
                                           "grad_norm": float(grad_norm), "tokens_per_s": tokens_seen / elapsed,
                                           "padding_share": round(1 - tokens_seen / max(padded_seen, 1), 4),
                                           "epoch": batches.epoch()})
            if tc.eval_every and step % tc.eval_every == 0 and step < steps:
                if early.update(step, validate(), accelerator.unwrap_model(model)):
                    break  # early stopping: patience ran out
            if tc.save_every and step % tc.save_every == 0 and step < steps:
                checkpoint()
            faults.kill("step", step)
            if stop.requested() and step < steps:
                path = checkpoint()
                raise TrainingInterrupted(
                    f"stopped by {stop.signal_name or 'a signal to another process of this run'} after step "
                    f"{step}/{steps}; checkpoint saved in {path}. "
                    f"Resume with: dstune train {run_dir / 'config.yaml'} --resume")
    flush_losses()
    final_ckpt = checkpoint()
    end_val = validate()
    if is_main and final_ckpt.exists():  # the last checkpoint can be the best one too
        note_best(final_ckpt)
        prune_checkpoints(run_dir, tc.keep_checkpoints, keep={Path(best["path"])} if "path" in best else set())
    val = early.finish(step, end_val, accelerator.unwrap_model(model), validate)  # keep_best restores the best
    final_dir = None
    if is_main:
        final_dir = save_final(accelerator.unwrap_model(model), tokenizer, template, run_dir / "final")
        plot_loss(run_dir)
    logger.close()
    result_summary = {"steps": step, "final_train_loss": losses[-1] if losses else None, "val": val,
                      "events": events, "micro_batch_split": split, "stability": guard.summary(),
                      "early_stopping": early.summary(), "diagnostics_warnings": diagnostics.warnings,
                      "trainable": summary, "data": data.report, "speed": speed,
                      # padding in the micro-batches this run computed (packing / length grouping lower it)
                      "padding_share": round(1 - tokens_seen / padded_seen, 4) if padded_seen else None,
                      "wall_s": round(time.perf_counter() - t0, 2)}
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(result_summary, indent=2, ensure_ascii=False), "utf-8")
    return RunResult(run_dir, step, losses, val, final_dir, result_summary, accelerator.unwrap_model(model))


def task_data(cfg: RunConfig, tokenizer, template: str | None):
    """The run's data for its task: token rows with a loss mask, or head rows for ``task: classification``."""
    if cfg.task == "classification":  # head rows (data/classify.py); the token cache does not key on the task
        from dstune.data import prepare_data

        return prepare_data(cfg.data, tokenizer, template, cfg.train.seed, task=cfg.task,
                            class_weights=cfg.classify.class_weights)
    return cached_prepare(cfg.data, tokenizer, template, cfg.train.seed)  # tokenised once, then from the cache


def task_model(cfg: RunConfig, resolved, labels: list[str], pad_id: int) -> torch.nn.Module:
    """The base model for the task: the causal LM, or for ``task: classification`` the decoder with a
    ``[classes, hidden]`` head in place of the LM head (models/classify.py)."""
    if cfg.task == "classification":
        from dstune.models.classify import load_classifier

        return load_classifier(resolved.path, labels, pad_id, trust_remote_code=cfg.model.trust_remote_code,
                               pooling=cfg.classify.pooling)
    return load_model(resolved, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code,
                      revision=cfg.model.revision, allow_pickle=cfg.model.allow_pickle)


def checkpoint_metric(cfg: RunConfig) -> tuple[str, int]:
    """``train.best_metric`` and its sign: +1 when lower is better, -1 when higher is.

    Raises:
        ValueError: a metric the validation of this task does not compute, naming the key and the choices.
    """
    name, mode = cfg.train.best_metric, cfg.train.best_mode
    known = CLASSIFICATION_METRICS if cfg.task == "classification" else ("loss", "ppl")
    if name in GENERATION_METRICS and cfg.task != "classification" and not cfg.train.eval_generate:
        raise ValueError(f"train.best_metric={name!r} needs answers at each evaluation: set train.eval_generate "
                         f"to the number of validation prompts to answer (e.g. 32)")
    if cfg.train.eval_generate and cfg.task != "classification":
        known = known + GENERATION_METRICS
    if name not in known:
        raise ValueError(f"train.best_metric={name!r} is not computed by the validation of task={cfg.task}; "
                         f"choose one of {list(known)}")
    if mode == "auto":
        mode = "min" if name in ("loss", "ppl") else "max"
    return name, 1 if mode == "min" else -1


def _order_hash(sources: list[str]) -> str:
    """A short fingerprint of the examples of one optimizer step, in order (for exact-resume checks)."""
    return hashlib.sha256("\n".join(sources).encode("utf-8")).hexdigest()[:16]


def _split_window(window: list[dict], parts: int) -> list[dict]:
    """Cuts each micro-batch into ``parts`` smaller ones along the batch dimension, keeping the order."""
    if parts == 1:
        return window
    out = []
    for batch in window:
        rows = len(batch["input_ids"])
        size = -(-rows // parts)
        out.extend({k: v[i:i + size] for k, v in batch.items()} for i in range(0, rows, size))
    return out


def _free_memory(accelerator: Accelerator) -> None:
    import gc

    gc.collect()
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()


def backward_window(model, window: list[dict], accelerator: Accelerator,
                    after_micro: Callable[[], None] | None = None,
                    label_smoothing: float = 0.0, chunk_tokens: int = 0,
                    fused_ce=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulates the gradients of one optimizer step's micro-batches into ``.grad``.

    The loss is normalised by the labelled tokens of the whole window on every process, so
    accumulation and data parallelism give the same gradient as one big batch (DDP averages
    gradients over processes, hence the ``num_processes`` factor).

    Returns:
        The summed token loss of this process (detached) and the window's labelled-token count over
        all processes.
    """
    n_local = sum(count_loss_tokens(b["labels"]) for b in window).to(accelerator.device)
    n_global = accelerator.reduce(n_local, "sum").clamp(min=1)
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(window):
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}  # pinned: async
        sync = nullcontext() if i == len(window) - 1 else accelerator.no_sync(model)
        with sync, accelerator.autocast():
            micro = forward_loss(model, batch, label_smoothing, chunk_tokens, fused_ce)
        accelerator.backward(micro * accelerator.num_processes / n_global)
        loss_sum += micro.detach()
        if after_micro is not None:
            after_micro()
    return loss_sum, n_global


def _progress(console: Console, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, disable=not enabled)
