"""Classification heads (``task: classification``), class weights, metrics during training, the best
checkpoint by a chosen metric, and data mixtures; on tiny models and real ChnSentiCorp rows."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA

from dstune.config import ConfigError, RunConfig, load_config
from dstune.core.collate import collate
from dstune.core.forward import loss_sum
from dstune.data import DataError, load_examples, prepare_data
from dstune.data.classify import class_weights, label_list, tokenize_classification
from dstune.data.mix import mix_examples, quotas
from dstune.evaluate.run import evaluate_run
from dstune.generate import load_for_inference
from dstune.methods import load_trained, prepare_model
from dstune.models.classify import is_classifier, load_classifier
from dstune.models.load import load_tokenizer, resolve_model_dir
from dstune.models.templates import resolve_chat_template
from dstune.train.loop import save_final, train

HOTEL = SHARED_DATA / "chnsenticorp_htl.csv"
LABELS = ["0", "1"]


@pytest.fixture(scope="module")
def tiny():
    resolved = resolve_model_dir("tiny:deepseek-llm")
    return resolved.path, load_tokenizer(resolved.path)


@pytest.fixture(scope="module")
def hotel_rows(tiny):
    """24 real reviews as head rows (bos + text, class index)."""
    examples = load_examples(str(HOTEL), "auto", False, 24).examples
    return tokenize_classification(examples, tiny[1], LABELS, 48).rows


def _cfg(out, **over) -> RunConfig:
    base = {"task": "classification", "model": {"name": "tiny:deepseek-llm"}, "method": "lora",
            "data": {"train": str(HOTEL), "max_samples": 40, "max_length": 48},
            "optim": {"lr": 1e-2, "schedule": "constant"},
            "train": {"micro_batch_size": 8, "max_steps": 6, "eval_every": 2, "save_every": 2, "keep_checkpoints": 1,
                      "progress": False, "seed": 3, "precision": "fp32"}, "output": str(out)}
    for key, value in over.items():
        base.setdefault(key, {}).update(value) if isinstance(value, dict) else base.update({key: value})
    return RunConfig.model_validate(base)


# --------------------------------------------------------------------------- the head


def test_head_replaces_lm_head_and_pools_the_last_real_token(tiny, hotel_rows):
    path, tok = tiny
    torch.manual_seed(0)
    model = load_classifier(path, LABELS, tok.pad_token_id).eval()
    assert is_classifier(model)
    assert tuple(model.score.weight.shape) == (2, model.config.hidden_size)
    assert model.get_output_embeddings() is None or model.get_output_embeddings() is not model.score
    batch = collate(hotel_rows[:4], tok.pad_token_id)  # left padded: rows of different lengths
    assert batch["labels"].tolist() == [r["labels"] for r in hotel_rows[:4]]
    assert len({len(r["input_ids"]) for r in hotel_rows[:4]}) > 1
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = torch.cat([model(input_ids=torch.tensor([r["input_ids"]])).logits for r in hotel_rows[:4]])
        # The head reads the hidden state of the last real token: computed by hand from the decoder.
        hidden = model.model(input_ids=torch.tensor([hotel_rows[0]["input_ids"]])).last_hidden_state[0, -1]
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(alone[0], model.score.weight @ hidden, atol=1e-5, rtol=1e-5)


def test_wrapper_where_transformers_has_no_head():
    """DeepSeek-V3.2 has no *ForSequenceClassification in transformers 5.24: the generic one is put on it."""
    resolved = resolve_model_dir("tiny:deepseek-v32")
    tok = load_tokenizer(resolved.path)
    model = load_classifier(resolved.path, ["a", "b", "c"], tok.pad_token_id).eval()
    assert type(model).__name__ == "DeepseekV32ForSequenceClassification"
    out = model(input_ids=torch.tensor([[0, 5, 6, 7], [1, 1, 0, 9]]), attention_mask=torch.tensor([[1] * 4, [0, 0, 1, 1]]))
    assert tuple(out.logits.shape) == (2, 3)


def test_a_new_head_loads_quietly_but_a_broken_checkpoint_is_named(tiny, tmp_path, capfd):
    """The new head is the point of a classifier: transformers' MISSING/UNEXPECTED report is not shown for
    it. A decoder weight missing from the checkpoint is a real problem and is warned about by name."""
    import shutil

    from safetensors.torch import load_file, save_file

    path, tok = tiny
    load_classifier(path, LABELS, tok.pad_token_id)
    out = capfd.readouterr()
    assert "LOAD REPORT" not in out.out + out.err and "MISSING" not in out.out + out.err
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    weights = next(broken.glob("*.safetensors"))
    state = load_file(weights)
    lost = next(k for k in state if "layers.0.self_attn.q_proj" in k)
    del state[lost]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"layers\.0\.self_attn\.q_proj"):
        load_classifier(str(broken), LABELS, tok.pad_token_id)


def test_mean_pooling_reads_the_mean_of_the_real_tokens(tiny, hotel_rows):
    path, tok = tiny
    torch.manual_seed(0)
    model = load_classifier(path, LABELS, tok.pad_token_id, pooling="mean").eval()
    assert is_classifier(model) and model.config.classifier_pooling == "mean"
    assert type(model).__name__ == "LlamaForSequenceClassification"  # config.json keeps a known architecture
    batch = collate(hotel_rows[:4], tok.pad_token_id)  # left padded: the padding must not enter the mean
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = torch.cat([model(input_ids=torch.tensor([r["input_ids"]])).logits for r in hotel_rows[:4]])
        hidden = model.model(input_ids=torch.tensor([hotel_rows[0]["input_ids"]])).last_hidden_state[0]
        last = load_classifier(path, LABELS, tok.pad_token_id).eval()
        last.score.weight.copy_(model.score.weight)
        last_logits = last(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(alone[0], model.score.weight @ hidden.mean(0), atol=1e-5, rtol=1e-5)
    assert (together - last_logits).abs().max() > 1e-3  # the same head reads something else with last pooling
    labels = torch.tensor([r["labels"] for r in hotel_rows[:4]])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    with pytest.raises(ValueError, match="classify.pooling"):
        load_classifier(path, LABELS, tok.pad_token_id, pooling="max")


METHODS = ["full", "freeze", "lora", "qlora", "adapter", "prefix", "ptuning", "prompt", "ia3"]


@pytest.mark.parametrize("method,pooling", [(m, "last") for m in METHODS] +
                         [(m, "mean") for m in ("full", "lora", "prefix", "prompt")])
def test_every_method_trains_and_saves_the_head(method, pooling, tiny, hotel_rows, tmp_path):
    """The head trains with each method, and the saved run rebuilds as base + head (+ adapter) exactly;
    with mean pooling too (prefix tuning's mask covers virtual tokens the hidden states do not have)."""
    if method == "qlora":
        pytest.importorskip("bitsandbytes", reason="qlora needs bitsandbytes (the dev extra installs it)")
    path, tok = tiny
    cfg = _cfg(tmp_path, method=method, prompt={"virtual_tokens": 4}, classify={"pooling": pooling})
    torch.manual_seed(0)
    model = prepare_model(load_classifier(path, LABELS, tok.pad_token_id, pooling=pooling), cfg)
    head = {n: p for n, p in model.named_parameters() if "score" in n.split(".") and p.requires_grad}
    assert head, f"{method}: the classification head is not trainable"
    if method == "qlora":  # the head is new and trained whole: never quantised
        assert model.quant_report.kept["score"].startswith("classification head")
    before = {n: p.detach().clone() for n, p in head.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = collate(hotel_rows[:8], tok.pad_token_id)
    for _ in range(2):
        loss = loss_sum(model, batch) / 8
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert math.isfinite(loss.item())
    assert any(not torch.equal(before[n], p) for n, p in head.items()), f"{method}: the head did not change"
    model.eval()
    final = save_final(model, tok, None, tmp_path / "final")
    reloaded = load_trained(final, path, cfg, labels=LABELS, pad_id=tok.pad_token_id)
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if method == "full":  # a saved classifier keeps its pooling in config.json, with no run config at hand
        alone = load_trained(final, path, None, labels=LABELS, pad_id=tok.pad_token_id)
        assert alone.config.classifier_pooling == pooling
        with torch.no_grad():
            got = alone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- class weights


def test_class_weights_balanced_and_given(hotel_rows):
    train = [{"label": lab} for lab in ["0", "1", "1", "1"]]
    assert class_weights("balanced", LABELS, train) == [2.0, 4 / 6]  # n / (classes x count)
    assert class_weights({"0": 3, "1": 1}, LABELS, train) == [3.0, 1.0]
    assert class_weights("none", LABELS, train) is None
    with pytest.raises(DataError, match="misses"):
        class_weights({"0": 1}, LABELS, train)
    # The weighted loss is the sum of w[y] x cross-entropy, checked against torch by hand.
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    weights = torch.tensor([2.0, 0.5, 0.5])
    from dstune.core.forward import class_loss_sum

    ce = F.cross_entropy(logits, labels, reduction="none")
    assert class_loss_sum(logits, labels, weights).item() == pytest.approx((ce * weights).sum().item())
    assert label_list([{"label": "10"}, {"label": "2"}, {"label": "b"}]) == ["2", "10", "b"]


def test_config_rules_for_classification():
    with pytest.raises(ConfigError, match="packing"):
        load_config(overrides=["task=classification", "train.packing=true"])
    with pytest.raises(ConfigError, match="class_weights needs task=classification"):
        load_config(overrides=["classify.class_weights=balanced"])
    with pytest.raises(ConfigError, match="data.mix.1.weight"):
        load_config(overrides=["data.mix=[{path: a.json, weight: 1}, {path: b.json, weight: 0}]"])
    with pytest.raises(ConfigError, match="data.train and data.mix are both set"):
        load_config(overrides=["data.train=a.json", "data.mix=[{path: b.json, weight: 1}]"])


# --------------------------------------------------------------------------- a run, metrics, best checkpoint


@pytest.fixture(scope="module")
def f1_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls")
    return train(_cfg(d / "run", train={"best_metric": "f1_macro"}, classify={"class_weights": "balanced"}))


def _val_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "val"]


def test_training_logs_classification_metrics_and_keeps_best_by_f1(f1_run):
    run = f1_run.run_dir
    vals = _val_records(run)
    assert [v["step"] for v in vals] == [2, 4, 6]
    assert all({"loss", "accuracy", "precision_macro", "recall_macro", "f1_macro"} <= set(v) for v in vals)
    best = json.loads((run / "best_checkpoint.json").read_text())
    top = max(v["f1_macro"] for v in vals)
    expected = min(v["step"] for v in vals if v["f1_macro"] == top)  # the first to reach the best value
    assert (best["metric"], best["mode"], best["step"]) == ("f1_macro", "max", expected)
    assert best["value"] == pytest.approx(top)
    assert (run / "checkpoints" / f"step-{expected:06d}").is_dir()  # kept through retention (keep 1)
    assert json.loads((run / "labels.json").read_text())["labels"] == LABELS
    assert json.loads((run / "run.json").read_text())["task"] == "classification"
    report = json.loads((run / "data_report.json").read_text())
    assert report["labels"] == LABELS and len(report["class_weights"]) == 2


def test_best_checkpoint_follows_the_chosen_mode(tmp_path):
    result = train(_cfg(tmp_path / "run", train={"best_metric": "loss", "best_mode": "max"}))
    vals = _val_records(result.run_dir)
    best = json.loads((result.run_dir / "best_checkpoint.json").read_text())
    assert best["step"] == max(vals, key=lambda v: (v["loss"], -v["step"]))["step"]
    assert best["mode"] == "max"


def test_unknown_best_metric_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="train.best_metric='f1_macro'.*task=lm"):
        train(_cfg(tmp_path / "run", task="lm", train={"best_metric": "f1_macro"}))


def test_eval_rebuilds_base_head_adapter(f1_run, tmp_path):
    run = f1_run.run_dir
    test = tmp_path / "test.csv"
    lines = HOTEL.read_text(encoding="utf-8").splitlines()
    test.write_text("\n".join([lines[0]] + lines[500:516]), encoding="utf-8")
    loaded = load_for_inference(str(run))
    tok = loaded.tokenizer
    rows = tokenize_classification(load_examples(str(test), "auto", False, None).examples, tok, LABELS, 48).rows
    batch = collate(rows, tok.pad_token_id)
    with torch.no_grad():
        want = f1_run.model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    result = evaluate_run(run, test)
    predicted = [LABELS[i] for i in want.argmax(-1).tolist()]
    truth = [LABELS[r["labels"]] for r in rows]
    c = result["classification"]
    assert c["accuracy"] == pytest.approx(sum(p == t for p, t in zip(predicted, truth)) / len(truth))
    assert sum(map(sum, c["confusion_matrix"])) == 16
    assert result["head"] == "sequence classification" and "best_f1" in result["thresholds"]
    assert (run / "eval.json").is_file() and (run / "plots" / "confusion.png").is_file()


# --------------------------------------------------------------------------- mixtures


def test_quotas_follow_weights_exactly_and_name_bad_weights():
    assert quotas([100, 100], [0.7, 0.3]) == [140, 60]
    assert sum(quotas([7, 5, 1], [1, 1, 1])) == 13
    with pytest.raises(ValueError, match=r"data.mix\[1\].weight"):
        quotas([3, 3], [1, -2])
    mixed, counts = mix_examples([list(range(10)), list(range(100, 103))], [1, 3], seed=1)
    assert counts == [3, 10] and len(mixed) == 13
    repeats = [mixed.count(x) for x in range(100, 103)]
    assert sorted(repeats) == [3, 3, 4]  # oversampled evenly: each row 3 or 4 times
    assert mix_examples([list(range(10)), list(range(100, 103))], [1, 3], seed=1)[0] == mixed  # deterministic


def test_mixture_of_real_files_is_weighted_and_deterministic(tiny):
    path, tok = tiny
    cfg = load_config(overrides=[f"data.mix=[{{path: '{SHARED_DATA / 'alpaca_zh_demo.json'}', weight: 0.7}}, "
                                 f"{{path: '{SHARED_DATA / 'alpaca_en_demo.json'}', weight: 0.3}}]",
                                 "data.max_length=64"]).data
    template = resolve_chat_template(tok, "auto", "deepseek-llm")
    data = prepare_data(cfg, tok, template, seed=5)
    shares = {m["path"].rsplit("/", 1)[-1]: m["share"] for m in data.report["mix"]}
    assert shares["alpaca_zh_demo.json"] == pytest.approx(0.7, abs=0.01)
    zh = sum("alpaca_zh_demo" in r["source"] for r in data.train) / len(data.train)
    assert zh == pytest.approx(0.7, abs=0.02)  # after tokenizing (a few long rows may drop)
    again = prepare_data(cfg, tok, template, seed=5)
    assert [r["source"] for r in again.train] == [r["source"] for r in data.train]
    other = prepare_data(cfg, tok, template, seed=6)
    assert [r["source"] for r in other.train] != [r["source"] for r in data.train]
    assert {r["source"].split(":")[0].rsplit("/", 1)[-1] for r in data.val} == {"alpaca_zh_demo.json",
                                                                                "alpaca_en_demo.json"}


def test_lr_find_sweeps_the_classification_loss(tmp_path):
    """lr-find on a classification config trains the head (cross-entropy over 2 classes starts near ln 2),
    not the language-model loss over a 129,280-token vocabulary (near ln 129280 = 11.8)."""
    from dstune.train.lr_find import lr_find

    result = lr_find(_cfg(tmp_path / "unused"), steps=6, start_lr=1e-5, end_lr=1e-2)
    assert len(result.losses) == 6
    assert all(0.1 < loss < 3.0 for loss in result.losses), result.losses
    assert not (tmp_path / "unused").exists()
