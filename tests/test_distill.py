"""Distillation (issue 27): the loss equals Hinton et al.'s formula on a worked example and on a batch of
a tiny model, the adapter-disabled base is a teacher with zero KL at the start, a student that learns from a
teacher gets closer to it, sequence mode trains on the teacher's own greedy answers, a teacher with another
tokenizer is refused, and a student cut to its first layers saves and loads as the smaller model."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from dstune.config import RunConfig
from dstune.core.loss import IGNORE
from dstune.errors import UsageError
from dstune.train.distill import distill_token_losses
from dstune.train.loop import train


@pytest.fixture(scope="module")
def data(alpaca_file) -> Path:
    return alpaca_file


def make_cfg(data: Path, out: Path, method: str = "full", **over) -> RunConfig:
    base = {
        "model": {"name": "tiny:deepseek-llm"},
        "objective": "distill",
        "distill": {"teacher": "tiny:deepseek-llm"},
        "method": method,
        "data": {"train": str(data), "max_length": 48},
        "optim": {"lr": 1e-3 if method == "full" else 1e-2, "schedule": "constant"},
        "train": {"micro_batch_size": 4, "max_steps": 3, "progress": False, "seed": 5},
        "output": str(out),
    }
    for key, value in over.items():
        section, _, leaf = key.partition("__")
        base.setdefault(section, {})[leaf] = value
    return RunConfig.model_validate(base)


def metrics(run: Path, split: str = "train") -> list[dict]:
    return [
        r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split
    ]


def test_loss_is_hintons_formula_on_a_worked_example():
    student = torch.tensor([[2.0, 0.0, -1.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0]])
    target = torch.tensor([0])
    T, alpha = 2.0, 0.3
    p = [math.exp(x / T) for x in (1.0, 1.0, 0.0)]
    p = [x / sum(p) for x in p]
    q = [math.exp(x / T) for x in (2.0, 0.0, -1.0)]
    q = [x / sum(q) for x in q]
    kl = sum(a * math.log(a / b) for a, b in zip(p, q))
    ce = -math.log(math.exp(2.0) / sum(math.exp(x) for x in (2.0, 0.0, -1.0)))
    loss, got_kl, got_ce = distill_token_losses(student, teacher, target, T, alpha)
    assert float(got_kl) == pytest.approx(kl, rel=1e-6) and float(got_ce) == pytest.approx(ce, rel=1e-6)
    assert float(loss) == pytest.approx(alpha * T * T * kl + (1 - alpha) * ce, rel=1e-6)
    same, kl0, _ = distill_token_losses(teacher, teacher, target, T, 1.0)
    assert float(kl0) == pytest.approx(0.0, abs=1e-7) and float(same) == pytest.approx(0.0, abs=1e-6)


def test_loss_sum_equals_the_formula_over_a_batch_of_full_logits(data, tmp_path):
    from dstune.core.collate import collate
    from dstune.train.build import build

    run = build(make_cfg(data, tmp_path / "run", distill__temperature=1.5, distill__alpha=0.7))
    with torch.no_grad():
        for p in run.objective.teacher.parameters():  # a teacher that differs from the student
            p.add_(0.02 * torch.randn_like(p))
    batch = collate(run.data.train[:4], run.pad_id)
    got = run.objective.loss_sum(run.model, batch)
    s = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    t = run.objective.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
        :, :-1
    ]
    keep = batch["labels"][:, 1:] != IGNORE
    s, t, y = s[keep].float(), t[keep].float(), batch["labels"][:, 1:][keep]
    kl = F.kl_div(F.log_softmax(s / 1.5, -1), F.log_softmax(t / 1.5, -1), log_target=True, reduction="sum")
    want = 0.7 * 1.5**2 * kl + 0.3 * F.cross_entropy(s, y, reduction="sum")
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert float(run.objective.units(batch)) == int(keep.sum())


def test_the_adapter_disabled_base_is_a_teacher_with_zero_kl_at_the_start(data, tmp_path):
    cfg = make_cfg(data, tmp_path / "run", "lora", distill__teacher="base", train__max_steps=4)
    train(cfg, console=Console(quiet=True))
    kl = [r["distill_kl"] for r in metrics(tmp_path / "run")]
    assert kl[0] == pytest.approx(0.0, abs=1e-7)  # LoRA starts as the base: the same distribution
    assert kl[-1] > 0  # the adapter moved the student away (the label term pulls it)


def test_a_smaller_student_gets_closer_to_its_teacher(data, tmp_path):
    """A 1-layer student of a 2-layer teacher, KL only: the KL on the training tokens falls."""
    cfg = make_cfg(
        data, tmp_path / "run", model__keep_layers=1, distill__alpha=1.0, optim__lr=3e-3, train__max_steps=8
    )
    result = train(cfg, console=Console(quiet=True))
    kl = [r["distill_kl"] for r in metrics(tmp_path / "run")]
    assert kl[-1] < 0.8 * kl[0]
    saved = json.loads((result.final_dir / "config.json").read_text())
    assert saved["num_hidden_layers"] == 1  # the student is saved as the smaller model it is
    from dstune.generate import load_for_inference

    loaded = load_for_inference(str(result.run_dir))
    assert len(loaded.model.get_decoder().layers) == 1


def test_sequence_mode_trains_on_the_teachers_greedy_answers(data, tmp_path):
    from dstune.models.load import load_model, resolve_model_dir
    from dstune.train.build import build

    cfg = make_cfg(data, tmp_path / "run", distill__mode="sequence", distill__max_new_tokens=6)
    run = build(cfg)
    row = run.data.train[0]
    start = next(i for i, t in enumerate(row["labels"]) if t != IGNORE)
    teacher = load_model(resolve_model_dir("tiny:deepseek-llm")).eval()
    prompt = torch.tensor([row["input_ids"][:start]])
    with torch.no_grad():
        want = teacher.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False
        )
    assert row["input_ids"][start:] == want[0, start:].tolist()[: len(row["input_ids"]) - start]
    assert run.objective.__class__.__name__ == "SupervisedObjective"
    assert run.data.report["distill"]["rows"] == len(run.data.train)
    assert train(cfg, console=Console(quiet=True)).steps == 3


def test_distill_resumes_bitwise(data, tmp_path):
    over = dict(distill__teacher="base", train__max_steps=4, train__save_every=2)
    full = train(make_cfg(data, tmp_path / "a", "lora", **over), console=Console(quiet=True))
    shutil.rmtree(tmp_path / "a" / "checkpoints" / "step-000004")
    shutil.rmtree(tmp_path / "a" / "final")
    resumed = train(make_cfg(data, tmp_path / "a", "lora", **over), resume=True, console=Console(quiet=True))
    assert resumed.train_losses == full.train_losses


@pytest.mark.parametrize(
    "over, message",
    [
        ({"distill__teacher": None}, "needs distill.teacher"),
        ({"distill__teacher": "base"}, "method=full has no adapter"),
        ({"distill__mode": "sequence", "train__packing": True}, "set train.packing=false"),
        ({"model__keep_layers": 1, "method": "lora"}, "only method=full or freeze"),
    ],
)
def test_bad_distill_configs_are_refused(data, tmp_path, over, message):
    method = over.pop("method", "full")
    with pytest.raises(ValueError, match=message):
        make_cfg(data, tmp_path / "never", method, **over)


def test_a_teacher_with_another_tokenizer_is_refused(data, tmp_path):
    cfg = make_cfg(
        data, tmp_path / "run", distill__teacher="smollm2"
    )  # SmolLM2: its own 49,152-token vocabulary
    with pytest.raises(UsageError, match="another tokenizer than the student"):
        train(cfg, console=Console(quiet=True))
