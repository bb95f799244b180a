"""``dstune report RUN...``: several runs side by side, in one table and one plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from dstune.rundir import NotARunError

# Columns of the table: (title, how to read it from a run's files). A run that lacks a value shows "-".
_COLUMNS = [
    ("model", lambda r: r["run"].get("model")),
    ("method", lambda r: r["run"].get("method")),
    ("lr", lambda r: r["config"].get("optim", {}).get("lr")),
    ("steps", lambda r: r["summary"].get("steps")),
    ("train loss", lambda r: r["summary"].get("final_train_loss")),
    ("val loss", lambda r: (r["summary"].get("val") or {}).get("loss")),
    ("val ppl", lambda r: (r["summary"].get("val") or {}).get("ppl")),
    ("eval ppl", lambda r: r["eval"].get("ppl")),
    ("BLEU", lambda r: r["eval"].get("generation", {}).get("bleu", {}).get("bleu")),
    ("ROUGE-L", lambda r: r["eval"].get("generation", {}).get("rouge", {}).get("rougeL")),
    ("exact match", lambda r: r["eval"].get("generation", {}).get("exact_match")),
    ("accuracy", lambda r: r["eval"].get("classification", {}).get("accuracy")),
    ("F1 macro", lambda r: r["eval"].get("classification", {}).get("f1_macro")),
    ("wall s", lambda r: r["summary"].get("wall_s")),
]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The files of a run that the comparison reads: run.json, config.yaml, summary.json, eval.json.

    Raises:
        NotARunError: ``run_dir`` is not a run directory.
    """
    run = Path(run_dir)
    if not (run / "run.json").is_file():
        raise NotARunError(f"{run} is not a run directory (no run.json); give directories written by dstune train")
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) if (run / "config.yaml").is_file() else {}
    return {"name": run.name, "path": str(run), "run": _read_json(run / "run.json"), "config": config or {},
            "summary": _read_json(run / "summary.json"), "eval": _read_json(run / "eval.json")}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path) -> dict:
    """Writes ``report.md`` (one table, one row per run) and ``compare.png`` (their loss curves) to ``out_dir``.

    Columns that no run has a value for are left out.

    Returns:
        ``{"columns": [...], "rows": [[run name, values...], ...], "markdown": path, "plot": path or None}``.
    """
    from dstune.report.charts import plot_compare

    if not run_dirs:
        raise NotARunError("no run directories given")
    runs = [read_run(r) for r in run_dirs]
    names = [Path(r["path"]).name for r in runs]
    if len(set(names)) < len(names):  # runs/a/run and runs/b/run: name them by their parent too
        for r in runs:
            r["name"] = "/".join(Path(r["path"]).resolve().parts[-2:])
    values = {title: [get(r) for r in runs] for title, get in _COLUMNS}
    columns = [title for title, _ in _COLUMNS if any(v is not None for v in values[title])]
    rows = [[r["name"]] + [values[c][i] for c in columns] for i, r in enumerate(runs)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_compare([r["path"] for r in runs], out / "compare.png")
    lines = ["# Runs compared", "", "| run | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    if plot:
        lines += ["", f"![loss curves]({plot.name})"]
    lines += ["", "Runs: " + ", ".join(f"`{r['path']}`" for r in runs)]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"columns": ["run", *columns], "rows": rows, "markdown": out / "report.md", "plot": plot}
