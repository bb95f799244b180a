"""PNG charts of runs: a run's curves (loss, learning rate, gradient norm, validation metrics; its
``loss.png``), a confusion matrix, and several runs' loss curves in one figure."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from dstune.report.logger import read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


_MEMORY = [("rss_mb", "process"), ("peak_rss_mb", "process peak"), ("device_mem_mb", "device"),
           ("device_peak_mb", "device peak")]  # fmt: skip


def _series(rows: list[dict], split: str, key: str) -> list[tuple[int, float]]:
    return [
        (r["step"], r[key]) for r in rows if r.get("split") == split and isinstance(r.get(key), (int, float))
    ]


def plot_run_curves(
    run_dir: str | Path, out_dir: str | Path, only: Sequence[str] | None = None
) -> dict[str, Path]:
    """Writes ``loss.png`` (train and validation), ``lr.png``, ``grad_norm.png``, ``reward.png`` (GRPO),
    ``memory.png`` and ``step_time.png`` (system metrics), ``tasks.png`` (each task's train and validation
    loss, multi-task runs) and, when the run logged validation metrics other than loss,
    ``val_metrics.png`` from its ``metrics.jsonl``.

    Args:
        only: write just these charts (e.g. ``("loss",)``); None writes them all.

    Returns:
        name -> path of each chart written (a chart with no data is skipped).
    """
    plt = _pyplot()
    rows = read_metrics(Path(run_dir))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    val_keys = sorted(
        {
            k
            for r in rows
            if r.get("split") == "val"
            for k, v in r.items()
            if k not in ("step", "split", "loss", "ppl", "tokens")
            and not k.startswith("loss/")
            and isinstance(v, (int, float))
        }
    )
    task_keys = sorted({k for r in rows for k in r if k.startswith("loss/")})  # multi-task runs (data.mix)
    charts = {
        "loss": ("loss (nats/token)", [("train", "loss", "train"), ("val", "loss", "validation")]),
        "lr": ("learning rate", [("train", "lr", "lr")]),
        "grad_norm": ("gradient norm (before clipping)", [("train", "grad_norm", "grad norm")]),
        # objective=grpo: sampled completions in training, greedy ones in validation
        "reward": (
            "mean reward",
            [("train", "reward", "train (sampled)"), ("val", "reward", "validation (greedy)")],
        ),
        "val_metrics": ("validation metrics", [("val", k, k) for k in val_keys]),
        "tasks": (
            "loss per task (nats/token)",
            [(split, k, f"{split} {k[5:]}") for k in task_keys for split in ("train", "val")],
        ),
    }
    for name, (ylabel, lines) in charts.items():
        if only is not None and name not in only:
            continue
        data = [(label, _series(rows, split, key)) for split, key, label in lines]
        data = [(label, points) for label, points in data if points]
        if not data:
            continue
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        for label, points in data:
            ax.plot(*zip(*points), "o-" if len(points) < 20 else "-", label=label, lw=1.3, ms=3)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{Path(run_dir).name}: {ylabel}")
        ax.grid(alpha=0.3)
        if len(data) > 1:
            ax.legend()
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written[name] = path
    return written


def plot_loss(run_dir: str | Path) -> Path | None:
    """The run's training and validation loss against optimizer step, as ``loss.png`` in the run directory
    (and a GRPO run's reward curve as ``reward.png``)."""
    return plot_run_curves(run_dir, run_dir, only=("loss", "reward")).get("loss")


def plot_confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path) -> Path:
    """A confusion matrix (rows true, columns predicted) with counts in the cells.

    Labels that are not ASCII are shown by their index (the report lists the names): the default
    matplotlib fonts have no CJK glyphs and would draw empty boxes.
    """
    plt = _pyplot()
    names = [lab if lab.isascii() else str(i) for i, lab in enumerate(labels)]
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.2 * n + 2), dpi=110)
    ax.imshow(matrix, cmap="Blues")
    top = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black")
    ax.set_xticks(range(n), names)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_compare(run_dirs: Sequence[str | Path], path: str | Path) -> Path | None:
    """Training loss of several runs in one figure (solid), with validation loss (dots) where logged."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    drawn = False
    for run in run_dirs:
        rows = read_metrics(Path(run))
        train, val = _series(rows, "train", "loss"), _series(rows, "val", "loss")
        if train:
            (line,) = ax.plot(*zip(*train), lw=1.2, label=f"{Path(run).name} train")
            drawn = True
            if val:
                ax.plot(*zip(*val), "o--", color=line.get_color(), ms=4, label=f"{Path(run).name} val")
    ax.set_title("runs compared")
    return _finish_runs_figure(plt, fig, [(ax, "loss (nats/token)")], path, drawn)


def plot_system(run_dirs: Sequence[str | Path], path: str | Path) -> Path | None:
    """Step time (left) and peak memory (right: the process, and the device on CUDA) of several runs against
    optimizer step, from their system metrics; None when no run logged any."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    drawn = False
    for run in run_dirs:
        rows, name = read_metrics(Path(run)), Path(run).name
        steps = _series(rows, "system", "step_time_s")
        if not steps:
            continue
        drawn = True
        (line,) = left.plot(*zip(*steps), lw=1.2, label=name)
        right.plot(*zip(*_series(rows, "system", "peak_rss_mb")), lw=1.2, color=line.get_color(), label=name)
        if device := _series(rows, "system", "device_peak_mb"):
            right.plot(*zip(*device), "--", lw=1.2, color=line.get_color(), label=f"{name} device")
    axes = [(left, "seconds per step"), (right, "peak memory (MiB)")]
    return _finish_runs_figure(plt, fig, axes, path, drawn)


def _finish_runs_figure(plt, fig, axes: list, path: str | Path, drawn: bool) -> Path | None:
    """Labels each (axes, y label) of a figure of several runs against step and saves it; None (nothing
    written) when no run had data to draw."""
    if not drawn:
        plt.close(fig)
        return None
    for ax, ylabel in axes:
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
