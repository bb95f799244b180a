"""The command line as a new user meets it (issues 23 and 30): quiet output that says what was read,
errors a user can fix as one line and bugs with their traceback, Ctrl-C while loading, lr-find's suggested
command, and a search started from a plain training config."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dstune.cli import app

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SMALL = ["--set", "data.max_length=64", "--set", "data.max_samples=24", "--set", "train.progress=false"]


def _dstune(*args: str, driver: str = "") -> subprocess.CompletedProcess:
    """Runs ``dstune ARGS`` in a fresh interpreter; ``driver`` is Python run first (e.g. a fault)."""
    code = f"import sys\n{driver}\nsys.argv = ['dstune', *{list(args)!r}]\nfrom dstune.cli import main\nmain()\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, COLUMNS="200"))


@pytest.fixture(scope="module")
def lenient_file(tmp_path_factory) -> Path:
    """Twenty real alpaca rows and one broken line."""
    rows = json.loads((SHARED / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:20]
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in rows[:10]] + ["{not json"] + [json.dumps(r) for r in rows[10:]]),
                    encoding="utf-8")
    return path


def test_train_output_is_quiet_and_says_what_was_read(lenient_file, tmp_path):
    args = ["train", "--model", "tiny:deepseek-llm", "--data", str(lenient_file), "--max-steps", "1", *SMALL,
            "--set", "data.lenient=true"]
    quiet = _dstune(*args, "-o", str(tmp_path / "quiet"))
    assert quiet.returncode == 0, quiet.stdout[-2000:] + quiet.stderr[-2000:]
    out = quiet.stdout + quiet.stderr
    assert "Loading weights" not in out and "FutureWarning" not in out, out[-3000:]
    assert "alpaca format, 21 rows read, 1 dropped" in quiet.stdout
    loud = _dstune("--verbose", *args, "-o", str(tmp_path / "loud"))
    assert loud.returncode == 0 and "Loading weights" in loud.stdout + loud.stderr  # the switch works


def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    import dstune.train.loop as loop
    from dstune.errors import UsageError

    def refuse(*a, **k):
        raise UsageError("lora.r: must be positive")

    def bug(*a, **k):
        raise KeyError("ppl")

    args = ["train", "--model", "tiny:deepseek-llm", "--data", str(SHARED / "identity.json"), "-o", str(tmp_path)]
    monkeypatch.setattr(loop, "train", refuse)
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 2 and "error: lora.r: must be positive" in out.output and out.exception.code == 2
    monkeypatch.setattr(loop, "train", bug)
    out = CliRunner().invoke(app, args)
    assert isinstance(out.exception, KeyError)  # not swallowed into an 'error:' line


def test_ctrl_c_while_loading_says_so(tmp_path):
    # The interrupt arrives while the tokenizer loads, before the training loop (which saves on its own).
    driver = ("import os, signal, dstune.train.build as b\norig = b.load_tokenizer\n"
              "def hit(*a, **k):\n    os.kill(os.getpid(), signal.SIGINT)\n    return orig(*a, **k)\n"
              "b.load_tokenizer = hit")
    proc = _dstune("train", "--model", "tiny:deepseek-llm", "--data", str(SHARED / "identity.json"), "-o",
                   str(tmp_path / "run"), *SMALL, driver=driver)
    assert proc.returncode == 130 and "interrupted" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_lr_find_suggests_a_command_that_does_not_collide_with_a_run(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"model": {"name": "tiny:deepseek-llm"},
                                  "data": {"train": str(SHARED / "identity.json"), "max_length": 64},
                                  "train": {"progress": False}, "output": str(tmp_path / "run")}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")  # the config's output already holds a run
    out = CliRunner().invoke(app, ["lr-find", str(config), "--steps", "8", "--start-lr", "1e-4", "--end-lr", "1",
                                   "--plot", str(tmp_path / "lr.png")], env={"COLUMNS": "300"})
    assert out.exit_code == 0, out.output
    command = next(line for line in out.output.splitlines() if line.startswith("use it:"))
    assert f"--output {tmp_path / 'run'}-lr" in command and "--set optim.lr=" in command


def test_tune_runs_from_a_plain_training_config(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"model": {"name": "tiny:deepseek-llm"}, "method": "lora",
                                  "data": {"train": str(SHARED / "identity.json"), "max_length": 64},
                                  "train": {"progress": False, "micro_batch_size": 4}}))
    out = CliRunner().invoke(app, ["tune", str(config), "--trials", "1", "--max-steps", "2", "-o",
                                   str(tmp_path / "study")], env={"COLUMNS": "300"})
    assert out.exit_code == 0, out.output
    assert "tune.preset=lora-default" in out.output and "train.eval_every=1" in out.output
    trial = json.loads((tmp_path / "study" / "trial-0000" / "summary.json").read_text())
    assert trial["steps"] == 2
