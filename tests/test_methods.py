"""Methods: what each one trains, LoRA target presets on every family, and refusals that explain."""

import pytest
import torch

from dstune.config import RunConfig
from dstune.methods import prepare_model, trainable_summary
from dstune.methods.lora import resolve_targets
from dstune.models.load import load_model, resolve_model_dir

FAMILIES = ["deepseek-llm", "deepseek-v2", "deepseek-v3", "r1-distill-qwen"]


def _model(family):
    return load_model(resolve_model_dir(f"tiny:{family}"), dtype=torch.float32)


def cfg(**sections) -> RunConfig:
    return RunConfig.model_validate(sections)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_preset_finds_each_familys_projections(family):
    names = {n.rsplit(".", 1)[-1] for n in resolve_targets(_model(family), "attention")}
    expected = {"deepseek-llm": {"q_proj", "k_proj", "v_proj", "o_proj"},
                "r1-distill-qwen": {"q_proj", "k_proj", "v_proj", "o_proj"},
                "deepseek-v2": {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"},
                "deepseek-v3": {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}}[family]
    assert names == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_attention_trains_only_adapters_and_starts_equal_to_base(family):
    base = _model(family)
    ids = torch.tensor([[0, 128803, 3476, 2058, 128804]])
    with torch.no_grad():
        before = base(input_ids=ids).logits.clone()
    model = prepare_model(base, cfg(method="lora"))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    with torch.no_grad():  # B is zero-initialised: the adapted model starts as the base model
        torch.testing.assert_close(model(input_ids=ids).logits, before)
    s = trainable_summary(model)
    assert s["adapter"]["trainable"] > 0 and s["attention"]["trainable"] == 0


@pytest.mark.parametrize("family", ["deepseek-llm", "r1-distill-qwen"])
def test_lora_mlp_and_all_linear_on_dense_families(family):
    model = prepare_model(_model(family), cfg(method="lora", lora={"targets": "all-linear"}))
    wrapped = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}
    leaves = {n.rsplit(".", 1)[-1] for n in wrapped}
    assert {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= leaves
    assert not any("lm_head" in n for n in wrapped)


@pytest.mark.parametrize("family", ["deepseek-v2", "deepseek-v3"])
def test_lora_mlp_on_moe_families_escapes_peft_rewrite(family):
    # peft 0.21 would rewrite gate/up/down_proj module targets to the fused routed experts; dstune targets
    # those Linear layers by weight parameter instead, so the dense MLP is adapted and the experts are not.
    model = prepare_model(_model(family), cfg(method="lora", lora={"targets": "mlp"}))
    assert set(model.base_model.targeted_parameter_names) == {
        f"model.layers.0.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(trainable_summary(model)["adapter"]["on"]) == {"dense_mlp"}


def test_unknown_lora_target_lists_module_names():
    with pytest.raises(ValueError) as err:
        prepare_model(_model("deepseek-v3"), cfg(method="lora", lora={"targets": ["qkv_proj"]}))
    assert "qkv_proj" in str(err.value) and "kv_b_proj" in str(err.value)


def test_freeze_top_layers_and_head():
    model = prepare_model(_model("deepseek-v3"), cfg(method="freeze", freeze={"top_layers": 1, "train_head": True}))
    for name, p in model.named_parameters():
        should = ".layers.1." in name or name.startswith("lm_head")
        assert p.requires_grad == should, name
    s = trainable_summary(model)
    assert s["experts"]["trainable"] > 0 and s["embeddings"]["trainable"] == 0  # layer 1 is the MoE layer


def test_freeze_patterns_and_no_head():
    model = prepare_model(_model("deepseek-llm"),
                          cfg(method="freeze", freeze={"top_layers": 0, "train_head": False, "patterns": [r"norm\.weight$"]}))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(n.endswith("norm.weight") for n in trained)


def test_freeze_more_layers_than_model_has_is_explained():
    with pytest.raises(ValueError, match="top_layers=5.*0..2"):
        prepare_model(_model("deepseek-llm"), cfg(method="freeze", freeze={"top_layers": 5}))


def test_freeze_nothing_is_explained():
    with pytest.raises(ValueError, match="no trainable parameter"):
        prepare_model(_model("deepseek-llm"), cfg(method="freeze", freeze={"top_layers": 0, "train_head": False}))


def test_full_trains_everything():
    model = prepare_model(_model("deepseek-v2"), cfg(method="full"))
    assert all(p.requires_grad for p in model.parameters())
    s = trainable_summary(model)
    assert all(v["frozen"] == 0 for v in s.values())
