"""``TrainState``: exactly what a checkpoint saves about the loop, and nothing else.

Weights, optimizer, scheduler and RNG states are saved beside it by ``train.checkpoint``; this is the
loop's own position. Restoring it and them gives a run that continues bit for bit (tested by killing a
run with SIGKILL and resuming it). It is plain JSON.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields


@dataclass
class TrainState:
    """The loop's position and memory.

    Attributes:
        step: optimizer steps taken.
        losses: the training loss of every step so far.
        order: a fingerprint of each step's examples, in order (checks exact resume).
        position: micro-batches served since the start (the data position).
        split: each micro-batch is cut into this many pieces after an out-of-memory back-off.
        best: the best checkpoint so far by ``train.best_metric``: metric, mode, value, loss, path, step.
        early: early-stopping counters: ``best`` (sign x value), ``best_step``, ``bad`` evaluations.
        schedule: the lr schedule's phases: the first ``{"start": 0, "total": T}``; each resume that changed
            the run's length adds ``{"start": step, "factor": lr factor then, "total": new T}`` (see
            ``schedules.phased_factor``).
        wall_s: seconds spent training in earlier sessions of this run.
    """

    step: int = 0
    losses: list[float] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    position: int = 0
    split: int = 1
    best: dict = field(default_factory=dict)
    early: dict = field(default_factory=lambda: {"best": math.inf, "best_step": None, "bad": 0})
    schedule: list[dict] = field(default_factory=list)
    wall_s: float = 0.0

    def to_json(self) -> dict:
        out = asdict(self)
        out["early"] = {**self.early, "best": None if math.isinf(self.early["best"]) else self.early["best"]}
        return out

    @classmethod
    def from_json(cls, data: dict) -> "TrainState":
        """Reads a checkpoint's loop state; keys a checkpoint of an older dstune lacks keep their defaults."""
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in known})
        if state.early.get("best") is None:
            state.early = {**state.early, "best": math.inf}
        return state
