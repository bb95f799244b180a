"""System metrics of a run, logged beside the training curves (``split: "system"`` in metrics.jsonl and
TensorBoard's ``system/``): mean step time and data-loading wait per step since the last log, the process's
resident memory now and at its peak, and on CUDA the device memory now and at its peak and the GPU's
utilisation when the driver reports it (``torch.cuda.utilization``, through nvidia-ml-py).

Step time runs from the end of one step's hooks to the end of the next step's update, so an evaluation or a
checkpoint does not count as a slow step; the data wait is the time the loop blocked on the next
micro-batch (the prefetch thread collates ahead, so a wait above zero means the data path is the limit).
"""

from __future__ import annotations

import time

import psutil
import torch

from dstune.core.facts import peak_rss_mb

_MB = 2**20


class SystemMetrics:
    """Collects one run's step times and data waits between logging steps and reads memory on demand."""

    def __init__(self, device: torch.device):
        self.device = device
        self.process = psutil.Process()
        self.started = time.perf_counter()
        self.step_s = self.wait_s = 0.0
        self.steps = 0

    def waited(self, seconds: float) -> None:
        """Adds time the loop spent waiting for a micro-batch."""
        self.wait_s += seconds

    def step_done(self) -> None:
        """Ends the current step's timing (call after the update, before evaluations and checkpoints)."""
        self.step_s += time.perf_counter() - self.started
        self.steps += 1

    def restart(self) -> None:
        """Starts timing the next step (call when the step's hooks are done)."""
        self.started = time.perf_counter()

    def take(self) -> dict[str, float]:
        """The metrics since the last call (means per step), then starts the sums afresh."""
        n = max(self.steps, 1)
        out = {
            "step_time_s": round(self.step_s / n, 4),
            "data_wait_s": round(self.wait_s / n, 5),
            "rss_mb": round(self.process.memory_info().rss / _MB, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        if self.device.type == "cuda":
            out["device_mem_mb"] = round(torch.cuda.memory_allocated(self.device) / _MB, 1)
            out["device_peak_mb"] = round(torch.cuda.max_memory_allocated(self.device) / _MB, 1)
            try:
                out["device_util"] = float(torch.cuda.utilization(self.device))
            except Exception:  # no nvidia-ml-py, or a driver that does not report it: leave it out
                pass
        self.step_s = self.wait_s = 0.0
        self.steps = 0
        return out
