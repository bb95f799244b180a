"""Checkpoints as safetensors and JSON: trainable weights, optimizer, scheduler, RNG and data position.

No pickle anywhere: torch's own ``optimizer.state_dict()`` is a nest of tensors and numbers, so we
flatten its tensors into a safetensors file keyed by parameter name and keep the rest as JSON.
A checkpoint directory is written under a temporary name and renamed into place, so a crash while
saving never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

COMPLETE = "COMPLETE"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, detached and contiguous on the CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _optimizer_files(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{order[idx]}::{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{order[idx]}::{key}"] = value
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in sd["param_groups"]]
    return tensors, {"param_names": order, "param_groups": groups, "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    order = meta["param_names"]
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        name, field = key.rsplit("::", 1)
        state.setdefault(order.index(name), {})[field] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_state() -> tuple[dict, dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def _set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    v, st, gauss = meta["python"]
    random.setstate((v, tuple(st), gauss))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def save_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, loop_state: dict) -> Path:
    """Writes a checkpoint directory atomically (temporary name, fsync, rename).

    Args:
        path: the final directory, e.g. ``run/checkpoints/step-000100``.
        loop_state: JSON-serialisable loop position (step, micro-batch position, loss history...).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    opt_tensors, opt_meta = _optimizer_files(model, optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors, rng_meta = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    state = {"loop": loop_state, "scheduler": scheduler.state_dict(), "optimizer": opt_meta, "rng": rng_meta}
    (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
    (tmp / COMPLETE).write_text("ok\n")
    _fsync_dir(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if (p / COMPLETE).exists() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> dict:
    """Restores weights, optimizer, scheduler and RNG from ``path``; returns the loop state."""
    path = Path(path)
    if not (path / COMPLETE).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(f"{path}: checkpoint has parameters this model lacks, e.g. {unknown[:3]}; "
                         f"was it made with another model or method?")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    _load_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state["loop"]
