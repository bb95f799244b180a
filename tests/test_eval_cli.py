"""``dstune eval`` and ``dstune report`` on tiny trained runs: perplexity equal to the training loop's
validation loss, generation metrics, label scoring for classification, reports, plots and errors."""

import json

import pytest
import torch
from conftest import SHARED_DATA
from typer.testing import CliRunner

from dstune.cli import app
from dstune.config import RunConfig
from dstune.core.loss import token_loss_sum
from dstune.data import load_examples
from dstune.data.tokenize import tokenize_examples
from dstune.evaluate.metrics import classification_metrics
from dstune.evaluate.run import evaluate_run, score_labels
from dstune.generate import load_for_inference
from dstune.train.loop import train

runner = CliRunner()


def _cfg(data, out, validation=None, **data_over) -> RunConfig:
    return RunConfig.model_validate({
        "model": {"name": "tiny:deepseek-llm"},
        "data": {"train": str(data), "validation": str(validation) if validation else None, "max_length": 64,
                 **data_over},
        "method": "lora", "optim": {"lr": 3e-3, "schedule": "constant"},
        "train": {"micro_batch_size": 4, "max_steps": 2, "progress": False, "seed": 7, "precision": "fp32"},
        "output": str(out)})


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory):
    """A 2-step LoRA run on four English and four Chinese instruction pairs, validated on the same file."""
    d = tmp_path_factory.mktemp("gen")
    rows = json.loads((SHARED_DATA / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:4]
    rows += json.loads((SHARED_DATA / "alpaca_zh_demo.json").read_text(encoding="utf-8"))[:4]
    data = d / "small.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    result = train(_cfg(data, d / "run", validation=data))
    return result, data


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    """A 2-step LoRA run on 24 ChnSentiCorp reviews (classification as generation of the label)."""
    d = tmp_path_factory.mktemp("cls")
    result = train(_cfg(SHARED_DATA / "chnsenticorp_htl.csv", d / "run", max_samples=24, max_length=128,
                        split=(1.0, 0.0, 0.0)))
    test = d / "test.csv"
    lines = (SHARED_DATA / "chnsenticorp_htl.csv").read_text(encoding="utf-8").splitlines()
    test.write_text("\n".join([lines[0]] + [line for line in lines[100:400] if len(line) < 120][:8]), encoding="utf-8")
    return result, test


def test_eval_generation_run(gen_run):
    result, data = gen_run
    out = evaluate_run(result.run_dir, data, max_new_tokens=4)
    # The loss is computed as in training: the reloaded peft adapter gives the loop's validation loss
    # (on the whole file: --max-samples would limit the loss too).
    assert out["task"] == "generation" and out["rows"] == 8
    assert out["loss"] == pytest.approx(result.val["loss"], rel=1e-5)
    assert out["ppl"] == pytest.approx(torch.exp(torch.tensor(out["loss"], dtype=torch.float64)).item())
    g = out["generation"]
    assert g["examples"] == 8 and 0 <= g["bleu"]["bleu"] <= 100 and 0 <= g["rouge"]["rougeL"] <= 1
    assert len(out["samples"]) == 8 and out["samples"][0]["source"] == "small.jsonl:line 1"
    run = result.run_dir
    assert json.loads((run / "eval.json").read_text(encoding="utf-8"))["loss"] == out["loss"]
    md = (run / "eval.md").read_text(encoding="utf-8")
    assert "| perplexity |" in md and "ROUGE-L" in md and "![loss](plots/loss.png)" in md
    for name in ("loss", "lr", "grad_norm"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 1000


def test_eval_classification_run(cls_run):
    result, test = cls_run
    out = evaluate_run(result.run_dir, test, positive_label="1", target_recall=0.5)
    assert out["task"] == "classification" and out["labels"] == ["0", "1"] and out["rows"] == 8
    c = out["classification"]
    samples = out["samples"]
    assert len(samples) == 8
    for s in samples:
        p = s["probabilities"]
        assert sum(p.values()) == pytest.approx(1.0, abs=1e-5) and s["predicted"] == max(p, key=p.get)
    # The reported metrics are those of the predictions it lists.
    again = classification_metrics([s["label"] for s in samples], [s["predicted"] for s in samples], ["0", "1"])
    assert c == again and sum(map(sum, c["confusion_matrix"])) == 8
    t = out["thresholds"]
    assert t["positive_label"] == "1" and t["target_recall"]["recall"] >= 0.5
    assert (result.run_dir / "plots" / "confusion.png").is_file()
    assert "| accuracy |" in (result.run_dir / "eval.md").read_text(encoding="utf-8")


def test_label_scores_are_the_training_loss_of_each_label(cls_run):
    """Scoring candidates in one padded batch gives each label minus its training loss as a lone row."""
    result, test = cls_run
    loaded = load_for_inference(str(result.run_dir))
    ex = load_examples(test).examples[0]
    scores = score_labels(loaded.model, loaded.tokenizer, loaded.chat_template, ex, ["0", "1", "neutral"])
    for label, score in zip(["0", "1", "neutral"], scores):
        one = {**ex, "messages": ex["messages"][:-1] + [{"role": "assistant", "content": label}]}
        row = tokenize_examples([one], loaded.tokenizer, loaded.chat_template, 10**6).rows[0]
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([row["input_ids"]])).logits
        assert score == pytest.approx(-token_loss_sum(logits, torch.tensor([row["labels"]])).item(), rel=1e-4)


def test_cli_eval_and_report(gen_run, cls_run, tmp_path):
    gen, data = gen_run
    cls, test = cls_run
    res = runner.invoke(app, ["eval", str(cls.run_dir), "--data", str(test), "--max-samples", "4"])
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.output and json.loads((cls.run_dir / "eval.json").read_text())["classification"]
    res = runner.invoke(app, ["report", str(gen.run_dir), str(cls.run_dir), "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "cmp" / "report.md").read_text(encoding="utf-8")
    header = md.splitlines()[2]
    assert "val loss" in header and "accuracy" in header and "F1 macro" in header
    # Both directories are named "run", so the table names them by their parent too.
    for run in (gen.run_dir, cls.run_dir):  # e.g. gen0/run; the number is pytest's, not ours
        assert f"| {run.parent.name}/run | tiny:deepseek-llm | lora |" in md, md
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000


def test_cli_eval_and_report_errors(gen_run, tmp_path):
    gen, _ = gen_run
    res = runner.invoke(app, ["eval", str(tmp_path), "--data", str(SHARED_DATA / "identity.json")])
    assert res.exit_code == 2 and "is not a run directory" in " ".join(res.output.split())
    res = runner.invoke(app, ["eval", str(gen.run_dir), "--data", str(tmp_path / "nope.jsonl")])
    assert res.exit_code == 2 and "data file not found" in " ".join(res.output.split())
    res = runner.invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "is not a run directory" in " ".join(res.output.split())
    out = runner.invoke(app, ["--help"]).output
    assert "eval" in out and "report" in out and "data" in out


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    """A 2-step LoRA run with a classification head (task: classification) on 24 ChnSentiCorp reviews."""
    d = tmp_path_factory.mktemp("head")
    cfg = _cfg(SHARED_DATA / "chnsenticorp_htl.csv", d / "run", max_samples=24, max_length=64, split=(1.0, 0.0, 0.0))
    return train(cfg.model_copy(update={"task": "classification"}))


def _first_rows(src, dst, n: int):
    """The first ``n`` rows of a data file in a new file of the same format (a header line kept for CSV)."""
    lines = src.read_text(encoding="utf-8").splitlines()
    dst.write_text("\n".join(lines[:n + 1] if src.suffix == ".csv" else lines[:n]), encoding="utf-8")
    return dst


def test_max_samples_limits_every_metric_loss_included(gen_run, cls_run, head_run, tmp_path):
    """One rule for every kind of run: --max-samples N scores the first N rows only, loss included, as if the
    file held only those rows; without it every row is used."""
    gen, data = gen_run
    cls, test = cls_run
    for run, file, n in ((gen.run_dir, data, 2), (cls.run_dir, test, 3), (head_run.run_dir, test, 3)):
        full = evaluate_run(run, file, max_new_tokens=2, write=False)
        assert full["scored_rows"] == full["rows"] == 8, run
        limited = evaluate_run(run, file, max_samples=n, max_new_tokens=2, write=False)
        alone = evaluate_run(run, _first_rows(file, tmp_path / f"first{n}{file.suffix}", n), max_new_tokens=2,
                             write=False)
        assert limited["rows"] == 8 and limited["scored_rows"] == n, (run, limited["scored_rows"])
        assert limited["loss"] == pytest.approx(alone["loss"], rel=1e-6) and limited["loss"] != full["loss"], run


def test_eval_help_and_report_say_the_max_samples_rule(cls_run):
    cls, test = cls_run
    out = " ".join(runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "loss uses all" not in out and "every metric, loss included" in out
    res = runner.invoke(app, ["eval", str(cls.run_dir), "--data", str(test), "--max-samples", "3"])
    assert res.exit_code == 0, res.output
    assert "8 rows, the first 3 used (--max-samples), 3 scored for loss" in (cls.run_dir / "eval.md").read_text(encoding="utf-8")
    res = runner.invoke(app, ["eval", str(cls.run_dir), "--data", str(test), "--max-samples", "0"])
    assert res.exit_code == 2 and "--max-samples must be at least 1" in " ".join(res.output.split())
