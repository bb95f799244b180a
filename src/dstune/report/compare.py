"""``dstune report RUN...``: several runs side by side, in one table and one plot.

A study directory (written by ``dstune tune``) stands for its trials. A run without ``summary.json`` (a pruned
trial, a run interrupted or still running) shows its steps and last losses from ``metrics.jsonl``, and its
state says why. The wall time of a run resumed over several sessions is their sum (see ``wall_time``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import yaml

from dstune.report.logger import read_metrics
from dstune.rundir import NotARunError, RunDir

# Columns of the table: (title, how to read it from a run's files). A run that lacks a value shows "-".
_COLUMNS = [
    ("state", lambda r: r["state"]),
    ("model", lambda r: r["run"].get("model")),
    ("method", lambda r: r["run"].get("method")),
    (
        "objective",
        lambda r: r["config"].get("objective") if r["config"].get("objective", "sft") != "sft" else None,
    ),
    ("lr", lambda r: r["config"].get("optim", {}).get("lr")),
    ("steps", lambda r: r["summary"].get("steps")),
    ("train loss", lambda r: r["summary"].get("final_train_loss")),
    ("val loss", lambda r: (r["summary"].get("val") or {}).get("loss")),
    ("val ppl", lambda r: (r["summary"].get("val") or {}).get("ppl")),
    # preference objectives (objective: dpo, ...): the validation pairs' reward accuracy and margin
    ("val reward acc", lambda r: (r["summary"].get("val") or {}).get("rewards/accuracy")),
    ("val margin", lambda r: (r["summary"].get("val") or {}).get("rewards/margins")),
    # objective=grpo: the mean reward of the validation prompts' greedy completions
    ("val reward", lambda r: (r["summary"].get("val") or {}).get("reward")),
    ("eval ppl", lambda r: r["eval"].get("ppl")),
    ("BLEU", lambda r: r["eval"].get("generation", {}).get("bleu", {}).get("bleu")),
    ("ROUGE-L", lambda r: r["eval"].get("generation", {}).get("rouge", {}).get("rougeL")),
    ("exact match", lambda r: r["eval"].get("generation", {}).get("exact_match")),
    ("accuracy", lambda r: r["eval"].get("classification", {}).get("accuracy")),
    ("F1 macro", lambda r: r["eval"].get("classification", {}).get("f1_macro")),
    ("wall s", lambda r: r["wall_s"]),
    # system metrics (split "system" of metrics.jsonl): the median step, the process's and device's peaks
    ("s/step", lambda r: r["system"].get("s_per_step")),
    ("peak MiB", lambda r: r["system"].get("peak_rss_mb")),
    ("device peak MiB", lambda r: r["system"].get("device_peak_mb")),
]
# optuna's trial states (trials.csv) as the table says them
_STATES = {"complete": "finished", "fail": "failed"}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def expand_runs(paths: list[str | Path]) -> list[Path]:
    """The run directories that ``paths`` stand for: a run directory itself, a study directory its trials.

    Raises:
        NotARunError: a path is neither, or a study holds no trial run yet.
    """
    runs: list[Path] = []
    for path in map(Path, paths):
        if RunDir(path).run_json.is_file():
            runs.append(path)
        elif (path / "base.yaml").is_file() or any(path.glob("trial-[0-9]*")):  # what run_tune writes first
            trials = sorted(d for d in path.glob("trial-[0-9]*") if RunDir(d).run_json.is_file())
            if not trials:
                raise NotARunError(
                    f"{path} is a study directory but holds no trial run directories yet "
                    "(trial-NNNN/ with run.json); run dstune tune first"
                )
            runs.extend(trials)
        else:
            raise NotARunError(
                f"{path} is not a run directory (no run.json) nor a study directory (no "
                "base.yaml); give directories written by dstune train or dstune tune"
            )
    return runs


def _trial_state(run: Path) -> str | None:
    """The state of a trial of a study (``trials.csv`` beside it, written when the search ends), or None."""
    table = run.parent / "trials.csv"
    number = run.name.removeprefix("trial-")
    if not number.isdigit() or not table.is_file():
        return None
    with open(table, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row.get("trial") == str(int(number)):
                return _STATES.get(row.get("state", ""), row.get("state") or None)
    return None


def _from_metrics(rows: list[dict]) -> dict:
    """What ``summary.json`` would say, from ``metrics.jsonl``: the latest step, train loss and evaluation."""
    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    return {
        "steps": train[-1]["step"] if train else None,
        "final_train_loss": train[-1].get("loss") if train else None,
        "val": {k: v for k, v in val[-1].items() if k not in ("step", "split")} if val else None,
    }


def _system(rows: list[dict]) -> dict:
    """A run's system metrics in one line: the median step time and the peaks of its memory."""
    system = [r for r in rows if r.get("split") == "system"]
    if not system:
        return {}
    times = sorted(r["step_time_s"] for r in system if r.get("step_time_s"))
    out = {"s_per_step": times[len(times) // 2] if times else None}
    for key in ("peak_rss_mb", "device_peak_mb"):
        values = [r[key] for r in system if key in r]
        out[key] = max(values) if values else None
    return out


def wall_time(run_dir: str | Path, summary: dict) -> tuple[float | None, int]:
    """Training wall time of a run over all its sessions, in seconds, and the number of sessions.

    A run keeps its time over sessions in its checkpoints (``TrainState.wall_s``), so ``summary.json`` holds
    the total; a run without one (a pruned trial, an interrupted run) is timed to its latest checkpoint.
    Each session (process) writes its own TensorBoard event file under ``tb/``: they count the sessions.
    """
    run = RunDir(run_dir)
    sessions = len(list(run.tensorboard.glob("events.out.tfevents.*")))
    if summary.get("wall_s") is not None:
        return summary["wall_s"], sessions
    latest = run.latest_checkpoint()
    state = _read_json(latest / "state.json").get("loop", {}) if latest else {}
    return state.get("wall_s"), sessions


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The files of a run that the comparison reads: run.json, config.yaml, summary.json (or, when there is
    none, metrics.jsonl), eval.json, its TensorBoard event files for the wall time, and for a trial of a study
    the study's trials.csv.

    Raises:
        NotARunError: ``run_dir`` is not a run directory.
    """
    run = Path(run_dir)
    rd = RunDir(run)
    if not rd.run_json.is_file():
        raise NotARunError(
            f"{run} is not a run directory (no run.json); give directories written by dstune train"
        )
    config = yaml.safe_load(rd.config.read_text(encoding="utf-8")) if rd.config.is_file() else {}
    summary = rd.read_json(RunDir.SUMMARY)
    state = _trial_state(run) or ("finished" if summary else "unfinished")
    wall_s, sessions = wall_time(run, summary)
    metrics = read_metrics(run)
    return {
        "name": run.name,
        "path": str(run),
        "run": rd.read_json(RunDir.RUN),
        "config": config or {},
        "summary": summary or _from_metrics(metrics),
        "system": _system(metrics),
        "eval": rd.read_json(RunDir.EVAL_JSON),
        "state": state,
        "wall_s": wall_s,
        "sessions": sessions,
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _task_columns(runs: list[dict]) -> list[tuple[str, Any]]:
    """A validation column per task and metric of the multi-task runs among ``runs`` (``val loss/<task>``;
    with a head per task also ``accuracy/<task>`` and ``f1_macro/<task>``)."""
    per_task = ("loss/", "accuracy/", "f1_macro/")
    keys = sorted({k for r in runs for k in (r["summary"].get("val") or {}) if k.startswith(per_task)})
    return [(f"val {k}", lambda r, k=k: (r["summary"].get("val") or {}).get(k)) for k in keys]


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path) -> dict:
    """Writes ``report.md`` (one table, one row per run), ``compare.png`` (their loss curves) and
    ``system.png`` (step time and memory, when the runs logged system metrics) to ``out_dir``.

    ``run_dirs`` may hold study directories: each stands for its trials. Columns that no run has a value
    for are left out, and the state column when every run finished.

    Returns:
        ``{"columns": [...], "rows": [[run name, values...], ...], "markdown": path, "plot": path or None}``.
    """
    from dstune.report.charts import plot_compare, plot_system

    if not run_dirs:
        raise NotARunError("no run directories given")
    runs = [read_run(r) for r in expand_runs(run_dirs)]
    names = [Path(r["path"]).name for r in runs]
    if len(set(names)) < len(names):  # runs/a/run and runs/b/run: name them by their parent too
        for r in runs:
            r["name"] = "/".join(Path(r["path"]).resolve().parts[-2:])
    getters = list(_COLUMNS) + _task_columns(runs)
    values = {title: [get(r) for r in runs] for title, get in getters}
    columns = [
        title
        for title, _ in getters
        if any(v is not None for v in values[title])
        and (title != "state" or set(values[title]) != {"finished"})
    ]
    rows = [[r["name"]] + [values[c][i] for c in columns] for i, r in enumerate(runs)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_compare([r["path"] for r in runs], out / "compare.png")
    system = plot_system([r["path"] for r in runs], out / "system.png")
    lines = [
        "# Runs compared",
        "",
        "| run | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    resumed = [f"{r['name']} ({r['sessions']} sessions)" for r in runs if r["sessions"] > 1]
    if resumed or any(r["state"] != "finished" and r["wall_s"] is not None for r in runs):
        lines += [
            "",
            "wall s: "
            + (f"summed over the sessions of a resumed run: {', '.join(resumed)}. " if resumed else "")
            + "A run that wrote no summary.json (a pruned or interrupted run) is "
            "timed to its latest checkpoint.",
        ]
    if plot:
        lines += ["", f"![loss curves]({plot.name})"]
    if system:
        lines += ["", f"![step time and memory]({system.name})"]
    lines += ["", "Runs: " + ", ".join(f"`{r['path']}`" for r in runs)]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"columns": ["run", *columns], "rows": rows, "markdown": out / "report.md", "plot": plot}


def console_tables(result: dict, console) -> list:
    """The table of ``compare_runs``'s result for a terminal: values every run shares on one line above it,
    and the other columns in as many tables (each led by the run names) as the console's width needs, so no
    cell is cut short.

    Returns:
        rich renderables to print in order.
    """
    from rich.measure import Measurement
    from rich.table import Table
    from rich.text import Text

    columns, texts = result["columns"], [[_cell(v) for v in row] for row in result["rows"]]
    rest = list(range(1, len(columns)))
    shared = [i for i in rest if len(texts) > 1 and len({t[i] for t in texts}) == 1]
    rest = [i for i in rest if i not in shared]

    def table(picked: list[int]) -> Table:
        t = Table(*(columns[i] for i in [0, *picked]))
        for row in texts:
            t.add_row(*(row[i] for i in [0, *picked]))
        return t

    def fits(picked: list[int]) -> bool:
        return (
            Measurement.get(console, console.options.update_width(10**4), table(picked)).maximum
            <= console.width
        )

    parts: list = (
        [Text("all runs: " + ", ".join(f"{columns[i]} {texts[0][i]}" for i in shared))] if shared else []
    )
    chunk: list[int] = []
    for i in rest:
        if chunk and not fits([*chunk, i]):
            parts.append(table(chunk))
            chunk = []
        chunk.append(i)
    if chunk or not rest:
        parts.append(table(chunk))
    return parts
