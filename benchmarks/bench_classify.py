"""Sentiment classification on ChnSentiCorp (hotel reviews): a LoRA-tuned classifier against baselines.

    .venv/bin/python benchmarks/bench_classify.py                       # the recorded run (docs/benchmarks.md)
    .venv/bin/python benchmarks/bench_classify.py --train-rows 32 --test-rows 32 --steps 2   # smoke run

1. ``dstune data prepare`` (library call): clean and split 8:1:1, stratified by label, seed 0.
2. Baselines on the same split: the majority class of train, and TF-IDF over character 1-3-grams
   (Chinese has no spaces, so characters are the units) + logistic regression (scikit-learn), fitted on
   the whole train split and, for a like-for-like figure, on the same train subset the model sees.
3. dstune: SmolLM2-135M-Instruct (``smollm2``, offline) with a sequence-classification head
   (``task: classification``) and LoRA, trained on the first ``--train-rows`` rows of the train split
   with texts cut to ``--max-length`` tokens, so the run fits a CPU budget of about 10 minutes.
4. ``dstune eval`` on the test split (or its first ``--test-rows``): accuracy and macro F1, beside the
   baselines on the same rows. Results go to ``benchmarks/results/classify_chnsenticorp.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "chnsenticorp_htl.csv"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _scores(y_true: list[str], y_pred: list[str]) -> dict:
    from dstune.evaluate.metrics import classification_metrics

    m = classification_metrics(y_true, y_pred, sorted(set(y_true)))
    return {"accuracy": round(m["accuracy"], 4), "f1_macro": round(m["f1_macro"], 4)}


def baselines(train: list[dict], test: list[dict], subset: int) -> dict:
    """Majority class and TF-IDF (character 1-3-grams) + logistic regression, scored on ``test``."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    y_test = [r["label"] for r in test]
    majority = Counter(r["label"] for r in train).most_common(1)[0][0]
    out = {"majority": {"predicts": majority, **_scores(y_test, [majority] * len(test))}}
    for name, rows in (("tfidf_lr_full_train", train), ("tfidf_lr_same_subset", train[:subset])):
        vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=1)
        x = vec.fit_transform([r["text"] for r in rows])
        clf = LogisticRegression(max_iter=2000, C=10.0).fit(x, [r["label"] for r in rows])
        pred = clf.predict(vec.transform([r["text"] for r in test])).tolist()
        out[name] = {"train_rows": len(rows), **_scores(y_test, pred)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default="runs/bench_classify", help="work directory (prepared data, run)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--train-rows", type=int, default=400, help="train rows the model sees (first N of train)")
    ap.add_argument("--test-rows", type=int, default=None, help="score only the first N test rows (default all)")
    ap.add_argument("--max-length", type=int, default=64, help="tokens per review (the text's end is cut)")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one epoch)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--top-layers", type=int, default=None, help="lora.top_layers: adapt only the top N layers")
    ap.add_argument("--head-lr", type=float, default=None, help="optim.head_lr: lr of the new head (default: --lr)")
    ap.add_argument("--class-weights", default="none", choices=["none", "balanced"],
                    help="classify.class_weights (balanced: n / (classes x count) per class)")
    ap.add_argument("--pooling", default="last", choices=["last", "mean"],
                    help="classify.pooling: the head reads the last real token or the mean of all of them")
    ap.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "classify_chnsenticorp.json"))
    args = ap.parse_args()

    import shutil

    from rich.console import Console

    from dstune.config import RunConfig
    from dstune.data.prepare import PrepareOptions, prepare_files
    from dstune.evaluate.run import evaluate_run
    from dstune.train.loop import train

    work = Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    report = prepare_files([args.data], work / "data", PrepareOptions(seed=0))
    train_rows, test_rows = _rows(work / "data" / "train.jsonl"), _rows(work / "data" / "test.jsonl")
    if args.test_rows:
        test_rows = test_rows[:args.test_rows]
        (work / "data" / "test_used.jsonl").write_text(
            "\n".join(json.dumps(r, ensure_ascii=False) for r in test_rows) + "\n", encoding="utf-8")
    test_file = work / "data" / ("test_used.jsonl" if args.test_rows else "test.jsonl")
    t_prep = time.perf_counter() - t0
    base = baselines(train_rows, test_rows, args.train_rows)
    t_base = time.perf_counter() - t0 - t_prep

    steps = args.steps or -(-min(args.train_rows, len(train_rows)) // args.micro_batch)
    cfg = RunConfig.model_validate({
        "model": {"name": args.model}, "task": "classification", "method": "lora",
        "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "targets": "all-linear", "top_layers": args.top_layers},
        "classify": {"class_weights": args.class_weights, "pooling": args.pooling},
        "data": {"train": str(work / "data" / "train.jsonl"), "validation": str(work / "data" / "val.jsonl"),
                 "max_samples": args.train_rows, "max_length": args.max_length},
        "optim": {"lr": args.lr, "head_lr": args.head_lr, "schedule": "cosine", "warmup_ratio": 0.1},
        "train": {"micro_batch_size": args.micro_batch, "max_steps": steps, "eval_batches": 4, "log_every": 5,
                  "seed": 0, "progress": False},
        "output": str(work / "run")})
    t1 = time.perf_counter()
    result = train(cfg, console=Console(quiet=True))
    t_train = time.perf_counter() - t1
    t2 = time.perf_counter()
    ev = evaluate_run(result.run_dir, test_file, batch_size=16)
    t_eval = time.perf_counter() - t2
    c = ev["classification"]
    out = {
        "command": "benchmarks/bench_classify.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                               if v is not None and k not in ("data", "out", "result")),
        "data": {"file": str(args.data), "split_after_cleaning": report["split"], "train": len(train_rows), "test_scored": len(test_rows),
                 "test_label_balance": dict(Counter(r["label"] for r in test_rows))},
        "model": {"name": args.model, "method": "lora", "r": args.lora_r, "targets": "all-linear",
                  "train_rows": min(args.train_rows, len(train_rows)), "max_length": args.max_length, "steps": steps,
                  "micro_batch": args.micro_batch, "lr": args.lr, "head_lr": args.head_lr,
                  "top_layers": args.top_layers, "class_weights": args.class_weights, "pooling": args.pooling,
                  "final_train_loss": round(result.final_loss, 4),
                  "accuracy": round(c["accuracy"], 4), "f1_macro": round(c["f1_macro"], 4),
                  "confusion_matrix": c["confusion_matrix"], "labels": c["labels"]},
        "baselines": base,
        "wall_s": {"prepare": round(t_prep, 1), "baselines": round(t_base, 1), "train": round(t_train, 1),
                   "eval": round(t_eval, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=2, ensure_ascii=False))
    print("\n| system | train rows | accuracy | macro F1 |\n|---|---|---|---|")
    print(f"| majority class ({base['majority']['predicts']}) | - | {base['majority']['accuracy']:.4f} | "
          f"{base['majority']['f1_macro']:.4f} |")
    for name in ("tfidf_lr_full_train", "tfidf_lr_same_subset"):
        b = base[name]
        print(f"| TF-IDF char 1-3 + LR | {b['train_rows']} | {b['accuracy']:.4f} | {b['f1_macro']:.4f} |")
    m = out["model"]
    print(f"| {args.model} + LoRA r{args.lora_r} + head | {m['train_rows']} | {m['accuracy']:.4f} | {m['f1_macro']:.4f} |")


if __name__ == "__main__":
    main()
