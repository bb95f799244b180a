"""Measured peak memory of dstune's own training step, to check the planner (``dstune.plan``) against.

A CPU has no ``torch.cuda.max_memory_allocated``, and RSS counts the allocator's cached pages, the
Python heap and the libraries, not tensors. So allocations are tracked with the PyTorch profiler's
memory events (``profile_memory=True``): every allocation and free of the CPU allocator is an event with
a signed byte count and a timestamp, recorded inside the C++ allocator, so tensors that autograd, fused
optimizers or bitsandbytes allocate internally are seen too (a ``TorchDispatchMode`` sees only operator
outputs, not workspaces). The peak is the largest running sum of those events, on top of the bytes live
when tracking starts (parameters, buffers and gradients, counted once per storage). Backward runs on the
calling thread for CPU tensors, so one thread's events are all of them.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from dstune.config import RunConfig


def live_bytes(*groups) -> int:
    """Bytes of the distinct storages behind the given tensors (views and tied weights counted once)."""
    seen: dict[int, int] = {}
    for group in groups:
        for t in group:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class AllocationTracker:
    """Context manager: ``peak`` is the highest sum of CPU allocations minus frees inside it."""

    def __init__(self) -> None:
        self.peak = 0
        self.net = 0
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)

    def __enter__(self) -> "AllocationTracker":
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        events = [e for e in self._prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        running = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            if e.device_type() != torch.device("cpu").type and str(e.device_type()) != "DeviceType.CPU":
                continue
            running += e.nbytes()
            self.peak = max(self.peak, running)
        self.net = running


def write_text_data(path: Path, rows: int = 48, seed: int = 0) -> Path:
    """A jsonl of plain-text rows long enough that packing fills every row of any length used here."""
    words = "the model reads a long text about memory and learns how many bytes each step keeps".split()
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(700))}) + "\n")
    return path


def measure_step(cfg: RunConfig, steps: int = 2) -> dict:
    """Builds ``cfg`` with dstune's ``build`` and runs ``steps`` optimizer steps (forward and backward
    through ``backward_window``, clipping, optimizer step), returning the measured peak in bytes.

    The second step is the steady state the planner predicts: its optimizer states exist while its
    activations do. Everything live before the first step (weights, buffers) is the baseline.
    """
    from dstune.train.build import build
    from dstune.train.loop import backward_window
    from dstune.train.optim import clip_gradients

    run = build(cfg)
    model = run.model
    model.train()  # as the loop does: transformers checkpoints layers only in training mode
    cuda = run.engine.device.type == "cuda"
    if cuda:  # CUDA's caching allocator counts every tensor it hands out: its own peak is the measure
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = live_bytes(model.parameters(), model.buffers())
    with contextlib.nullcontext() if cuda else AllocationTracker() as tracker:
        for step in range(steps):
            window = [run.batches.at(step * cfg.train.grad_accum + i)[0] for i in range(cfg.train.grad_accum)]
            backward_window(model, window, run.engine, run.objective)
            clip_gradients(run.params, cfg.optim, run.engine)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
    shape = tuple(window[0]["input_ids"].shape)
    if cuda:
        torch.cuda.synchronize()
        return {"peak": torch.cuda.max_memory_allocated(), "baseline": base, "batch_shape": shape}
    return {"peak": base + tracker.peak, "baseline": base, "batch_shape": shape}
