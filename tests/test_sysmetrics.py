"""System metrics (issue 27): a run logs step time, data wait and memory beside its curves, evaluation and
checkpoint time is not counted as step time, and `dstune report` tabulates and plots them."""

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from dstune.config import RunConfig
from dstune.report.compare import compare_runs
from dstune.train import sysmetrics
from dstune.train.loop import train
from dstune.train.sysmetrics import SystemMetrics


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_step_time_runs_from_the_end_of_one_steps_hooks_to_the_next_update(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(sysmetrics.time, "perf_counter", clock)
    m = SystemMetrics(torch.device("cpu"))
    clock.now += 2.0  # step 1 computes for 2 s
    m.step_done()
    clock.now += 30.0  # then an evaluation and a checkpoint: not step time
    m.restart()
    m.waited(0.5)
    clock.now += 4.0  # step 2: 4 s, of which 0.5 s waiting for data
    m.step_done()
    got = m.take()
    assert got["step_time_s"] == pytest.approx(3.0)  # (2 + 4) / 2
    assert got["data_wait_s"] == pytest.approx(0.25)
    assert got["rss_mb"] > 10 and got["peak_rss_mb"] >= got["rss_mb"] - 1
    assert "device_mem_mb" not in got  # CPU: no device memory to report
    again = m.take()  # the sums start afresh
    assert again["step_time_s"] == 0.0 and again["data_wait_s"] == 0.0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, alpaca_file) -> Path:
    d, data = tmp_path_factory.mktemp("sys"), alpaca_file
    cfg = RunConfig.model_validate(
        {
            "model": {"name": "tiny:deepseek-llm"},
            "data": {"train": str(data), "max_length": 48},
            "train": {
                "micro_batch_size": 4,
                "max_steps": 4,
                "log_every": 2,
                "eval_every": 2,
                "progress": False,
            },
            "output": str(d / "run"),
        }
    )
    train(cfg, console=Console(quiet=True))
    return d / "run"


def test_a_run_logs_system_metrics_at_each_logging_step(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    system = [r for r in rows if r["split"] == "system"]
    assert [r["step"] for r in system] == [2, 4]
    for r in system:
        assert r["step_time_s"] > 0 and r["data_wait_s"] >= 0
        assert r["rss_mb"] > 50 and r["peak_rss_mb"] >= r["rss_mb"] - 1
    tags = set()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for events in (run_dir / "tb").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"system/step_time_s", "system/rss_mb", "system/data_wait_s"} <= tags


def test_report_tabulates_and_plots_the_system_metrics(run_dir, tmp_path):
    result = compare_runs([run_dir], tmp_path / "report")
    assert {"s/step", "peak MiB"} <= set(result["columns"])
    assert "device peak MiB" not in result["columns"]  # a CPU run has no device memory
    assert (tmp_path / "report" / "system.png").stat().st_size > 5000
    assert "system.png" in (tmp_path / "report" / "report.md").read_text()
