"""Classification tasks with different label sets on one model, one head per task (issue 27,
``classify.heads``): real ChnSentiCorp reviews (labels 0/1) and arithmetic prompts labelled by their
operation (add/subtract/multiply), on tiny:deepseek-llm."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA

from dstune.config import ConfigError, load_config
from dstune.core.collate import collate
from dstune.core.forward import loss_sum
from dstune.core.heads import block_cross_entropy, block_softmax, head_blocks
from dstune.core.loss import TaskLosses
from dstune.data import DataError, prepare_data
from dstune.evaluate.run import evaluate_run
from dstune.generate import load_for_inference
from dstune.models.classify import load_classifier, read_heads
from dstune.models.load import load_tokenizer, resolve_model_dir
from dstune.train.loop import train

HOTEL = SHARED_DATA / "chnsenticorp_htl.csv"
OPS = {" + ": "add", " - ": "subtract", " × ": "multiply"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``operation.jsonl``: the arithmetic prompts that show their operator, labelled by it (3 classes)."""
    root = tmp_path_factory.mktemp("heads")
    rows = []
    for line in (SHARED_DATA / "arith_train.jsonl").read_text(encoding="utf-8").splitlines():
        prompt = json.loads(line)["prompt"]
        op = next((name for sign, name in OPS.items() if sign in prompt), None)
        if op is not None:
            rows.append({"text": prompt, "label": op})
    (root / "operation.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:60]))
    return {"root": root, "operation": root / "operation.jsonl"}


def _cfg(files, out, *sets: str, operation_weight: float = 1.0):
    mix = (
        f"data.mix=[{{path: '{HOTEL}', weight: 1, task: sentiment}}, "
        f"{{path: '{files['operation']}', weight: 1, task: operation, loss_weight: {operation_weight}}}]"
    )
    return load_config(
        overrides=[
            "task=classification", "model.name=tiny:deepseek-llm", "method=lora", mix, f"output={out}",
            "data.max_samples=60", "data.max_length=48", "train.micro_batch_size=8", "train.max_steps=6",
            "train.eval_every=3", "train.log_every=1", "train.progress=false", "train.seed=3",
            "train.precision=fp32", "optim.lr=1e-2", "optim.schedule=constant", *sets,
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_dir("tiny:deepseek-llm").path)


def test_label_sets_that_differ_get_a_head_each_and_shared_keeps_one(files, tokenizer, tmp_path):
    data = prepare_data(_cfg(files, tmp_path).data, tokenizer, None, 3, task="classification")
    assert data.labels == ["sentiment:0", "sentiment:1", "operation:add", "operation:multiply",
                           "operation:subtract"]  # fmt: skip
    assert data.heads == {"sentiment": [0, 2], "operation": [2, 5]}
    for row in data.train + data.val + data.test:  # every row's class is in its own task's head
        start, end = list(data.heads.values())[row["task"]]
        assert start <= row["labels"] < end
    shared = prepare_data(
        _cfg(files, tmp_path).data, tokenizer, None, 3, task="classification", heads="shared"
    )
    assert shared.heads is None and shared.labels == ["0", "1", "add", "multiply", "subtract"]
    same = load_config(overrides=[f"data.mix=[{{path: '{HOTEL}', weight: 1}}, {{path: '{HOTEL}', weight: 2, "
                                  "task: again}]", "data.max_samples=40"]).data  # fmt: skip
    assert prepare_data(same, tokenizer, None, 3, task="classification").heads is None  # auto: same labels


def test_block_loss_is_each_tasks_own_softmax_and_stays_in_its_block():
    heads = {"a": [0, 2], "b": [2, 5]}
    torch.manual_seed(0)
    logits = torch.randn(6, 5, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 4, 3, 1])
    losses = block_cross_entropy(logits, labels, heads, label_smoothing=0.1)
    for i, y in enumerate(labels.tolist()):
        s, e = (0, 2) if y < 2 else (2, 5)
        want = F.cross_entropy(logits[i : i + 1, s:e], torch.tensor([y - s]), label_smoothing=0.1)
        assert losses[i].item() == pytest.approx(want.item(), abs=1e-6)
    losses.sum().backward()
    outside = torch.tensor([[y >= 2] * 2 + [y < 2] * 3 for y in labels.tolist()])
    assert logits.grad[outside].abs().max().item() == 0.0  # no row pushes on another task's classes
    probs = block_softmax(logits.detach(), heads)
    assert torch.allclose(probs[:, :2].sum(1), torch.ones(6)) and torch.allclose(probs[:, 2:].sum(1), torch.ones(6))
    assert head_blocks(["a", "b"], [["x", "y"], ["p", "q", "r"]]) == (["a:x", "a:y", "b:p", "b:q", "b:r"], heads)


def test_a_tasks_rows_train_only_its_head_and_loss_weights_scale_its_gradient(files, tokenizer, tmp_path):
    """One model with two heads: a batch of sentiment rows gives the operation head no gradient; with task
    loss weights (1, 3) the gradient is the sentiment-only one plus 3x the operation-only one."""
    data = prepare_data(_cfg(files, tmp_path).data, tokenizer, None, 3, task="classification")
    path = resolve_model_dir("tiny:deepseek-llm").path
    torch.manual_seed(0)
    model = load_classifier(path, data.labels, tokenizer.pad_token_id, heads=data.heads)
    by_task = [[r for r in data.train if r["task"] == t][:4] for t in (0, 1)]

    def grads(rows, weights=(1.0, 1.0)):
        model.zero_grad()
        tasks = TaskLosses(["sentiment", "operation"], list(weights))
        loss_sum(model, collate(rows, tokenizer.pad_token_id), tasks=tasks).backward()
        return [p.grad.clone() for p in model.parameters()], tasks.take()

    (only_a, logged) = grads(by_task[0])
    head = [n for n, _ in model.named_parameters()].index("score.weight")
    assert only_a[head][2:].abs().max().item() == 0.0 and only_a[head][:2].abs().max().item() > 0
    assert set(logged) == {"loss/sentiment"}
    only_b, _ = grads(by_task[1])
    both, logged = grads(by_task[0] + by_task[1], (1.0, 3.0))
    for g, a, b in zip(both, only_a, only_b):
        assert torch.allclose(g, a + 3 * b, atol=1e-5, rtol=1e-4)
    # the logged task losses are unweighted means of their rows' cross-entropies
    rows_b = collate(by_task[1], tokenizer.pad_token_id)
    with torch.no_grad():
        plain = block_cross_entropy(model(input_ids=rows_b["input_ids"], attention_mask=rows_b["attention_mask"]).logits,
                                    rows_b["labels"], data.heads).mean().item()  # fmt: skip
    assert logged["loss/operation"] == pytest.approx(plain, rel=1e-5)


@pytest.fixture(scope="module")
def run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "two-heads"
    train(_cfg(files, out, operation_weight=2.0))
    return out


def test_the_run_saves_its_heads_and_logs_each_tasks_loss_and_metrics(run):
    assert read_heads(run) == {"sentiment": [0, 2], "operation": [2, 5]}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"][-1]
    assert {"loss/sentiment", "loss/operation"} <= set(train_rows[0])
    for task in ("sentiment", "operation"):
        assert {f"loss/{task}", f"accuracy/{task}", f"f1_macro/{task}"} <= set(val)
    from dstune.report.charts import plot_run_curves
    from dstune.report.compare import compare_runs

    charts = plot_run_curves(run, run / "charts")
    assert {"tasks", "val_metrics"} <= set(charts)  # dstune report draws them
    columns = compare_runs([run], run / "compare")["columns"]  # and tabulates them
    assert {"val loss/sentiment", "val accuracy/operation", "val f1_macro/operation"} <= set(columns)


def test_eval_picks_the_head_whose_labels_fit_the_file(run, files, tmp_path):
    result = evaluate_run(run, files["operation"], max_samples=12, write=False)
    assert result["head_task"] == "operation" and result["labels"] == ["add", "multiply", "subtract"]
    assert all(abs(sum(s["probabilities"].values()) - 1) < 1e-4 for s in result["samples"])
    hotel = evaluate_run(run, HOTEL, max_samples=12, write=False)
    assert hotel["head_task"] == "sentiment" and hotel["labels"] == ["0", "1"]
    with pytest.raises(DataError, match="not among the labels"):
        evaluate_run(run, HOTEL, max_samples=12, task="operation", write=False)
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"text": "x y", "label": "other"}) + "\n" + json.dumps({"text": "y", "label": "0"}))
    with pytest.raises(Exception, match="choose one with --task"):
        evaluate_run(run, odd, write=False)


def test_a_head_per_task_survives_loading_and_merging(run, tmp_path):
    """The run directory (base + head of both tasks + adapter) and the merged model (its config.json
    keeps the blocks) give the same probabilities, each task's summing to 1."""
    from dstune.chat import classify_text
    from dstune.merge import merge_run

    loaded = load_for_inference(str(run))
    text = "计算：12 + 30。"
    probs = classify_text(loaded, text)
    assert sum(v for k, v in probs.items() if k.startswith("operation:")) == pytest.approx(1, abs=1e-5)
    merge_run(run, tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["classifier_heads"] == read_heads(run)
    again = classify_text(load_for_inference(str(tmp_path / "merged")), text)
    assert again == pytest.approx(probs, abs=1e-4)


def test_heads_settings_are_checked_before_anything_is_written(files, tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="classify.heads=per_task"):
        load_config(overrides=["task=classification", "classify.heads=per_task", f"data.train={HOTEL}"])
    with pytest.raises(ConfigError, match="leave data.validation unset"):
        _cfg(files, tmp_path, "classify.heads=per_task", f"data.validation={HOTEL}")
    one = files["root"] / "one.jsonl"
    one.write_text("".join(json.dumps({"text": f"row {i}", "label": "same"}) + "\n" for i in range(20)))
    cfg = load_config(overrides=[f"data.mix=[{{path: '{HOTEL}', weight: 1}}, {{path: '{one}', weight: 1}}]",
                                 "data.max_samples=30", "task=classification"])  # fmt: skip
    with pytest.raises(DataError, match=r"data.mix\[1\].*two or more"):
        prepare_data(cfg.data, tokenizer, None, 3, task="classification")


def test_explain_reads_each_tasks_head_on_its_own(run, tmp_path):
    """The classifier lens of a run with a head per task: each task's probabilities sum to 1 after every
    layer, and the attribution explains one task's label."""
    from dstune.explain.run import explain

    result = explain(str(run), "计算：12 + 30。", tmp_path / "explain")
    lens = json.loads((tmp_path / "explain" / "lens.json").read_text(encoding="utf-8"))
    for layer in lens["steps"][0]["layers"]:
        for task in ("sentiment", "operation"):
            mass = sum(t["prob"] for t in layer["top"] if t["text"].startswith(f"{task}:"))
            assert mass == pytest.approx(1.0, abs=1e-4)  # --top-k (5) covers every class of both heads
    assert lens["steps"][0]["chosen"]["text"].split(":")[0] in ("sentiment", "operation")
    assert "label" in result.explained


def test_pseudo_labels_come_from_the_chosen_tasks_head(run, files, tmp_path):
    from dstune.augment import pseudo_label
    from dstune.errors import UsageError

    with pytest.raises(UsageError, match="choose the one that labels with --task"):
        pseudo_label(str(files["operation"]), str(run), str(tmp_path / "x.jsonl"), 0.0, max_rows=4)
    counts = pseudo_label(str(files["operation"]), str(run), str(tmp_path / "op.jsonl"), 0.0, max_rows=8,
                          task="operation")  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "op.jsonl").read_text(encoding="utf-8").splitlines()]
    assert counts["written"] == len(rows) == 8  # confidence 0 keeps every row
    assert {r["label"] for r in rows} <= {"add", "subtract", "multiply"}
    assert all(r["confidence"] >= 1 / 3 - 1e-6 for r in rows)  # the top of three classes that sum to 1


def test_validation_with_a_batch_limit_still_measures_every_task(run):
    """train.eval_batches counts micro-batches per task: the validation rows come task after task, and one
    batch over all of them would hold sentiment rows only."""
    from dstune.evaluate.loss import evaluate_classifier

    loaded = load_for_inference(str(run))
    data = prepare_data(load_config(run / "config.yaml").data, loaded.tokenizer, None, 3, task="classification")
    assert [r["task"] for r in data.val[:4]] == [0] * 4  # the first micro-batch is all sentiment
    metrics = evaluate_classifier(loaded.model, data.val, 4, loaded.tokenizer.pad_token_id, limit=1,
                                  names=["sentiment", "operation"])  # fmt: skip
    assert metrics["examples"] == 8 and {"accuracy/sentiment", "accuracy/operation"} <= set(metrics)


def test_a_two_head_run_resumes_exactly(files, tmp_path):
    """A crash after the step-4 checkpoint (the later files removed), then --resume: the same losses, per-task
    logs and head weights as the uninterrupted run."""
    import shutil

    sets = ("train.max_steps=6", "train.save_every=4", "train.eval_every=0", "train.keep_checkpoints=3")
    full = train(_cfg(files, tmp_path / "run", *sets, operation_weight=2.0))
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000006")
    shutil.rmtree(tmp_path / "run" / "final")
    resumed = train(_cfg(files, tmp_path / "run", *sets, operation_weight=2.0), resume=True)
    assert resumed.train_losses == full.train_losses  # bitwise: fp32 on CPU
    assert read_heads(tmp_path / "run") == {"sentiment": [0, 2], "operation": [2, 5]}
    for name, p in full.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, dict(resumed.model.named_parameters())[name]), name
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in logged if r["split"] == "train"}
    assert {"loss/sentiment", "loss/operation"} <= set(steps[6])  # logged after the resume too
