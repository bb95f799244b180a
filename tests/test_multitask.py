"""Multi-task training (issue 27): ``data.mix`` entries are tasks with a name and a loss weight; the
training loss weights each token by its task, and the logs, validation and ``dstune report`` break the loss
down per task. On tiny:deepseek-llm with real English and Chinese instruction rows."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHARED_DATA
from rich.console import Console

from dstune.config import ConfigError, load_config
from dstune.core.collate import collate
from dstune.core.forward import loss_sum
from dstune.core.loss import IGNORE, TaskLosses
from dstune.data.pack import pack_rows
from dstune.train.loop import train


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    out = {}
    for name, src in (("en", "alpaca_en_demo.json"), ("zh", "alpaca_zh_demo.json")):
        rows = json.loads((SHARED_DATA / src).read_text(encoding="utf-8"))[:40]
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return out


def _cfg(files, out, zh_weight: float = 1.0, *sets: str):
    mix = (
        f"data.mix=[{{path: '{files['en']}', weight: 1}}, "
        f"{{path: '{files['zh']}', weight: 1, task: chinese, loss_weight: {zh_weight}}}]"
    )
    return load_config(
        overrides=[
            "model.name=tiny:deepseek-llm", "method=full", mix, f"output={out}", "data.max_length=64",
            "train.micro_batch_size=4", "train.max_steps=10", "train.eval_every=5", "train.log_every=1",
            "train.progress=false", "optim.lr=1e-2", "data.cache=false", *sets,
        ]
    )  # fmt: skip


def _rows(run, split):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def test_task_weights_scale_each_tasks_gradient_exactly_on_both_loss_paths():
    """The weighted loss is sum_t w_task(t) x CE_t: its gradient is the en-only gradient plus w x the
    zh-only one, with full logits and with the chunked output layer (the default)."""
    from dstune.models.load import load_model

    torch.manual_seed(0)
    model = load_model("tiny:deepseek-llm")
    g = torch.Generator().manual_seed(1)
    rows = [
        {"input_ids": ids, "labels": ids, "task": i % 2}
        for i, ids in enumerate(torch.randint(5, 2000, (4, 24), generator=g).tolist())
    ]
    batch = collate(rows, pad_id=0)
    only = {
        t: dict(batch, labels=batch["labels"].masked_fill(batch["task_ids"] != t, IGNORE)) for t in (0, 1)
    }
    for chunk in (0, 16):
        tasks = TaskLosses(["en", "zh"], [1.0, 3.0])
        grads = []
        for b, t in ((batch, tasks), (only[0], None), (only[1], None)):
            model.zero_grad()
            loss_sum(model, b, chunk_tokens=chunk, tasks=t).backward()
            grads.append(model.lm_head.weight.grad.clone())
        torch.testing.assert_close(grads[0], grads[1] + 3.0 * grads[2], rtol=1e-4, atol=1e-6)
        logged = tasks.take()
        with torch.no_grad():
            per = [float(loss_sum(model, only[t], chunk_tokens=chunk)) / 23 / 2 for t in (0, 1)]
        assert logged == pytest.approx({"loss/en": per[0], "loss/zh": per[1]}, rel=1e-5)
        assert tasks.take() == {}  # read once


def test_packed_rows_keep_each_tokens_task():
    rows = [{"input_ids": [1] * n, "labels": [1] * n, "source": f"r{n}", "task": n % 2} for n in (5, 7, 3, 9)]
    packed = pack_rows(rows, 12, seed=0)
    for row in packed:
        lengths, pos = [], row["position_ids"]
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        lengths = [b - a for a, b in zip(starts, starts[1:])]
        assert row["task_ids"] == [n % 2 for n in lengths for _ in range(n)]
    batch = collate(packed, pad_id=0)
    assert (batch["task_ids"][batch["attention_mask"] == 0] == -1).all()


def test_a_multi_task_run_logs_each_tasks_loss_and_the_weight_shows_in_them(files, tmp_path):
    plain = train(_cfg(files, tmp_path / "plain"), console=Console(quiet=True))
    heavy = train(_cfg(files, tmp_path / "heavy", 4.0), console=Console(quiet=True))
    for result in (plain, heavy):
        run = result.run_dir
        train_rows, val_rows = _rows(run, "train"), _rows(run, "val")
        # A step logs the tasks its rows came from (a micro-batch of 4 rows can hold one task only).
        seen = [{k for k in r if k.startswith("loss/")} for r in train_rows]
        assert all(seen) and set().union(*seen) == {"loss/en", "loss/chinese"}
        assert {"loss/en", "loss/chinese"} <= set(val_rows[-1])
        # The overall validation loss is the token-weighted mean of the tasks' (each token once).
        v = val_rows[-1]
        assert min(v["loss/en"], v["loss/chinese"]) <= v["loss"] <= max(v["loss/en"], v["loss/chinese"])
        report = json.loads((run / "summary.json").read_text())["data"]["mix"]
        assert [(m["task"], m["loss_weight"]) for m in report] == [
            ("en", 1.0),
            ("chinese", 4.0 if result is heavy else 1.0),
        ]
    # Weighting Chinese 4x trades English loss for Chinese loss on held-out rows of each.
    p, h = _rows(plain.run_dir, "val")[-1], _rows(heavy.run_dir, "val")[-1]
    assert h["loss/chinese"] < p["loss/chinese"] - 0.05, (p, h)
    assert h["loss/en"] > p["loss/en"], (p, h)
    # Weights of 1 are plain fine-tuning: the training loss is the token mean of the tasks' losses.
    first = _rows(plain.run_dir, "train")[0]
    assert (
        min(first["loss/en"], first["loss/chinese"])
        <= first["loss"]
        <= max(first["loss/en"], first["loss/chinese"])
    )


def test_report_plots_and_tabulates_the_task_losses(files, tmp_path):
    from dstune.report.charts import plot_run_curves
    from dstune.report.compare import compare_runs

    cfg = _cfg(files, tmp_path / "run", 2.0, "train.max_steps=4", "train.eval_every=2", "train.packing=true")
    run = train(cfg, console=Console(quiet=True)).run_dir
    charts = plot_run_curves(run, tmp_path / "charts")
    assert "tasks" in charts and charts["tasks"].stat().st_size > 10_000
    result = compare_runs([run], tmp_path / "report")
    assert {"val loss/en", "val loss/chinese"} <= set(result["columns"])
    text = result["markdown"].read_text()
    assert "val loss/chinese" in text


@pytest.mark.parametrize(
    "sets, match",
    [
        (["classify.heads=per_task", "data.mix=[{path: a.json, weight: 1}]"], "needs task=classification"),
        (["objective=dpo", "data.mix=[{path: a.json, weight: 1, loss_weight: 2}]"], "objective=dpo"),
        (["data.mix=[{path: a/x.json, weight: 1}, {path: b/y.json, weight: 1, task: x}]"], "must differ"),
        (
            ["data.mix=[{path: a.json, weight: 1, task: t}, {path: b.json, weight: 1, task: t}]"],
            "must differ",
        ),
        (["data.mix=[{path: a.json, weight: 1, task: 'two words'}]"], r"data.mix.0.task"),
        (["data.mix=[{path: a.json, weight: 1, loss_weight: 0}]"], r"data.mix.0.loss_weight"),
    ],
)
def test_bad_task_settings_are_refused_by_key(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=sets)


def test_max_samples_takes_the_first_rows_of_each_mixed_file(files):
    from dstune.data import prepare_data
    from dstune.models.load import load_tokenizer
    from dstune.models.templates import resolve_chat_template

    cfg = _cfg(files, "unused", 1.0, "data.max_samples=10").data
    tok = load_tokenizer("tiny:deepseek-llm")
    data = prepare_data(cfg, tok, resolve_chat_template(tok, "auto", "deepseek-llm"), seed=0)
    rows = data.train + data.val + data.test
    for task, name in enumerate(("en", "zh")):
        lines = {int(r["source"].rsplit(" ", 1)[1]) for r in rows if r["task"] == task}  # "FILE: line N"
        assert lines and max(lines) <= 10, (name, sorted(lines))
