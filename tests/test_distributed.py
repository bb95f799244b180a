"""Two CPU processes (gloo, DDP) train one run: one log, one run directory, and a SIGTERM sent to one rank
stops both after the same step with one checkpoint, from which both resume.

The run is started as a user starts it, ``dstune train ... --nproc 2`` (torchrun's launcher in that process,
each rank running the real ``dstune train``); the signal goes to one rank only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SHARED_DATA

MAX_STEPS = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(work: Path, extra: list[str], tag: str) -> subprocess.Popen:
    """``dstune train ... --nproc 2``: torchrun's launcher (this process) and its two ranks."""
    log = open(work / f"{tag}.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "dstune.cli", "train", "--model", "tiny:deepseek-llm", "--data", str(work / "d.jsonl"),
         "--method", "lora", "--output", str(work / "run"), "--max-steps", str(MAX_STEPS),
         "--set", "data.max_length=64", "--set", "train.micro_batch_size=2", "--set", "train.progress=false",
         "--set", "data.split=[1.0,0.0,0.0]", "--nproc", "2", *extra],
        cwd=work, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


def _train_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == "train"]


@pytest.mark.slow  # ~50 s: two DDP ranks under torchrun
def test_two_ranks_share_one_run_and_stop_together_on_sigterm(tmp_path):
    import psutil

    rows = json.loads((SHARED_DATA / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:64]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    run = tmp_path / "run"
    launcher = _launch(tmp_path, [], "first")
    deadline = time.time() + 600
    while len(_train_rows(run)) < 3 and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.05)
    ranks = [
        p
        for p in psutil.Process(launcher.pid).children(recursive=True)
        if "dstune.cli" in " ".join(p.cmdline())
    ]
    assert len(ranks) == 2
    ranks[1].send_signal(signal.SIGTERM)  # only one rank is told to stop (as when a scheduler signals one)
    code = launcher.wait(timeout=600)
    assert code == 130, (tmp_path / "first.log").read_text()[
        -4000:
    ]  # the ranks' exit code: stopped, resumable
    log = (tmp_path / "first.log").read_text()
    stopped = _train_rows(run)
    k = stopped[-1]["step"]
    assert 3 <= k < MAX_STEPS
    # One log stream (rank 0 writes it), not one per rank, and both ranks name the same step.
    assert [r["step"] for r in stopped] == list(range(1, k + 1))
    assert log.count(f"after step {k}/{MAX_STEPS}") == 2, log[-3000:]
    assert "stopped by SIGTERM" in log and "another process of this run" in log
    assert "--resume --nproc 2" in log  # the resume hint names the launch
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == [f"step-{k:06d}"]

    resumed = _launch(tmp_path, ["--resume"], "resume")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    resumed_rows = _train_rows(run)
    assert [r["step"] for r in resumed_rows] == list(range(1, MAX_STEPS + 1))
    # The two ranks split each step's batch: one epoch of 64 rows is 16 steps of 2 x 2 rows.
    assert resumed_rows[15]["epoch"] == 1.0
    assert json.loads((run / "summary.json").read_text())["steps"] == MAX_STEPS
