"""Writes the identity preference data of examples/ from ../shared/data/identity.json (issue 25).

    .venv/bin/python benchmarks/make_identity_pairs.py          # rewrites examples/data/identity_*.jsonl

Most of the 91 rows of identity.json answer a question about the assistant with ``{{name}}`` and
``{{author}}`` placeholders. A pair fills them in twice: chosen "Orion" by "Nebula Labs", rejected "Atlas"
by "Helix AI", the same words otherwise, so the only thing a preference can learn is the identity.
Six rows name nobody (e.g. "你会保护用户的隐私吗？"): chosen and rejected would be the same text, a pair
with no preference whose reward margin is 0 whatever the model (it capped held-out accuracy at 19/20, and
in the KTO file it was one answer labelled both good and bad), so they are left out. The 91 rows are
shuffled with ``random.Random(0)`` and those 6 dropped; of the other 85, the last 20 whose question
identity.json asks only once are held out (``identity_pairs_heldout.jsonl``), the other 65 train
(``identity_pairs.jsonl``). Questions are compared after dropping case, spaces and punctuation:
identity.json asks "你好" twice and "你是谁" three ways ("你是谁", "你是谁？" twice) with different answers;
the first version of these files split by row and so held out two questions it also trained on.
The KTO file is the training pairs unpaired: chosen with label true, then rejected with label false.
"""

from __future__ import annotations

import argparse
import json
import random
import unicodedata
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "identity.json"
OUT = ROOT / "examples" / "data"
CHOSEN, REJECTED = ("Orion", "Nebula Labs"), ("Atlas", "Helix AI")
HELD_OUT = 20


def question_key(text: str) -> str:
    """The question with case, spaces and punctuation (ASCII and CJK) dropped."""
    return "".join(c for c in text.lower() if not (c.isspace() or unicodedata.category(c).startswith("P")))


def fill(template: str, who: tuple[str, str]) -> str:
    return template.replace("{{name}}", who[0]).replace("{{author}}", who[1])


def make_pairs(rows: list[dict], held_out: int = HELD_OUT, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The training and held-out pairs (module doc): no held-out question is asked in training."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    order = [i for i in order if fill(rows[i]["output"], CHOSEN) != fill(rows[i]["output"], REJECTED)]
    asked = Counter(question_key(rows[i]["instruction"]) for i in order)
    held: set[int] = set()
    for i in reversed(order):
        if len(held) < held_out and asked[question_key(rows[i]["instruction"])] == 1:
            held.add(i)
    pairs = [
        {
            "prompt": rows[i]["instruction"],
            "chosen": fill(rows[i]["output"], CHOSEN),
            "rejected": fill(rows[i]["output"], REJECTED),
        }
        for i in order
    ]
    train = [p for i, p in zip(order, pairs) if i not in held]
    return train, [p for i, p in zip(order, pairs) if i in held]


def unpaired(pairs: list[dict]) -> list[dict]:
    """KTO rows: each pair's chosen answer marked desirable, then its rejected one marked undesirable."""
    return [
        {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
        for p in pairs
        for side in ("chosen", "rejected")
    ]


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(SOURCE))
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    rows = json.loads(Path(args.source).read_text(encoding="utf-8"))
    train, held = make_pairs(rows)
    out = Path(args.out)
    _write(out / "identity_pairs.jsonl", train)
    _write(out / "identity_pairs_heldout.jsonl", held)
    _write(out / "identity_kto.jsonl", unpaired(train))
    print(f"{len(train)} training pairs, {len(held)} held-out pairs, {2 * len(train)} KTO rows in {out}")


if __name__ == "__main__":
    main()
