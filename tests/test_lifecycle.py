"""A run's life cycle as a user meets it (issue 30, items 1-5, and issue 23's keep_best case): what a resume
may change, a directory left by an early crash, layerdrop with adapters, configs used from another folder,
and a bad config refused before anything is written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import make_cfg

from dstune.config import load_config, save_config
from dstune.train.loop import RunDirError, train

CHECKPOINT_EVERY_STEP = dict(train__max_steps=4, train__save_every=1, train__keep_checkpoints=0,
                             optim__schedule="cosine", optim__lr=3e-3)


def _cli(*args: str, cwd: Path | None = None, faults: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, DSTUNE_FAULTS=faults)
    return subprocess.run([sys.executable, "-m", "dstune.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def four_steps(small_file, tmp_path_factory):
    """A finished 4-step cosine run with a checkpoint after every step."""
    run = tmp_path_factory.mktemp("life") / "run"
    train(make_cfg(small_file, run, **CHECKPOINT_EVERY_STEP))
    return run


def _copy(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to)
    return to


@pytest.mark.parametrize("change", [dict(lora={"r": 16, "alpha": 16}), dict(lora={"r": 8, "alpha": 16,
                                                                                   "targets": "all-linear"}),
                                    dict(method="full")], ids=["rank", "targets", "method"])
def test_resume_with_a_changed_shape_is_refused_even_when_allowed(small_file, four_steps, tmp_path, change):
    run = _copy(four_steps, tmp_path / "run")
    cfg = make_cfg(small_file, run, **{**CHECKPOINT_EVERY_STEP, "train__max_steps": 6}, **change)
    for allow in (False, True):
        with pytest.raises(RunDirError, match="decide the shapes.*--allow-config-change cannot"):
            train(cfg, resume=True, allow_config_change=allow)
    assert not (run / "config_changes.jsonl").exists()


def test_a_changed_data_length_is_refused_or_recorded(small_file, four_steps, tmp_path):
    run = _copy(four_steps, tmp_path / "run")
    cfg = make_cfg(small_file, run, **{**CHECKPOINT_EVERY_STEP, "train__max_steps": 5}, data__max_length=32)
    with pytest.raises(RunDirError, match="data.max_length: 64 -> 32"):
        train(cfg, resume=True)
    train(cfg, resume=True, allow_config_change=True)
    rows = [json.loads(line) for line in (run / "config_changes.jsonl").read_text().splitlines()]
    keys = {c["key"] for row in rows for c in row["changes"]}
    assert {"data.max_length", "train.max_steps"} <= keys
    assert load_config(run / "config.yaml").data.max_length == 32


def test_extending_a_finished_run_continues_from_its_last_lr(small_file, four_steps, tmp_path, capsys):
    run = _copy(four_steps, tmp_path / "run")
    train(make_cfg(small_file, run, **{**CHECKPOINT_EVERY_STEP, "train__max_steps": 6}), resume=True)
    assert "length changed to 6 steps" in capsys.readouterr().out
    weights = {s: load_file(str(run / "checkpoints" / f"step-{s:06d}" / "trainable.safetensors")) for s in (4, 5)}
    # The cosine over 4 steps ended at lr 0; recomputed over 6 it would restart from there (step 5 at lr 0,
    # the weights unchanged) and rise again. Continued from step 4's lr, step 5 moves the weights.
    assert any(not torch.equal(weights[4][k], weights[5][k]) for k in weights[4])
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
           if r["split"] == "train"}
    assert 0 < lrs[5] < lrs[3] and lrs[6] <= lrs[5]  # the lr step 6 used is below the one step 4 used
    changes = json.loads((run / "config_changes.jsonl").read_text().splitlines()[0])["changes"]
    assert changes == [{"key": "train.max_steps", "was": 4, "now": 6, "kind": "other"}]


def test_a_crash_before_the_first_checkpoint_can_be_started_again(small_file, tmp_path):
    config = tmp_path / "run.yaml"
    save_config(make_cfg(small_file, tmp_path / "run", train__max_steps=3), config)
    crashed = _cli("train", str(config), faults="kill@step:1")
    assert crashed.returncode == -9 and (tmp_path / "run" / "run.json").exists()
    again = _cli("train", str(config))
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "stopped before its first checkpoint, so it is started again" in again.stdout
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"train"' in line]
    assert steps == [1, 2, 3]  # the crashed start's rows are gone, not mixed in


def test_layerdrop_with_an_adapter_survives_steps_that_drop_every_layer(small_file, tmp_path):
    # p = 1 drops both layers on every step: no step has a gradient, and none may crash.
    result = train(make_cfg(small_file, tmp_path / "all", train__max_steps=2, regularize={"layerdrop": 1.0}))
    assert result.steps == 2
    result = train(make_cfg(small_file, tmp_path / "half", train__max_steps=6, regularize={"layerdrop": 0.5}))
    assert result.steps == 6 and all(map(torch.isfinite, torch.tensor(result.train_losses)))


def test_a_config_works_from_any_folder(small_file, tmp_path):
    data = tmp_path / "project" / "data" / "d.jsonl"
    data.parent.mkdir(parents=True)
    data.write_bytes(small_file.read_bytes())
    config = tmp_path / "project" / "run.yaml"
    cfg = make_cfg(data, Path("runs/x"), train__max_steps=2, train__save_every=1)
    raw = cfg.model_dump(mode="json")
    raw["data"]["train"] = "data/d.jsonl"  # relative to the config file, as users write it
    config.write_text(json.dumps(raw))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = _cli("train", str(config), "--max-steps", "2", cwd=elsewhere)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    saved = load_config(elsewhere / "runs" / "x" / "config.yaml")
    assert saved.data.train == str(data) and saved.output == str(elsewhere / "runs" / "x")
    # The run's own config.yaml resumes it from a third folder.
    again = _cli("train", str(elsewhere / "runs" / "x" / "config.yaml"), "--resume", "--max-steps", "3", cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    missing = _cli("train", str(config), "--set", "data.train=nope.json", "-o", str(tmp_path / "y"), cwd=elsewhere)
    assert missing.returncode == 2 and "data.train: data file not found" in missing.stdout
    assert "Traceback" not in missing.stdout + missing.stderr and not (tmp_path / "y").exists()


def test_keep_best_without_eval_every_is_refused_before_anything_is_written(small_file, tmp_path):
    args = ["train", "--model", "tiny:deepseek-llm", "--data", str(small_file), "--max-steps", "2", "-o",
            str(tmp_path / "run"), "--set", "data.max_length=64", "--set", "train.progress=false"]
    refused = _cli(*args, "--set", "regularize.keep_best=true")
    assert refused.returncode == 2 and "Traceback" not in refused.stdout + refused.stderr
    assert "regularize.keep_best" in refused.stdout and "train.eval_every" in refused.stdout
    assert not (tmp_path / "run").exists()
    fixed = _cli(*args, "--set", "regularize.keep_best=true", "--set", "train.eval_every=1")
    assert fixed.returncode == 0, fixed.stdout[-2000:] + fixed.stderr[-2000:]


def test_a_finished_run_without_checkpoints_is_never_started_over(small_file, tmp_path):
    import shutil

    cfg = make_cfg(small_file, tmp_path / "run", train__max_steps=1)
    train(cfg)
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # a user freeing disk space keeps final/
    before = (tmp_path / "run" / "final" / "adapter_model.safetensors").read_bytes()
    for resume in (False, True):
        with pytest.raises(RunDirError, match="holds a finished run"):
            train(cfg, resume=resume)
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").read_bytes() == before
