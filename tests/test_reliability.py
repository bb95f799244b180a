"""Crash safety: verified checkpoints, exact resume after SIGKILL, signals, OOM back-off, disk full,
config changes on resume."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import make_cfg

from dstune.config import save_config
from dstune.train import checkpoint as ckpt_mod
from dstune.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, verify_checkpoint
from dstune.train.loop import RunDirError, train

# Accumulation of 2 micro-batches of 2 and LoRA dropout: resume must restore data order, the
# position inside the epoch and the dropout RNG to be bitwise exact.
RESUME = dict(train__max_steps=8, train__save_every=2, train__grad_accum=2, train__micro_batch_size=2,
              train__keep_checkpoints=0, lora__dropout=0.1, optim__schedule="cosine")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run) / "trainable.safetensors"))


def _cli(config: Path, *extra: str, faults: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, DSTUNE_FAULTS=faults)
    return subprocess.run([sys.executable, "-m", "dstune.cli", "train", str(config), *extra],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(small_file, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    out = tmp_path_factory.mktemp("ref") / "run"
    result = train(make_cfg(small_file, out, **RESUME))
    state = json.loads((latest_checkpoint(out) / "state.json").read_text())["loop"]
    return result, state, _weights(out)


# Between steps is the easy case (the other two cover it: a kill inside the window resumes from the step
# before), so it runs with -m slow to keep the default suite short; CI runs both.
@pytest.mark.parametrize("fault", [pytest.param("kill@step:3", id="between-steps", marks=pytest.mark.slow),
                                   pytest.param("kill@micro:7", id="inside-accumulation-window"),
                                   pytest.param("kill@save:4", id="during-checkpoint-write")])
def test_sigkill_then_resume_is_bitwise_equal(small_file, tmp_path, reference, fault):
    ref, ref_state, ref_weights = reference
    run = tmp_path / "run"
    cfg = make_cfg(small_file, run, **RESUME)
    config = tmp_path / "run.yaml"
    save_config(cfg, config)
    killed = _cli(config, faults=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run / "final").exists()
    resumed = _cli(config, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())["loop"]
    assert state["losses"] == ref.train_losses  # per-step losses, bitwise
    assert state["order"] == ref_state["order"]  # hashed example ids of every step
    weights = _weights(run)
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(small_file, tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    save_config(make_cfg(small_file, run, train__max_steps=400, train__micro_batch_size=2), config)
    proc = subprocess.Popen([sys.executable, "-m", "dstune.cli", "train", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count('"train"') >= 2):
        assert time.time() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    assert "--resume" in out and "SIGTERM" in out
    last = latest_checkpoint(run)
    verify_checkpoint(last)
    step = json.loads((last / "state.json").read_text())["loop"]["step"]
    assert 2 <= step < 400


def test_changed_file_or_missing_file_is_refused_by_name(small_file, tmp_path):
    result = train(make_cfg(small_file, tmp_path / "run", train__max_steps=2))
    ck = latest_checkpoint(result.run_dir)
    original = (ck / "optimizer.safetensors").read_bytes()
    data = bytearray(original)
    data[-1] ^= 0xFF
    (ck / "optimizer.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.safetensors.*SHA-256"):
        verify_checkpoint(ck)
    (ck / "optimizer.safetensors").write_bytes(original)
    verify_checkpoint(ck)
    (ck / "rng.safetensors").unlink()
    with pytest.raises(CheckpointError, match="rng.safetensors.*missing"):
        load_checkpoint(ck, None, None)


def test_latest_checkpoint_skips_incomplete_ones_and_retention_keeps_last_k(small_file, tmp_path):
    result = train(make_cfg(small_file, tmp_path / "run", train__max_steps=8, train__save_every=2,
                            train__keep_checkpoints=2))
    root = result.run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000006", "step-000008"]
    # A crash while writing step 10 leaves a .tmp directory, or one without the marker: never chosen.
    (root / "step-000010.tmp").mkdir()
    (root / "step-000012").mkdir()
    (root / "step-000012" / "trainable.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(result.run_dir).name == "step-000008"


def test_disk_full_during_save_keeps_previous_checkpoint(small_file, tmp_path, monkeypatch):
    real_save = ckpt_mod.save_file
    calls = {"n": 0}

    def flaky_save(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # the first checkpoint writes 3 files; the second one hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save_file", flaky_save)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="disk is full.*step-000002"):
        train(make_cfg(small_file, run, train__max_steps=4, train__save_every=2))
    assert latest_checkpoint(run).name == "step-000002"
    verify_checkpoint(run / "checkpoints" / "step-000002")
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_oom_in_a_step_halves_micro_batch_and_keeps_the_update(small_file, tmp_path, monkeypatch):
    over = dict(train__max_steps=5, train__micro_batch_size=4, train__grad_accum=1)
    clean = train(make_cfg(small_file, tmp_path / "clean", **over))
    monkeypatch.setenv("DSTUNE_FAULTS", "oom@step:3")
    faulty = train(make_cfg(small_file, tmp_path / "faulty", **over))
    assert faulty.summary["events"]["oom_backoffs"] == 1 and faulty.summary["micro_batch_split"] == 2
    # Same examples and per-token normalisation: only float summation order differs.
    torch.testing.assert_close(torch.tensor(faulty.train_losses), torch.tensor(clean.train_losses),
                               rtol=1e-5, atol=1e-5)


def test_oom_in_evaluation_never_changes_training(small_file, tmp_path, monkeypatch):
    over = dict(train__max_steps=4, train__eval_every=2, data__split=[0.5, 0.5, 0.0])
    clean = train(make_cfg(small_file, tmp_path / "clean", **over))
    monkeypatch.setenv("DSTUNE_FAULTS", "oom@eval:2")
    faulty = train(make_cfg(small_file, tmp_path / "faulty", **over))
    assert faulty.summary["events"]["eval_oom_backoffs"] == 1
    assert faulty.summary["micro_batch_split"] == 1
    assert faulty.train_losses == clean.train_losses
    assert faulty.val["loss"] == pytest.approx(clean.val["loss"], rel=1e-6)


def test_resume_with_changed_lr_is_refused_unless_allowed(small_file, tmp_path):
    run = tmp_path / "run"
    train(make_cfg(small_file, run, train__max_steps=4, train__save_every=2))
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-000004")
    changed = make_cfg(small_file, run, train__max_steps=4, train__save_every=2, optim__lr=1e-4)
    with pytest.raises(RunDirError, match="optim.lr.*--allow-config-change"):
        train(changed, resume=True)
    train(changed, resume=True, allow_config_change=True)
    record = json.loads((run / "config_changes.jsonl").read_text().splitlines()[-1])
    assert record["changes"][0]["key"] == "optim.lr"


def test_resume_with_changed_data_contents_is_refused(small_file, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(small_file.read_text(encoding="utf-8"), encoding="utf-8")
    run = tmp_path / "run"
    train(make_cfg(data, run, train__max_steps=2, train__save_every=1))
    data.write_text("\n".join(small_file.read_text(encoding="utf-8").splitlines()[:-1]), encoding="utf-8")
    with pytest.raises(RunDirError, match="data.train \\(contents\\)"):
        train(make_cfg(data, run, train__max_steps=3), resume=True)


def test_retention_keeps_the_best_checkpoint_too(small_file, tmp_path):
    # lr 3e-2 then a long run: validation at every save; the best step must survive retention of 1.
    result = train(make_cfg(small_file, tmp_path / "run", train__max_steps=6, train__save_every=2,
                            train__eval_every=2, train__keep_checkpoints=1, data__split=[0.5, 0.5, 0.0]))
    best = json.loads((result.run_dir / "best_checkpoint.json").read_text())
    kept = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir())
    assert Path(best["path"]).name in kept and "step-000006" in kept
    assert len(kept) <= 2
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["loss"] for r in rows if r["split"] == "val"}  # the end-of-run evaluation counts too
    assert best["loss"] == min(val.values())
