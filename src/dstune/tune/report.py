"""What a study leaves behind: best.yaml, the trials table, parameter importances and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import optuna
from optuna.trial import TrialState
from rich.console import Console

from dstune.config import RunConfig, load_config, save_config
from dstune.rundir import RunDir


def trial_rows(study: optuna.Study) -> list[dict]:
    """One row per trial: number, state, value, steps, seconds, parameters and failure reason."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {
            "trial": t.number,
            "state": t.state.name.lower(),
            "value": t.value,
            "steps": t.user_attrs.get("steps", ""),
            "seconds": t.user_attrs.get("seconds", ""),
            "worker": t.user_attrs.get("worker", ""),
        }
        row.update({f"param:{k}": v for k, v in t.params.items()})
        drawn = (
            "drawn at random (tune.random_fraction)"
            if t.system_attrs.get("dstune:sampled") == "random"
            else ""
        )
        row["note"] = "; ".join(
            n for n in (t.user_attrs.get("error") or t.user_attrs.get("pruned"), drawn) if n
        )
        rows.append(row)
    return rows


def _write_tables(rows: list[dict], study_dir: Path) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(study_dir / "trials.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v if v is not None else "").replace("|", "\\|")

    lines = ["| " + " | ".join(c.removeprefix("param:") for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    (study_dir / "trials.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _plots(study: optuna.Study, study_dir: Path, importances: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import warnings

    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    made = []
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    jobs = [("history.png", lambda: ov.plot_optimization_history(study))]
    if len(complete) >= 2 and study.best_trial.params:
        jobs.append(("parallel_coordinates.png", lambda: ov.plot_parallel_coordinate(study)))
    if importances:
        jobs.append(("importances.png", lambda: ov.plot_param_importances(study)))
    jobs.append(("intermediate.png", lambda: ov.plot_intermediate_values(study)))
    for name, draw in jobs:
        try:
            with warnings.catch_warnings():  # optuna marks its matplotlib plots experimental; noise for users
                warnings.simplefilter("ignore")
                ax = draw()
        except (ValueError, RuntimeError, TypeError):  # e.g. too few trials for the plot
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flatten()[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        fig.savefig(study_dir / name, dpi=100)
        plt.close(fig)
        made.append(name)
    return made


def write_outputs(study: optuna.Study, base: RunConfig, study_dir: Path, console: Console) -> Path | None:
    """Writes trials.csv/.md, importances.json, plots and best.yaml; returns best.yaml's path (or None)."""
    rows = trial_rows(study)
    _write_tables(rows, study_dir)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    importances: dict = {}
    if len(complete) >= 3 and len({json.dumps(t.params, sort_keys=True, default=str) for t in complete}) > 1:
        try:
            importances = optuna.importance.get_param_importances(study)
        except (ValueError, RuntimeError):  # constant parameters or objective values
            importances = {}
    (study_dir / "importances.json").write_text(json.dumps(importances, indent=2), encoding="utf-8")
    plots = _plots(study, study_dir, importances)
    counts = {s.name.lower(): sum(t.state == s for t in study.trials) for s in TrialState}
    steps = sum(int(t.user_attrs.get("steps") or 0) for t in study.trials)
    summary = {
        "trials": len(study.trials),
        "states": {k: v for k, v in counts.items() if v},
        "total_steps": steps,
        "direction": study.direction.name.lower(),
        "plots": plots,
    }
    best_path = None
    if complete:
        best = study.best_trial
        cfg = load_config(RunDir(best.user_attrs["run_dir"]).config)
        cfg = cfg.model_copy(update={"output": str(study_dir / "best")})
        best_path = study_dir / "best.yaml"
        save_config(cfg, best_path)
        summary.update({"best_trial": best.number, "best_value": best.value, "best_params": best.params})
        console.print(f"best trial {best.number}: {best.value:.4f} with {best.params}", highlight=False)
    (study_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    console.print(
        f"{len(study.trials)} trials ({summary['states']}), {steps} training steps in all; "
        f"results in {study_dir} (best.yaml, trials.md, trials.csv, importances.json, "
        f"{', '.join(plots)})",
        highlight=False,
    )
    return best_path
