"""Two CPU processes (gloo) train one run: one log, one run directory, and a SIGTERM sent to one rank
stops both after the same step with one checkpoint, from which both resume.

The ranks are started the way torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
environment), each running the real `dstune train` command.
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


def _launch(work: Path, extra: list[str], tag: str) -> list[subprocess.Popen]:
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        log = open(work / f"{tag}-rank{rank}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dstune.cli", "train", "--model", "tiny:deepseek-llm", "--data", str(work / "d.jsonl"),
             "--method", "lora", "--output", str(work / "run"), "--max-steps", str(MAX_STEPS),
             "--set", "data.max_length=64", "--set", "train.micro_batch_size=2", "--set", "train.progress=false",
             "--set", "data.split=[1.0,0.0,0.0]", *extra],
            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _train_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == "train"]


def _wait(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


@pytest.mark.slow  # ~50 s: two accelerate ranks as subprocesses
def test_two_ranks_share_one_run_and_stop_together_on_sigterm(tmp_path):
    rows = json.loads((SHARED_DATA / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:64]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    run = tmp_path / "run"
    procs = _launch(tmp_path, [], "first")
    deadline = time.time() + 600
    while len(_train_rows(run)) < 3 and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # only the second rank is told to stop
    codes = _wait(procs)
    logs = [(tmp_path / f"first-rank{r}.log").read_text() for r in (0, 1)]
    assert codes == [130, 130], logs
    stopped = _train_rows(run)
    k = stopped[-1]["step"]
    assert 3 <= k < MAX_STEPS
    # One log stream (rank 0 writes it), not one per rank, and both ranks name the same step.
    assert [r["step"] for r in stopped] == list(range(1, k + 1))
    assert f"after step {k}/{MAX_STEPS}" in logs[0] and f"after step {k}/{MAX_STEPS}" in logs[1]
    assert "stopped by SIGTERM" in logs[1] and "another process of this run" in logs[0]
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == [f"step-{k:06d}"]

    codes = _wait(_launch(tmp_path, ["--resume"], "resume"))
    assert codes == [0, 0], [(tmp_path / f"resume-rank{r}.log").read_text() for r in (0, 1)]
    resumed = _train_rows(run)
    assert [r["step"] for r in resumed] == list(range(1, MAX_STEPS + 1))
    # The two ranks split each step's batch: one epoch of 64 rows is 16 steps of 2 x 2 rows.
    assert resumed[15]["epoch"] == 1.0
    assert json.loads((run / "summary.json").read_text())["steps"] == MAX_STEPS
