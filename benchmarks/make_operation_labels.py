"""Writes examples/data/arith_operation.jsonl: a second classification task for the multi-head example.

    .venv/bin/python benchmarks/make_operation_labels.py        # rewrites examples/data/arith_operation.jsonl

The prompts of ../shared/data/arith_train.jsonl that show their operator (" + ", " - ", " × ": the bare
sums in English and Chinese; the word problems name none and are left out) become ``{"text", "label"}``
rows labelled ``add``, ``subtract`` or ``multiply``, the first ``--rows`` of them in file order. Its label
set differs from ChnSentiCorp's (0/1), so a ``data.mix`` of both trains one head per task
(``classify.heads``, examples/multitask-classify-smollm2.yaml).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "arith_train.jsonl"
OPERATORS = {" + ": "add", " - ": "subtract", " × ": "multiply"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "data" / "arith_operation.jsonl")
    args = parser.parse_args()
    rows = []
    for line in SOURCE.read_text(encoding="utf-8").splitlines():
        prompt = json.loads(line)["prompt"]
        label = next((name for sign, name in OPERATORS.items() if sign in prompt), None)
        if label is not None:
            rows.append({"text": prompt, "label": label})
    rows = rows[: args.rows]
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
