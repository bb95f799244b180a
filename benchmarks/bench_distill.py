"""Distillation of a fine-tuned SmolLM2 teacher into a smaller student (issue 27's proof).

The teacher is a run directory of a fine-tuned SmolLM2 (``dstune demo`` writes one: LoRA on the identity
data). The student is SmolLM2 cut to its first ``--layers`` decoder layers (``model.keep_layers``), trained
in full on the teacher's own data and split, for the same steps and seed, twice: on the labels alone
(``objective: sft``), and distilled from the teacher (``objective: distill``, logit mode). Both are scored on
the validation split the teacher never trained on, by the plain label cross-entropy.

    .venv/bin/python benchmarks/bench_distill.py --teacher runs/demo --out /tmp/distill [--steps 40]

Validation: the questions of ../shared/data/identity.json the demo data does not ask, answered with the
demo's identity. Prints one JSON object: each student's validation loss and perplexity, and the teacher's.
Figures: docs/benchmarks.md.
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

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def identity_heldout(teacher_data: Path, out: Path) -> Path:
    """The questions of ../shared/data/identity.json that the demo's data does not ask, answered with the
    demo's identity (``dstune demo``: Lumen by Qingyun Lab): a validation set neither model trained on."""
    asked = {json.loads(line)["messages"][0]["content"] for line in teacher_data.read_text().splitlines()}
    who = json.loads(
        (Path(__file__).resolve().parents[1] / "src/dstune/assets/identity_heldout.json").read_text()
    )
    rows = []
    for r in json.loads((SHARED / "identity.json").read_text(encoding="utf-8")):
        if r["instruction"] in asked:
            continue
        maker = who["maker_zh"] if any("\u4e00" <= c <= "\u9fff" for c in r["output"]) else who["maker"]
        answer = r["output"].replace("{{name}}", who["name"]).replace("{{author}}", maker)
        rows.append({"instruction": r["instruction"], "input": r["input"], "output": answer})
    path = out / "identity_heldout.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def student_config(teacher: Path, out: Path, objective: str, args) -> RunConfig:
    """The teacher run's data and seed, validated on ``args.validation``; SmolLM2 cut to ``args.layers``
    layers, trained in full."""
    base = load_config(RunDir(teacher).config)
    data = {**base.data.model_dump(mode="json"), "validation": str(args.validation)}
    if args.data:
        data["train"] = args.data
    cfg = {
        "model": {"name": base.model.name, "keep_layers": args.layers},
        "objective": objective,
        "distill": {"teacher": str(teacher), "alpha": args.alpha, "temperature": args.temperature},
        "data": data,
        "method": "full",
        "optim": {"lr": args.lr, "warmup_steps": 2},
        "train": {
            "micro_batch_size": 4,
            "max_steps": args.steps,
            "eval_every": 0,
            "progress": False,
            "seed": base.train.seed,
        },  # fmt: skip
        "output": str(out),
    }
    return RunConfig.model_validate(cfg)


def teacher_val(teacher: Path, out: Path, args) -> dict:
    """The teacher's own loss on the held-out questions, tokenized as the students' validation is."""
    from dstune.generate import load_for_inference
    from dstune.train.build import build
    from dstune.train.tasks import TASKS

    cfg = student_config(teacher, out / "unused", "sft", args)
    run = build(cfg.model_copy(update={"model": cfg.model.model_copy(update={"keep_layers": 1})}))
    run.model = load_for_inference(str(teacher)).model  # the data and engine of a run, the teacher's weights
    return TASKS["lm"].validate(run, 4)


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
    ap.add_argument("--skip-teacher-eval", action="store_true", help="do not score the teacher itself")
    args = ap.parse_args()
    teacher, out = Path(args.teacher).resolve(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_data = Path(args.data or load_config(RunDir(teacher).config).data.train)
    args.validation = identity_heldout(teacher_data, out)
    result = {"teacher": str(teacher), "validation": str(args.validation)}
    if not args.skip_teacher_eval:
        result["teacher_val"] = teacher_val(teacher, out, args)
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
