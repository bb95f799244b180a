"""Continual learning on SmolLM2: a new identity first, general instructions second; how much of the
identity does each method against forgetting keep (issue 27)?

    .venv/bin/python benchmarks/bench_continual.py                   # the recorded run (docs/benchmarks.md)
    .venv/bin/python benchmarks/bench_continual.py --steps-a 2 --steps-b 2 --rows-b 32   # smoke run

1. Task A: the demo's run (``dstune demo``'s config: LoRA r16 on the top 10 layers of SmolLM2-135M-Instruct,
   40 steps on the 40 identity rows), merged into a standalone model with ``dstune merge``.
2. Task B, from that merged model: LoRA (same shape) on ``--rows-b`` Alpaca rows for ``--steps-b`` steps,
   validated on the next 80 Alpaca rows (the same file for every method), five ways:
   ``plain``; ``ewc`` (``regularize.ewc_lambda``, Fisher on the identity rows); ``replay`` (``data.mix``:
   Alpaca 0.8, identity rows 0.2); ``distill`` (``objective: distill`` with ``teacher: base``, the
   student's own base = the task-A model with the adapter disabled, on the Alpaca answers).
3. Identity score: the share of greedy answers to 20 held-out identity questions (none of them in the
   training rows; English and Chinese) that name the new assistant or its maker, before task B (the
   task-A model) and after it (each method). Task-B loss: the loss on the 80 held-out Alpaca rows.
Results: ``benchmarks/results/continual_smollm2.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"

# Held-out: none of these is a question of src/dstune/assets/identity_demo.jsonl (checked in main()).
QUESTIONS = [
    "Which lab built you?", "Tell me a little about yourself.", "Who is behind you?", "Are you Claude?",
    "Who is your creator?", "What kind of assistant are you?", "Please state your name.",
    "Which lab trained you?", "By what name do you go?", "Who am I chatting with?", "Who designed you?",
    "Which language model is this?", "Which organisation do you belong to?", "Introduce yourself in one sentence.",
    "Who programmed you?", "你叫什么？", "你是哪个实验室开发的？", "用一句话介绍你自己。", "你是谁做的？",
    "你的名字是什么？",
]  # fmt: skip


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def task_b_config(name: str, model: str, train: Path, held: Path, identity: Path, work: Path, args) -> dict:
    base = {
        "model": {"name": model}, "method": "lora",
        "lora": {"r": 16, "alpha": 32, "targets": "all-linear", "top_layers": 10},
        "data": {"train": str(train), "validation": str(held), "max_length": 256},
        "optim": {"lr": args.lr_b, "schedule": "cosine", "warmup_steps": 5},
        "train": {"micro_batch_size": 4, "max_steps": args.steps_b, "log_every": 5, "seed": 0,
                  "group_by_length": True, "progress": False},
        "output": str(work / name),
    }  # fmt: skip
    if name == "ewc":
        base["regularize"] = {"ewc_lambda": args.ewc_lambda, "ewc_data": str(identity), "ewc_samples": 40}
    elif name == "replay":
        base["data"].pop("train")
        base["data"]["mix"] = [{"path": str(train), "weight": 0.8}, {"path": str(identity), "weight": 0.2}]
    elif name == "distill":
        base["objective"] = "distill"
        base["distill"] = {
            "teacher": "base",
            "mode": "logits",
            "temperature": 2.0,
            "alpha": args.distill_alpha,
        }
    return base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_continual")
    ap.add_argument("--steps-a", type=int, default=40)
    ap.add_argument("--rows-b", type=int, default=400)
    ap.add_argument("--steps-b", type=int, default=100)
    ap.add_argument("--lr-b", type=float, default=3e-3)
    ap.add_argument("--ewc-lambda", type=float, default=5000.0)
    ap.add_argument("--distill-alpha", type=float, default=0.5)
    ap.add_argument("--methods", default="plain,ewc,replay,distill")
    ap.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "continual_smollm2.json"))
    args = ap.parse_args()

    import shutil

    from rich.console import Console

    from dstune.config import RunConfig
    from dstune.demo import answers, carries_identity, demo_config, demo_paths
    from dstune.merge import merge_run
    from dstune.train.loop import train

    identity_file, heldout_file = demo_paths()
    heldout = json.loads(heldout_file.read_text(encoding="utf-8"))
    seen = {
        json.loads(x)["messages"][0]["content"]
        for x in identity_file.read_text(encoding="utf-8").splitlines()
    }
    assert not seen & set(QUESTIONS), seen & set(QUESTIONS)
    named = carries_identity(heldout)

    def heldout_loss(target: str) -> float:
        """Mean token loss on the held-out Alpaca rows (answers only, the training template), no generation."""
        from dstune.config import load_config
        from dstune.core.facts import pad_id
        from dstune.data import prepare_data
        from dstune.evaluate.loss import evaluate_loss
        from dstune.generate import load_for_inference

        loaded = load_for_inference(target)
        dc = load_config(overrides=[f"data.train={held_b}", "data.split=[1.0, 0.0, 0.0]", "data.max_length=256",
                                    "data.cache=false"]).data  # fmt: skip
        rows = prepare_data(dc, loaded.tokenizer, loaded.chat_template, 0).train
        return round(evaluate_loss(loaded.model, rows, 8, pad_id(loaded.tokenizer))["loss"], 4)

    def score(target: str) -> dict:
        replies = answers(target, QUESTIONS)
        return {"share": round(sum(map(named, replies)) / len(QUESTIONS), 3), "answers": replies}

    work = Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))
    train_b = _write(work / "alpaca_train.jsonl", rows[: args.rows_b])
    held_b = _write(
        work / "alpaca_heldout.jsonl", rows[args.rows_b : args.rows_b + 80]
    )  # read by heldout_loss
    a = train(demo_config(str(work / "task_a"), max_steps=args.steps_a), console=Console(quiet=True))
    merged = work / "task_a_merged"
    merge_run(a.run_dir, merged)
    out = {"task_a": {"identity": score(str(merged)), "alpaca_heldout": heldout_loss(str(merged))}}
    for name in args.methods.split(","):
        cfg = RunConfig.model_validate(
            task_b_config(name, str(merged), train_b, held_b, identity_file, work, args)
        )
        t1 = time.perf_counter()
        result = train(cfg, console=Console(quiet=True))
        out[name] = {
            "identity": score(str(result.run_dir)),
            "alpaca_heldout": heldout_loss(str(result.run_dir)),
            "train_s": round(time.perf_counter() - t1, 1),
        }
    plain = out.get("plain")
    for name in args.methods.split(","):
        if plain and name != "plain":
            out[name]["identity_vs_plain"] = round(
                out[name]["identity"]["share"] / max(plain["identity"]["share"], 1e-9), 2
            )
            out[name]["alpaca_loss_vs_plain"] = round(
                out[name]["alpaca_heldout"] / plain["alpaca_heldout"], 4
            )
    out["command"] = "benchmarks/bench_continual.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "result")
    )
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print("| model | identity share (20 held-out questions) | Alpaca held-out loss |\n|---|---|---|")
    for name, r in out.items():
        if isinstance(r, dict) and "identity" in r:
            print(f"| {name} | {r['identity']['share']:.2f} | {r['alpaca_heldout']:.4f} |")


if __name__ == "__main__":
    main()
