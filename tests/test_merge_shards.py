"""``dstune merge`` shard by shard (issue 24): a LoRA run folded into its base one tensor at a time equals
peft's in-memory ``merge_and_unload`` bitwise, on tiny DeepSeek-LLM (rsLoRA, per-module rank and alpha,
PiSSA) and DeepSeek-V3 (MLA attention and the dense MLP's 2-D ``target_parameters``); what it cannot express
falls back to the in-memory merge with the reason, and a bad merge leaves nothing behind."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHARED_DATA
from rich.console import Console
from safetensors.torch import load_file, save_file

from dstune.config import RunConfig
from dstune.merge import MergeError, merge_run
from dstune.merge_shards import NotShardable, dequantize_fp8, parse_size, plan_shard_merge
from dstune.models.load import load_model
from dstune.train.loop import train


def _run(tmp_path, family: str, **lora) -> str:
    out = tmp_path / f"run-{family}"
    train(RunConfig.model_validate({
        "model": {"name": f"tiny:{family}"}, "method": "lora", "output": str(out),
        "data": {"train": str(SHARED_DATA / "alpaca_en_demo.json"), "max_samples": 16, "max_length": 64},
        "lora": {"r": 4, "targets": "all-linear", **lora}, "optim": {"lr": 1e-2},
        "train": {"max_steps": 2, "micro_batch_size": 4, "progress": False, "seed": 0, "precision": "fp32"},
    }), console=Console(quiet=True))  # fmt: skip
    return out


def _same_weights(a, b) -> None:
    sa, sb = load_model(str(a)).state_dict(), load_model(str(b)).state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize(
    "family, lora",
    [
        ("deepseek-llm", {"use_rslora": True, "rank_pattern": {"o_proj": 8}, "alpha_pattern": {"down_proj": 3.0}}),
        ("deepseek-llm", {"init": "pissa"}),  # saved converted: a rank-2r adapter on the original base
        ("deepseek-v3", {}),  # MLA projections by module, the dense MLP by 2-D target_parameters
    ],
)
def test_shard_merge_equals_the_in_memory_merge_bitwise(family, lora, tmp_path):
    run = _run(tmp_path, family, **lora)
    plan = plan_shard_merge(run)
    assert len(plan.updates) >= 10
    shards = merge_run(run, tmp_path / "shards")
    memory = merge_run(run, tmp_path / "memory", mode="memory")
    assert (shards.mode, memory.mode) == ("shards", "memory")
    _same_weights(tmp_path / "shards", tmp_path / "memory")
    base = load_model(f"tiny:{family}").state_dict()
    merged = load_model(str(tmp_path / "shards")).state_dict()
    changed = [n for n in base if not torch.equal(base[n], merged[n])]
    assert sorted(changed) == sorted(plan.updates)  # exactly the adapted weights moved


def test_small_shards_get_an_index_and_load_the_same(tmp_path):
    run = _run(tmp_path, "deepseek-llm")
    merge_run(run, tmp_path / "one")
    merge_run(run, tmp_path / "many", max_shard_size="600KB", dtype="bf16")
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 3
    for f in files:  # each shard within the limit, unless it holds one tensor larger than the limit
        holds = [n for n, where in index["weight_map"].items() if where == f]
        assert len(holds) == 1 or (tmp_path / "many" / f).stat().st_size <= 600_000 + 10_000, (f, holds)
    one = load_model(str(tmp_path / "one")).state_dict()
    many = load_model(str(tmp_path / "many")).state_dict()
    for name in one:  # bf16 written: the fp32 merge rounded once
        assert many[name].dtype == torch.float32 and torch.equal(many[name], one[name].bfloat16().float()), name
    assert json.loads((tmp_path / "many" / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30 and parse_size("512") == 512


@pytest.mark.parametrize(
    "family, lora, why",
    [
        ("deepseek-llm", {"use_dora": True}, "use_dora: DoRA"),
        ("deepseek-v3", {"targets": "attention", "experts": "routed"}, "fused experts"),  # 3-D expert LoRA
    ],
)
def test_what_one_tensor_cannot_hold_merges_in_memory_with_the_reason(family, lora, why, tmp_path):
    run = _run(tmp_path, family, **lora)
    with pytest.raises(NotShardable, match=why):
        plan_shard_merge(run)
    result = merge_run(run, tmp_path / "auto")
    assert result.mode == "memory" and why in result.why_memory
    with pytest.raises(MergeError, match=f"--mode shards: .*{why}"):
        merge_run(run, tmp_path / "forced", mode="shards")
    assert not (tmp_path / "forced").exists()  # refused before anything was written


def test_a_merge_that_would_write_inf_leaves_nothing(tmp_path):
    run = _run(tmp_path, "deepseek-llm")
    path = run / "final" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = torch.full_like(tensors[key], float("inf"))
    save_file(tensors, str(path))
    with pytest.raises(MergeError, match="NaN or inf"):
        merge_run(run, tmp_path / "bad", mode="shards")
    assert not (tmp_path / "bad").exists()


def test_fp8_blocks_are_dequantised_with_ragged_edges():
    torch.manual_seed(0)
    w = torch.randn(40, 70)
    scale = torch.rand(3, 5) + 0.5  # 16x16 blocks: the last row and column blocks are partial
    q = (w / scale.repeat_interleave(16, 0)[:40].repeat_interleave(16, 1)[:, :70]).to(torch.float8_e4m3fn)
    want = torch.stack([torch.stack([q[i, j].float() * scale[i // 16, j // 16] for j in range(70)]) for i in range(40)])
    assert torch.equal(dequantize_fp8(q, scale, (16, 16)), want)
