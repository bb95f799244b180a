"""SIGTERM and SIGINT: finish the current step, save a checkpoint, exit with how to resume.

A cluster scheduler sends SIGTERM before it kills a job, and Ctrl-C sends SIGINT; both should cost no
more than the step in flight. The handler only sets a flag; the loop looks at it between steps, so a
checkpoint is never written from inside a half-finished update. In a multi-process run the flag is
reduced with max over ranks, so every rank stops after the same step and saves together.
"""

from __future__ import annotations

import signal
import threading

import torch

from dstune.errors import DstuneError


class TrainingInterrupted(DstuneError, RuntimeError):
    """Training stopped on a signal after saving a checkpoint; the message says how to resume."""


class StopRequest:
    """Context manager that turns SIGTERM/SIGINT into a flag for the duration of training."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.signal_name: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user really wants out now
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signals can only be set there
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def requested(self) -> bool:
        """True on every rank when any rank received a stop signal."""
        if self.accelerator.num_processes == 1:
            return self.signal_name is not None
        flag = torch.tensor([1 if self.signal_name else 0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "max").item())
