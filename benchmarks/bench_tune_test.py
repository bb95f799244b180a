"""Scores the configuration each bench_tune search picked on the held-out test split.

Both searches pick their best trial on validation loss, and on the SmolLM2 task the two picks differ by a
few thousandths of it. Whether such a difference means anything shows on data neither search saw: the
test part of the same 8:1:1 split (the run's seed, the run's tokenization). This loads each search's best
trial (base model plus its adapter, as `dstune generate` does) and computes its loss on the test split; it
also recomputes the validation loss exactly as the trial evaluated it, which must give the search's own
figure (a check that the split and scoring are the trial's).

    .venv/bin/python benchmarks/bench_tune_test.py /work/bench/runs-m96 --json test_split.json

The directory is bench_tune's `--out`: one `seedS/<sampler>` study directory per seed and search.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dstune.config import load_config
from dstune.data import prepare_data
from dstune.evaluate.loss import evaluate_loss
from dstune.generate import load_for_inference

SEARCHES = {"random": "random, no pruning", "tpe": "TPE + ASHA"}


def score_trial(trial_dir: Path) -> dict:
    """Validation loss (as the trial evaluated it) and test loss of one finished trial."""
    cfg = load_config(trial_dir / "config.yaml")
    if cfg.train.precision != "fp32":  # its validation ran on bf16 copies of the frozen weights, not saved
        raise SystemExit(f"{trial_dir}: trained with train.precision={cfg.train.precision}; the rescoring "
                         f"reproduces fp32 trials only (bench_tune.py trains in fp32)")
    loaded = load_for_inference(str(trial_dir))
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    data = prepare_data(cfg.data, tok, loaded.chat_template, cfg.train.seed)
    tc = cfg.train
    val = evaluate_loss(loaded.model, data.val, tc.micro_batch_size, pad, limit=tc.eval_batches)
    test = evaluate_loss(loaded.model, data.test, tc.micro_batch_size, pad)
    return {"val_loss": val["loss"], "val_tokens": val["tokens"], "test_loss": test["loss"],
            "test_rows": len(data.test), "test_tokens": test["tokens"]}


def score_study(study_dir: Path) -> dict:
    summary = json.loads((study_dir / "summary.json").read_text(encoding="utf-8"))
    best = summary["best_trial"]
    scored = score_trial(study_dir / f"trial-{best:04d}")
    drift = abs(scored["val_loss"] - summary["best_value"])
    if drift > 1e-4:  # a different split, tokenization or adapter than the trial's: the test figure is not its
        raise SystemExit(f"{study_dir}: trial {best} rescored to val loss {scored['val_loss']:.6f}, the search "
                         f"recorded {summary['best_value']:.6f}; not the trial's data or weights")
    return {"best_trial": best, "best_params": summary["best_params"], "search_val_loss": summary["best_value"],
            **scored}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", help="bench_tune's --out directory (seedS/random, seedS/tpe inside)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    root = Path(args.runs)
    rows = []
    for seed_dir in sorted(root.glob("seed*"), key=lambda d: int(d.name[4:])):
        done = {s: seed_dir / s for s in SEARCHES if (seed_dir / s / "summary.json").is_file()}
        if len(done) < 2:
            continue
        res = {SEARCHES[s]: score_study(d) for s, d in done.items()}
        r, t = res[SEARCHES["random"]], res[SEARCHES["tpe"]]
        rows.append({"seed": int(seed_dir.name[4:]), "searches": res,
                     "val_diff": t["val_loss"] - r["val_loss"], "test_diff": t["test_loss"] - r["test_loss"]})
        print(f"seed {rows[-1]['seed']}: val random {r['val_loss']:.4f} tpe {t['val_loss']:.4f} "
              f"({rows[-1]['val_diff']:+.4f}); test random {r['test_loss']:.4f} tpe {t['test_loss']:.4f} "
              f"({rows[-1]['test_diff']:+.4f}; {r['test_rows']} rows, {r['test_tokens']} tokens)", flush=True)
    if not rows:
        print(f"{root}: no seed with both searches finished", file=sys.stderr)
        return 1
    n = len(rows)
    mean = {k: sum(x[k] for x in rows) / n for k in ("val_diff", "test_diff")}
    tpe_test_as_good = sum(x["test_diff"] <= 0 for x in rows)
    print(f"{n} seeds: mean difference TPE - random, val {mean['val_diff']:+.4f}, test {mean['test_diff']:+.4f}; "
          f"TPE's pick at least as good on test in {tpe_test_as_good}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "seeds": rows,
                                               "mean_diff": mean}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
