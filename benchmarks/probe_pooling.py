"""Which hidden state should a classification head read? A linear probe on frozen features.

The decoder stays frozen; each review becomes one feature vector, read from the last real token (what
transformers' classifiers pool, ``classify.pooling: last``) or as the mean over the real tokens
(``classify.pooling: mean``), and scikit-learn's logistic regression is fitted on the train rows and scored
on the test rows. The split is the one ``bench_classify.py`` uses (``dstune data prepare``, seed 0):

    .venv/bin/python benchmarks/probe_pooling.py --train-rows 400 --test-rows 300 --max-length 64

No training is involved, so the figure says how much of the label each pooling exposes to a linear head
before fine-tuning starts; docs/benchmarks.md records it beside the fine-tuned classifier.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_classify import DATA, _rows

from dstune.models.classify import mean_of_real_tokens


@torch.no_grad()
def features(model, tok, texts: list[str], max_length: int, batch: int = 16) -> dict[str, torch.Tensor]:
    """Last-real-token and mean-of-real-tokens hidden states of the decoder's last layer, one row per text."""
    out: dict[str, list[torch.Tensor]] = {"last": [], "mean": []}
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"]
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # the rightmost real token, either padding side
        out["last"].append(hidden[torch.arange(len(hidden)), last])
        out["mean"].append(mean_of_real_tokens(hidden, mask))  # the pooling classify.pooling=mean trains
    return {k: torch.cat(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default="runs/probe_pooling", help="work directory (prepared data)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--train-rows", type=int, default=400)
    ap.add_argument("--test-rows", type=int, default=300)
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args()

    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModel

    from dstune.data.prepare import PrepareOptions, prepare_files
    from dstune.models.load import load_tokenizer, resolve_model_dir

    t0 = time.perf_counter()
    prepare_files([args.data], Path(args.out), PrepareOptions(seed=0))
    train = _rows(Path(args.out) / "train.jsonl")[:args.train_rows]
    test = _rows(Path(args.out) / "test.jsonl")[:args.test_rows]
    resolved = resolve_model_dir(args.model)
    tok = load_tokenizer(resolved.path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModel.from_pretrained(resolved.path, dtype=torch.float32).eval()
    f_train = features(model, tok, [r["text"] for r in train], args.max_length)
    f_test = features(model, tok, [r["text"] for r in test], args.max_length)
    result = {"model": args.model, "train_rows": len(train), "test_rows": len(test), "max_length": args.max_length,
              "accuracy": {}}
    for pooling in ("last", "mean"):
        for c in (0.1, 1.0):
            clf = LogisticRegression(max_iter=3000, C=c).fit(f_train[pooling].numpy(), [r["label"] for r in train])
            acc = clf.score(f_test[pooling].numpy(), [r["label"] for r in test])
            result["accuracy"][f"{pooling}, C={c}"] = round(float(acc), 4)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
