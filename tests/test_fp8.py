"""The official DeepSeek-V3/R1 checkpoints store FP8 weights (issue 24): e4m3 values, one float32
``weight_scale_inv`` per block of the weight, and ``quantization_config: {quant_method: fp8,
weight_block_size}`` in config.json. A tiny V3 is written here in that layout (per-expert tensor names as
in the hub's shards, 16x16 blocks so that most weights have several blocks and ragged edges), and dstune
loads it de-quantised exactly, names the storage in ``inspect``, trains LoRA on it and merges the result
into a plain checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from dstune.config import RunConfig
from dstune.models.inspect import inspect_model, render_report
from dstune.models.load import load_model, resolve_model_dir
from dstune.train.loop import train

BLOCK = 16
E4M3_MAX = 448.0
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _quantise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's block quantisation: per block, scale = amax / 448 and q = w / scale in e4m3."""
    rows, cols = -(-w.shape[0] // BLOCK), -(-w.shape[1] // BLOCK)
    scale = torch.empty(rows, cols)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            block = w[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK]
            scale[i, j] = block.abs().max().clamp(min=1e-12) / E4M3_MAX
            q[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = (block / scale[i, j]).to(q.dtype)
    return q, scale


def dequantise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The reference: each e4m3 value times its block's scale, in fp32."""
    full = scale.repeat_interleave(BLOCK, 0)[: q.shape[0]].repeat_interleave(BLOCK, 1)[:, : q.shape[1]]
    return q.float() * full


@pytest.fixture(scope="module")
def fp8_v3(tmp_path_factory) -> Path:
    """tiny:deepseek-v3 re-written as the hub's FP8 checkpoints are: linear weights of the decoder layers in
    e4m3 with ``weight_scale_inv``; embeddings, norms, the router and the output layer in bf16."""
    src = Path(resolve_model_dir("tiny:deepseek-v3").path)
    dst = tmp_path_factory.mktemp("fp8") / "deepseek-v3-fp8"
    shutil.copytree(src, dst)
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(dst.glob("*.safetensors")):
        weights.update(load_file(shard))
        shard.unlink()
    for index in dst.glob("*.index.json"):
        index.unlink()
    out = {}
    for name, w in weights.items():
        if w.dim() == 2 and ".layers." in name and name.endswith("proj.weight"):
            out[name], out[name + "_scale_inv"] = _quantise(w)
        else:
            out[name] = w.to(torch.bfloat16)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [BLOCK, BLOCK]}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def test_fp8_weights_load_dequantised_exactly(fp8_v3):
    stored = load_file(fp8_v3 / "model.safetensors")
    quantised = [n for n in stored if n.endswith("_scale_inv")]
    assert len(quantised) >= 20 and stored["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].shape == (40, 64)

    def ref(name: str) -> torch.Tensor:
        return dequantise(stored[name], stored[name + "_scale_inv"])

    model = load_model(fp8_v3, dtype=torch.float32)
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.float32 for p in params.values())
    for name in quantised:
        name = name.removesuffix("_scale_inv")
        if ".experts." not in name or "shared_experts" in name:
            torch.testing.assert_close(params[name], ref(name), rtol=0, atol=0, msg=name)
    # The routed experts are fused by transformers: gate_up_proj[e] = [gate_e; up_e], down_proj[e] = down_e.
    layer = "model.layers.1.mlp.experts"
    for e in range(4):
        want = torch.cat([ref(f"{layer}.{e}.gate_proj.weight"), ref(f"{layer}.{e}.up_proj.weight")])
        torch.testing.assert_close(params[f"{layer}.gate_up_proj"][e], want, rtol=0, atol=0)
        torch.testing.assert_close(params[f"{layer}.down_proj"][e], ref(f"{layer}.{e}.down_proj.weight"),
                                   rtol=0, atol=0)
    # Not a no-op: FP8 is a coarse copy of the original weights (3 mantissa bits, ~2-3% relative error).
    original = load_model(resolve_model_dir("tiny:deepseek-v3"), dtype=torch.float32)
    name = "model.layers.0.self_attn.o_proj.weight"
    w, w0 = params[name].detach(), original.get_parameter(name).detach()
    assert 0.005 < float((w - w0).norm() / w0.norm()) < 0.05


def test_inspect_names_the_fp8_storage(fp8_v3):
    text = render_report(inspect_model(str(fp8_v3)))
    assert "FP8 (e4m3, 16x16 blocks" in text
    assert "FP8 (e4m3, 128x128 blocks" in render_report(inspect_model("deepseek-ai/DeepSeek-V3"))
    assert inspect_model("tiny:deepseek-v3")["storage"] is None


def test_lora_trains_on_the_fp8_checkpoint_and_merges_into_a_plain_one(fp8_v3, tmp_path):
    from transformers import AutoModelForCausalLM

    from dstune.merge import merge_run

    cfg = RunConfig.model_validate({
        "model": {"name": str(fp8_v3)}, "method": "lora", "output": str(tmp_path / "run"),
        "data": {"train": str(SHARED / "alpaca_zh_demo.json"), "max_samples": 24, "max_length": 64},
        "lora": {"r": 4, "targets": "attention"}, "optim": {"lr": 1e-2},
        "train": {"max_steps": 3, "micro_batch_size": 4, "progress": False, "seed": 0},
    })
    result = train(cfg, console=Console(quiet=True))
    losses = result.train_losses
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert merge_run(tmp_path / "run", tmp_path / "merged").mode == "shards"  # FP8 de-quantised tensor by tensor
    merge_run(tmp_path / "run", tmp_path / "memory", mode="memory")  # the whole model loaded by transformers
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "memory", dtype=torch.float32).state_dict()
    for name, value in AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).state_dict().items():
        assert torch.equal(value, in_memory[name]), name
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config  # the merged weights are plain floats, not FP8
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    stored = load_file(fp8_v3 / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"  # not a LoRA target: the de-quantised base weight itself
    torch.testing.assert_close(merged.get_parameter(name), dequantise(stored[name], stored[name + "_scale_inv"]))
    adapted = "model.layers.0.self_attn.o_proj.weight"  # a LoRA target: base + the trained update
    base = dequantise(stored[adapted], stored[adapted + "_scale_inv"])
    assert not torch.allclose(merged.get_parameter(adapted), base)


def test_dstune_dequantize_writes_the_plain_checkpoint_transformers_would_load(fp8_v3, tmp_path):
    """``dstune dequantize`` (what ZeRO-3 needs: it partitions a plain checkpoint while loading) rewrites the
    FP8 weights tensor by tensor: the result loads without a quantization_config into exactly the weights
    transformers de-quantises on its own, in shards with an index, with the tokenizer beside them."""
    import subprocess
    import sys

    out = tmp_path / "plain"
    done = subprocess.run([sys.executable, "-m", "dstune.cli", "dequantize", str(fp8_v3), "-o", str(out),
                           "--dtype", "fp32", "--max-shard-size", "100KB"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    stored = load_file(fp8_v3 / "model.safetensors")
    assert f"de-quantised {sum(n.endswith('_scale_inv') for n in stored)} FP8 weights" in done.stdout
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    written = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    assert not any(k.endswith("_scale_inv") for k in written) and all(v.dtype != torch.float8_e4m3fn for v in written.values())
    plain, fp8 = (dict(load_model(d, dtype=torch.float32).named_parameters()) for d in (out, fp8_v3))
    assert sorted(plain) == sorted(fp8)
    for name, p in fp8.items():
        torch.testing.assert_close(plain[name], p, rtol=0, atol=0, msg=name)
    again = subprocess.run([sys.executable, "-m", "dstune.cli", "dequantize", str(out), "-o", str(tmp_path / "x")],
                           capture_output=True, text=True)  # fmt: skip
    assert again.returncode != 0 and "its weights are not FP8" in " ".join((again.stdout + again.stderr).split())
