"""The memory planner: its arithmetic, its orderings, its accuracy against a tracked CPU step, fit and CLI."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from dstune.cli import app
from dstune.config import load_config
from dstune.errors import DstuneError, UsageError
from dstune.gpus import parse_gpu
from dstune.plan.estimate import Setup, estimate
from dstune.plan.search import fit
from dstune.train.measure import measure_step, write_text_data

CPU = Setup(device_type="cpu")
VOCAB, HIDDEN, LAYERS = 129280, 64, 2  # tiny:deepseek-llm (families.yaml)


def cfg_of(**values):
    base = {"model.name": "tiny:deepseek-llm", "data.max_length": 64, "train.micro_batch_size": 2,
            "train.precision": "fp32"}  # the hand counts are fp32's (auto plans bf16 for a GPU)
    return load_config(values={**base, **values})


def test_breakdown_adds_up():
    b = estimate(cfg_of(method="lora"), Setup(devices=1))
    assert b.allocated == pytest.approx(sum(b.parts.values()))
    assert b.total == pytest.approx(b.allocated + b.margin)
    assert b.parts["overlap"] <= 0


def test_components_match_a_hand_count():
    full = estimate(cfg_of(method="full"), CPU)
    params = full.facts["total_params"]
    assert params == VOCAB * HIDDEN * 2 + LAYERS * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    assert full.parts["trainable"] == 4 * params  # fp32 master weights
    assert full.parts["gradients"] == 4 * params
    assert full.parts["optimizer"] == 8 * params  # AdamW m and v in fp32
    lora = estimate(cfg_of(method="lora"), CPU)
    assert lora.facts["trainable_params"] == LAYERS * 4 * 8 * (64 + 64)  # r=8 on q, k, v, o
    assert lora.parts["weights"] == 4 * params
    # per token and layer: sdpa keeps q, k, v, out (4 x 64 x 4 B) + lse (4 heads x 4 B); two frozen
    # RMSNorms keep their fp32 input (2 x 64 x 4); LoRA inputs: the shared q/k/v input and o's (2 x 64 x 4);
    # SwiGLU keeps gate, silu and up (3 x 128 x 4).
    per_token = 4 * 64 * 4 + 16 + 2 * 64 * 4 + 2 * 64 * 4 + 3 * 128 * 4
    assert lora.parts["activations"] == LAYERS * per_token * 2 * 64
    labelled = 2 * 63
    assert lora.parts["logits"] == labelled * VOCAB * 8 + labelled * HIDDEN * 8


def test_orderings():
    full = estimate(cfg_of(method="full", **{"train.precision": "bf16"}), Setup())
    lora = estimate(cfg_of(method="lora", **{"train.precision": "bf16"}), Setup())
    qlora = estimate(cfg_of(method="qlora", **{"train.precision": "bf16"}), Setup())
    assert lora.total < full.total
    assert qlora.parts["weights"] < lora.parts["weights"] and qlora.allocated < lora.allocated
    long = {"data.max_length": 1024}
    plain = estimate(cfg_of(method="lora", **long), CPU)
    ckpt = estimate(cfg_of(method="lora", **long, **{"train.gradient_checkpointing": True}), CPU)
    assert ckpt.parts["activations"] < plain.parts["activations"]
    one = estimate(cfg_of(method="lora"), Setup(devices=1, zero=3))
    eight = estimate(cfg_of(method="lora"), Setup(devices=8, zero=3))
    assert eight.parts["weights"] == pytest.approx(one.parts["weights"] / 8)


@pytest.mark.parametrize(
    "model,method,length,ckpt",
    [
        ("tiny:deepseek-llm", "full", 64, False),
        ("tiny:deepseek-llm", "lora", 128, True),
        ("tiny:deepseek-v3", "freeze", 64, False),
    ],
)
def test_estimate_within_15_percent_of_measured(tmp_path, model, method, length, ckpt):
    data = write_text_data(tmp_path / "text.jsonl", rows=16)
    values = {
        "data.train": str(data),
        "data.format": "text",
        "data.cache": False,
        "train.packing": True,
        "train.progress": False,
        "train.prefetch": 0,
        "train.gradient_checkpointing": ckpt,
    }
    cfg = cfg_of(method=method, **{"model.name": model, "data.max_length": length}, **values)
    measured = measure_step(cfg)["peak"]
    predicted = estimate(cfg, CPU).allocated
    assert abs(predicted / measured - 1) < 0.15, (predicted, measured)


def test_fit_lowers_micro_batch_and_keeps_the_effective_batch():
    cfg = cfg_of(
        method="lora", **{"train.micro_batch_size": 8, "train.grad_accum": 2, "data.max_length": 512}
    )
    small = cfg_of(method="lora", **{"train.micro_batch_size": 2, "data.max_length": 512})
    budget = estimate(small, CPU).total * 1.01
    fitted, reason = fit(cfg, budget, Setup(device_type="cpu"))
    assert fitted.train.micro_batch_size < 8
    assert fitted.train.micro_batch_size * fitted.train.grad_accum == 16
    assert "micro-batch 8 ->" in reason
    with pytest.raises(UsageError, match="needs .* GiB"):
        fit(cfg, 1024, Setup(device_type="cpu"))


def test_errors_name_the_value_and_what_is_accepted():
    with pytest.raises(UsageError, match=r"'B200'.*24GB.*H100"):
        parse_gpu("B200")
    assert parse_gpu("8xH100")[0] == 8
    with pytest.raises(DstuneError, match="nosuch"):
        estimate(cfg_of(**{"model.name": "tiny:nosuch"}))
    out = CliRunner().invoke(app, ["plan", "--model", "tiny:deepseek-llm", "--gpu", "B200"])
    assert out.exit_code == 2 and "B200" in out.output and "H100" in out.output


def test_cli_plans_deepseek_v3_lora_on_8_h100_offline():
    args = ["plan", "--model", "deepseek-ai/DeepSeek-V3", "--method", "lora", "--gpu", "8xH100"]
    out = CliRunner().invoke(app, [*args, "--precision", "bf16", "--max-length", "2048"])
    assert out.exit_code == 0, out.output
    for line in ("weights", "activations", "optimizer states", "total per device", "verdict:"):
        assert line in out.output
    assert "does not fit" in out.output and "fastest configuration that fits" in out.output


def _auto_fit_run(tmp_path, name: str, *args: str):
    import json
    from pathlib import Path

    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    out = tmp_path / name
    result = CliRunner().invoke(app, [
        "train", "--model", "tiny:deepseek-llm", "--data", str(shared / "alpaca_zh_demo.json"), "--max-steps", "2",
        "--output", str(out), "--set", "train.micro_batch_size=8", "--set", "train.grad_accum=2",
        "--set", "data.max_length=512", "--set", "data.max_samples=64", "--set", "train.progress=false", *args,
    ])
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    return result, out, summary


def test_auto_fit_lowers_the_micro_batch_keeps_the_effective_batch_and_the_losses(tmp_path):
    from dstune.config import load_config as load

    plain, _, plain_summary = _auto_fit_run(tmp_path, "plain")
    fitted, out, summary = _auto_fit_run(tmp_path, "fitted", "--auto-fit", "--set", "train.memory_budget=1GB")
    assert plain.exit_code == 0 and fitted.exit_code == 0, fitted.output
    assert "auto-fit to 0.98 GiB (train.memory_budget=1GB): micro-batch 8 ->" in fitted.output
    saved = load(out / "config.yaml").train  # the run directory records the config that ran
    assert saved.micro_batch_size < 8 and saved.micro_batch_size * saved.grad_accum == 16
    memory = summary["memory"]
    assert memory["auto_fit"]["budget_mb"] == pytest.approx(0.98 * 1024, abs=0.1)
    assert memory["predicted_mb"] <= 0.98 * 1024 < plain_summary["memory"]["predicted_mb"]
    assert memory["measured"] == "peak_rss" and memory["measured_mb"] > 0
    assert "memory: the planner predicted" in fitted.output and "memory: the planner predicted" in plain.output
    # The same 16 rows per optimizer step, in the same order: the same training, in smaller pieces.
    assert plain_summary["final_train_loss"] == pytest.approx(summary["final_train_loss"], rel=1e-5)
    # Resuming with the same flags fits the same way, so the config is unchanged.
    more = CliRunner().invoke(app, ["train", "--output", str(out), "--resume", "--max-steps", "3"])
    assert more.exit_code == 0, more.output
    assert "changes (train.max_steps: 2 -> 3)" in more.output and "micro_batch" not in more.output


def test_auto_fit_refuses_a_budget_nothing_fits_before_anything_is_written(tmp_path):
    result, out, _ = _auto_fit_run(tmp_path, "tight", "--auto-fit", "--set", "train.memory_budget=150MB")
    assert result.exit_code != 0 and "needs 0." in result.output and "even at micro-batch 1" in result.output
    assert not out.exists()
    bad, out, _ = _auto_fit_run(tmp_path, "bad", "--auto-fit", "--set", "train.memory_budget=lots")
    assert bad.exit_code != 0 and "train.memory_budget" in bad.output and "512MB" in bad.output
    assert not out.exists()


def _recipes():
    from pathlib import Path

    return sorted((Path(__file__).resolve().parents[1] / "examples").glob("recipe-*.yaml"))


@pytest.mark.parametrize("path", _recipes(), ids=lambda p: p.stem)
def test_each_recipe_names_its_gpu_and_fits_it(path):
    import re

    from dstune.config.deepspeed import ZERO_STAGE
    from dstune.plan.search import plan

    found = re.search(r"dstune plan examples/\S+ --gpu (\S+)(?: --nodes (\d+))?", path.read_text(encoding="utf-8"))
    assert found, f"{path.name} does not say which GPU it was planned for"
    cfg = load_config(path)
    assert cfg.model.name.startswith("deepseek-ai/")  # a real model, planned from dstune's offline tables
    setup = Setup(nodes=int(found.group(2) or 1), zero=ZERO_STAGE[cfg.train.distributed])
    asked, budget, _, _ = plan(cfg, found.group(1), setup)
    assert asked.total <= budget, f"{path.name}: {asked.total / 2**30:.1f} GiB on {found.group(1)}"


def test_the_recipes_cover_the_guides_three_scenarios():
    by_model = {load_config(p).model.name: load_config(p) for p in _recipes()}
    domain = by_model["deepseek-ai/deepseek-llm-7b-base"]
    assert (domain.method, domain.lora.r, domain.lora.targets, domain.optim.lr) == ("lora", 16, "attention", 1e-4)
    dialogue = by_model["deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"]
    assert (dialogue.lora.r, dialogue.lora.alpha, dialogue.train.gradient_checkpointing) == (8, 32, True)
    assert 1 <= dialogue.train.epochs <= 2
    v3 = by_model["deepseek-ai/DeepSeek-V3"]  # the multi-node one: ZeRO-3, which partitions while it loads
    assert (v3.method, v3.train.distributed, v3.train.precision) == ("lora", "zero3", "bf16")
    low = by_model["deepseek-ai/DeepSeek-V2-Lite"]
    assert (low.method, low.qlora.bits, low.lora.r, low.lora.alpha, low.train.grad_accum) == ("qlora", 4, 4, 8, 16)
