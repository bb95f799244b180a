"""The one training loop: ``train(cfg) -> RunResult``, shared by every method, the demo and each trial.

``build`` makes the run's objects, ``TrainState`` is what a checkpoint saves, ``RunDir`` names the files,
``Hooks`` do everything around a step in a fixed order. The loop keeps no module-level state: a search
trial or a test calls it as a function.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from safetensors.torch import save_file

from dstune.config import RunConfig, save_config
from dstune.core.facts import HostPeak, file_sha256
from dstune.core.shards import parse_size
from dstune.errors import DstuneError
from dstune.plan.autofit import apply_auto_fit, measured_peak, predicted_peak_mb
from dstune.quiet import output_console
from dstune.report.charts import plot_loss
from dstune.rundir import RunDir
from dstune.train.batching import split_by_length
from dstune.train.build import Run, build, resolve_auto_precision
from dstune.train.checkpoint import load_checkpoint, read_loop_state
from dstune.train.hooks import Hooks
from dstune.train.lifecycle import RunDirError, open_run_dir, record_changes  # noqa: F401  (RunDirError: API)
from dstune.train.objective import Objective, SupervisedObjective
from dstune.train.optim import clip_gradients
from dstune.train.schedules import change_length, phased_factor
from dstune.train.state import TrainState
from dstune.train.stream_save import drain, save_streamed
from dstune.train.tasks import TASKS


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
    task: str = "lm"

    @property
    def final_loss(self) -> float:
        return self.train_losses[-1] if self.train_losses else math.nan


def train(
    cfg: RunConfig,
    *,
    resume: bool = False,
    allow_config_change: bool = False,
    console: Console | None = None,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
) -> RunResult:
    """Fine-tunes ``cfg.model`` on ``cfg.data`` with ``cfg.method`` and writes a run directory.

    Args:
        cfg: the run configuration (validated: every cross-field rule was checked when it was made).
        resume: continue from the newest complete checkpoint in ``cfg.output``.
        allow_config_change: resume even if the lr, batch, seed or data changed (recorded).
        console: where to print; defaults to stdout.
        on_eval: called with (step, validation metrics) after every evaluation; a hyperparameter search
            reports to its pruner here and may raise to stop the run (e.g. ``optuna.TrialPruned``).

    Returns:
        RunResult with per-step training losses, final validation metrics and paths.
    """
    console = console or output_console()
    cfg = cfg.absolute()  # the saved config.yaml reproduces the run from any folder
    run_dir = RunDir(cfg.output)
    check_inputs(cfg)
    cfg, precision = resolve_auto_precision(cfg)  # saved as decided: a resume elsewhere sees the change
    if precision != cfg.train.precision:
        console.print(f"precision: {precision}", highlight=False)
    cfg, fitted = apply_auto_fit(cfg, console)  # nothing fits: refused before anything is written
    memory = {"auto_fit": fitted, "predicted_mb": predicted_peak_mb(cfg)}
    ckpt, changes = open_run_dir(run_dir, cfg, resume, allow_config_change, console)
    state = TrainState.from_json(read_loop_state(ckpt)) if ckpt else TrainState()
    run = build(cfg, console, schedule=state.schedule)
    if ckpt:
        restore(run, state, ckpt, console)
    start_files(run, run_dir, changes, state.step, console)
    with Hooks(run, run_dir, state, console, on_eval) as hooks:
        while state.step < run.steps:
            done = train_step(run, state, hooks)
            if done is None or hooks.after_step(*done):
                break
    return finish(run, run_dir, state, hooks, memory)


def train_step(run: Run, state: TrainState, hooks: Hooks) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One optimizer step: forward and backward over the accumulation window, the stability guard's
    verdict, the update. Returns the step's loss and gradient norm, or None when the guard halts the run
    (the weights stay the last step's)."""
    cfg = run.cfg
    served = [hooks.next_batch() for _ in range(cfg.train.grad_accum)]
    window, rows = [b for b, _ in served], [i for _, idx in served for i in idx]
    state.order.append(order_hash([run.data.train[i].get("source", str(i)) for i in rows]))
    while True:
        try:
            hooks.faults.oom("step", state.step + 1)
            prepared = run.objective.prepare(run.model, split_window(window, state.split), run.engine)
            passes = split_by_length(prepared, run.speed["split_by_length"])
            loss_sum, n_global = backward_window(
                run.model, passes, run.engine, run.objective, hooks.after_micro
            )
            break
        except torch.OutOfMemoryError as error:
            hooks.out_of_memory(window, error)
    hooks.count_tokens(passes)  # the padding computed, after split_by_length trimmed it
    if run.penalty is not None:  # EWC: its gradient joins the accumulated one, before clipping
        hooks.penalty = run.penalty.add_gradients(run.unwrapped)
    loss_sum = hooks.guard.inject(state.step + 1, loss_sum, run.params)
    hooks.diagnostics.before_step(state.step + 1)
    grad_norm = clip_gradients(run.params, cfg.optim, run.engine)
    loss_t = (run.engine.reduce(loss_sum, "sum") / n_global).detach()
    # The guard decides this step's update from its loss and gradient norm, so it reads them now (a
    # host-device sync per step); with stability.policy=off nothing is read from the device except at
    # logging steps, and the GPU runs ahead of the host.
    loss = loss_t.item() if cfg.stability.policy != "off" else loss_t
    action = hooks.guard.check(state.step + 1, loss, grad_norm, rows)
    if action == "halt":
        state.order.pop()
        return None
    if action == "step":
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return loss_t, grad_norm


def check_inputs(cfg: RunConfig) -> None:
    """Refuses a run whose data files are missing, naming the key, or that needs vLLM where it is not
    installed, before anything is written."""
    files = [("data.train", cfg.data.train), ("data.validation", cfg.data.validation)]
    files += [(f"data.mix[{i}].path", s.path) for i, s in enumerate(cfg.data.mix)]
    if cfg.data.train is None and not cfg.data.mix:
        raise DstuneError("no training data: pass --data FILE or set data.train (or data.mix) in the config")
    for key, path in files:
        if path is not None and not Path(path).is_file():
            raise DstuneError(f"{key}: data file not found: {path}")
    if cfg.objective == "grpo" and cfg.grpo.generation == "vllm":
        from dstune.train.vllm_rollout import check_vllm_installed

        check_vllm_installed()


def restore(run: Run, state: TrainState, ckpt: Path, console: Console) -> None:
    """Loads a checkpoint into the built run; a changed run length gets its own lr phase (printed)."""
    trainable, _ = load_checkpoint(ckpt, run.unwrapped, run.scheduler)
    run.engine.load_state(run.unwrapped, run.optimizer, trainable)
    run.batches.position = state.position
    phase = change_length(state.schedule, state.step, run.steps, run.cfg.optim)
    if phase is not None:  # the optimizer holds the lr of the old schedule for this step: set the new one
        factor = phased_factor(state.step, state.schedule, run.cfg.optim)
        for group, base in zip(run.optimizer.param_groups, run.scheduler.base_lrs):
            group["lr"] = base * factor
    if run.engine.is_main_process:
        console.print(f"resumed from {ckpt} at step {state.step}", markup=False, highlight=False)
        if phase is not None:
            console.print(
                f"the run's length changed to {run.steps} steps: from step {state.step + 1} the lr "
                f"continues from {phase['factor']:.3g} x optim.lr and decays to the floor "
                f"(optim.min_lr_ratio) over the remaining steps",
                style="yellow",
                markup=False,
            )


def start_files(run: Run, run_dir: RunDir, changes: list[dict], step: int, console: Console) -> None:
    """Writes what a run directory says about the run (main process): config, run.json, data report."""
    if not run.engine.is_main_process:
        return
    run_dir.path.mkdir(parents=True, exist_ok=True)
    record_changes(run_dir, changes, step, console)
    cfg = run.cfg
    save_config(cfg, run_dir.config)
    run_dir.write_json(RunDir.DATA_REPORT, run.data.report)
    run_dir.write_json(
        RunDir.RUN,
        {
            "base_model": run.resolved.path,
            "model": cfg.model.name,
            "family": run.resolved.family,
            "method": cfg.method,
            "final": RunDir.FINAL,
            "data_sha256": file_sha256(cfg.data.train),
            "validation_sha256": file_sha256(cfg.data.validation),
            "task": cfg.task,
        },
    )
    if (save := TASKS[cfg.task].save) is not None:
        save(run_dir.path, run.data)
    if run.penalty is not None:
        save_file(run.penalty.fisher, str(run_dir / RunDir.FISHER))


def finish(run: Run, run_dir: RunDir, state: TrainState, hooks: Hooks, memory: dict) -> RunResult:
    """The end of a run: last checkpoint, evaluation, the kept weights, ``final/``, plots, summary
    (``memory``: the planner's prediction and auto-fit decision, to which the measured peak is added)."""
    hooks.flush_losses()
    final_ckpt = hooks.checkpoint()
    end_val = hooks.validate()
    if hooks.is_main and final_ckpt.exists():  # the last checkpoint can be the best one too
        hooks.retain(hooks.update_best(final_ckpt))
    val = hooks.early.finish(
        state.step, end_val, run.unwrapped, hooks.validate
    )  # keep_best restores the best
    final_dir = None
    memory = {**memory, **peaks(run.engine, run.speed.get("startup_peak_mb"))}  # the training's peaks
    with HostPeak() as saving:
        # Every rank: a sharded engine gathers an adapter on rank 0, or a whole model one tensor at a time.
        weights = run.engine.final_state(run.unwrapped)
        if hooks.is_main:
            final_dir = save_final(
                run.unwrapped, run.tokenizer, run.template, run_dir / RunDir.FINAL, weights,
                parse_size(run.cfg.train.save_shard_size),
            )  # fmt: skip
        elif weights is not None and not isinstance(weights, dict):
            drain(weights)
    memory |= per_rank(run.engine, "final_save_mb", saving.mb)
    if hooks.is_main:
        plot_loss(run_dir.path)
    hooks.logger.close()
    summary = {
        "steps": state.step,
        "final_train_loss": state.losses[-1] if state.losses else None,
        "val": val,
        **hooks.summary(),
        "trainable": run.trainable,
        "data": run.data.report,
        "speed": run.speed,
        "memory": memory,
        "wall_s": hooks.wall_s(),
    }
    if hooks.is_main:
        run_dir.write_json(RunDir.SUMMARY, summary)
    return RunResult(
        run_dir.path, state.step, state.losses, val, final_dir, summary, run.unwrapped, run.cfg.task
    )


def peaks(engine, startup_mb: float | None = None) -> dict:
    """The measured peak (``plan.autofit.measured_peak``) of rank 0 and, in a multi-process run, of every
    rank (``measured_mb_per_rank``), with each rank's host-memory peak once the model was loaded and
    sharded (``startup_mb_per_rank``: under fsdp2 and zero2 every rank loads the whole model before its
    engine shards it, see docs/benchmarks.md "Sharded training"). Every rank calls it, before the final
    save (whose host memory ``finish`` measures apart: ``final_save_mb``)."""
    peak = measured_peak(engine.device)
    if engine.num_processes > 1:
        peak |= per_rank(engine, "measured_mb", peak["measured_mb"])
        if startup_mb is not None:
            peak["startup_mb_per_rank"] = per_rank(engine, "startup_mb", startup_mb)["startup_mb_per_rank"]
    return peak


def per_rank(engine, key: str, value: float | None) -> dict:
    """``{key: rank 0's value}`` and, in a multi-process run, ``{key}_per_rank`` (every rank calls it)."""
    if value is None:
        return {}
    if engine.num_processes == 1:
        return {key: value}
    mine = torch.zeros(engine.num_processes, dtype=torch.float64, device=engine.device)
    mine[engine.process_index] = value
    every = [round(x, 1) for x in engine.reduce(mine, "sum").tolist()]
    return {key: every[0], f"{key}_per_rank": every}


def save_final(
    model, tokenizer, chat_template: str | None, out: Path, weights=None, max_bytes: int | None = None
) -> Path:
    """Saves the trained model: an adapter in peft's format, or a full model, plus the tokenizer.

    ``save_pretrained`` writes safetensors in both cases, so plain transformers/peft load the result;
    ``weights``: the model's weights gathered from a sharded engine (None: the model's own), a dict, or
    for a whole model an iterator that gathers them one at a time while they are written (``stream_save``)
    into files of at most ``max_bytes``.
    """
    out.mkdir(parents=True, exist_ok=True)
    if weights is not None and not isinstance(weights, dict):
        save_streamed(model, weights, out, max_bytes)
    else:
        extra = {"state_dict": weights} if weights is not None else {}
        model.save_pretrained(str(out), safe_serialization=True, **extra)
    if chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(out))
    return out


def order_hash(sources: list[str]) -> str:
    """A short fingerprint of the examples of one optimizer step, in order (for exact-resume checks)."""
    return hashlib.sha256("\n".join(sources).encode("utf-8")).hexdigest()[:16]


def split_window(window: list[dict], parts: int) -> list[dict]:
    """Cuts each micro-batch into ``parts`` smaller ones along the batch dimension, keeping the order."""
    if parts == 1:
        return window
    out = []
    for batch in window:
        rows = len(batch["input_ids"])
        size = -(-rows // parts)
        out.extend({k: v[i : i + size] for k, v in batch.items()} for i in range(0, rows, size))
    return out


def backward_window(
    model,
    window: list[dict],
    engine,
    objective: Objective | None = None,
    after_micro: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulates the gradients of one optimizer step's micro-batches into ``.grad``.

    The loss is normalised by the units (labelled tokens) of the whole window on every process, so
    accumulation and data parallelism give the same gradient as one big batch (DDP averages gradients
    over processes, hence the ``num_processes`` factor).

    Returns:
        The summed loss of this process (detached) and the window's unit count over all processes.
    """
    objective = objective or SupervisedObjective()
    n_local = sum(objective.units(b) for b in window).to(engine.device)
    n_global = engine.reduce(n_local, "sum").clamp(min=1)
    loss_sum = torch.zeros((), device=engine.device)
    for i, batch in enumerate(window):
        batch = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}  # pinned: async
        sync = nullcontext() if i == len(window) - 1 else engine.no_sync(model)
        with sync, engine.autocast():
            micro = objective.loss_sum(model, batch)
        # A micro-batch whose forward skipped every trainable layer (regularize.layerdrop with an adapter
        # method) has a loss with no gradient: it adds nothing to the step's gradient, so it gets no backward.
        if micro.requires_grad:
            engine.backward(micro * engine.num_processes / n_global)
        loss_sum += micro.detach()
        if after_micro is not None:
            after_micro()
    return loss_sum, n_global
