"""How often does a search beat random search with the same number of trials?

A random search's best of N trials is itself a random draw: rerun it with another sampler seed and it lands
elsewhere. One random search per seed therefore says little about whether another search is "at least as
good". Random search's trials are independent draws, so a random search of M > N trials (same training
seed, same task) gives that draw's whole distribution: every N-subset of the M trials is an N-trial random
search, equally likely. Over all of them, exactly (no sampling), this script computes per seed (in the
study's direction, read from its summary.json: lower is better for a loss, higher for F1)

- the expected best of an N-trial random search, and
- the chance that the other search's best is at least as good as an N-trial random search's,

and over the seeds the means of both, and the other search's steps against N full random trials.

    .venv/bin/python benchmarks/bench_tune_odds.py /work/bench/runs-m96-64 /work/bench/runs-m96-o2000 --trials 32

Both directories are bench_tune `--out` directories: `seedS/random` in the first (M trials, resumed with
`--trials M` or run so), `seedS/tpe` in the second (its first N trials are used). A failed random trial is a
draw that never wins; it stays in the M.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path


def read_trials(study_dir: Path) -> list[dict]:
    """The rows of a study's trials.csv, in trial order: state, value (None unless complete) and steps."""
    with open(study_dir / "trials.csv", encoding="utf-8") as fh:
        rows = [{"trial": int(r["trial"]), "state": r["state"], "steps": int(r["steps"] or 0),
                 "value": float(r["value"]) if r["state"] == "complete" and r["value"] else None}
                for r in csv.DictReader(fh)]
    return sorted(rows, key=lambda r: r["trial"])


def expected_best(values: list[float], n: int) -> float:
    """Mean of min() over all n-subsets of values: the i-th smallest is the minimum of C(M-1-i, n-1) of them."""
    m = len(values)
    weights = (math.comb(m - 1 - i, n - 1) for i in range(m))
    # a value that is never the minimum (weight 0) is skipped, not multiplied: a failed trial's inf * 0 is nan
    return sum(w * v for w, v in zip(weights, sorted(values)) if w) / math.comb(m, n)


def chance_at_least_as_good(values: list[float], x: float, n: int) -> float:
    """P(x <= min of a random n-subset of values): every member of the subset is >= x."""
    return math.comb(sum(v >= x for v in values), n) / math.comb(len(values), n)


def seed_odds(random_dir: Path, other_dir: Path, n: int | None) -> dict:
    rnd, other = read_trials(random_dir), read_trials(other_dir)
    summary = json.loads((random_dir / "summary.json").read_text(encoding="utf-8"))
    sign = -1.0 if summary.get("direction") == "maximize" else 1.0  # the sums below minimise
    n = n or len(other)
    if len(rnd) <= n:
        raise SystemExit(f"{random_dir}: {len(rnd)} random trials; need more than {n} to compare with {n}-trial "
                         "searches (resume it with bench_tune --trials 2N)")
    if len(other) < n:
        raise SystemExit(f"{other_dir}: {len(other)} trials, fewer than --trials {n}")
    values = [sign * r["value"] if r["value"] is not None else math.inf for r in rnd]
    mine = [sign * r["value"] for r in other[:n] if r["value"] is not None]
    best = min(mine, default=math.inf)
    full = max(r["steps"] for r in rnd)
    return {"random_trials": len(rnd), "trials": n, "direction": summary.get("direction", "minimize"),
            "best": sign * best, "random_first_n_best": sign * min(values[:n]),
            "random_expected_best": sign * expected_best(values, n),
            "chance_at_least_as_good": chance_at_least_as_good(values, best, n),
            "steps": sum(r["steps"] for r in other[:n]), "random_steps": n * full}


def _finite(row: dict) -> dict:
    """A search whose every trial failed has an infinite best; JSON has no infinity, so it is written as null."""
    return {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in row.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("random_runs", help="bench_tune --out directory with seedS/random of M trials")
    p.add_argument("other_runs", help="bench_tune --out directory with seedS/tpe (or seedS/<--search>)")
    p.add_argument("--search", default="tpe", help="the study directory compared with random search (default: tpe)")
    p.add_argument("--trials", type=int, default=None, help="N (default: the other search's trial count)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    rows = []
    for seed_dir in sorted(Path(args.other_runs).glob("seed*"), key=lambda d: int(d.name[4:])):
        other, rnd = seed_dir / args.search, Path(args.random_runs) / seed_dir.name / "random"
        if (other / "trials.csv").is_file() and (rnd / "trials.csv").is_file():
            rows.append({"seed": int(seed_dir.name[4:]), **seed_odds(rnd, other, args.trials)})
    if not rows:
        raise SystemExit(f"no seed has both {args.random_runs}/seedS/random and {args.other_runs}/seedS/{args.search}")
    print(f"| seed | {args.search} best | random best, first N | random best of N, expected | "
          f"chance {args.search} at least as good | steps |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['best']:.4f} | {r['random_first_n_best']:.4f} | {r['random_expected_best']:.4f} "
              f"| {r['chance_at_least_as_good']:.2f} | {r['steps']}/{r['random_steps']} "
              f"({r['steps'] / r['random_steps']:.2f}x) |")
    k = len(rows)
    summary = {"seeds": k, "trials": rows[0]["trials"],
               "mean_best_minus_expected_random": sum(r["best"] - r["random_expected_best"] for r in rows) / k,
               "direction": rows[0]["direction"],
               "mean_chance_at_least_as_good": sum(r["chance_at_least_as_good"] for r in rows) / k,
               "chance_on_every_seed": math.prod(r["chance_at_least_as_good"] for r in rows),
               "step_ratio": sum(r["steps"] for r in rows) / sum(r["random_steps"] for r in rows)}
    print(f"\n{k} seeds, N = {summary['trials']}: best minus random's expected best of N, mean "
          f"{summary['mean_best_minus_expected_random']:+.4f}; chance at least as good, mean "
          f"{summary['mean_chance_at_least_as_good']:.2f} (on every seed: {summary['chance_on_every_seed']:.4f}); "
          f"steps {summary['step_ratio']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "summary": _finite(summary),
                                               "seeds": [_finite(r) for r in rows]},
                                              indent=1, allow_nan=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
