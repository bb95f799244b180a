"""Generation metrics during training (``train.eval_generate``): the prompts and references read off
validation token rows are the ones ``dstune eval`` renders, the metrics reach the metric log and can pick
the best checkpoint, and a model that learned its answers scores exact match 1 and BLEU 100."""

import json

import pytest
from conftest import SHARED_DATA

from dstune.config import RunConfig
from dstune.data.tokenize import IGNORE
from dstune.evaluate.answers import answer_rows, last_reply_span
from dstune.evaluate.run import evaluate_run
from dstune.generate import load_for_inference
from dstune.train.loop import train

IDENTITY = [
    {"instruction": "Who are you?", "output": "I am Lumen."},
    {"instruction": "What is your name?", "output": "I am Lumen."},
    {"instruction": "你是谁？", "output": "我是 Lumen。"},
    {"instruction": "Introduce yourself.", "output": "I am Lumen."},
]


def _cfg(data, out, max_length=64, **train_over) -> RunConfig:
    return RunConfig.model_validate({
        "model": {"name": "tiny:deepseek-llm"},
        "data": {"train": str(data), "validation": str(data), "max_length": max_length},
        "method": "lora", "lora": {"r": 8, "alpha": 16}, "optim": {"lr": 1e-2, "schedule": "constant"},
        "train": {"micro_batch_size": 4, "max_steps": 2, "progress": False, "seed": 3, "precision": "fp32",
                  **train_over},
        "output": str(out)})


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return path


def test_last_reply_span_is_the_last_run_of_labelled_tokens():
    x = IGNORE
    assert last_reply_span([x, x, 5, 6, x, x, 7, 8, 9, x]) == (6, 9)
    assert last_reply_span([1, 2, 3]) == (0, 3)
    with pytest.raises(ValueError, match="no labelled token"):
        last_reply_span([x, x])


def test_answers_during_training_use_the_prompts_dstune_eval_renders(tmp_path):
    rows = json.loads((SHARED_DATA / "alpaca_zh_demo.json").read_text(encoding="utf-8"))[:3]
    rows += json.loads((SHARED_DATA / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:3]
    data = _write(tmp_path / "mixed.jsonl", rows)
    result = train(_cfg(data, tmp_path / "run", max_length=1024, eval_generate=6, eval_max_new_tokens=6))
    val = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text("utf-8").splitlines()]
    val = [r for r in val if r.get("split") == "val"]
    assert val and {"bleu", "rouge1", "rouge2", "rougeL", "exact_match"} <= set(val[-1])
    assert val[-1]["answered"] == 6

    # The reloaded run answers the token rows' prompts exactly as `dstune eval` answers the rendered ones.
    from dstune.data import prepare_data

    loaded = load_for_inference(result.run_dir)
    cfg = _cfg(data, tmp_path / "unused", max_length=1024)
    prepared = prepare_data(cfg.data, loaded.tokenizer, loaded.chat_template, cfg.train.seed)
    hyps, refs = answer_rows(loaded.model, prepared.val, loaded.tokenizer, max_new_tokens=6)
    report = evaluate_run(result.run_dir, data, max_new_tokens=6)
    assert hyps == [s["prediction"] for s in report["samples"]]
    assert [r[:300] for r in refs] == [s["reference"] for s in report["samples"]]  # eval.json keeps 300 chars
    assert val[-1]["bleu"] == pytest.approx(report["generation"]["bleu"]["bleu"])
    assert val[-1]["rougeL"] == pytest.approx(report["generation"]["rouge"]["rougeL"])


def test_replies_cut_by_max_length_are_not_scored(tmp_path):
    rows = json.loads((SHARED_DATA / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:6]
    data = _write(tmp_path / "long.jsonl", rows)
    from dstune.data import prepare_data
    from dstune.evaluate.answers import complete_reply
    from dstune.models.load import load_tokenizer, resolve_model_dir
    from dstune.models.templates import resolve_chat_template

    resolved = resolve_model_dir("tiny:deepseek-llm")
    tok = load_tokenizer(resolved.path)
    template = resolve_chat_template(tok, "auto", resolved.family)
    short = prepare_data(_cfg(data, tmp_path / "a", max_length=48).data, tok, template, 3).val
    whole = prepare_data(_cfg(data, tmp_path / "b", max_length=4096).data, tok, template, 3).val
    special = set(tok.all_special_ids)
    assert all(complete_reply(r, special) for r in whole)
    cut = [r for r in short if not complete_reply(r, special)]
    assert cut and all(len(r["input_ids"]) == 48 for r in cut)


def test_a_model_that_learned_its_answers_scores_full_marks_and_keeps_the_best_checkpoint(tmp_path):
    data = _write(tmp_path / "identity.jsonl", IDENTITY)
    result = train(_cfg(data, tmp_path / "run", max_steps=40, eval_every=10, save_every=10, eval_generate=4,
                        eval_max_new_tokens=12, best_metric="exact_match"))
    val = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text("utf-8").splitlines()]
    val = [r for r in val if r.get("split") == "val"]
    assert val[0]["exact_match"] < 1.0  # a random-weight model does not start with the answers
    assert val[-1]["exact_match"] == 1.0 and val[-1]["bleu"] == pytest.approx(100.0)
    best = json.loads((result.run_dir / "best_checkpoint.json").read_text("utf-8"))
    assert best["metric"] == "exact_match" and best["mode"] == "max" and best["value"] == 1.0


def test_a_generation_metric_without_answers_is_refused_naming_the_key(tmp_path):
    data = _write(tmp_path / "identity.jsonl", IDENTITY)
    with pytest.raises(ValueError, match="train.eval_generate"):
        train(_cfg(data, tmp_path / "run", best_metric="bleu"))
