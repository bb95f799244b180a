"""DPO on SmolLM2-135M-Instruct (issue 25): held-out preference accuracy and greedy answers, before and after.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dpo.py                  # the recorded run
    .venv/bin/python benchmarks/bench_dpo.py --set train.max_steps=2 --out /tmp/d  # smoke run

1. Trains ``examples/dpo.yaml`` as it is (LoRA on the offline ``smollm2``), its run directory under ``--out``;
   ``--set key=value`` changes the config as on the command line (the tuning of the example was done so).
2. On the held-out pairs of the config's ``data.validation`` (questions never trained on,
   ``benchmarks/make_identity_pairs.py``), with the prompt and answers tokenised as in training:
   - before: the base model's own preference, the share of pairs where log p(chosen) > log p(rejected)
     (summed over the answer tokens). Its implicit DPO reward is 0 for every pair before training (the policy
     is the reference), so "reward accuracy before" would be 0 by a strict comparison and means nothing;
   - after: the implicit reward accuracy, the share of pairs where (log p - log p_ref)(chosen) >
     (log p - log p_ref)(rejected), with p the trained model reloaded from its run directory and p_ref the
     base model (the reference of a LoRA run: the adapter disabled); beside it the run's own last
     validation ``rewards/accuracy``, computed during training with the adapter disabled (the two agree);
   - after: the trained model's own log-probability preference, as before.
3. Greedy answers (48 new tokens) to every held-out question, base and trained: how many name the chosen
   identity (Orion / Nebula Labs) and how many the rejected one (Atlas / Helix AI).
Results go to ``benchmarks/results/dpo_smollm2.json``; figures in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CHOSEN_MARKS, REJECTED_MARKS = ("orion", "nebula labs"), ("atlas", "helix ai")


def held_out_rows(cfg, tokenizer, template: str) -> tuple[list[str], list[dict]]:
    """The held-out questions and their token rows, tokenised exactly as the run's validation pairs."""
    from dstune.data import load_examples
    from dstune.data.preference import tokenize_preference

    examples = load_examples(cfg.data.validation, "preference").examples
    tok = tokenize_preference(examples, tokenizer, template, cfg.data.max_length, cfg.data.overflow)
    if len(tok.rows) != len(examples):
        raise SystemExit(f"{cfg.data.validation}: tokenising dropped pairs ({dict(tok.dropped)})")
    return [ex["prompt"][-1]["content"] for ex in examples], tok.rows


@torch.no_grad()
def pair_logps(model, rows: list[dict], pad: int, micro: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probabilities of the chosen and of the rejected side of each row."""
    from dstune.core.collate import collate
    from dstune.train.preference import sequence_logps

    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(rows), micro):
        batch = collate(rows[start : start + micro], pad)
        for prefix, out in (("", chosen), ("rejected_", rejected)):
            inputs = [batch[prefix + k] for k in ("input_ids", "attention_mask", "labels")]
            out.append(sequence_logps(model, *inputs)[0])
    return torch.cat(chosen), torch.cat(rejected)


def share(mask: torch.Tensor) -> float:
    return round(float(mask.float().mean()), 4)


def names(answer: str, marks: tuple[str, ...]) -> bool:
    return any(m in answer.lower() for m in marks)


def answers_of(loaded, questions: list[str]) -> list[str]:
    from dstune.generate import generate_replies

    return generate_replies(loaded, [[{"role": "user", "content": q}] for q in questions], max_new_tokens=48)


def identity_counts(answers: list[str]) -> dict:
    return {
        "names_chosen": sum(names(a, CHOSEN_MARKS) for a in answers),
        "names_rejected": sum(names(a, REJECTED_MARKS) for a in answers),
        "of": len(answers),
    }


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, CPU, fp32"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "examples" / "dpo.yaml"))
    ap.add_argument("--out", default="runs/bench_dpo", help="the run directory")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key=value, as dstune train")
    ap.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "dpo_smollm2.json"))
    args = ap.parse_args(argv)

    from rich.console import Console

    from dstune.config import load_config
    from dstune.core.facts import pad_id
    from dstune.generate import load_for_inference
    from dstune.train.loop import train

    cfg = load_config(args.config, args.overrides + [f"output={args.out}"])
    t0 = time.perf_counter()
    base = load_for_inference(cfg.model.name)
    questions, rows = held_out_rows(cfg, base.tokenizer, base.chat_template)
    pad = pad_id(base.tokenizer)
    ref_c, ref_r = pair_logps(base.model, rows, pad)
    before_answers = answers_of(base, questions)
    t_before = time.perf_counter() - t0

    t1 = time.perf_counter()
    result = train(cfg, console=Console())
    t_train = time.perf_counter() - t1

    t2 = time.perf_counter()
    tuned = load_for_inference(str(result.run_dir))
    pol_c, pol_r = pair_logps(tuned.model, rows, pad)
    after_answers = answers_of(tuned, questions)
    t_after = time.perf_counter() - t2

    margins = cfg.preference.beta * ((pol_c - ref_c) - (pol_r - ref_r))
    out = {
        "command": "benchmarks/bench_dpo.py " + " ".join(f"--set {o}" for o in args.overrides),
        "config": cfg.model_dump(mode="json", include={"preference", "optim", "lora", "train", "data"}),
        "machine": machine(),
        "held_out_pairs": len(rows),
        "before": {
            "logp_preference": share(ref_c > ref_r),
            "implicit_reward": "0 for every pair",
            "mean_logp_chosen": round(float(ref_c.mean()), 2),
        },
        "after": {
            "implicit_reward_accuracy": share(margins > 0),
            "mean_implicit_margin": round(float(margins.mean()), 4),
            # log p - log p_ref of each side, in nats: DPO may widen the margin by lowering both
            "mean_logp_change_chosen": round(float((pol_c - ref_c).mean()), 2),
            "mean_logp_change_rejected": round(float((pol_r - ref_r).mean()), 2),
            "run_val": {k: round(v, 4) for k, v in result.val.items()},
            "logp_preference": share(pol_c > pol_r),
            "mean_logp_chosen": round(float(pol_c.mean()), 2),
        },
        "train_losses": [round(x, 4) for x in result.train_losses],
        "answers": {
            "questions": questions,
            "before": before_answers,
            "after": after_answers,
            "before_counts": identity_counts(before_answers),
            "after_counts": identity_counts(after_answers),
        },
        "wall_s": {
            "before": round(t_before, 1),
            "train": round(t_train, 1),
            "after": round(t_after, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
        "run_dir": str(result.run_dir),
    }
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({k: out[k] for k in ("before", "after", "wall_s")}, indent=2))
    a = out["answers"]
    print(f"answers naming Orion/Nebula Labs: {a['before_counts']} -> {a['after_counts']}")
    for q, b, x in list(zip(questions, before_answers, after_answers)):
        print(f"\nQ: {q}\n  before: {b}\n  after:  {x}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
