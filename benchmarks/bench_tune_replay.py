"""Replays dstune's pruner on the learning curves of a finished random search without pruning.

Random search without pruning runs every trial to the end, so its run directories hold each trial's full
validation curve. Feeding those curves, in trial order, to the pruner `dstune tune` would build (the same
`_pruner`, optuna's own SuccessiveHalvingPruner) answers a question bench_tune alone cannot: would pruning
have kept random search's best configuration, and at what share of the steps? If it would, a TPE + ASHA
search that misses that configuration lost it in the sampler, not in the pruner.

    .venv/bin/python benchmarks/bench_tune_replay.py /work/bench/runs-m96 --asha 3:4 2:4 3:8

Each `--asha F:M` is a reduction factor F with the first decision after M steps (M=0: dstune's default, a
quarter of the trial). The directory is bench_tune's `--out` (`seedS/random` inside).

`--halves K` asks the fairer question, random search with ASHA against *another* random search of the same
size: K times, the finished trials are split at random into two halves; ASHA is replayed on one half (in a
random order, as a random sampler would have drawn it) and its best compared with the other half's. The
share of splits where it was at least as good is what bench_tune_odds reports for TPE + ASHA.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

from dstune.config import RunConfig
from dstune.report.logger import read_metrics
from dstune.tune.study import _pruner


def curves(study_dir: Path) -> list[tuple[int, dict[int, float]]]:
    """(trial number, {step: validation loss}) of every complete trial, in trial order."""
    with open(study_dir / "trials.csv", encoding="utf-8") as fh:
        numbers = sorted(int(r["trial"]) for r in csv.DictReader(fh) if r["state"] == "complete")
    return [(n, {row["step"]: row["loss"] for row in read_metrics(study_dir / f"trial-{n:04d}")
                 if row.get("split") == "val"}) for n in numbers]


def replay(trials: list[tuple[int, dict[int, float]]], reduction_factor: int, min_resource: int | None) -> dict:
    """Runs the trials' curves through dstune's ASHA pruner; returns what it kept and the steps it spent."""
    max_steps = max(max(v) for _, v in trials)
    tc = RunConfig.model_validate({"tune": {"pruner": "asha", "reduction_factor": reduction_factor,
                                            "min_resource": min_resource}}).tune
    study = optuna.create_study(pruner=_pruner(tc, max_steps))
    steps, finished = 0, []
    for number, vals in trials:
        trial = study.ask()
        for step in sorted(vals):
            trial.report(vals[step], step)
            if step < max_steps and trial.should_prune():
                study.tell(trial, state=TrialState.PRUNED)
                steps += step
                break
        else:
            study.tell(trial, vals[max_steps])
            steps += max_steps
            finished.append((vals[max_steps], number))
    best_value, best_trial = min(finished)
    return {"reduction_factor": reduction_factor, "min_resource": min_resource, "steps": steps,
            "step_ratio": steps / (max_steps * len(trials)), "finished": len(finished), "best_trial": best_trial,
            "best_value": best_value}


def halves(trials: list[tuple[int, dict[int, float]]], reduction_factor: int, min_resource: int | None,
           k: int, seed: int = 0) -> dict:
    """Random search + ASHA on a random half of the trials against the other half without pruning, k times."""
    rng, wins, ratios = random.Random(seed), 0, []
    for _ in range(k):
        order = rng.sample(trials, len(trials))
        half = len(order) // 2
        pruned = replay(order[:half], reduction_factor, min_resource)
        other_best = min(v[max(v)] for _, v in order[half:2 * half])
        wins += pruned["best_value"] <= other_best
        ratios.append(pruned["step_ratio"])
    return {"reduction_factor": reduction_factor, "min_resource": min_resource, "splits": k,
            "trials_per_search": len(trials) // 2, "chance_at_least_as_good": wins / k,
            "mean_step_ratio": sum(ratios) / k}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", help="bench_tune's --out directory (seedS/random inside)")
    p.add_argument("--asha", nargs="+", default=["3:0"], help="F:M = reduction factor F, first decision after M steps")
    p.add_argument("--halves", type=int, default=0,
                   help="K random splits into two halves: random + ASHA on one against random search on the other")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = [tuple(int(x) for x in a.split(":")) for a in args.asha]
    rows = []
    for seed_dir in sorted(Path(args.runs).glob("seed*"), key=lambda d: int(d.name[4:])):
        if not (seed_dir / "random" / "summary.json").is_file():
            continue
        trials = curves(seed_dir / "random")
        best_value, best_trial = min((v[max(v)], n) for n, v in trials)
        row = {"seed": int(seed_dir.name[4:]), "random_best_trial": best_trial, "random_best_value": best_value,
               "replays": [replay(trials, f, m or None) for f, m in settings]}
        if args.halves:
            row["halves"] = [halves(trials, f, m or None, args.halves) for f, m in settings]
        rows.append(row)
        cells = [f"factor {r['reduction_factor']}, first {r['min_resource'] or 'default'}: "
                 f"{r['best_value']:.4f} (trial {r['best_trial']}{', kept' if r['best_trial'] == best_trial else ''}) "
                 f"at {r['step_ratio']:.2f}x" for r in row["replays"]]
        print(f"seed {row['seed']}: random best {best_value:.4f} (trial {best_trial}) | " + " | ".join(cells))
        for h in row.get("halves", []):
            print(f"  factor {h['reduction_factor']}: random + ASHA on {h['trials_per_search']} trials at least as "
                  f"good as random search on the other {h['trials_per_search']} in {h['chance_at_least_as_good']:.2f} "
                  f"of {h['splits']} splits, at {h['mean_step_ratio']:.2f}x")
    if not rows:
        print(f"{args.runs}: no finished random search", file=sys.stderr)
        return 1
    for i, (f, m) in enumerate(settings if args.halves else []):
        share = sum(r["halves"][i]["chance_at_least_as_good"] for r in rows) / len(rows)
        print(f"all seeds, factor {f}, first {m or 'default'}: random + ASHA at least as good, mean {share:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "seeds": rows}, indent=1),
                                   encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
