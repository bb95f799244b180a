"""Long context (issue 27): ``train.curriculum`` trains short rows first and longer ones later, each stage
re-cut (and re-packed) at its length; validation reports the loss per length bucket; ``model.rope_scaling``
sets YaRN/linear RoPE scaling from the config. On tiny:deepseek-llm with real Alpaca rows."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from conftest import SHARED_DATA
from rich.console import Console

from dstune.config import ConfigError, load_config
from dstune.core.loss import IGNORE
from dstune.train.batching import MicroBatches, Stage
from dstune.train.build import build
from dstune.train.loop import train
from dstune.train.signals import TrainingInterrupted

STAGES = "train.curriculum=[{max_length: 32, steps: 3}, {max_length: 64, steps: 2}, {max_length: 128}]"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = json.loads((SHARED_DATA / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:48]
    path = tmp_path_factory.mktemp("curriculum") / "d.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return path


def _cfg(data_file, out, *sets: str):
    return load_config(
        overrides=[
            "model.name=tiny:deepseek-llm", "method=lora", f"data.train={data_file}", f"output={out}",
            "data.max_length=128", "data.split=[0.75, 0.25, 0.0]", "train.micro_batch_size=4",
            "train.max_steps=8", "train.progress=false", "data.cache=false", STAGES, *sets,
        ]
    )  # fmt: skip


def _lengths_served(run, steps: int) -> list[int]:
    """The longest row of each step's micro-batch, in the order the loop is served them."""
    out = []
    for position in range(steps):
        idx = run.batches.indices_at(position)
        out.append(max(len(run.data.train[i]["input_ids"]) for i in idx))
    return out


@pytest.mark.parametrize("packing", [False, True])
def test_each_stage_serves_rows_cut_to_its_length(data_file, tmp_path, packing):
    run = build(_cfg(data_file, tmp_path / "run", f"train.packing={str(packing).lower()}"))
    stages = run.data.report["curriculum"]
    assert [s["max_length"] for s in stages] == [32, 64, 128]
    assert [s["first_batch"] for s in stages] == [0, 3, 5]
    longest = _lengths_served(run, 8)
    assert max(longest[:3]) <= 32 and max(longest[3:5]) <= 64 and max(longest[5:]) <= 128
    assert max(longest[5:]) > 64  # the last stage has the long rows back
    for position in range(8):
        for i in run.batches.indices_at(position):
            row = run.data.train[i]
            assert any(t != IGNORE for t in row["labels"][1:])  # a cut row keeps a trainable token
            if packing:
                assert len(row["input_ids"]) == len(row["position_ids"])
    if packing:  # re-packed per stage: a stage's rows are full rows of its length
        first = [run.data.train[i] for i in range(stages[0]["rows"])]
        assert sum(len(r["input_ids"]) for r in first) / len(first) > 0.8 * 32


def test_the_stream_is_a_pure_function_of_the_position_so_resume_is_exact():
    rows = [{"input_ids": [1] * n, "labels": [1] * n} for n in range(2, 22)]
    stages = [Stage(0, 8, 0), Stage(8, 12, 5)]
    a = MicroBatches(rows, 3, 7, 0, stages=stages)
    served = [a.next()[1] for _ in range(12)]
    assert all(i < 8 for s in served[:5] for i in s) and all(8 <= i for s in served[5:] for i in s)
    b = MicroBatches(rows, 3, 7, 0, stages=stages, position=7)  # resumed at micro-batch 7
    assert [b.next()[1] for _ in range(5)] == served[7:]
    plain = MicroBatches(rows, 3, 7, 0)  # without stages: one stage of every row, as before
    assert plain.per_epoch == 7 and [plain.indices_at(p) for p in range(7)] == [
        MicroBatches(rows, 3, 7, 0, stages=[Stage(0, 20, 0)]).indices_at(p) for p in range(7)
    ]


def test_a_curriculum_run_validates_per_length_bucket_and_resumes_exactly(data_file, tmp_path):
    cfg = _cfg(data_file, tmp_path / "run", "train.eval_every=4", "train.save_every=4")
    full = train(cfg, console=Console(quiet=True))
    val = [json.loads(x) for x in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in val if r["split"] == "val"][-1]
    buckets = {k for k in last if k.startswith("len_loss/")}
    assert buckets and buckets <= {"len_loss/1-32", "len_loss/33-64", "len_loss/65-128"}
    assert min(last[k] for k in buckets) <= last["loss"] <= max(last[k] for k in buckets)
    # SIGTERM at the evaluation after step 4 (inside the second stage): the run saves and stops; resumed,
    # it trains the same steps on the same rows as the uninterrupted run.
    cut = _cfg(data_file, tmp_path / "cut", "train.eval_every=4", "train.save_every=4")

    def stop(step, metrics):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted):
        train(cut, console=Console(quiet=True), on_eval=stop)
    resumed = train(cut, console=Console(quiet=True), resume=True)
    assert resumed.train_losses == pytest.approx(full.train_losses, rel=1e-5)


def test_rope_scaling_from_the_config_reaches_training_and_the_reloaded_run(data_file, tmp_path):
    from dstune.generate import load_for_inference as load

    cfg = _cfg(data_file, tmp_path / "run", "train.max_steps=2", "train.curriculum=[]",
               "model.rope_scaling={rope_type: linear, factor: 4.0}")  # fmt: skip
    result = train(cfg, console=Console(quiet=True))
    assert result.model.base_model.model.config.rope_parameters["rope_type"] == "linear"
    loaded = load(str(result.run_dir))
    assert loaded.model.config.rope_parameters["factor"] == 4.0
    ids = torch.tensor([[5, 900, 77, 1201, 13, 6000, 42, 8]])
    plain = train(
        _cfg(data_file, tmp_path / "plain", "train.max_steps=2", "train.curriculum=[]"),
        console=Console(quiet=True),
    )
    with torch.no_grad():  # linear scaling divides the positions by 4: the outputs differ
        a = loaded.model(input_ids=ids).logits
        b = load(str(plain.run_dir)).model(input_ids=ids).logits
    assert not torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize(
    "sets, match",
    [
        (["train.curriculum=[{max_length: 64, steps: 2}]"], "two or more stages"),
        (["train.curriculum=[{max_length: 64, steps: 2}, {max_length: 32}]"], "must rise"),
        (
            ["train.curriculum=[{max_length: 64}, {max_length: 128}]"],
            "needs steps on every stage but the last",
        ),
        (["train.curriculum=[{max_length: 64, steps: 2}, {max_length: 1024}]"], "above data.max_length=512"),
        (
            ["train.curriculum=[{max_length: 64, steps: 5}, {max_length: 128}]", "train.max_steps=5"],
            "leaves none",
        ),
        (
            ["train.curriculum=[{max_length: 64, steps: 2}, {max_length: 128}]", "objective=dpo"],
            "objective=sft",
        ),
        (["model.rope_scaling={rope_type: cosine, factor: 2}"], "model.rope_scaling.rope_type"),
    ],
)
def test_bad_long_context_settings_are_refused_by_key(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=sets)


def test_rope_scaling_missing_a_key_is_refused_naming_it(tmp_path):
    from dstune.errors import UsageError
    from dstune.models.load import load_model

    with pytest.raises(UsageError, match="model.rope_scaling.*original_max_position_embeddings"):
        load_model("tiny:deepseek-llm", rope_scaling={"rope_type": "yarn", "factor": 4.0})
