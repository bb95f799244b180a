"""GRPO on SmolLM2-135M-Instruct (offline) with ../shared/data/arith_train.jsonl (issue 25's proof).

Trains examples/grpo.yaml (LoRA, accuracy + format rewards) and scores the 200 held-out problems of the
validation split (never trained on) with greedy decoding before and after: accuracy (the final number
equals the answer) and format (``<think>...</think>`` then an answer). The run directory keeps the reward
curve (reward.png), metrics.jsonl and a few validation completions (completions.jsonl).

    .venv/bin/python benchmarks/bench_grpo.py --out /tmp/grpo-run [--set train.max_steps=60 ...]

Prints one JSON object: before/after metrics, steps, wall and CPU seconds. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console

from dstune.config import load_config
from dstune.train.build import build
from dstune.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


def held_out_scores(cfg) -> dict:
    """Greedy completions of every validation prompt with the starting weights, scored."""
    run = build(cfg)
    return run.objective.evaluate(run.model, run.data.val, cfg.train.micro_batch_size, run.engine)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "examples" / "grpo.yaml"))
    ap.add_argument("--out", required=True, help="run directory")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE config overrides")
    ap.add_argument("--result", help="also write the JSON result here")
    args = ap.parse_args()
    cfg = load_config(args.config, overrides=args.set, values={"output": args.out})
    if cfg.train.eval_batches:
        raise SystemExit("leave train.eval_batches unset: before and after score the whole validation split")
    pick = ("reward", "reward/accuracy", "reward/format", "completion_length", "truncated", "prompts")
    t0, c0 = time.perf_counter(), time.process_time()
    before = held_out_scores(cfg)
    t_before = time.perf_counter() - t0
    result = train(cfg, console=Console(stderr=True))
    after = result.val  # the end-of-run validation: the whole split, as train.eval_batches is unset
    out = {
        "model": cfg.model.name,
        "threads": torch.get_num_threads(),
        "held_out_prompts": before.get("prompts"),
        "before": {k: before.get(k) for k in pick},
        "after": {k: after.get(k) for k in pick},
        "steps": result.steps,
        "completions_per_step": cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.grpo.num_generations,
        "wall_s_before_eval": round(t_before, 1),
        "wall_s_total": round(time.perf_counter() - t0, 1),
        "cpu_s_total": round(time.process_time() - c0, 1),
        "run_dir": str(result.run_dir),
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.result:
        Path(args.result).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
