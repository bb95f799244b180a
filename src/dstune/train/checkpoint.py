"""Checkpoints as safetensors and JSON: trainable weights, optimizer, scheduler, RNG and data position.

No pickle anywhere: torch's own ``optimizer.state_dict()`` is a nest of tensors and numbers, so we
flatten its tensors into a safetensors file keyed by parameter name and keep the rest as JSON.

Crash safety: a checkpoint is written into ``step-N.tmp``, every file fsynced, a manifest with the
SHA-256 of every file written, then the completeness marker, then the directory renamed into place and
the parent directory fsynced. A directory without the marker is never loaded; loading re-hashes every
file against the manifest and names the one that changed or went missing.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from dstune.core.facts import file_sha256, restore_trainable, snapshot_trainable
from dstune.errors import DstuneError
from dstune.rundir import COMPLETE, RunDir

MANIFEST = "manifest.json"


class CheckpointError(DstuneError, RuntimeError):
    """A checkpoint that cannot be written or trusted; the message names the file and what to do."""


def _flatten(prefix: str, state: dict, tensors: dict, scalars: dict) -> None:
    """Splits one parameter's optimizer state into tensors and JSON scalars under ``prefix::field``.
    Nested dicts (bitsandbytes keeps its 8-bit quantisation state in one) get ``field/sub`` keys."""
    for key, value in state.items():
        if isinstance(value, dict):
            _flatten(f"{prefix}{key}/", value, tensors, scalars)
        elif torch.is_tensor(value):
            tensors[f"{prefix}{key}"] = value.detach().cpu().contiguous()
        else:
            scalars[f"{prefix}{key}"] = value


@dataclass
class Trainable:
    """What a checkpoint holds of the model and optimizer, whole (gathered from the shards when the
    engine shards them), so a checkpoint is the same files whatever engine wrote or reads it.

    Attributes:
        weights: the trainable parameters by name.
        order: the parameter names in the optimizer's order (its state is keyed by position).
        optimizer: ``optimizer.state_dict()`` form: ``{"state": {position: {...}}, "param_groups": [...]}``.
    """

    weights: dict[str, torch.Tensor]
    order: list[str]
    optimizer: dict

    @classmethod
    def empty(cls) -> "Trainable":
        """What a rank other than 0 holds after a gather (rank 0 writes the files)."""
        return cls({}, [], {"state": {}, "param_groups": []})

    @classmethod
    def from_named(cls, weights: dict[str, torch.Tensor], by_name: dict) -> "Trainable":
        """From an optimizer state keyed by parameter name (torch.distributed.checkpoint's form, whose
        ``param_groups`` list names), in the group order."""
        order = [n for g in by_name["param_groups"] for n in g["params"]]
        index = {n: i for i, n in enumerate(order)}
        sd = {
            "state": {index[n]: s for n, s in by_name["state"].items()},
            "param_groups": [
                g | {"params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]
            ],
        }
        return cls(weights, order, sd)

    def named_optimizer(self) -> dict:
        """The optimizer state keyed by parameter name (``from_named``'s input form)."""
        sd, order = self.optimizer, self.order
        return {
            "state": {order[i]: s for i, s in sd["state"].items()},
            "param_groups": [g | {"params": [order[i] for i in g["params"]]} for g in sd["param_groups"]],
        }


def group_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The parameter names of each optimizer group, in the optimizer's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def local_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Trainable:
    """The ``Trainable`` of a model and optimizer that this process holds whole (one process, or DDP)."""
    order = [n for names in group_names(model, optimizer) for n in names]
    return Trainable(snapshot_trainable(model, copy=False), order, optimizer.state_dict())


def apply_local(model: nn.Module, optimizer: torch.optim.Optimizer, trainable: Trainable) -> None:
    """Puts a ``Trainable`` back into a model and optimizer that this process holds whole."""
    restore_trainable(model, trainable.weights)
    optimizer.load_state_dict(trainable.optimizer)


def _optimizer_files(trainable: Trainable) -> tuple[dict, dict]:
    sd, order = trainable.optimizer, trainable.order
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        _flatten(f"{order[idx]}::", state, tensors, scalars)
    groups = [
        {k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in sd["param_groups"]
    ]
    return tensors, {"param_names": order, "param_groups": groups, "scalars": scalars}


def _read_optimizer(tensors: dict, meta: dict) -> dict:
    order = meta["param_names"]
    index = {name: i for i, name in enumerate(order)}
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        name, field = key.rsplit("::", 1)
        *outer, leaf = field.split("/")
        node = state.setdefault(index[name], {})
        for part in outer:
            node = node.setdefault(part, {})
        node[leaf] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict, dict]:
    """The torch (CPU and CUDA), Python and numpy generators' states: tensors and JSON metadata."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    v, st, gauss = meta["python"]
    random.setstate((v, tuple(st), gauss))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_files(tmp: Path, trainable: Trainable, scheduler, loop_state: dict) -> None:
    save_file(trainable.weights, str(tmp / "trainable.safetensors"))
    opt_tensors, opt_meta = _optimizer_files(trainable)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    state = {"loop": loop_state, "scheduler": scheduler.state_dict(), "optimizer": opt_meta, "rng": rng_meta}
    (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    for f in files:
        _fsync(f)
    manifest = {
        "step": loop_state.get("step"),
        "files": {f.name: {"sha256": file_sha256(f), "bytes": f.stat().st_size} for f in files},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    _fsync(tmp / MANIFEST)
    # The marker comes last: a directory that has it has everything the manifest lists.
    (tmp / COMPLETE).write_text("ok\n")
    _fsync(tmp / COMPLETE)


def save_checkpoint(
    path: Path,
    trainable: Trainable,
    scheduler,
    loop_state: dict,
    fault: Callable[[], None] | None = None,
) -> Path:
    """Writes a checkpoint directory atomically and verifies it.

    Args:
        path: the final directory, e.g. ``run/checkpoints/step-000100``.
        trainable: the weights and optimizer state (``local_state``, or an engine's ``gather_state``).
        loop_state: JSON-serialisable loop position (step, micro-batch position, loss history...).
        fault: test hook called between writing the files and the rename (fault injection).

    Raises:
        CheckpointError: when the disk is full or the write fails; the temporary directory is removed
            and every earlier checkpoint is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        _write_files(tmp, trainable, scheduler, loop_state)
        if fault is not None:
            fault()
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync(path.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(path.parent.parent)
        what = "the disk is full" if exc.errno == errno.ENOSPC else f"the write failed ({exc})"
        raise CheckpointError(
            f"could not save checkpoint {path}: {what}. Nothing was half-written; "
            f"the newest complete checkpoint is still {previous or 'none'}"
        ) from exc
    verify_checkpoint(path)
    return path


def verify_checkpoint(path: Path) -> None:
    """Re-hashes every file of a checkpoint against its manifest.

    Raises:
        CheckpointError: naming the checkpoint and the missing or changed file.
    """
    path = Path(path)
    if not (path / COMPLETE).exists() or not (path / MANIFEST).exists():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no {COMPLETE} marker or {MANIFEST}); "
            f"it was interrupted while being written"
        )
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    for name, entry in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: file {name} listed in the manifest is missing")
        if f.stat().st_size != entry["bytes"] or file_sha256(f) != entry["sha256"]:
            raise CheckpointError(
                f"checkpoint {path}: file {name} does not match its SHA-256 in the manifest "
                f"(changed or corrupted since it was written)"
            )


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    return RunDir(run_dir).latest_checkpoint()


def prune_checkpoints(run_dir: Path, keep_last: int, keep: set[Path] = frozenset()) -> list[Path]:
    """Deletes all but the newest ``keep_last`` complete checkpoints and those in ``keep`` (the best).

    Called only after the newest checkpoint was verified, so a failed save never costs an old one.
    Leftover ``.tmp`` directories of interrupted saves are removed too.

    Returns:
        The deleted directories.
    """
    done = RunDir(run_dir).list_checkpoints()
    doomed = [p for p in done[:-keep_last] if p not in keep] if keep_last > 0 else []
    doomed += list(RunDir(run_dir).checkpoints.glob("step-*.tmp"))
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def read_loop_state(path: Path) -> dict:
    """The loop state (``TrainState`` as JSON) of a complete checkpoint, verified against its manifest."""
    verify_checkpoint(path)
    return json.loads((Path(path) / "state.json").read_text(encoding="utf-8"))["loop"]


def load_checkpoint(path: Path, model: nn.Module, scheduler) -> tuple[Trainable, dict]:
    """Reads a checkpoint for ``model``: restores the scheduler and RNG, and returns the weights and
    optimizer state (for the engine's ``load_state``, which shards them where it shards) and the loop
    state."""
    path = Path(path)
    verify_checkpoint(path)
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise CheckpointError(
            f"{path}: checkpoint has parameters this model lacks, e.g. {unknown[:3]}; "
            f"was it made with another model or method?"
        )
    shapes = {n: getattr(p, "ds_shape", p.shape) for n, p in params.items()}  # ZeRO-3: the unpartitioned
    wrong = [
        f"{n}: checkpoint {tuple(v.shape)}, model {tuple(shapes[n])}"
        for n, v in weights.items()
        if v.shape != shapes[n]
    ]
    if wrong:
        raise CheckpointError(
            f"{path}: checkpoint shapes differ from this model's ({wrong[0]}); the setup that "
            f"decides them (method, rank, targets, model) changed since it was written"
        )
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    sd = _read_optimizer(load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return Trainable(weights, state["optimizer"]["param_names"], sd), state["loop"]
