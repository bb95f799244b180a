"""Distillation of a fine-tuned SmolLM2 teacher into a smaller student (issue 27's proof).

The teacher is a run directory of a fine-tuned SmolLM2 (``dstune demo`` writes one: LoRA on the identity
data). The student is SmolLM2 cut to its first ``--layers`` decoder layers (``model.keep_layers``), trained
in full on the teacher's own data and split, for the same steps and seed, twice: on the labels alone
(``objective: sft``), and distilled from the teacher (``objective: distill``, logit mode). Both are scored on
the validation split the teacher never trained on, by the plain label cross-entropy.

    .venv/bin/python benchmarks/bench_distill.py --teacher runs/demo --out /tmp/distill [--steps 40]

Prints one JSON object: each student's validation loss and perplexity, and the teacher's. Figures:
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console

from dstune.config import RunConfig, load_config
from dstune.rundir import RunDir
from dstune.train.loop import train


def student_config(teacher: Path, out: Path, objective: str, args) -> RunConfig:
    """The teacher run's data, split and seed; SmolLM2 cut to ``args.layers`` layers, trained in full."""
    base = load_config(RunDir(teacher).config)
    cfg = {
        "model": {"name": base.model.name, "keep_layers": args.layers},
        "objective": objective,
        "distill": {"teacher": str(teacher), "alpha": args.alpha, "temperature": args.temperature},
        "data": {**base.data.model_dump(mode="json"), **({"train": args.data} if args.data else {})},
        "method": "full",
        "optim": {"lr": args.lr, "warmup_steps": 2},
        "train": {"micro_batch_size": 4, "max_steps": args.steps, "eval_every": 0, "progress": False,
                  "seed": base.train.seed},  # fmt: skip
        "output": str(out),
    }
    return RunConfig.model_validate(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True, help="run directory of a fine-tuned SmolLM2")
    ap.add_argument("--out", required=True, help="folder for the two student runs")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--data", help="the teacher's training file, when it moved since the teacher was trained")
    args = ap.parse_args()
    teacher, out = Path(args.teacher).resolve(), Path(args.out)
    result = {"teacher": str(teacher), "teacher_val": RunDir(teacher).read_json(RunDir.SUMMARY).get("val")}
    for name, objective in (("labels_only", "sft"), ("distilled", "distill")):
        t0 = time.perf_counter()
        run = train(student_config(teacher, out / name, objective, args), console=Console(stderr=True))
        result[name] = {
            "val_loss": run.val.get("loss"),
            "val_ppl": run.val.get("ppl"),
            "steps": run.steps,
            "wall_s": round(time.perf_counter() - t0, 1),
        }
    result["settings"] = {k: getattr(args, k) for k in ("layers", "steps", "lr", "alpha", "temperature")}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
