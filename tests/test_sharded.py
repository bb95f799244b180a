"""``train.distributed=fsdp2`` on two CPU ranks (gloo), launched the way a user launches it:
``dstune train ... --nproc 2`` (torchrun underneath).

Two ranks with micro-batch 2 see, step by step, the same four rows as one process with micro-batch 4
(rank r takes every other row of the epoch's order), and both normalise the loss over the window's
labelled tokens, so the per-step losses, the validation losses and the trained weights must agree to
float rounding. Every launch has a timeout: a hang is a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA
from safetensors.torch import load_file

TIMEOUT = 420


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> Path:
    rows = json.loads((SHARED_DATA / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:64]
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


def dstune_train(
    out: Path, data: Path, *args: str, nproc: int = 1, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``dstune train`` as a user runs it, on one process or on ``nproc`` FSDP2 ranks."""
    micro = 4 // nproc  # the same rows per step either way
    cmd = [sys.executable, "-m", "dstune.cli", "train", "--data", str(data), "--output", str(out),
           "--set", "data.max_length=64", "--set", "train.progress=false", "--set", f"train.micro_batch_size={micro}",
           *args]  # fmt: skip
    if nproc > 1:
        cmd += ["--set", "train.distributed=fsdp2", "--nproc", str(nproc)]
    return subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True, text=True,
        timeout=TIMEOUT, cwd=out.parent,
    )  # fmt: skip


def curve(run: Path) -> list[tuple[str, int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["split"], r["step"], r["loss"]) for r in rows if r["split"] in ("train", "val")]


def assert_same_curve(a: list, b: list, rel: float = 2e-6) -> None:
    assert [x[:2] for x in a] == [x[:2] for x in b]
    for x, y in zip(a, b):
        assert y[2] == pytest.approx(x[2], rel=rel, nan_ok=True), (x, y)


def assert_same_tensors(a: dict, b: dict, atol: float) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), atol=atol, rtol=0, msg=k)


COMMON = ["--max-steps", "6", "--set", "data.split=[0.75,0.25,0.0]", "--set", "train.eval_every=3",
          "--set", "train.save_every=2"]  # fmt: skip


@pytest.mark.slow  # ~40 s: a one-process run and a two-rank run of tiny V3
def test_fsdp2_lora_on_moe_equals_one_process_with_rollback_and_gathers_a_plain_adapter(rows_file, tmp_path):
    """Tiny DeepSeek-V3 (MLA, MoE with the per-expert `eager` experts code, where ZeRO-3 needs leaf modules),
    accumulation over two micro-batches, periodic validation and a rollback by the stability guard."""
    args = ["--model", "tiny:deepseek-v3", "--method", "lora", *COMMON,
            "--set", "train.experts_implementation=eager", "--set", "train.grad_accum=2",
            "--set", "stability.policy=rollback", "--set", "stability.snapshot_every=2",
            "--set", "stability.inject=[nan_loss@4]"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    for out, n in ((one, 1), (two, 2)):
        done = dstune_train(out, rows_file, *args, nproc=n)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_same_curve(curve(one), curve(two))
    assert json.loads((two / "summary.json").read_text())["stability"]["rollbacks"] == 1
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == sorted(
        p.name for p in (one / "checkpoints").iterdir()
    )
    # The gathered adapter is peft's plain format: one process loads it and computes the same logits.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = json.loads((one / "run.json").read_text())["base_model"]
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    logits = []
    for run in (one, two):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(run / "final"))
        with torch.no_grad():
            logits.append(model.eval()(input_ids=ids).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)
    # `dstune merge` of the two-rank run equals the merge of the one-process run.
    merged = []
    for run in (one, two):
        out = run.parent / f"{run.name}-merged"
        done = subprocess.run([sys.executable, "-m", "dstune.cli", "merge", str(run), "-o", str(out)],
                              capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        merged.append({k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()})
    assert_same_tensors(*merged, atol=1e-6)
    # The checkpoint is the same files a one-process run writes (gathered), with the same weights.
    step = "checkpoints/step-000006/trainable.safetensors"
    assert_same_tensors(load_file(one / step), load_file(two / step), atol=1e-6)


@pytest.mark.slow  # ~35 s
def test_fsdp2_full_fine_tuning_gathers_the_whole_model_like_one_process(rows_file, tmp_path):
    """Full fine-tuning shards every weight; the final model is gathered into one safetensors file that
    transformers loads, equal to the one-process model."""
    args = ["--model", "tiny:deepseek-llm", "--method", "full", *COMMON]
    one, two = tmp_path / "one", tmp_path / "two"
    for out, n in ((one, 1), (two, 2)):
        done = dstune_train(out, rows_file, *args, nproc=n)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_same_curve(curve(one), curve(two))
    a, b = (load_file(r / "final" / "model.safetensors") for r in (one, two))
    assert_same_tensors(a, b, atol=2e-5)


@pytest.mark.slow  # ~60 s: an uninterrupted two-rank run, one killed with SIGKILL, its resume
def test_fsdp2_qlora_killed_with_sigkill_resumes_exactly(rows_file, tmp_path):
    """Both ranks die with SIGKILL right after step 3 (no handler runs); ``--resume --nproc 2`` continues
    from the step-2 checkpoint, and the curve and adapter equal an uninterrupted run's. QLoRA: the frozen
    4-bit weights stay whole on each rank, the rest is sharded."""
    args = ["--model", "tiny:deepseek-llm", "--method", "qlora", *COMMON]
    full, cut = tmp_path / "full", tmp_path / "cut"
    done = dstune_train(full, rows_file, *args, nproc=2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    killed = dstune_train(cut, rows_file, *args, nproc=2, env={"DSTUNE_FAULTS": "kill@step:3"})
    assert killed.returncode != 0
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["step-000002"]
    resumed = dstune_train(cut, rows_file, *args, "--resume", nproc=2)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step 2" in resumed.stdout
    # metrics.jsonl is a log (the killed session's step 3 stays in it); the checkpoint holds the run's curve.
    loop = [json.loads((r / "checkpoints/step-000006/state.json").read_text())["loop"] for r in (full, cut)]
    assert loop[1]["order"] == loop[0]["order"]  # the same rows in every step
    assert loop[1]["losses"] == pytest.approx(loop[0]["losses"], rel=1e-6)
    val = [json.loads((r / "summary.json").read_text())["val"]["loss"] for r in (full, cut)]
    assert val[1] == pytest.approx(val[0], rel=1e-6)
    adapter = "final/adapter_model.safetensors"
    assert_same_tensors(load_file(full / adapter), load_file(cut / adapter), atol=1e-6)


SLURM_SHIMS = """#!/bin/bash
# srun: the script's one task per machine, started here once per node number (SLURM_NODEID)
pids=(); for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node "$@" & pids+=($!); done
code=0; for p in "${pids[@]}"; do wait "$p" || code=$?; done; exit $code
"""


@pytest.mark.slow  # ~40 s: one process, then two "machines" of one rank each
def test_the_slurm_example_runs_one_run_over_two_machines(rows_file, tmp_path):
    """examples/slurm-fsdp2.sh as sbatch runs it, with the two machines on this one: ``srun`` is a shim
    that starts the script's task once per node (SLURM itself cannot run in CI), ``scontrol`` names this
    host. Each task is the real ``dstune train --nproc 1 --nnodes 2 --node-rank R --master-addr ...``;
    together they are one run of two ranks, equal to one process that sees both ranks' rows."""
    import socket
    import stat

    root = Path(__file__).resolve().parents[1]
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "srun").write_text(SLURM_SHIMS)
    (shims / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    for f in shims.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = (
        (root / "examples/slurm-fsdp2.sh").read_text().replace("--master-port 29500", f"--master-port {port}")
    )
    (tmp_path / "slurm.sh").write_text(script)
    shrink = ["--max-steps", "3", "--set", "data.max_samples=32", "--set", "data.max_length=64",
              "--set", "train.progress=false", "--set", "train.eval_every=0", "--set", "train.save_every=0",
              "--set", f"data.train={rows_file}"]  # fmt: skip
    config = str(root / "examples/fsdp2-lora-deepseek-v3-tiny.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{shims}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "1", "SLURM_JOB_NODELIST": "localhost"}  # fmt: skip
    two = subprocess.run(["bash", str(tmp_path / "slurm.sh"), config, "--output", str(tmp_path / "two"), *shrink],
                         env=env, capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert two.stdout.count("run directory:") == 1  # the first machine's rank 0 prints, the other is quiet
    one = subprocess.run([sys.executable, "-m", "dstune.cli", "train", config, "--output", str(tmp_path / "one"),
                          *shrink, "--set", "train.micro_batch_size=4", "--set", "train.distributed=auto"],
                         env=env, capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    assert_same_curve(curve(tmp_path / "one"), curve(tmp_path / "two"))


def test_launch_flags_are_removed_for_the_ranks_and_become_torchrun_arguments():
    from dstune.launch import strip_launch_flags, torchrun_args

    argv = ["train", "run.yaml", "--nproc", "8", "--nnodes=2", "--node-rank", "1", "--master-addr", "10.0.0.1",
            "--master-port=29600", "--set", "train.distributed=fsdp2"]  # fmt: skip
    assert strip_launch_flags(argv) == ["train", "run.yaml", "--set", "train.distributed=fsdp2"]
    local = torchrun_args(["train", "x.yaml"], 4, 1, 0, None, 29500)
    assert "--standalone" in local and "--nproc-per-node=4" in local
    assert local[-4:] == ["-m", "dstune.cli", "train", "x.yaml"]
    multi = torchrun_args(["train"], 8, 2, 1, "10.0.0.1", 29600)
    assert {"--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=29600"} <= set(multi)
    assert "--standalone" not in multi


@pytest.mark.parametrize(
    "sets, key",
    [
        (["train.precision=fp16"], "train.precision=fp16"),
        (["objective=grpo"], "objective=grpo"),
        (["train.split_by_length=on"], "train.split_by_length=on"),
        (["regularize.ewc_lambda=1", "regularize.ewc_data=x.jsonl"], "regularize.ewc_lambda"),
    ],
)
def test_what_fsdp2_cannot_run_is_refused_by_key_before_anything_is_written(sets, key, tmp_path):
    from dstune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"{key}.*train.distributed=fsdp2.*train.distributed=auto"):
        load_config(None, ["train.distributed=fsdp2", *sets])


def test_launch_flags_are_checked_before_torchrun_starts(tmp_path):
    from typer.testing import CliRunner

    from dstune.cli import app

    bad = CliRunner().invoke(app, ["train", "--nproc", "2", "--nnodes", "2", "--model", "tiny:deepseek-llm"])
    assert bad.exit_code != 0 and "--master-addr" in bad.output
    bad = CliRunner().invoke(
        app, ["train", "--nproc", "2", "--nnodes", "2", "--node-rank", "2", "--master-addr", "h"]
    )
    assert bad.exit_code != 0 and "0 .. 1" in bad.output
