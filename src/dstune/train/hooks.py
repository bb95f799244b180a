"""The hooks of the step loop, called in a fixed order after every optimizer step.

``Hooks.after_step`` runs, in this order: layer diagnostics, the stability guard's snapshot, the loss log
(console, ``metrics.jsonl``, TensorBoard), evaluation and early stopping, the checkpoint policy, fault
injection (tests), and the stop signals (SIGTERM/SIGINT: save, then stop). Each hook reads and writes the
run's ``TrainState``; none of them branches on the method or the task.
"""

from __future__ import annotations

import gc
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console

from dstune.errors import DstuneError
from dstune.report.logger import MetricsLogger
from dstune.rundir import RunDir
from dstune.train.batching import Prefetcher
from dstune.train.build import Run
from dstune.train.checkpoint import prune_checkpoints, save_checkpoint
from dstune.train.diagnostics import LayerDiagnostics
from dstune.train.faults import Faults
from dstune.train.guard import StabilityGuard
from dstune.train.regularize import EarlyStopping
from dstune.train.schedules import current_lr
from dstune.train.signals import StopRequest, TrainingInterrupted
from dstune.train.state import TrainState
from dstune.train.sysmetrics import SystemMetrics
from dstune.train.tasks import TASKS


def free_memory(engine) -> None:
    gc.collect()
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()


def ranks_out_of_memory(engine, where: str, micro: int) -> DstuneError:
    """The error a rank of a multi-process run stops with on out-of-memory. One process halves its batch
    and retries (``Hooks.out_of_memory``); a rank cannot, because the others are already inside the
    step's collectives with the old batch, and they would wait for it until the process-group timeout.
    Stopping makes the launcher end the other ranks at once; the run resumes from its last checkpoint."""
    return DstuneError(
        f"out of memory on rank {engine.process_index} of {engine.num_processes} at {where} (micro-batch "
        f"{micro}); a multi-process run cannot shrink one rank's batch mid-step, so it stops. Halve "
        "train.micro_batch_size and double train.grad_accum (the same rows per step) and resume with "
        "--resume --allow-config-change"
    )


class Hooks:
    """Everything that happens around the optimizer steps of one session of a run.

    Args:
        run: what ``build`` made.
        run_dir: the run directory (written by the main process only).
        state: the loop's state, restored from a checkpoint or new.
        console: where the main process prints.
        on_eval: called with (step, metrics) after each evaluation (a search's pruner; may raise).
    """

    def __init__(
        self,
        run: Run,
        run_dir: RunDir,
        state: TrainState,
        console: Console,
        on_eval: Callable[[int, dict[str, float]], None] | None = None,
    ):
        cfg, engine = run.cfg, run.engine
        self.run, self.run_dir, self.state, self.on_eval = run, run_dir, state, on_eval
        self.is_main = engine.is_main_process
        self.say = (
            (lambda text, style=None: console.print(text, style=style, markup=False, highlight=False))
            if self.is_main
            else (lambda text, style=None: None)
        )
        self.faults = Faults()
        self.events = {"oom_backoffs": 0, "eval_oom_backoffs": 0}
        self.logger = MetricsLogger(run_dir.path, enabled=self.is_main)
        log = self.logger.log
        # GRPO's loss is a centred policy-gradient surrogate near 0, not a descent curve: spikes of it say
        # nothing, so only its gradient norm is watched.
        stability = (
            cfg.stability.model_copy(update={"detect_loss_spikes": False})
            if cfg.objective == "grpo"
            else None
        )
        self.guard = StabilityGuard(
            stability or cfg.stability,
            run.unwrapped,
            run.optimizer,
            run.scheduler,
            cfg.train.precision,
            run.data.train,
            log=lambda s, v: log(s, "stability", v),
            say=self.say,
        )
        self.diagnostics = LayerDiagnostics(
            cfg.stability, run.unwrapped, log=lambda s, v: log(s, "diag", v), say=self.say
        )
        self.metric, self.sign = cfg.train.best_metric, cfg.best_metric_sign()
        self.early = EarlyStopping(cfg.regularize, self.metric, self.sign, state.early)
        self.val_seen: dict = {}  # the last validation (step, value of train.best_metric)
        self.pending: list[torch.Tensor] = []  # per-step losses still on the device
        self.micro_done = state.step * cfg.train.grad_accum
        self.tokens_seen = self.padded_seen = 0
        self.t0, self.wall_before = time.perf_counter(), state.wall_s
        self.progress = _progress(console, enabled=self.is_main and cfg.train.progress)
        self.task = self.progress.add_task(
            "training", total=run.steps, completed=state.step, loss=float("nan")
        )
        self.stop = StopRequest(engine)
        # The next micro-batches are collated (and pinned, on CUDA) on a thread while this step computes.
        self.feed = Prefetcher(run.batches, cfg.train.prefetch, pin_memory=engine.device.type == "cuda")
        self.system = SystemMetrics(engine.device)
        self.penalty: float | None = None  # the EWC penalty of the last step (regularize.ewc_lambda)

    def __enter__(self) -> "Hooks":
        self.progress.__enter__()
        self.stop.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.feed.close()
        self.stop.__exit__(*exc)
        self.progress.__exit__(*exc)

    # ------------------------------------------------------------------ within a step

    def next_batch(self) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The next micro-batch and its row indices; the time waited for it counts as data wait."""
        t = time.perf_counter()
        out = self.feed.next()
        self.system.waited(time.perf_counter() - t)
        return out

    def after_micro(self) -> None:
        self.micro_done += 1
        self.faults.kill("micro", self.micro_done)

    def count_tokens(self, window: list[dict]) -> None:
        self.tokens_seen += sum(
            int(b["attention_mask"].sum()) for b in window
        )  # host tensors: no device sync
        self.padded_seen += sum(b["attention_mask"].numel() for b in window)

    def out_of_memory(self, window: list[dict], error: torch.OutOfMemoryError) -> None:
        """Halves the micro-batch and doubles accumulation after an out-of-memory error in a step: the same
        examples and tokens per optimizer step, so the update is unchanged (the loss is per token)."""
        state, tc = self.state, self.run.cfg.train
        self.run.optimizer.zero_grad(set_to_none=True)
        free_memory(self.run.engine)
        if self.run.engine.num_processes > 1:
            raise ranks_out_of_memory(
                self.run.engine, f"step {state.step + 1}", tc.micro_batch_size
            ) from error
        if max(len(b["input_ids"]) for b in window) // state.split <= 1:
            raise error
        state.split *= 2
        self.events["oom_backoffs"] += 1
        self.say(
            f"out of memory at step {state.step + 1}: micro-batch {tc.micro_batch_size} -> "
            f"{-(-tc.micro_batch_size // state.split)}, accumulation x{state.split}; retrying the step",
            "yellow",
        )

    # ------------------------------------------------------------------ after a step, in order

    def after_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Runs the hooks of a finished step in their fixed order; returns True to stop (early stopping)."""
        step, steps, tc = self.state.step, self.run.steps, self.run.cfg.train
        self.system.step_done()
        self.diagnostics.after_step(step)
        self.guard.after_step(step)
        self.pending.append(loss)
        self.progress.update(self.task, advance=1)
        if step % tc.log_every == 0 or step == steps:
            self.log_train(grad_norm)
        if tc.eval_every and step % tc.eval_every == 0 and step < steps:
            if self.early.update(step, self.validate(), self.run.unwrapped):
                return True  # early stopping: patience ran out
        if tc.save_every and step % tc.save_every == 0 and step < steps:
            self.checkpoint()
        self.faults.kill("step", step)
        if self.stop.requested() and step < steps:
            path = self.checkpoint()
            raise TrainingInterrupted(
                f"stopped by {self.stop.signal_name or 'a signal to another process of this run'} after step "
                f"{step}/{steps}; checkpoint saved in {path}. Resume with: "
                f"dstune train {self.run_dir.config} --resume{launch_flags(self.run.engine.num_processes)}"
            )
        self.system.restart()  # evaluation and checkpoints above are not the next step's time
        return False

    def flush_losses(self) -> None:
        if self.pending:
            self.state.losses.extend(torch.stack(self.pending).float().tolist())  # one host-device sync
            self.pending.clear()

    def log_train(self, grad_norm: torch.Tensor) -> None:
        self.flush_losses()
        losses, run = self.state.losses, self.run
        self.progress.update(self.task, loss=losses[-1])
        self.logger.log(
            self.state.step,
            "train",
            {
                "loss": losses[-1],
                "lr": current_lr(run.scheduler, run.cfg.optim),
                "grad_norm": float(grad_norm),
                "tokens_per_s": self.tokens_seen / (time.perf_counter() - self.t0),
                "padding_share": round(1 - self.tokens_seen / max(self.padded_seen, 1), 4),
                "epoch": run.batches.epoch(),
                # a preference objective's implicit rewards since the last log (objective=dpo, ...)
                **(run.objective.take_metrics() if hasattr(run.objective, "take_metrics") else {}),
                **({"ewc_penalty": self.penalty} if self.penalty is not None else {}),
            },
        )
        self.logger.log(self.state.step, "system", self.system.take())

    def validate(self) -> dict[str, float]:
        """Validation metrics of the current weights; an out-of-memory halves the evaluation batch only."""
        run, step = self.run, self.state.step
        micro = run.cfg.train.micro_batch_size
        while True:
            try:
                self.faults.oom("eval", step)
                metrics = TASKS[run.cfg.task].validate(run, micro)
                break
            except torch.OutOfMemoryError as error:
                if run.engine.num_processes > 1:
                    raise ranks_out_of_memory(run.engine, f"evaluation after step {step}", micro) from error
                if micro == 1:
                    raise
                micro //= 2
                self.events["eval_oom_backoffs"] += 1
                free_memory(run.engine)
                self.say(f"out of memory in evaluation: evaluation micro-batch -> {micro}", "yellow")
        if metrics:
            self.logger.log(step, "val", metrics)
            self.val_seen.update(step=step, loss=metrics["loss"], value=metrics[self.metric])
            for sample in getattr(run.objective, "samples", ()) if self.is_main else ():  # GRPO's completions
                self.run_dir.append_jsonl(RunDir.COMPLETIONS, {"step": step, **sample})
            if self.on_eval is not None:
                self.on_eval(step, metrics)
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> Path:
        """Saves a checkpoint of the current step (main process), keeps the best, prunes the rest."""
        self.flush_losses()
        state, run = self.state, self.run
        path = self.run_dir.checkpoint(state.step)
        trainable = run.engine.gather_state(run.unwrapped, run.optimizer)  # every rank (sharded: a gather)
        if self.is_main:
            state.position, state.wall_s = run.batches.position, self.wall_s()
            improved = self.update_best(path)  # before saving: the checkpoint's state knows it is the best
            save_checkpoint(
                path,
                trainable,
                run.scheduler,
                state.to_json(),
                fault=lambda: self.faults.kill("save", state.step),
            )
            self.retain(improved)
        run.engine.wait_for_everyone()
        return path

    def update_best(self, path: Path) -> bool:
        """Makes ``path`` the best checkpoint if this step's validation beats the best so far."""
        seen, best, step = self.val_seen, self.state.best, self.state.step
        if (
            seen.get("step") != step
            or not math.isfinite(seen["value"])
            or self.sign * seen["value"] >= self.sign * best.get("value", self.sign * math.inf)
        ):
            return False
        best.update(
            metric=self.metric,
            mode="min" if self.sign > 0 else "max",
            value=seen["value"],
            loss=seen["loss"],
            path=str(path),
            step=step,
        )
        return True

    def retain(self, improved: bool) -> None:
        """Retention keeps the newest K checkpoints and the one with the best ``train.best_metric`` so far."""
        best = self.state.best
        if improved:
            self.run_dir.write_json(RunDir.BEST, best)
        keep = {Path(best["path"])} if "path" in best else set()
        prune_checkpoints(self.run_dir.path, self.run.cfg.train.keep_checkpoints, keep=keep)

    def wall_s(self) -> float:
        """Seconds of training over all sessions of the run (earlier ones from the checkpoint)."""
        return round(self.wall_before + time.perf_counter() - self.t0, 2)

    def summary(self) -> dict:
        """The events of this session, for ``summary.json``."""
        padded = self.padded_seen
        return {
            "events": self.events,
            "micro_batch_split": self.state.split,
            "stability": self.guard.summary(),
            "early_stopping": self.early.summary(),
            "diagnostics_warnings": self.diagnostics.warnings,
            # padding in the micro-batches this session computed (packing / length grouping lower it)
            "padding_share": round(1 - self.tokens_seen / padded, 4) if padded else None,
        }


def launch_flags(world: int) -> str:
    """The launch flags that start this run again: ``--nproc`` for torchrun's processes per machine."""
    if world == 1:
        return ""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    machines = " (on each machine, with the same --nnodes, --master-addr)" if local != world else ""
    return f" --nproc {local}{machines}"


def _progress(console: Console, enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )
