"""LoRA variants (DoRA, rsLoRA, PiSSA, per-module rank/alpha, LoRA+) and LoRA on MoE experts: each trains,
reloads in a fresh process (with plain peft too), generates with the cache as without, and merges exactly."""

from __future__ import annotations

import pytest
import torch
from _matrix import HAS_BNB, check_trained, reload_in_fresh_process, run_cell, selected, write_data

from dstune.config import RunConfig
from dstune.methods import prepare_model, trainable_summary
from dstune.methods.summary import render_summary
from dstune.models.load import load_model, resolve_model_dir

VARIANTS = {
    "dora-v3": ("deepseek-v3", {"lora": {"use_dora": True}}),
    # rsLoRA scales by alpha/sqrt(r) (2.8x alpha/r at r=8), hence a lower lr.
    "rslora-patterns-llm": ("deepseek-llm", {"lora": {"use_rslora": True, "targets": "all-linear",
                                                      "rank_pattern": {"o_proj": 4, "down_proj": 2},
                                                      "alpha_pattern": {"q_proj": 32}},
                                             "optim": {"lr": 1e-2}}),
    "pissa-llm": ("deepseek-llm", {"lora": {"init": "pissa"}}),
    # LoRA+ on top: the B matrices (experts' included) learn 4x faster.
    "experts-all-loraplus-v3": ("deepseek-v3", {"lora": {"experts": "all"},
                                                "optim": {"lora_plus_ratio": 4.0, "lr": 1e-2}}),
    "mlp-shared-v2": ("deepseek-v2", {"lora": {"targets": "all-linear", "experts": "shared",
                                               "rank_pattern": {"gate_proj": 4}}}),
    "qlora-8bit-v3": ("deepseek-v3", {"qlora": {"bits": 8}, "lora": {"experts": "all"}}),
}


# The default suite trains the variants whose code is dstune's own (LoRA on fused experts with LoRA+'s
# optimizer groups, rank patterns on V2's shared experts); the peft-provided ones (DoRA, rsLoRA, PiSSA) and
# 8-bit QLoRA run with -m slow, which CI runs too.
DEFAULT_VARIANTS = ("experts-all-loraplus-v3", "mlp-shared-v2")
PARAMS = [pytest.param(n, id=n, marks=[] if n in DEFAULT_VARIANTS else [pytest.mark.slow]) for n in VARIANTS]


@pytest.fixture(scope="module")
def variants(request, tmp_path_factory):
    # Only the variants this session selected are trained (so -m 'not slow' does not train the slow ones).
    wanted = selected(request, "test_variant_trains_reloads_generates_and_merges", "name")
    root = tmp_path_factory.mktemp("variants")
    data = write_data(root)
    rows = {}
    for name in wanted:
        family, extra = VARIANTS[name]
        (root / name).mkdir()
        rows[name] = run_cell(family, "qlora" if "qlora" in extra else "lora", data, root / name, extra)
    reload_in_fresh_process([root / n for n, r in rows.items() if r["status"] == "trained"])
    return root, rows


@pytest.mark.parametrize("name", PARAMS)
def test_variant_trains_reloads_generates_and_merges(variants, name):
    root, rows = variants
    row = rows[name]
    if name.startswith("qlora") and not HAS_BNB:  # the refusal is the checked outcome without bitsandbytes
        assert row["status"] == "unsupported" and "pip install 'dstune[qlora]'" in row["reason"], row
        return
    assert row["status"] == "trained", row.get("reason")
    problems = check_trained(row, root / name)
    if name == "qlora-8bit-v3":
        # LLM.int8 also quantises the activations (and multiplies in fp16), so no fp32 weight reproduces its
        # forward exactly: the merge into the de-quantised weights is close, not equal (measured 0.2 on
        # logits of magnitude ~10 here; the 4-bit cells of the matrix merge within 1e-4).
        problems = [p for p in problems if not p.startswith("merged_plain_transformers")]
        assert row["merged_plain_transformers_max_diff"] < 1.0
    assert not problems, problems
    if not name.startswith("qlora"):
        assert "plain_peft_max_diff" in row  # plain peft loaded it (PiSSA: converted to LoRA on the original base)


def _model(family):
    return load_model(resolve_model_dir(f"tiny:{family}"), dtype=torch.float32)


def _cfg(**lora) -> RunConfig:
    return RunConfig.model_validate({"method": "lora", "lora": lora})


@pytest.mark.parametrize("family", ["deepseek-v2", "deepseek-v3"])
def test_summary_shows_experts_adapted_or_frozen(family):
    adapted = prepare_model(_model(family), _cfg(experts="all"))
    text = render_summary(trainable_summary(adapted), is_moe=True)
    assert "routed experts: ADAPTED" in text and "shared experts: ADAPTED" in text
    assert trainable_summary(adapted)["adapter"]["on"]["experts"] > 0
    frozen = render_summary(trainable_summary(prepare_model(_model(family), _cfg())), is_moe=True)
    assert "routed experts: FROZEN" in frozen


def test_mlp_preset_on_moe_adapts_the_dense_mlp_not_the_experts():
    model = prepare_model(_model("deepseek-v3"), _cfg(targets="mlp"))
    on = trainable_summary(model)["adapter"]["on"]
    assert set(on) == {"dense_mlp"}
    assert sorted(model.base_model.targeted_parameter_names) == [
        f"model.layers.0.mlp.{p}.weight" for p in ("down_proj", "gate_proj", "up_proj")]


def test_rank_pattern_reaches_modules_and_fused_experts():
    model = prepare_model(_model("deepseek-v3"), _cfg(experts="routed", rank_pattern={"o_proj": 2, "gate_up_proj": 3}))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert shapes["base_model.model.model.layers.0.self_attn.o_proj.lora_A.default.weight"][0] == 2
    # Two ParamWrappers nest on the experts module; gate_up_proj's is the inner one. peft 0.21 warns that
    # the key "did not match any targeted module", but it did: rank 3 for each of the 4 experts.
    assert shapes["base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.default.weight"][0] == 3 * 4
    assert shapes["base_model.model.model.layers.1.mlp.experts.lora_A.default.weight"][0] == 8 * 4  # down_proj: r


def test_lora_plus_gives_every_b_matrix_the_higher_lr():
    from dstune.config import OptimConfig
    from dstune.train.optim import build_optimizer

    model = prepare_model(_model("deepseek-v3"), _cfg(experts="all", use_rslora=True))
    opt = build_optimizer(model, OptimConfig(lr=1e-3, lora_plus_ratio=8.0))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert lr_of[id(p)] == pytest.approx(8e-3 if ".lora_B." in name else 1e-3), name


def test_top_layers_adapts_only_the_top_and_the_backward_pass_stops_below_them():
    from dstune.core.facts import layer_index

    model = prepare_model(_model("deepseek-v3"), _cfg(targets="all-linear", experts="all", top_layers=1))
    top = model.config.num_hidden_layers - 1
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and {layer_index(n) for n in trained} == {top}
    assert any(".experts." in n for n in trained)  # fused expert parameters follow the rule too
    ids = torch.randint(0, 100, (1, 8))
    out = model(input_ids=ids, output_hidden_states=True)
    # hidden_states[i] is the input of layer i: nothing below the adapted layer is part of the backward graph.
    assert not out.hidden_states[top].requires_grad and out.logits.requires_grad
    everywhere = prepare_model(_model("deepseek-v3"), _cfg(targets="all-linear"))
    assert everywhere(input_ids=ids, output_hidden_states=True).hidden_states[1].requires_grad


@pytest.mark.parametrize("lora, match", [
    ({"top_layers": 99}, "lora.top_layers=99 but the model has 2 decoder layers"),
    ({"use_dora": True, "experts": "routed"}, "lora.use_dora=true"),
    ({"dropout": 0.1, "targets": "mlp"}, "lora.dropout"),
    ({"init": "pissa", "experts": "shared"}, "lora.init=pissa"),
    ({"rank_pattern": {"no_such_proj": 4}}, "no_such_proj"),
])
def test_impossible_lora_settings_name_the_key(lora, match):
    with pytest.raises(ValueError, match=match):
        prepare_model(_model("deepseek-v3"), _cfg(**lora))


def test_experts_on_a_dense_family_is_explained():
    with pytest.raises(ValueError, match="lora.experts=routed.*lora.experts=none"):
        prepare_model(_model("deepseek-llm"), _cfg(experts="routed"))


def test_qlora_without_bitsandbytes_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'dstune\[qlora\]'"):
        prepare_model(_model("deepseek-llm"), RunConfig(method="qlora"))
