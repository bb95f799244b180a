"""Regularisation: label smoothing by hand, NEFTune's noise bound, LayerDrop's identity, dropout
overrides, early stopping with the best weights kept."""

import json
import math
from pathlib import Path

import pytest
import torch

from dstune.config import RegularizeConfig, RunConfig
from dstune.core.loss import IGNORE, token_loss_sum
from dstune.methods import prepare_model
from dstune.models.load import load_model, resolve_model_dir
from dstune.train.regularize import (
    EarlyStopping,
    add_hidden_dropout,
    add_layerdrop,
    add_neftune,
    decoder_layers,
    set_attention_dropout,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
IDS = torch.tensor([[0, 128803, 3476, 2058, 128804, 1, 300, 301]])


@pytest.fixture
def model():
    torch.manual_seed(0)
    cfg = RunConfig.model_validate({"method": "full"})
    return prepare_model(load_model(resolve_model_dir("tiny:deepseek-llm"), dtype=torch.float32), cfg)


def test_label_smoothing_changes_the_loss_by_the_hand_computed_amount():
    # Vocabulary of 3, probabilities (1/4, 1/2, 1/4) at both positions. Smoothed token loss is
    # (1 - e) * CE + e * mean_k(-log p_k) and mean_k(-log p_k) = (ln4 + ln2 + ln4) / 3 = 5/3 ln2.
    row = torch.log(torch.tensor([1.0, 2.0, 1.0]))
    logits = row.expand(1, 4, 3).clone()
    labels = torch.tensor([[IGNORE, 1, 0, IGNORE]])  # after the shift: label 1 (CE ln2), label 0 (CE 2 ln2)
    ln2, e = math.log(2), 0.1
    plain = token_loss_sum(logits, labels)
    smoothed = token_loss_sum(logits, labels, label_smoothing=e)
    assert float(plain) == pytest.approx(3 * ln2)
    # token 1: e * (5/3 - 1) ln2 = +0.0667 ln2; token 2: e * (5/3 - 2) ln2 = -0.0333 ln2
    assert float(smoothed - plain) == pytest.approx(e * (5 / 3 - 1) * ln2 + e * (5 / 3 - 2) * ln2, abs=1e-6)


def test_neftune_noise_is_bounded_and_only_in_training(model):
    emb = model.get_input_embeddings()
    clean = emb(IDS).detach()
    alpha = 5.0
    add_neftune(model, alpha)
    L, d = IDS.shape[1], clean.shape[-1]
    bound = alpha / math.sqrt(L * d)  # Jain et al. 2023: alpha / sqrt(L d)
    model.train()
    noise = emb(IDS).detach() - clean
    assert noise.abs().max() <= bound * (1 + 1e-5) and noise.abs().max() > 0.9 * bound
    assert noise.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)  # uniform on [-b, b]
    model.eval()
    assert torch.equal(emb(IDS), clean)


def test_layerdrop_at_p1_makes_the_output_independent_of_that_layer(model):
    layers = decoder_layers(model)
    assert add_layerdrop(model, [0.0, 1.0]) == [1]
    seen = {}
    layers[1].register_forward_hook(lambda m, args, out: seen.update(inp=args[0], out=out))
    model.train()  # dropout is 0 in the tiny preset, so training mode is deterministic
    with torch.no_grad():
        before = model(input_ids=IDS).logits
        assert torch.equal(seen["out"], seen["inp"])  # skipped: output = input, never zeros
        eval_before = model.eval()(input_ids=IDS).logits
        for p in layers[1].parameters():
            p.add_(torch.randn_like(p))
        after = model.train()(input_ids=IDS).logits
        eval_after = model.eval()(input_ids=IDS).logits
    assert torch.equal(before, after)
    assert not torch.allclose(eval_before, eval_after)  # in evaluation the layer runs
    with pytest.raises(ValueError, match="regularize.layerdrop has 3 probabilities"):
        add_layerdrop(model, [0.0, 0.5, 0.5])


def test_layerdrop_probability_is_respected(model):
    add_layerdrop(model, [0.0, 0.5])
    layer = decoder_layers(model)[1]
    runs = []
    layer.self_attn.register_forward_hook(lambda *a: runs.append(1))
    torch.manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(40):
            model(input_ids=IDS[:, :3])
    assert 10 <= len(runs) <= 30  # Binomial(40, 0.5): outside this range with probability < 0.2%


@pytest.mark.parametrize("which", ["attention", "hidden"])
def test_dropout_overrides_act_in_training_only(model, which):
    with torch.no_grad():
        reference = model.eval()(input_ids=IDS).logits
        assert torch.equal(model.train()(input_ids=IDS).logits, reference)  # the preset has no dropout
        if which == "attention":
            assert set_attention_dropout(model, 0.5) == model.config.num_hidden_layers
        else:
            assert add_hidden_dropout(model, 0.5) == 2 * model.config.num_hidden_layers
        a, b = model.train()(input_ids=IDS).logits, model(input_ids=IDS).logits
        assert not torch.allclose(a, b) and not torch.allclose(a, reference)
        assert torch.equal(model.eval()(input_ids=IDS).logits, reference)


def test_early_stopping_counts_patience_and_restores_the_best(model):
    es = EarlyStopping(RegularizeConfig(early_stop_patience=2, keep_best=True))
    w = model.get_input_embeddings().weight
    with torch.no_grad():
        assert not es.update(1, {"loss": 3.0}, model)
        w.add_(1.0)
        best = w.detach().clone()
        assert not es.update(2, {"loss": 2.0}, model)
        w.add_(1.0)
        assert not es.update(3, {"loss": 2.5}, model)
        assert es.update(4, {"loss": 2.6}, model)  # two evaluations without improvement
    assert es.finish(4, {"loss": 2.6}, model, lambda: {"loss": 2.0}) == {"loss": 2.0}
    assert torch.equal(w, best) and es.summary()["best_step"] == 2 and es.summary()["stopped_at"] == 4
    with pytest.raises(ValueError, match="train.eval_every"):  # a config rule now, checked before any file
        RunConfig.model_validate({"regularize": {"early_stop_patience": 2}, "train": {"eval_every": 0}})


def test_training_stops_early_and_final_holds_the_best_weights(tmp_path):
    from safetensors.torch import load_file

    from dstune.train.loop import train

    rows = json.loads((SHARED / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:4]
    data = tmp_path / "four.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")

    def cfg(out, **reg):
        return RunConfig.model_validate({
            "data": {"train": str(data), "validation": str(data), "max_length": 48},
            "optim": {"lr": 1e-2, "schedule": "constant"}, "regularize": reg,
            "train": {"micro_batch_size": 4, "max_steps": 20, "eval_every": 2, "progress": False, "seed": 3},
            "output": str(out)})

    # min_delta 100: the first evaluation improves on infinity, none after it can; patience 1 stops at step 4.
    run = train(cfg(tmp_path / "es", early_stop_patience=1, early_stop_min_delta=100.0, keep_best=True))
    assert run.steps == 4 and run.summary["early_stopping"]["stopped_at"] == 4
    assert run.summary["early_stopping"]["best_step"] == 2
    two = train(cfg(tmp_path / "two").model_copy(update={"train": cfg(tmp_path / "x").train.model_copy(
        update={"max_steps": 2, "eval_every": 0})}))
    kept = load_file(str(run.run_dir / "final" / "adapter_model.safetensors"))
    ref = load_file(str(two.run_dir / "final" / "adapter_model.safetensors"))
    assert kept.keys() == ref.keys() and all(torch.equal(kept[k], ref[k]) for k in ref)
    assert run.val["loss"] == pytest.approx(two.val["loss"])
