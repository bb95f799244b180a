"""The end of a classification run (``task: classification``) from the command line (issue 29, issue 30
item 6): ``train`` prints accuracy and F1 instead of failing on a missing perplexity, ``chat`` classifies
typed texts, ``generate`` refuses with a one-line reason, ``merge`` writes the decoder with its trained head,
``eval``, ``report`` and ``tune --retrain`` work. On tiny DeepSeek-LLM and real ChnSentiCorp reviews."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from _documented import run_cli
from conftest import SHARED_DATA
from typer.testing import CliRunner

from dstune.cli import app
from dstune.train.loop import RunResult

HOTEL = SHARED_DATA / "chnsenticorp_htl.csv"
SHRINK = ["--max-steps", "2", "--set", "data.max_length=64", "--set", "data.max_samples=64",
          "--set", "train.progress=false", "--set", "train.seed=5"]
TEXTS = ["房间很干净，服务也很好，下次还会再来。", "隔音太差，空调坏了，前台态度恶劣。"]
runner = CliRunner()


def _plain(output: str) -> str:
    return " ".join(output.split())


def test_summary_line_names_the_metrics_each_task_has(tmp_path):
    from dstune.report.summary import summary_line

    lm = RunResult(tmp_path, 3, [2.5, 2.25], {"loss": 2.0, "ppl": math.exp(2.0), "tokens": 10})
    cls = RunResult(tmp_path, 2, [0.7], {"loss": 0.69, "accuracy": 0.75, "precision_macro": 0.5,
                                         "recall_macro": 0.5, "f1_macro": 0.4286, "examples": 8})
    assert summary_line(lm) == "done: 3 steps, final train loss 2.2500, val loss 2.0000 (ppl 7.39)"
    assert summary_line(cls) == ("done: 2 steps, final train loss 0.7000, val loss 0.6900 "
                                 "(accuracy 0.7500, F1 macro 0.4286)")
    assert summary_line(RunResult(tmp_path, 1, [1.0], {})) == "done: 1 steps, final train loss 1.0000"


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    """The issue's command, shrunk: a 2-step LoRA classifier; and a held-out file of other reviews."""
    root = tmp_path_factory.mktemp("cls-cli")
    res = runner.invoke(app, ["train", "--model", "tiny:deepseek-llm", "--data", str(HOTEL), "--set",
                              "task=classification", "-o", str(root / "run"), *SHRINK])
    lines = HOTEL.read_text(encoding="utf-8").splitlines()
    (root / "held.csv").write_text("\n".join([lines[0], *lines[-16:]]) + "\n", encoding="utf-8")
    return root, res


def test_train_prints_accuracy_and_f1_and_exits_0(cls_run):
    root, res = cls_run
    assert res.exit_code == 0 and res.exception is None, res.output
    summary = json.loads((root / "run" / "summary.json").read_text(encoding="utf-8"))
    line = next(ln for ln in res.output.splitlines() if ln.startswith("done:"))
    assert f"accuracy {summary['val']['accuracy']:.4f}" in _plain(res.output)
    assert f"F1 macro {summary['val']['f1_macro']:.4f}" in _plain(res.output)
    assert "ppl" not in line


def _head_probs(model, tokenizer, text: str) -> list[float]:
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids]])
    with torch.no_grad():
        return torch.softmax(model(input_ids=ids).logits[0].float(), -1).tolist()


def test_generate_on_a_classifier_refuses_in_one_line(cls_run):
    root, _ = cls_run
    res = runner.invoke(app, ["generate", str(root / "run"), "--prompt", TEXTS[0], "--max-new-tokens", "4"])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    error = [ln for ln in _plain(res.output).split("error: ")[1:]]
    assert len(error) == 1 and "classifier" in error[0] and "dstune chat" in error[0], res.output


def test_merge_of_a_classifier_writes_the_head_plain_transformers_loads(cls_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dstune.generate import load_for_inference

    root, _ = cls_run
    res = runner.invoke(app, ["merge", str(root / "run"), "--out", str(root / "merged")])
    assert res.exit_code == 0, res.output
    assert "AutoModelForSequenceClassification" in _plain(res.output)
    merged = AutoModelForSequenceClassification.from_pretrained(str(root / "merged"), dtype=torch.float32).eval()
    assert [merged.config.id2label[i] for i in range(2)] == ["0", "1"]
    run = load_for_inference(str(root / "run"))
    tok = AutoTokenizer.from_pretrained(str(root / "merged"))
    for text in TEXTS:  # the merged head answers as the run's base + head + adapter
        torch.testing.assert_close(torch.tensor(_head_probs(merged, tok, text)),
                                   torch.tensor(_head_probs(run.model, run.tokenizer, text)), atol=1e-5, rtol=1e-4)


def test_chat_on_a_classifier_prints_each_texts_label_and_probability(cls_run):
    """Through the real CLI and standard input; the probabilities are the merged checkpoint's, loaded by
    plain transformers (the old chat died in generate() and then waited forever: the timeout fails it)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root, _ = cls_run
    if not (root / "merged").is_dir():
        assert runner.invoke(app, ["merge", str(root / "run"), "--out", str(root / "merged")]).exit_code == 0
    code, out = run_cli(["chat", str(root / "run")], root, stdin="\n".join(TEXTS) + "\n/exit\n", timeout=300)
    assert code == 0 and "Traceback" not in out, out
    printed = re.findall(r"label> (\S+) \(probability ([0-9.]+)", out)
    merged = AutoModelForSequenceClassification.from_pretrained(str(root / "merged"), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(root / "merged"))
    assert len(printed) == len(TEXTS), out
    for text, (label, prob) in zip(TEXTS, printed):
        p = _head_probs(merged, tok, text)
        assert label == merged.config.id2label[max(range(2), key=p.__getitem__)], out
        assert abs(float(prob) - max(p)) < 1e-4, (prob, p)  # printed to 4 decimals


def test_a_merged_classifier_loads_as_a_classifier_for_chat_and_generate(cls_run):
    from dstune.chat import classify_text
    from dstune.generate import load_for_inference

    root, _ = cls_run
    if not (root / "merged").is_dir():
        assert runner.invoke(app, ["merge", str(root / "run"), "--out", str(root / "merged")]).exit_code == 0
    merged, run = load_for_inference(str(root / "merged")), load_for_inference(str(root / "run"))
    assert merged.labels == run.labels == ["0", "1"]
    for text in TEXTS:
        got, want = classify_text(merged, text), classify_text(run, text)
        assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-5 for k in got)
    res = runner.invoke(app, ["generate", str(root / "merged"), "--prompt", TEXTS[0]])
    assert res.exit_code == 2 and "dstune chat" in _plain(res.output) and "dstune eval" not in res.output


def test_eval_and_report_on_a_classifier(cls_run):
    root, _ = cls_run
    res = runner.invoke(app, ["eval", str(root / "run"), "--data", str(root / "held.csv")])
    assert res.exit_code == 0, res.output
    result = json.loads((root / "run" / "eval.json").read_text(encoding="utf-8"))
    assert result["task"] == "classification" and result["classification"]["labels"] == ["0", "1"]
    assert sum(map(sum, result["classification"]["confusion_matrix"])) == 16
    rep = runner.invoke(app, ["report", str(root / "run"), "--out", str(root / "report")])
    assert rep.exit_code == 0, rep.output
    table = (root / "report" / "report.md").read_text(encoding="utf-8")
    assert "accuracy" in table and "F1 macro" in table and "val ppl" not in table


@pytest.mark.slow
def test_tune_retrain_on_a_classification_config(tmp_path):
    import yaml

    config = tmp_path / "cls.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "tiny:deepseek-llm"}, "task": "classification", "method": "lora",
        "data": {"train": str(HOTEL), "max_samples": 64, "max_length": 48},
        "train": {"micro_batch_size": 8, "max_steps": 2, "eval_every": 1, "progress": False},
        "tune": {"trials": 2, "objective": "f1_macro", "output": str(tmp_path / "study"),
                 "space": {"lora.r": {"type": "categorical", "choices": [4, 8]}}}}), encoding="utf-8")
    code, out = run_cli(["tune", str(config), "--retrain"], tmp_path, timeout=600)
    assert code == 0 and "Traceback" not in out, out
    assert "maximize f1_macro" in _plain(out)
    retrained = tmp_path / "study" / "best-retrained"
    assert (retrained / "labels.json").is_file() and (retrained / "final").is_dir()
