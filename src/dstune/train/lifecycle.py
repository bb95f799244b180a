"""A run directory's life cycle: start, restart after an early crash, resume, and what a resume may change.

Every decision here is taken before anything is written. A directory that holds a run is never started
over unless it has no complete checkpoint (a crash before the first one: nothing to lose, and it says
so). A resume compares the whole config with the one the run started with: a key that decides the
checkpoint's shapes cannot change; a key that decides the optimisation (lr, batch, seed, data) changes
only with ``--allow-config-change``; any other change is printed and recorded in ``config_changes.jsonl``.
"""

from __future__ import annotations

import shutil
import time

from rich.console import Console

from dstune.config import RunConfig, load_config
from dstune.core.facts import file_sha256
from dstune.errors import DstuneError
from dstune.rundir import RunDir

# A resumed run continues the same optimisation only if these stay the same: they decide the data
# order, the rows and their tokens, the per-step batch and the update size.
RESUME_KEYS = (
    "optim.lr",
    "train.micro_batch_size",
    "train.grad_accum",
    "train.seed",
    "train.packing",
    "train.group_by_length",
    "data.train",
    "data.validation",
    "data.mix",
    "data.format",
    "data.split",
    "data.max_length",
    "data.overflow",
    "data.train_on",
    "data.max_samples",
    "data.system",
    "data.reasoning",
    "data.text_column",
    "data.label_column",
)
# Written by a run; removed when a run that crashed before its first checkpoint is started again.
_RUN_FILES = (
    RunDir.CONFIG,
    RunDir.RUN,
    RunDir.DATA_REPORT,
    RunDir.METRICS,
    RunDir.SUMMARY,
    RunDir.BEST,
    RunDir.CHANGES,
    RunDir.LABELS,
    RunDir.LOSS_PLOT,
)


class RunDirError(DstuneError, RuntimeError):
    """The output directory cannot be used as asked; the message says what to do instead."""


def open_run_dir(
    run_dir: RunDir, cfg: RunConfig, resume: bool, allow_change: bool, console: Console
) -> tuple[object, list[dict]]:
    """Decides how a run starts in ``run_dir``; writes nothing except removing a crashed start's files.

    Returns:
        The checkpoint to resume from (None: start from step 0) and the config changes of a resume.

    Raises:
        RunDirError: a run would be overwritten, or a resume changes what it may not; the message says
            what to do.
    """
    latest = run_dir.latest_checkpoint()
    finished = run_dir.summary.is_file() or (run_dir / RunDir.FINAL).is_dir()
    if latest is None and run_dir.is_run() and finished:  # its checkpoints were deleted: keep its final/
        raise RunDirError(
            f"{run_dir} holds a finished run (final/, summary.json) without checkpoints to resume "
            f"from; choose another --output (nothing was changed)"
        )
    if latest is None and run_dir.is_run():
        where = "--resume found no complete checkpoint" if resume else "it holds a run"
        console.print(
            f"{run_dir}: {where}; that run stopped before its first checkpoint, so it is started "
            f"again from step 0",
            style="yellow",
            markup=False,
            highlight=False,
        )
        _clear(run_dir)
        return None, []
    if latest is None and resume:
        raise RunDirError(
            f"--resume: {run_dir} holds no run to resume; run the same command without --resume to start it"
        )
    if latest is not None and not resume:
        raise RunDirError(
            f"{run_dir} already holds a run; pass --resume to continue it, or choose another "
            f"--output (nothing was changed)"
        )
    return latest, (config_changes(run_dir, cfg, allow_change) if latest is not None else [])


def _clear(run_dir: RunDir) -> None:
    for name in _RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for folder in (run_dir.tensorboard, run_dir.checkpoints):
        shutil.rmtree(folder, ignore_errors=True)


def _flat(node, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    out = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def config_changes(run_dir: RunDir, cfg: RunConfig, allow_change: bool) -> list[dict]:
    """Compares a resumed run's config and data files with what the run started with.

    Returns:
        The changes found, each ``{"key", "was", "now", "kind"}``; ``kind`` is ``setup`` (allowed by
        ``allow_change``) or ``other``.

    Raises:
        RunDirError: for a changed shape key (always), or a changed setup key without ``allow_change``.
    """
    saved = load_config(run_dir.config)
    was, now = _flat(saved.model_dump(mode="json")), _flat(cfg.model_dump(mode="json"))
    changes = [
        {"key": k, "was": was.get(k), "now": now.get(k)}
        for k in sorted(now)
        if k != "output" and not k.startswith("tune.") and was.get(k) != now.get(k)
    ]
    info = run_dir.read_json(RunDir.RUN)
    for key, path in (("data.train", cfg.data.train), ("data.validation", cfg.data.validation)):
        old = info.get("data_sha256" if key == "data.train" else "validation_sha256")
        if old and (digest := file_sha256(path)) != old:
            changes.append({"key": f"{key} (contents)", "was": old[:16], "now": (digest or "missing")[:16]})
    shape = set(saved.shape_keys())
    fixed = [c for c in changes if c["key"] in shape]
    if fixed:
        listed = "; ".join(f"{c['key']}: {c['was']} -> {c['now']}" for c in fixed)
        raise RunDirError(
            f"cannot resume {run_dir.path} with {listed}: these decide the shapes of what its "
            f"checkpoints hold (--allow-config-change cannot override them). Start a new run with "
            f"another --output instead."
        )
    for c in changes:
        c["kind"] = "setup" if c["key"].split(" ")[0] in RESUME_KEYS else "other"
    setup = [c for c in changes if c["kind"] == "setup"]
    if setup and not allow_change:
        listed = "; ".join(f"{c['key']}: {c['was']} -> {c['now']}" for c in setup)
        raise RunDirError(
            f"refusing to resume {run_dir.path} with a changed setup ({listed}). The resumed run "
            f"would not continue the same optimisation. Pass --allow-config-change to resume anyway "
            f"(the change is recorded in {RunDir.CHANGES}), or start a new --output."
        )
    return changes


def record_changes(run_dir: RunDir, changes: list[dict], step: int, console: Console | None) -> None:
    """Prints the changes of a resume and appends them to ``config_changes.jsonl``."""
    if not changes:
        return
    run_dir.append_jsonl(
        RunDir.CHANGES, {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "step": step, "changes": changes}
    )
    if console is not None:
        listed = "; ".join(f"{c['key']}: {c['was']} -> {c['now']}" for c in changes)
        console.print(
            f"resumed with changes ({listed}); recorded in {run_dir.changes}",
            style="yellow",
            markup=False,
            highlight=False,
        )
