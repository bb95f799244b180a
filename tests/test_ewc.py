"""EWC (issue 27): the Fisher is the mean of per-example squared gradients, the penalty's gradient is
lambda F (theta - theta*), and after a second task the first task's loss is kept lower than by plain
fine-tuning; the Fisher is written to the run directory and a resumed run recomputes it bitwise."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file

from dstune.config import RunConfig
from dstune.core.collate import collate
from dstune.train.ewc import EWC, fisher_diagonal
from dstune.train.loop import train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ewc")
    identity = json.loads((SHARED / "identity.json").read_text(encoding="utf-8"))
    for row in identity:
        row["output"] = row["output"].replace("{{name}}", "Orion").replace("{{author}}", "Nebula Labs")
    alpaca = json.loads((SHARED / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:48]
    out = {}
    for name, rows in (("a", identity[:48]), ("b", alpaca)):
        out[name] = d / f"{name}.jsonl"
        out[name].write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return out


def make_cfg(data: Path, out: Path, model: str = "tiny:deepseek-llm", **over) -> RunConfig:
    base = {
        "model": {"name": model},
        "method": "full",
        "data": {"train": str(data), "max_length": 64, "split": [0.75, 0.25, 0.0]},
        "optim": {"lr": 3e-3, "schedule": "constant"},
        "train": {"micro_batch_size": 4, "max_steps": 12, "progress": False, "seed": 1},
        "output": str(out),
    }
    for key, value in over.items():
        section, _, leaf = key.partition("__")
        base.setdefault(section, {})[leaf] = value
    return RunConfig.model_validate(base)


def test_fisher_is_the_mean_of_per_example_squared_gradients(tasks, tmp_path):
    from dstune.train.build import build

    run = build(make_cfg(tasks["a"], tmp_path / "run"))
    rows = run.data.train[:3]
    got = fisher_diagonal(run.model, rows, run.pad_id, torch.device("cpu"))
    want = {n: torch.zeros_like(p) for n, p in run.model.named_parameters()}
    for row in rows:  # independently: full logits, mean token cross-entropy, autograd
        b = collate([row], run.pad_id)
        logits = run.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), b["labels"][:, 1:].reshape(-1))
        grads = torch.autograd.grad(loss, list(run.model.parameters()), allow_unused=True)
        for (n, _), g in zip(run.model.named_parameters(), grads):
            if g is not None:
                want[n] += g**2 / len(rows)
    for n, f in got.items():
        assert torch.allclose(f, want[n], rtol=1e-3, atol=1e-12), n
    assert all(p.grad is None for p in run.model.parameters())  # gradients left cleared


def test_penalty_gradient_is_lambda_fisher_times_the_distance():
    layer = torch.nn.Linear(3, 1, bias=False)
    anchor = {"weight": torch.zeros(1, 3)}
    fisher = {"weight": torch.tensor([[1.0, 0.0, 4.0]])}
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, 5.0, -1.0]]))
    value = EWC(0.5, anchor, fisher).add_gradients(layer)
    assert layer.weight.grad.tolist() == [[1.0, 0.0, -2.0]]  # 0.5 * F * (w - 0)
    assert value == pytest.approx(0.5 / 2 * (1 * 4 + 0 * 25 + 4 * 1))


@pytest.mark.slow  # four tiny runs: a minute on 2 CPU cores; run by CI's slow suite
def test_ewc_keeps_the_first_task_better_than_plain_fine_tuning(tasks, tmp_path):
    first = train(make_cfg(tasks["a"], tmp_path / "a"), console=Console(quiet=True))
    start = str(first.final_dir)
    plain = train(make_cfg(tasks["b"], tmp_path / "plain", model=start), console=Console(quiet=True))
    ewc = train(
        make_cfg(
            tasks["b"],
            tmp_path / "ewc",
            model=start,
            regularize__ewc_lambda=2000.0,
            regularize__ewc_data=str(tasks["a"]),
            regularize__ewc_samples=24,
        ),  # fmt: skip
        console=Console(quiet=True),
    )

    def loss_on_a(run) -> float:  # the first task's validation loss with the run's final weights
        from dstune.train.build import build
        from dstune.train.tasks import TASKS

        built = build(make_cfg(tasks["a"], tmp_path / "unused", model=str(run.final_dir)))
        return TASKS["lm"].validate(built, 4)["loss"]

    kept, forgot = loss_on_a(ewc), loss_on_a(plain)
    assert kept < forgot - 0.05, (kept, forgot)
    assert ewc.val["loss"] < first.val["loss"] + 5  # it still learned the second task's data somewhat
    fisher = load_file(str(tmp_path / "ewc" / "fisher.safetensors"))
    assert fisher and all(v.min() >= 0 for v in fisher.values())
    rows = [json.loads(x) for x in (tmp_path / "ewc" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["ewc_penalty"] >= 0 for r in rows if r["split"] == "train")


def test_ewc_resumes_bitwise(tasks, tmp_path):
    over = dict(regularize__ewc_lambda=100.0, regularize__ewc_data=str(tasks["a"]), regularize__ewc_samples=8,
                train__max_steps=4, train__save_every=2, method="lora")  # fmt: skip
    method = over.pop("method")
    base = {"method": method, "optim": {"lr": 1e-2, "schedule": "constant"}}
    cfg = RunConfig.model_validate({**make_cfg(tasks["b"], tmp_path / "r", **over).model_dump(), **base})
    full = train(cfg, console=Console(quiet=True))
    shutil.rmtree(tmp_path / "r" / "checkpoints" / "step-000004")
    shutil.rmtree(tmp_path / "r" / "final")
    resumed = train(cfg, resume=True, console=Console(quiet=True))
    assert resumed.train_losses == full.train_losses


def test_ewc_needs_the_previous_tasks_data(tasks, tmp_path):
    with pytest.raises(ValueError, match="needs regularize.ewc_data"):
        make_cfg(tasks["b"], tmp_path / "x", regularize__ewc_lambda=1.0)
