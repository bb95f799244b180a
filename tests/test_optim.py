"""Schedules against their formulas, parameter groups (layer-wise decay, LoRA+, embedding/head lr),
optimizers (fused flag, 8-bit without bitsandbytes, Adafactor state through a checkpoint) and clipping."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from accelerate import Accelerator

from dstune.config import ConfigError, OptimConfig, RunConfig, load_config
from dstune.methods import prepare_model
from dstune.models.load import load_model, resolve_model_dir
from dstune.train.optim import (
    adaptive_clip_,
    build_optimizer,
    clip_gradients,
    param_groups,
    render_groups,
    unitwise_norm,
)
from dstune.train.schedules import build_scheduler, current_lr, lr_factor

T, W = 100, 10  # total steps, warmup steps


def _f(schedule: str, step: int, **kw) -> float:
    return lr_factor(step, T, OptimConfig(schedule=schedule, warmup_steps=W, min_lr_ratio=0.1, **kw))


def _p(step: int) -> float:
    return (step - W) / (T - W)


@pytest.mark.parametrize("step", [0, 4, 9])
def test_warmup_is_linear_from_one_step(step):
    for schedule in ["constant", "linear", "cosine", "polynomial", "wsd"]:
        assert _f(schedule, step) == pytest.approx((step + 1) / (W + 1))
    # warmup_ratio gives the same warmup when warmup_steps is 0
    assert lr_factor(step, T, OptimConfig(warmup_ratio=0.1)) == pytest.approx((step + 1) / 11)


@pytest.mark.parametrize("step", [10, 37, 55, 99])
def test_each_schedule_matches_its_formula(step):
    p, m = _p(step), 0.1
    assert _f("constant", step) == 1.0
    assert _f("linear", step) == pytest.approx(m + (1 - m) * (1 - p))
    assert _f("cosine", step) == pytest.approx(m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p)))
    assert _f("polynomial", step, power=2.0) == pytest.approx(m + (1 - m) * (1 - p) ** 2)
    # wsd with decay_ratio 0.2: stable until step 82 (= 100 - 0.2 * 90), then linear to m over 18 steps
    expected = 1.0 if step < 82 else m + (1 - m) * (1 - (step - 82) / 18)
    assert _f("wsd", step, decay_ratio=0.2) == pytest.approx(expected)


def test_cosine_restarts_follow_sgdr_cycles():
    # T_0 = 20, T_mult = 2: cycles of 20, 40, 80 post-warmup steps start at steps 10, 30, 70.
    kw = dict(restart_steps=20, restart_mult=2.0)
    for step, t_cur, t_i in [(10, 0, 20), (25, 15, 20), (30, 0, 40), (50, 20, 40), (69, 39, 40), (70, 0, 80)]:
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t_cur / t_i))
        assert _f("cosine_restarts", step, **kw) == pytest.approx(expected), step
    assert _f("cosine_restarts", 30, **kw) == pytest.approx(1.0)  # a restart jumps back to the peak
    with pytest.raises(ConfigError, match="optim.restart_steps"):
        load_config(overrides=["optim.schedule=cosine_restarts"])


def test_scheduler_scales_every_group_by_the_same_factor():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 1e-3},
                             {"params": model[1].parameters(), "lr": 4e-3}])
    sched = build_scheduler(opt, 10, OptimConfig(schedule="linear"))
    for _ in range(3):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * 0.7, 4e-3 * 0.7])
    assert current_lr(sched, OptimConfig(lr=2e-4)) == pytest.approx(2e-4 * 0.7)  # what metrics.jsonl logs as lr


# --------------------------------------------------------------------------- parameter groups


@pytest.fixture(scope="module")
def tiny():
    return resolve_model_dir("tiny:deepseek-llm")


def _model(tiny, method="full", **lora):
    cfg = RunConfig.model_validate({"method": method, "lora": lora or {}})
    torch.manual_seed(0)
    return prepare_model(load_model(tiny, dtype=torch.float32), cfg)


def _one_adam_step(model, cfg: OptimConfig) -> dict[str, float]:
    """Max |update| per parameter after one AdamW step: Adam's first update is lr * g / |g| per element,
    so it measures the lr the optimizer really used for that parameter."""
    opt = build_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.tensor([[0, 128803, 3476, 2058, 128804, 1, 300, 301]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters() if p.requires_grad}


def test_layerwise_lr_decay_gives_each_layer_its_lr(tiny):
    model = _model(tiny)
    n = model.config.num_hidden_layers
    cfg = OptimConfig(lr=1e-3, layer_decay=0.5, eps=1e-12, betas=(0.9, 0.999))
    groups = {g["name"]: g["lr"] for g in param_groups(model, cfg)}
    for i in range(n):
        assert groups[f"layer {i} / decay"] == pytest.approx(1e-3 * 0.5 ** (n - i))
    assert groups["embeddings / no_decay"] == pytest.approx(1e-3 * 0.5 ** (n + 1))  # deepest
    assert groups["head / decay"] == pytest.approx(1e-3)                            # top
    step = _one_adam_step(model, cfg)
    for name, moved in step.items():
        if ".layers.0." in name and "norm" not in name:
            assert moved == pytest.approx(1e-3 * 0.5 ** n, rel=1e-3), name
        if "lm_head" in name:
            assert moved == pytest.approx(1e-3, rel=1e-3)
        if "embed_tokens" in name:
            assert moved == pytest.approx(1e-3 * 0.5 ** (n + 1), rel=1e-3)


def test_embedding_and_head_lr_replace_the_rule(tiny):
    model = _model(tiny)
    groups = {g["name"]: g["lr"] for g in param_groups(model, OptimConfig(lr=1e-3, embedding_lr=1e-5, head_lr=2e-3))}
    assert groups["embeddings / no_decay"] == 1e-5 and groups["head / decay"] == 2e-3
    assert groups["layer 0 / decay"] == groups["layer 1 / decay"] == 1e-3


@pytest.mark.parametrize("method", ["full", "lora"])
def test_head_lr_reaches_a_classification_head(tiny, method):
    # A sequence classifier has no output embeddings; its head (``score``, under LoRA peft's trainable
    # copy in modules_to_save) is found by its module type. Adam's first update measures the lr it really used.
    from dstune.models.classify import load_classifier

    torch.manual_seed(0)
    cfg = RunConfig.model_validate({"method": method, "task": "classification", "lora": {"r": 4}})
    model = prepare_model(load_classifier(tiny.path, ["neg", "pos"], pad_id=0), cfg)
    optim = OptimConfig(lr=1e-4, head_lr=3e-3)
    assert {g["name"] for g in param_groups(model, optim)} >= {"head / decay"}
    opt = build_optimizer(model, optim)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model(input_ids=torch.tensor([[5, 6, 7, 8]]), labels=torch.tensor([1])).loss.backward()
    opt.step()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters() if p.requires_grad}
    heads = [n for n in moved if ".score." in n or n.startswith("score.")]
    assert heads and all(moved[n] == pytest.approx(3e-3, rel=1e-3) for n in heads)
    assert all(moved[n] <= 1e-4 * 1.001 for n in moved if n not in heads)


def test_lora_plus_raises_the_b_matrices_lr(tiny):
    model = _model(tiny, "lora", r=4)
    cfg = OptimConfig(lr=1e-3, lora_plus_ratio=16, eps=1e-12)
    groups = param_groups(model, cfg)
    by_name = {g["name"]: g for g in groups}
    assert by_name["lora_B / decay"]["lr"] == pytest.approx(16e-3) and by_name["decay"]["lr"] == 1e-3
    assert all(".lora_B." in n for n, p in model.named_parameters() if any(p is q for q in by_name["lora_B / decay"]["params"]))
    # One step: B moves by 16 x lr; A gets no gradient at step 1 (B starts at zero) and stays put.
    step = _one_adam_step(model, cfg)
    b_moves = [v for k, v in step.items() if "lora_B" in k]
    assert b_moves and all(v == pytest.approx(16e-3, rel=1e-3) for v in b_moves)
    table = render_groups(build_optimizer(model, cfg))
    assert "lora_B / decay" in table and "0.016" in table


def test_defaults_keep_two_groups_and_no_decay_on_norms_biases_embeddings(tiny):
    groups = param_groups(_model(tiny), OptimConfig(weight_decay=0.1))
    assert sorted(g["name"] for g in groups) == ["decay", "no_decay"]
    no_decay = next(g for g in groups if g["name"] == "no_decay")
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim < 2 or p.shape[0] > 100_000 for p in no_decay["params"])


# --------------------------------------------------------------------------- optimizers


def test_fused_adamw_by_default_and_adamw8bit_names_its_extra(tiny):
    model = _model(tiny, "lora", r=4)
    assert build_optimizer(model, OptimConfig(), "cuda").defaults["fused"] is True
    assert build_optimizer(model, OptimConfig(), "cpu").defaults["fused"] is True
    assert not build_optimizer(model, OptimConfig(fused=False), "cpu").defaults["fused"]
    # the fused kernel is the same update as torch's loop: one step of each from the same state agrees
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    after = {}
    for fused in (True, False):
        for p, s in zip(params, start):
            p.data.copy_(s)
            p.grad = torch.ones_like(p) * 0.01
        build_optimizer(model, OptimConfig(fused=fused, lr=1e-2), "cpu").step()
        after[fused] = [p.detach().clone() for p in params]
    for a, b in zip(after[True], after[False]):
        torch.testing.assert_close(a, b)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"optim.optimizer=adamw8bit.*dstune\[bnb\]"):
            build_optimizer(model, OptimConfig(optimizer="adamw8bit"))


def test_adamw8bit_keeps_8bit_state_follows_adamw_and_survives_a_checkpoint(tmp_path):
    pytest.importorskip("bitsandbytes", reason="dev installs bitsandbytes; adamw8bit is its optimizer")
    from dstune.train.checkpoint import apply_local, load_checkpoint, local_state, save_checkpoint

    def setup(optimizer):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 4))
        cfg = OptimConfig(optimizer=optimizer, lr=1e-2, weight_decay=0.0)
        opt = build_optimizer(model, cfg)
        return model, opt, build_scheduler(opt, 20, cfg)

    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(32, 4, generator=torch.Generator().manual_seed(2))

    def step(model, opt, sched):
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        return loss.item()

    runs = {}
    for name in ("adamw", "adamw8bit"):
        model, opt, sched = setup(name)
        runs[name] = [step(model, opt, sched) for _ in range(15)]
        if name == "adamw8bit":
            state = opt.state[model[0].weight]  # 8192 weights: above bitsandbytes' 4096 minimum for 8 bits
            assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    # Quantised moments change the maths a little, not the course: both fit the batch about as well.
    assert runs["adamw8bit"][-1] < 0.5 * runs["adamw8bit"][0]
    assert runs["adamw8bit"][-1] == pytest.approx(runs["adamw"][-1], rel=0.1), runs
    model, opt, sched = setup("adamw8bit")
    for _ in range(3):
        step(model, opt, sched)
    save_checkpoint(tmp_path / "step-000003", local_state(model, opt), sched, {"step": 3})
    model2, opt2, sched2 = setup("adamw8bit")
    apply_local(model2, opt2, load_checkpoint(tmp_path / "step-000003", model2, sched2)[0])
    assert [step(model, opt, sched) for _ in range(2)] == [step(model2, opt2, sched2) for _ in range(2)]
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_adafactor_state_survives_a_checkpoint(tmp_path):
    from dstune.train.checkpoint import apply_local, load_checkpoint, local_state, save_checkpoint

    def setup():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
        cfg = OptimConfig(optimizer="adafactor", lr=1e-2, weight_decay=0.01)
        opt = build_optimizer(model, cfg)
        return model, opt, build_scheduler(opt, 10, cfg)

    def step(model, opt, sched, seed):
        g = torch.Generator().manual_seed(seed)
        model(torch.randn(5, 8, generator=g)).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()

    model, opt, sched = setup()
    assert type(opt).__name__ == "Adafactor"
    for s in range(3):
        step(model, opt, sched, s)
    assert any("exp_avg_sq_row" in st for st in opt.state.values())  # factored second moment
    save_checkpoint(tmp_path / "step-000003", local_state(model, opt), sched, {"step": 3})
    model2, opt2, sched2 = setup()
    apply_local(model2, opt2, load_checkpoint(tmp_path / "step-000003", model2, sched2)[0])
    for s in (3, 4):
        step(model, opt, sched, s)
        step(model2, opt2, sched2, s)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- clipping


def test_agc_bounds_the_unitwise_ratio():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(32, 16)), nn.Parameter(torch.randn(16) * 0.1), nn.Parameter(torch.zeros(8, 4))]
    for p in params:
        p.grad = torch.randn_like(p) * torch.logspace(-3, 1, p.shape[0]).view(-1, *[1] * (p.ndim - 1))
    before = [p.grad.clone() for p in params]
    lam = 0.05
    adaptive_clip_(params, lam)
    for p, g0 in zip(params, before):
        w_norm = unitwise_norm(p.detach()).clamp(min=1e-3)  # the paper's max(|W_i|, eps)
        assert (unitwise_norm(p.grad) / w_norm <= lam * (1 + 1e-5)).all()
    # Rows of the matrix already under the bound keep their gradient exactly; the others were scaled down.
    ratio0 = (unitwise_norm(before[0]) / unitwise_norm(params[0].detach())).flatten()
    under = ratio0 <= lam
    assert under.sum() > 3 and (~under).sum() > 5
    assert torch.equal(params[0].grad[under], before[0][under])
    assert (params[0].grad[~under].norm(dim=1) < before[0][~under].norm(dim=1)).all()
    # The zero-initialised matrix (like LoRA's B) is bounded by lam * eps, not frozen at zero.
    assert (params[2].grad.norm(dim=1) == pytest.approx(lam * 1e-3, rel=1e-4))


def test_clip_gradients_returns_the_norm_before_clipping_and_bounds_values():
    p = nn.Parameter(torch.randn(10, 10))
    p.grad = torch.full((10, 10), 3.0)
    norm = clip_gradients([p], OptimConfig(max_grad_norm=None, clip_value=0.5), Accelerator(cpu=True))
    assert float(norm) == pytest.approx(30.0) and p.grad.abs().max() == 0.5
    p.grad = torch.full((10, 10), 3.0)
    norm = clip_gradients([p], OptimConfig(max_grad_norm=1.0), Accelerator(cpu=True))
    assert float(norm) == pytest.approx(30.0) and float(p.grad.norm()) == pytest.approx(1.0, rel=1e-4)


def test_readme_documents_every_optim_regularize_and_stability_key():
    from dstune.config import RegularizeConfig, StabilityConfig

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for section, model in [("optim", OptimConfig), ("regularize", RegularizeConfig), ("stability", StabilityConfig)]:
        for key in model.model_fields:
            assert f"`{section}.{key}`" in readme, f"{section}.{key} is not in the README's config reference"
