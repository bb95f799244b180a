"""The run directory's own bookkeeping: refusing to overwrite a run, and checking a resume."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from dstune.config import RunConfig, load_config
from dstune.train.checkpoint import latest_checkpoint

# A resumed run continues the same optimisation only if these stay the same: they decide the data
# order, the per-step batch and the update size. Anything else (logging, eval interval, max_steps)
# may change freely.
RESUME_KEYS = ("optim.lr", "train.micro_batch_size", "train.grad_accum", "train.seed", "data.train",
               "data.validation", "method", "model.name")


class RunDirError(RuntimeError):
    """The output directory cannot be used as asked; the message says what to do instead."""


def file_sha256(path: str | None) -> str | None:
    """SHA-256 of a data file, or None when there is no file."""
    if not path or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuses to start a new run over an existing one, and to resume a run that has no checkpoint."""
    has_run = (run_dir / "run.json").exists() or any((run_dir / "checkpoints").glob("step-*"))
    if has_run and not resume:
        raise RunDirError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another "
                          f"--output (nothing was changed)")
    if resume and latest_checkpoint(run_dir) is None:
        raise RunDirError(f"--resume: {run_dir} has no complete checkpoint to resume from")


def _get(cfg: RunConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def check_resume(run_dir: Path, cfg: RunConfig, allow_change: bool) -> list[dict]:
    """Compares a resumed run's config and data file with what the run started with.

    Args:
        run_dir: the run being resumed.
        cfg: the config it is resumed with.
        allow_change: accept changes (``--allow-config-change``); they are appended to
            ``config_changes.jsonl`` in the run directory.

    Returns:
        The changes found (empty when none).

    Raises:
        RunDirError: listing each change, unless ``allow_change``.
    """
    saved = load_config(run_dir / "config.yaml")
    changes = [{"key": k, "was": _get(saved, k), "now": _get(cfg, k)} for k in RESUME_KEYS
               if _get(saved, k) != _get(cfg, k)]
    info = json.loads((run_dir / "run.json").read_text(encoding="utf-8")) if (run_dir / "run.json").exists() else {}
    digest = file_sha256(cfg.data.train)
    if info.get("data_sha256") and digest != info["data_sha256"]:
        changes.append({"key": "data.train (contents)", "was": info["data_sha256"][:16], "now": (digest or "")[:16]})
    if changes and not allow_change:
        listed = "; ".join(f"{c['key']}: {c['was']} -> {c['now']}" for c in changes)
        raise RunDirError(f"refusing to resume {run_dir} with a changed setup ({listed}). The resumed run would "
                          f"not continue the same optimisation. Pass --allow-config-change to resume anyway "
                          f"(the change is recorded in config_changes.jsonl), or start a new --output.")
    if changes:
        with (run_dir / "config_changes.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": changes}, default=str) + "\n")
    return changes
