"""Does TPE with ASHA pruning beat random search without pruning, at the same trial count?

Both searches run the same base config (LoRA on a real data slice) for the same number of trials and
report the best validation loss found and the training steps spent, once per seed:

    .venv/bin/python benchmarks/bench_tune.py                       # SmolLM2-135M (offline), alpaca_zh slice
    .venv/bin/python benchmarks/bench_tune.py --model tiny:deepseek-llm --trials 12 --seeds 0

The current figures in docs/benchmarks.md (one process per search; about 30 + 15 minutes per seed on a
2-core CPU machine):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_tune.py --model smollm2 --rows 240 --max-length 96 \
        --micro-batch 2 --trials 32 --steps 16 --eval-every 4 --eval-batches 12 --startup 8 --seeds 0 \
        --searches random --out runs/m96 --json m0-random.json          # and --searches tpe

Keep max_length large enough for the answers: at 48, SmolLM2's tokenizer left 1 to 6 validation rows of 24
(the older figures there). The output lists the rows and trainable tokens each split kept.

The two searches draw from different sampler seeds (random: seed, TPE: seed + 1000, or + --tpe-seed-offset):
with one seed, TPE's random start-up trials would be the random search's first trials, and both would often
find their best in the same shared trial. The training seed (data order, adapter init) is the same for both.

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
                  "progress": False, "save_every": 0, "keep_checkpoints": 1, "seed": 0,
                  # fp32, as the recorded searches ran before train.precision became auto; bench_tune_test
                  # recomputes a trial's validation loss from its saved files, exactly only in fp32.
                  "precision": "fp32"},
        "tune": {"space": SPACE, "startup_trials": 4, "output": str(out)},
    }


def run_pair(args, seed: int, console: Console) -> dict:
    """One seed: random search without pruning, then TPE + ASHA, on the same base config."""
    out = Path(args.out) / f"seed{seed}"
    results = {}
    for name, sampler, pruner, sampler_seed in [("random, no pruning", "random", "none", seed),
                                                ("TPE + ASHA", "tpe", "asha", seed + args.tpe_seed_offset)]:
        if sampler not in args.searches:
            continue
        cfg = base_config(args.model, args.rows, args.steps, out / sampler, Path(args.data))
        cfg["data"]["max_length"] = args.max_length
        cfg["train"].update({"seed": seed, "eval_batches": args.eval_batches, "micro_batch_size": args.micro_batch,
                             "eval_every": args.eval_every or max(1, args.steps // 6)})
        cfg["tune"].update({"trials": args.trials, "sampler": sampler, "pruner": pruner, "seed": sampler_seed,
                            "startup_trials": args.startup})
        if args.reduction_factor:
            cfg["tune"]["reduction_factor"] = args.reduction_factor
        if args.min_resource:
            cfg["tune"]["min_resource"] = args.min_resource
        if args.keep_best:
            cfg["regularize"] = {"keep_best": True}
        if args.random_fraction is not None:
            cfg["tune"]["random_fraction"] = args.random_fraction
        if args.tpe_gamma is not None:
            cfg["tune"]["tpe_gamma"] = args.tpe_gamma
        t0 = time.perf_counter()
        res = run_tune(RunConfig.model_validate(cfg), console=console)
        trials = res.study.trials
        results[name] = {
            "sampler_seed": sampler_seed,
            "best_val_loss": res.best.value if res.best else None,
            "best_trial": res.best.number if res.best else None,
            "total_steps": sum(int(t.user_attrs.get("steps") or 0) for t in trials),
            "complete": sum(t.state.name == "COMPLETE" for t in trials),
            "pruned": sum(t.state.name == "PRUNED" for t in trials),
            "failed": sum(t.state.name == "FAIL" for t in trials),
            "wall_s": round(time.perf_counter() - t0, 1),
            "best_params": res.best.params if res.best else None,
            # rows and trainable tokens per split as tokenized: the figures before 2026-12-05 were measured
            # at max_length 48, where 4 validation rows (21 tokens) were left
            "data": _tokenized(res.study_dir),
            "trials": [{"number": t.number, "state": t.state.name.lower(), "value": t.value,
                        "steps": t.user_attrs.get("steps"), "params": t.params} for t in trials],
        }
    if len(results) < 2:  # one side only (--searches): nothing to compare in this process
        return {"seed": seed, "searches": results}
    rnd, tpe = results["random, no pruning"], results["TPE + ASHA"]
    ratio = tpe["total_steps"] / max(1, rnd["total_steps"])
    met = tpe["best_val_loss"] is not None and rnd["best_val_loss"] is not None and \
        tpe["best_val_loss"] <= rnd["best_val_loss"] and ratio <= 0.6
    return {"seed": seed, "searches": results, "step_ratio": round(ratio, 3), "goal_met": bool(met)}


def _tokenized(study_dir: Path) -> dict | None:
    reports = sorted(study_dir.glob("trial-*/data_report.json"))
    if not reports:
        return None
    tok = json.loads(reports[0].read_text(encoding="utf-8"))["tokenized"]
    return {name: {"rows": t["rows"], "trainable_tokens": t["trainable_tokens"]} for name, t in tok.items()}


def render(args, per_seed: list[dict]) -> str:
    every = args.eval_every or max(1, args.steps // 6)
    lines = [f"### bench_tune: {args.model}, {args.rows} rows of {Path(args.data).name}, max_length "
             f"{args.max_length}, micro-batch {args.micro_batch}, {args.trials} trials x {args.steps} steps, "
             f"evaluation every {every} steps on {args.eval_batches} batches, ASHA reduction factor "
             f"{args.reduction_factor or RunConfig().tune.reduction_factor}, first rung at step "
             f"{args.min_resource or 'tune.min_resource default'}{', keep_best' if args.keep_best else ''}, "
             f"seeds {args.seeds}", "",
             "| seed | search | best val loss (trial) | training steps | complete / pruned / failed | wall s |",
             "|---|---|---|---|---|---|"]
    for ps in per_seed:
        for name, r in ps["searches"].items():
            lines.append(f"| {ps['seed']} | {name} | {r['best_val_loss']:.4f} ({r['best_trial']}) | {r['total_steps']} "
                         f"| {r['complete']} / {r['pruned']} / {r['failed']} | {r['wall_s']} |")
    for ps in per_seed:
        data = next(iter(ps["searches"].values())).get("data")
        if data:
            lines.append(f"- seed {ps['seed']}, as tokenized: " + ", ".join(
                f"{n} {d['rows']} rows ({d['trainable_tokens']} trainable tokens)" for n, d in data.items()))
    lines.append("")
    if any(len(ps["searches"]) < 2 for ps in per_seed):
        return "\n".join(lines) + "\n"
    for ps in per_seed:
        rnd, tpe = ps["searches"]["random, no pruning"], ps["searches"]["TPE + ASHA"]
        lines.append(f"- seed {ps['seed']}: TPE+ASHA / random steps {ps['step_ratio']:.2f}x, best loss "
                     f"{tpe['best_val_loss']:.4f} vs {rnd['best_val_loss']:.4f} -> goal "
                     f"{'met' if ps['goal_met'] else 'NOT met'}")
    steps = {n: sum(ps["searches"][n]["total_steps"] for ps in per_seed) for n in per_seed[0]["searches"]}
    losses = {n: sum(ps["searches"][n]["best_val_loss"] for ps in per_seed) / len(per_seed) for n in steps}
    lines.append(f"- all seeds: steps {steps['TPE + ASHA']} vs {steps['random, no pruning']} "
                 f"({steps['TPE + ASHA'] / max(1, steps['random, no pruning']):.2f}x), mean best loss "
                 f"{losses['TPE + ASHA']:.4f} vs {losses['random, no pruning']:.4f}; goal met on "
                 f"{sum(ps['goal_met'] for ps in per_seed)} of {len(per_seed)} seeds")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=str(SHARED / "alpaca_zh_demo.json"))
    ap.add_argument("--rows", type=int, default=240, help="rows of the data file (split 8:1:1)")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per example")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per trial")
    ap.add_argument("--micro-batch", type=int, default=4, help="examples per step")
    ap.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: steps // 6)")
    ap.add_argument("--eval-batches", type=int, default=4, help="validation batches per evaluation")
    ap.add_argument("--startup", type=int, default=4, help="TPE's random start-up trials")
    ap.add_argument("--reduction-factor", type=int, default=None,
                    help="ASHA keeps the best 1/N at each rung (default: tune.reduction_factor's default)")
    ap.add_argument("--min-resource", type=int, default=None,
                    help="steps before ASHA's first decision (default: tune.min_resource's default)")
    ap.add_argument("--tpe-gamma", type=float, default=None,
                    help="TPE: share of the trials in its 'good' set (default: tune.tpe_gamma's)")
    ap.add_argument("--random-fraction", type=float, default=None,
                    help="TPE: share of the post-start-up trials drawn at random (default: tune.random_fraction's)")
    ap.add_argument("--tpe-seed-offset", type=int, default=1000,
                    help="TPE's sampler seed is the seed plus this; another offset repeats a seed's TPE + ASHA "
                         "search with other draws (the training seed stays the seed)")
    ap.add_argument("--keep-best", action="store_true",
                    help="both searches with regularize.keep_best: a trial's objective is its best evaluation's")
    ap.add_argument("--searches", nargs="+", choices=["random", "tpe"], default=["random", "tpe"],
                    help="run only one side, e.g. random search and TPE + ASHA of one seed as two processes "
                         "on two cores; the figures of both JSON files are then compared by hand")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="one random-vs-TPE pair per seed")
    ap.add_argument("--out", default="runs/bench-tune")
    ap.add_argument("--json", default=None, help="write all figures (per trial too) to this JSON file")
    ap.add_argument("--report", default=None, help="append a Markdown section with the figures to this file")
    args = ap.parse_args(argv)
    console = Console(stderr=True)
    per_seed = []
    for seed in args.seeds:
        per_seed.append(run_pair(args, seed, console))
        text = render(args, per_seed)
        print(text, flush=True)
        if args.json:  # after each seed, so an interrupted run keeps the seeds it finished
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "args": vars(args),
                                                   "date": time.strftime("%Y-%m-%d %H:%M %Z"), "seeds": per_seed},
                                                  indent=1, default=str), encoding="utf-8")
    if args.report:
        with open(args.report, "a", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
