"""``train.distributed=fsdp2 | zero2 | zero3`` on two CPU ranks (gloo), launched the way a user launches
it: ``dstune train ... --nproc 2`` (torchrun underneath).

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
import time
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
    out: Path, data: Path, *args: str, engine: str = "auto", env: dict | None = None, micro: int | None = None
) -> subprocess.CompletedProcess:
    """``dstune train`` as a user runs it: one process, or two ranks of ``engine`` (``--nproc 2``)."""
    nproc = 1 if engine == "auto" else 2
    micro = micro or 4 // nproc  # the same rows per step either way
    cmd = [sys.executable, "-m", "dstune.cli", "train", "--data", str(data), "--output", str(out),
           "--set", "data.max_length=64", "--set", "train.progress=false", "--set", f"train.micro_batch_size={micro}",
           "--set", "train.precision=fp32",  # the engines agree to fp32 rounding (auto: bf16 on an avx512_bf16 CPU)
           *args]  # fmt: skip
    if engine != "auto":
        offload = engine.endswith("-offload")
        cmd += ["--set", f"train.distributed={engine.removesuffix('-offload')}", "--nproc", "2"]
        cmd += ["--set", "train.offload=all"] if offload else []
    done = subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True, text=True,
        timeout=TIMEOUT, cwd=out.parent,
    )  # fmt: skip
    assert env or done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


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


def loop_state(run: Path, step: int = 6) -> dict:
    return json.loads((run / f"checkpoints/step-{step:06d}/state.json").read_text())["loop"]


COMMON = ["--max-steps", "6", "--set", "data.split=[0.75,0.25,0.0]", "--set", "train.eval_every=3",
          "--set", "train.save_every=2"]  # fmt: skip
# Tiny DeepSeek-V3 (MLA; MoE with the per-expert `eager` experts code, under which ZeRO-3 needs its leaf
# modules), accumulation over two micro-batches, periodic validation, a step the stability guard skips.
V3 = ["--model", "tiny:deepseek-v3", "--method", "lora", *COMMON, "--set", "train.experts_implementation=eager",
      "--set", "train.grad_accum=2", "--set", "stability.inject=[nan_loss@4]"]  # fmt: skip
FULL = ["--model", "tiny:deepseek-llm", "--method", "full", *COMMON]


@pytest.fixture(scope="module")
def one_process(rows_file, tmp_path_factory) -> dict[str, Path]:
    """The one-process runs each engine is compared with (made once)."""
    root = tmp_path_factory.mktemp("one")
    dstune_train(root / "v3", rows_file, *V3)
    dstune_train(root / "full", rows_file, *FULL)
    return {"v3": root / "v3", "full": root / "full"}


@pytest.fixture(scope="module")
def sharded_v3(rows_file, tmp_path_factory):
    """The two-rank V3 runs, by engine, made on first use (the merge test reads one of them)."""
    runs: dict[str, Path] = {}

    def get(engine: str) -> Path:
        if engine not in runs:
            runs[engine] = tmp_path_factory.mktemp("two") / engine
            dstune_train(runs[engine], rows_file, *V3, engine=engine)
        return runs[engine]

    return get


@pytest.mark.slow  # ~25 s per engine (two ranks), after the one-process reference
@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3-offload"])
def test_sharded_lora_on_moe_equals_one_process_and_gathers_a_plain_adapter(engine, one_process, sharded_v3):
    one, two = one_process["v3"], sharded_v3(engine)
    assert_same_curve(curve(one), curve(two))
    assert json.loads((two / "summary.json").read_text())["stability"]["skipped"] == 1
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == [
        "step-000002",
        "step-000004",
        "step-000006",
    ]
    # The checkpoint is the files a one-process run writes (gathered), with the same weights and moments.
    for name in ("trainable", "optimizer"):
        step = f"checkpoints/step-000006/{name}.safetensors"
        assert_same_tensors(load_file(one / step), load_file(two / step), atol=1e-6)
    assert loop_state(two)["losses"] == pytest.approx(loop_state(one)["losses"], rel=2e-6, nan_ok=True)
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


@pytest.mark.slow  # ~20 s: two merges (the sharded run is the ZeRO-3 one above)
def test_dstune_merge_of_a_sharded_run_equals_the_one_process_merge(one_process, sharded_v3, tmp_path):
    merged = []
    for run in (one_process["v3"], sharded_v3("zero3-offload")):
        out = tmp_path / f"{run.name}-merged"
        done = subprocess.run([sys.executable, "-m", "dstune.cli", "merge", str(run), "-o", str(out)],
                              capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        merged.append({k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()})
    assert_same_tensors(*merged, atol=1e-6)


@pytest.mark.slow  # ~25 s (full fine-tuning under ZeRO-3 is checked by the kill test below)
def test_fsdp2_full_fine_tuning_gathers_the_whole_model_like_one_process(one_process, rows_file, tmp_path):
    """Full fine-tuning shards every weight; the final model is gathered into the safetensors file
    transformers loads, equal to the one-process model."""
    one, two = one_process["full"], tmp_path / "fsdp2"
    # Files of 10 MB: the 66 MB model is gathered and written one weight at a time into several files.
    dstune_train(two, rows_file, *FULL, "--set", "train.save_shard_size=10MB", engine="fsdp2")
    assert_same_curve(curve(one), curve(two))
    memory = json.loads((two / "summary.json").read_text())["memory"]  # each rank's peaks, rank 0 first
    assert len(memory["measured_mb_per_rank"]) == len(memory["startup_mb_per_rank"]) == 2
    assert memory["measured_mb"] == memory["measured_mb_per_rank"][0] and min(memory["startup_mb_per_rank"]) > 100
    assert len(memory["final_save_mb_per_rank"]) == 2
    files = sorted((two / "final").glob("*.safetensors"))
    assert len(files) > 2 and (two / "final" / "model.safetensors.index.json").is_file()
    a = load_file(one / "final" / "model.safetensors")
    b = {k: v for f in files for k, v in load_file(f).items()}
    assert_same_tensors(a, b, atol=2e-5)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(two / "final")).config.architectures == ["LlamaForCausalLM"]


@pytest.mark.slow  # ~45 s per engine: a killed two-rank run and its resume
@pytest.mark.parametrize("engine, run", [("fsdp2", "v3"), ("zero3", "full")])
def test_sharded_run_killed_with_sigkill_resumes_exactly(engine, run, one_process, rows_file, tmp_path):
    """Both ranks die with SIGKILL right after step 3 (no handler runs); ``--resume --nproc 2`` continues
    from the step-2 checkpoint, and the run's curve and weights equal the uninterrupted one-process run's:
    LoRA on V3 under FSDP2, full fine-tuning under ZeRO-3 (every weight and moment gathered and reloaded)."""
    args, cut = {"v3": V3, "full": FULL}[run], tmp_path / "cut"
    killed = dstune_train(cut, rows_file, *args, engine=engine, env={"DSTUNE_FAULTS": "kill@step:3"})
    assert killed.returncode != 0
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["step-000002"]
    resumed = dstune_train(cut, rows_file, *args, "--resume", engine=engine)
    assert "resumed from" in resumed.stdout and "step 2" in resumed.stdout
    # metrics.jsonl is a log (the killed session's step 3 stays in it); the checkpoint holds the run's curve.
    one = one_process[run]
    assert loop_state(cut)["losses"] == pytest.approx(loop_state(one)["losses"], rel=1e-6, nan_ok=True)
    final = "final/adapter_model.safetensors" if run == "v3" else "final/model.safetensors"
    assert_same_tensors(load_file(one / final), load_file(cut / final), atol=2e-5)


@pytest.mark.slow  # ~60 s: a one-process run and two of two ranks
def test_fsdp2_qlora_rollback_equals_one_process(rows_file, tmp_path):
    """QLoRA under FSDP2 (the frozen 4-bit weights stay whole on each rank, the rest is sharded) with
    the stability guard rolling back to an in-memory snapshot of the sharded weights and optimizer."""
    args = ["--model", "tiny:deepseek-llm", "--method", "qlora", *COMMON, "--set", "stability.policy=rollback",
            "--set", "stability.snapshot_every=2", "--set", "stability.inject=[nan_loss@4]"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    dstune_train(one, rows_file, *args)
    dstune_train(two, rows_file, *args, engine="fsdp2")
    assert_same_curve(curve(one), curve(two))
    assert json.loads((two / "summary.json").read_text())["stability"]["rollbacks"] == 1


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
              "--set", f"data.train={rows_file}", "--set", "train.precision=fp32"]  # fmt: skip
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


def test_the_launch_exits_with_the_code_of_the_rank_that_ended_first_not_of_those_torchrun_killed():
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from dstune.launch import root_exit_code

    def failed(rank: int, code: int, at: int) -> ProcessFailure:
        f = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="/nonexistent")
        f.timestamp = at
        return f

    # Rank 1 saved and stopped (130); torchrun then sent SIGTERM to rank 0, recorded as -15.
    assert root_exit_code([failed(0, -15, 11), failed(1, 130, 10)]) == 130
    assert root_exit_code([failed(0, 3, 10), failed(1, -15, 10)]) == 3  # halted by the stability guard
    assert root_exit_code([failed(0, 130, 10), failed(1, 1, 10)]) == 1  # same second: the error wins
    assert root_exit_code([failed(0, 130, 9), failed(1, 1, 10)]) == 130
    assert root_exit_code([failed(0, -9, 10), failed(1, -9, 10)]) == 1  # every rank killed


@pytest.mark.parametrize(
    "sets, key",
    [
        (["train.precision=fp16"], "train.precision=fp16"),
        (["objective=grpo"], "objective=grpo"),
        (["train.split_by_length=on"], "train.split_by_length=on"),
        (["regularize.ewc_lambda=1", "regularize.ewc_data=x.jsonl"], "regularize.ewc_lambda"),
        (["lora.init=pissa"], "lora.init=pissa"),  # it crashed at the final save (checked on fsdp2 and zero3)
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


def _ds_cfg(tmp_path, user: dict | None, *sets: str):
    from dstune.config import load_config

    overrides = ["train.distributed=zero3", *sets]
    if user is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(user))
        overrides.append(f"train.deepspeed={path}")
    return load_config(None, overrides)


def test_the_shipped_zero3_offload_preset_gets_its_auto_values_from_the_run_config():
    from dstune.config import load_config
    from dstune.config.deepspeed import deepspeed_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "examples/zero3-offload-lora-deepseek-v3-tiny.yaml", ["train.precision=bf16"])
    assert cfg.train.deepspeed == str(root / "examples/deepspeed/zero3-offload.json")  # relative to the yaml
    ds = deepspeed_config(cfg.train, cfg.optim, world=8, hidden=7168)
    zero = ds["zero_optimization"]
    assert (
        zero["stage"] == 3
        and zero["offload_optimizer"]["device"] == "cpu"
        and zero["offload_param"]["device"] == "cpu"
    )
    assert zero["reduce_bucket_size"] == 7168 * 7168 and zero["stage3_param_persistence_threshold"] == 71680
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 7168 * 7168)
    assert ds["gradient_clipping"] == cfg.optim.max_grad_norm and ds["bf16"]["enabled"] is True
    # dstune's loop accumulates: DeepSpeed sees one micro-step per optimizer step, over all ranks
    assert (
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
        ds["train_batch_size"],
    ) == (1, 1, 8)
    assert ds["zero_force_ds_cpu_optimizer"] is False and not [k for k, v in ds.items() if v == "auto"]


@pytest.mark.parametrize(
    "user, sets, needle",
    [
        ({"gradient_accumulation_steps": 8}, ["train.grad_accum=2"], "gradient_accumulation_steps to 8, but train.grad_accum is 2"),
        ({"zero_optimization": {"stage": 2}}, [], "zero_optimization.stage to 2, but train.distributed=zero3 is 3"),
        ({"optimizer": {"type": "AdamW"}}, [], "'optimizer' section"),
        ({"bf16": {"enabled": True}}, ["train.precision=fp32"], "bf16.enabled to True, but train.precision=bf16 is False"),
        ({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, [], "zero_optimization.sub_group_size"),
        (None, ["train.offload=all", "train.distributed=zero2"], "train.offload=all needs train.distributed=zero3"),
        (None, ["stability.policy=rollback"], "stability.policy=rollback does not run with train.distributed=zero3"),
        (None, ["optim.max_grad_norm=null"], "optim.max_grad_norm=null"),
    ],
)  # fmt: skip
def test_a_deepspeed_setting_dstune_cannot_honour_is_refused_by_key(user, sets, needle, tmp_path):
    from dstune.config import ConfigError

    with pytest.raises(ConfigError) as err:
        _ds_cfg(tmp_path, user, *sets)
    assert needle in str(err.value)


def test_a_broken_deepspeed_json_names_the_file_and_line(tmp_path):
    from dstune.config import ConfigError, load_config

    bad = tmp_path / "ds.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 3,}\n}\n')
    with pytest.raises(ConfigError, match=r"ds.json is not valid JSON \(line 2"):
        load_config(None, ["train.distributed=zero3", f"train.deepspeed={bad}"])
    with pytest.raises(ConfigError, match="train.deepspeed: file not found"):
        load_config(None, ["train.distributed=zero3", f"train.deepspeed={tmp_path / 'nope.json'}"])
    with pytest.raises(ConfigError, match="train.deepspeed .* needs train.distributed=zero2 or zero3"):
        load_config(None, [f"train.deepspeed={bad}"])


@pytest.mark.slow  # ~40 s: a two-rank run that stops, and its resume
def test_out_of_memory_on_one_rank_stops_every_rank_and_the_run_resumes(rows_file, tmp_path):
    """Rank 1 alone runs out of memory in step 3. It cannot halve its batch as one process does (rank 0 is
    already inside the step's collectives), so it stops with the reason, the launcher ends rank 0 at once
    (not after the 30-minute process-group timeout), and the run resumes from its step-2 checkpoint with
    the halved micro-batch the message asks for."""
    args = ["--model", "tiny:deepseek-llm", "--method", "lora", *COMMON]
    cut = tmp_path / "cut"
    start = time.monotonic()
    failed = dstune_train(cut, rows_file, *args, engine="fsdp2", env={"DSTUNE_FAULTS": "oom@step:3@rank1"})
    assert failed.returncode != 0 and time.monotonic() - start < 120
    said = failed.stdout + failed.stderr
    assert "out of memory on rank 1 of 2 at step 3" in said and "--allow-config-change" in said
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["step-000002"]
    resumed = dstune_train(cut, rows_file, *args, "--resume", "--allow-config-change", "--set",
                           "train.grad_accum=2", engine="fsdp2", micro=1)  # fmt: skip
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout
    assert json.loads((cut / "summary.json").read_text())["steps"] == 6


def test_zero3_partitions_the_model_while_transformers_loads_it(tmp_path, monkeypatch):
    """ZeRO-3 loads inside ``deepspeed.zero.Init`` (``engine.loading``): every weight is partitioned as it is
    created and filled layer by layer, so no rank holds the whole model; the parameter counts, the
    optimizer's decay groups and the weights are those of the plain load, and a model loaded after the
    block is plain again. One process (a group of one), tiny DeepSeek-V3 with its fused 3-D experts."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from dstune.config import RunConfig
    from dstune.core.facts import full_shape
    from dstune.methods.summary import trainable_summary
    from dstune.models.load import load_model, resolve_model_dir
    from dstune.train.engine import make_engine
    from dstune.train.optim import build_optimizer

    # A one-process ZeRO engine sets LOCAL_RANK for DeepSpeed; the test's process must not keep it, or the
    # runs later tests start in it would take themselves for torchrun ranks.
    monkeypatch.setenv("LOCAL_RANK", "0")
    qlora = RunConfig.model_validate({
        "model": {"name": "tiny:deepseek-llm"}, "data": {"train": str(tmp_path / "unused.jsonl")}, "method": "qlora",
        "train": {"distributed": "zero3", "precision": "fp32"}, "output": str(tmp_path / "run"),
    })  # fmt: skip
    with make_engine(qlora).loading(resolve_model_dir(qlora.model.name).path):
        assert not is_deepspeed_zero3_enabled()  # a quantised model is loaded whole, and peft must know it
    cfg = RunConfig.model_validate({
        "model": {"name": "tiny:deepseek-v3"}, "data": {"train": str(tmp_path / "unused.jsonl")}, "method": "full",
        "train": {"distributed": "zero3", "precision": "fp32"}, "output": str(tmp_path / "run"),
    })  # fmt: skip
    engine = make_engine(cfg)
    resolved = resolve_model_dir(cfg.model.name)
    plain = load_model(resolved)
    with engine.loading(resolved.path):
        assert is_deepspeed_zero3_enabled()
        model = load_model(resolved)
    assert not is_deepspeed_zero3_enabled()
    whole = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        assert hasattr(p, "ds_id") and p.numel() == 0, name  # partitioned: the data lives in ds_tensor
        assert full_shape(p) == whole[name].shape, name
    assert trainable_summary(model) == trainable_summary(plain)
    groups = [[p.shape if p.numel() else full_shape(p) for p in g["params"]] for g in
              build_optimizer(model, cfg.optim, engine.device).param_groups]  # fmt: skip
    assert groups == [[p.shape for p in g["params"]] for g in build_optimizer(plain, cfg.optim, engine.device).param_groups]
    assert any(len(shape) == 3 for g in groups for shape in g)  # the fused experts, seen as 3-D
    params = list(model.parameters())
    with engine.deepspeed.zero.GatheredParameters(params):
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.data, whole[name].data, rtol=0, atol=0, msg=name)
    assert not hasattr(load_model(resolved).lm_head.weight, "ds_id")
