"""Plots of a run, written as PNG next to its metrics."""

from __future__ import annotations

from pathlib import Path

from dstune.report.logger import read_metrics


def plot_loss(run_dir: Path) -> Path | None:
    """Training and validation loss against optimizer step, saved as ``loss.png``."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if r["split"] == "train" and "loss" in r]
    val = [(r["step"], r["loss"]) for r in rows if r["split"] == "val" and "loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / "loss.png"
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
