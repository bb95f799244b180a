"""``dstune report`` as a user meets it: a study's trials (a pruned one too), a run resumed over two sessions,
and a wide table on an 80-column terminal. Tiny models, real data, fixed seeds."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import SHARED_DATA
from rich.console import Console
from typer.testing import CliRunner

from dstune.cli import app
from dstune.config import RunConfig, load_config
from dstune.evaluate.run import evaluate_run
from dstune.report.compare import compare_runs
from dstune.report.logger import read_metrics
from dstune.train.loop import train
from dstune.tune.study import run_tune

runner = CliRunner()
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    rows = json.loads((SHARED_DATA / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:24]
    path = tmp_path_factory.mktemp("report") / "d.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def study(data_file, tmp_path_factory) -> Path:
    """An ASHA study of two trials: lr 3e-2 runs its 6 steps, lr 1e-7 is pruned at its first evaluation."""
    d = tmp_path_factory.mktemp("study")
    cfg = {"model": {"name": "tiny:deepseek-llm"}, "data": {"train": str(data_file), "max_length": 48},
           "method": "lora", "train": {"micro_batch_size": 4, "max_steps": 6, "eval_every": 2, "progress": False},
           "tune": {"output": str(d / "study"), "trials": 2, "sampler": "random", "pruner": "asha",
                    "space": {"optim.lr": {"type": "categorical", "choices": [3e-2, 1e-7]}}}}
    (d / "base.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    study_dir = d / "study"
    study_dir.mkdir()
    queued = optuna.create_study(study_name="study", storage=f"sqlite:///{study_dir / 'study.db'}")
    for lr in (3e-2, 1e-7):
        queued.enqueue_trial({"optim.lr": lr})
    states = [t.state.name for t in run_tune(load_config(d / "base.yaml"), console=Console(quiet=True)).study.trials]
    assert states == ["COMPLETE", "PRUNED"]  # the case the tests are about
    return study_dir


@pytest.fixture(scope="module")
def resumed(data_file, tmp_path_factory) -> Path:
    """A 6-step run stopped after step 4 (its later files removed, as a crash leaves them) and resumed."""
    run = tmp_path_factory.mktemp("resumed") / "run"
    cfg = RunConfig.model_validate({
        "model": {"name": "tiny:deepseek-llm"}, "data": {"train": str(data_file), "max_length": 48},
        "method": "lora", "optim": {"lr": 3e-3}, "output": str(run),
        "train": {"micro_batch_size": 4, "max_steps": 6, "save_every": 4, "progress": False, "seed": 5}})
    train(cfg)
    shutil.rmtree(run / "checkpoints" / "step-000006")
    shutil.rmtree(run / "final")
    train(cfg, resume=True)
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 2  # one TensorBoard file per session
    return run


def _row(result: dict, name: str) -> dict:
    rows = {row[0]: dict(zip(result["columns"], row)) for row in result["rows"]}
    return rows[name]


def test_pruned_trial_shows_its_steps_and_losses_and_is_marked(study, tmp_path):
    result = compare_runs([study / "trial-0000", study / "trial-0001"], tmp_path / "cmp")
    pruned, done = _row(result, "trial-0001"), _row(result, "trial-0000")
    rows = read_metrics(study / "trial-0001")
    train_rows, val_rows = [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "val"]
    assert pruned["steps"] == 2 == train_rows[-1]["step"]
    assert pruned["train loss"] == train_rows[-1]["loss"] and pruned["val loss"] == val_rows[-1]["loss"]
    assert pruned["state"] == "pruned" and done["state"] == "finished" and done["steps"] == 6
    md = (tmp_path / "cmp" / "report.md").read_text(encoding="utf-8")
    assert "| trial-0001 |" in md and "pruned" in md


def test_a_study_directory_is_expanded_into_its_trials(study, tmp_path):
    result = compare_runs([study], tmp_path / "cmp")
    assert [row[0] for row in result["rows"]] == ["trial-0000", "trial-0001"]
    res = runner.invoke(app, ["report", str(study), "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    empty = tmp_path / "empty-study"
    empty.mkdir()
    (empty / "base.yaml").write_text("{}", encoding="utf-8")
    res = runner.invoke(app, ["report", str(empty), "--out", str(tmp_path / "cli")])
    assert res.exit_code == 2 and "holds no trial run directories" in " ".join(res.output.split())


def test_a_resumed_run_shows_its_wall_time_over_both_sessions(resumed, tmp_path):
    # Session 1 up to the checkpoint the run resumed from, as that checkpoint recorded it ...
    first = json.loads((resumed / "checkpoints" / "step-000004" / "state.json").read_text())["loop"]["wall_s"]
    total = json.loads((resumed / "summary.json").read_text(encoding="utf-8"))["wall_s"]  # ... plus session 2
    assert 0 < first < total
    wall = _row(compare_runs([resumed], tmp_path / "cmp"), "run")["wall s"]
    assert wall == pytest.approx(total)
    assert "2 sessions" in (tmp_path / "cmp" / "report.md").read_text(encoding="utf-8")


def test_the_table_is_readable_at_80_columns(study, resumed, data_file, tmp_path):
    # Every column of the table: generation metrics on one run, classification metrics on another.
    evaluate_run(study / "trial-0000", data_file, max_samples=2, max_new_tokens=2)
    test = tmp_path / "hotel.csv"
    test.write_text("\n".join((SHARED_DATA / "chnsenticorp_htl.csv").read_text(encoding="utf-8").splitlines()[:5]),
                    encoding="utf-8")
    evaluate_run(resumed, test)
    runs = [str(study / "trial-0000"), str(study / "trial-0001"), str(resumed)]
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-m", "dstune.cli", "report", *runs, "--out", str(tmp_path / "cmp")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = compare_runs(runs, tmp_path / "cmp")
    assert len(result["columns"]) >= 14  # the case of the issue: far more than 80 columns hold
    _assert_readable(out.stdout, result)

    from dstune.report.compare import console_tables

    console = Console(width=80, record=True, file=io.StringIO())
    for table in console_tables(result, console):
        console.print(table)
    _assert_readable(console.export_text(), result)


def _assert_readable(text: str, result: dict) -> None:
    """No cell cut short ("lo…"), no line wider than 80, and every run, value and title there whole."""
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80, text
    cells = " ".join(text.split())
    for row in result["rows"]:
        for value in row:
            shown = "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
            assert shown in cells, (shown, text)
    for title in result["columns"]:
        assert all(word in cells for word in title.split()), (title, text)


def test_padding_hint_says_what_packing_would_have_saved():
    from dstune.report.summary import padding_hint

    hint = padding_hint({"padding_share": 0.4, "wall_s": 100.0}, packing=False)
    assert hint and "40%" in hint and "about 40 s of its 100 s" in hint and "train.packing=true" in hint
    assert padding_hint({"padding_share": 0.4, "wall_s": 100.0}, packing=True) is None
    assert padding_hint({"padding_share": 0.1, "wall_s": 100.0}, packing=False) is None
    assert padding_hint({"padding_share": None, "wall_s": 100.0}, packing=False) is None
