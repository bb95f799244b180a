"""Does TPE with ASHA pruning beat random search without pruning, at the same trial count?

Both searches run the same base config (LoRA on a real data slice) for the same number of trials and
report the best validation loss found and the training steps spent, in one invocation:

    .venv/bin/python benchmarks/bench_tune.py                       # SmolLM2-135M (offline), alpaca_zh slice
    .venv/bin/python benchmarks/bench_tune.py --model tiny:deepseek-llm --trials 12

The goal (issue 6): TPE+ASHA reaches a best objective at least as good as random search while spending
at most 60% of its steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console

from dstune.config import RunConfig
from dstune.tune.study import run_tune

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

SPACE = {
    "optim.lr": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
    "lora.r": {"type": "categorical", "choices": [4, 8, 16, 32]},
    "lora.alpha_ratio": {"type": "categorical", "choices": [0.5, 1.0, 2.0, 4.0]},
    "optim.warmup_ratio": {"type": "float", "low": 0.0, "high": 0.3},
}


def base_config(model: str, rows: int, steps: int, out: Path, data: Path) -> dict:
    return {
        "model": {"name": model},
        "data": {"train": str(data), "max_samples": rows, "max_length": 128},
        "method": "lora",
        "lora": {"targets": "attention"},
        "train": {"micro_batch_size": 4, "max_steps": steps, "eval_every": max(1, steps // 6), "eval_batches": 4,
                  "progress": False, "save_every": 0, "keep_checkpoints": 1, "seed": 0},
        "tune": {"space": SPACE, "startup_trials": 4, "output": str(out)},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=str(SHARED / "alpaca_zh_demo.json"))
    ap.add_argument("--rows", type=int, default=240, help="rows of the data file (split 8:1:1)")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per trial")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench-tune")
    ap.add_argument("--report", default=None, help="append a Markdown section with the figures to this file")
    args = ap.parse_args(argv)
    console = Console(stderr=True)
    out = Path(args.out)
    results = {}
    for name, sampler, pruner in [("random, no pruning", "random", "none"), ("TPE + ASHA", "tpe", "asha")]:
        cfg = base_config(args.model, args.rows, args.steps, out / sampler, Path(args.data))
        cfg["tune"].update({"trials": args.trials, "sampler": sampler, "pruner": pruner, "seed": args.seed})
        t0 = time.perf_counter()
        res = run_tune(RunConfig.model_validate(cfg), console=console)
        trials = res.study.trials
        results[name] = {
            "best_val_loss": res.best.value if res.best else None,
            "total_steps": sum(int(t.user_attrs.get("steps") or 0) for t in trials),
            "complete": sum(t.state.name == "COMPLETE" for t in trials),
            "pruned": sum(t.state.name == "PRUNED" for t in trials),
            "failed": sum(t.state.name == "FAIL" for t in trials),
            "wall_s": round(time.perf_counter() - t0, 1),
            "best_params": res.best.params if res.best else None,
        }
    rnd, tpe = results["random, no pruning"], results["TPE + ASHA"]
    step_ratio = tpe["total_steps"] / max(1, rnd["total_steps"])
    lines = [f"### bench_tune: {args.model}, {args.rows} rows of {Path(args.data).name}, {args.trials} trials x "
             f"{args.steps} steps, seed {args.seed}", "",
             "| search | best val loss | training steps | complete / pruned / failed | wall s |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['best_val_loss']:.4f} | {r['total_steps']} | "
                     f"{r['complete']} / {r['pruned']} / {r['failed']} | {r['wall_s']} |")
    verdict = "met" if (tpe["best_val_loss"] <= rnd["best_val_loss"] and step_ratio <= 0.6) else "NOT met"
    lines += ["", f"TPE+ASHA / random: steps {step_ratio:.2f}x, best loss {tpe['best_val_loss']:.4f} vs "
              f"{rnd['best_val_loss']:.4f} -> goal (as good, <= 0.60x steps) {verdict}", ""]
    text = "\n".join(lines)
    print(text)
    print(json.dumps(results, indent=1, default=str))
    if args.report:
        with open(args.report, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
