"""GRPO after a supervised "cold start" (DeepSeek-R1's recipe) on SmolLM2 with ../shared/data/arith_train.jsonl.

bench_grpo.py showed that GRPO alone on SmolLM2-135M-Instruct gets no signal from the accuracy reward (the model
answers 5% of the problems, so most groups of 8 hold no correct completion) and learns the format's loophole
instead. R1 starts its RL from a model fine-tuned on a few thousand examples written in the target format. Here:

1. cold start: LoRA on the training split's problems written as ``<think>\\n{a} {op} {b} = {answer}\\n</think> {answer}``
   (the operation found from the two numbers of the prompt and the answer; problems whose numbers do not give the
   answer by one operation are left out), with the GRPO config's system prompt, ``--sft-steps`` steps;
2. ``dstune merge`` of that run, the base of
3. GRPO with examples/grpo.yaml's settings (accuracy + format rewards) for ``--set train.max_steps=N`` steps.

The 200 validation problems of the GRPO config (never in 1. or 3.: rows are kept out by their line number) are
answered greedily by the instruct model, after 1. and after 3. Prints one JSON object; figures in docs/benchmarks.md.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_grpo_coldstart.py --out /tmp/grpo-cold --sft-steps 40 \\
        --set train.max_steps=20
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from dstune.config import load_config
from dstune.models.load import load_tokenizer, resolve_model_dir
from dstune.models.templates import resolve_chat_template
from dstune.train.build import build, build_data
from dstune.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
PICK = ("reward", "reward/accuracy", "reward/format", "completion_length", "truncated", "prompts")


def worked(prompt: str, answer: str) -> str | None:
    """``<think>`` with the one operation on the prompt's two numbers that gives ``answer``, then the answer."""
    numbers = [int(x) for x in re.findall(r"\d+", prompt)]
    if len(numbers) != 2:
        return None
    a, b, want = *numbers, int(answer)
    for op, value in (("+", a + b), ("-", a - b), ("*", a * b)):
        if value == want:
            return f"<think>\n{a} {op} {b} = {want}\n</think> {want}"
    return None


def scores(cfg) -> dict:
    run = build(cfg)
    got = run.objective.evaluate(run.model, run.data.val, cfg.train.micro_batch_size, run.engine)
    return {k: got.get(k) for k in PICK}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="a new folder: sft/, merged/ and grpo/ go in it")
    ap.add_argument("--sft-steps", type=int, default=40)
    ap.add_argument("--sft-rows", type=int, default=800, help="cold-start examples (from the training split)")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE overrides of the GRPO run")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    grpo = load_config(ROOT / "examples" / "grpo.yaml", overrides=args.set, values={"output": str(out / "grpo")})
    resolved = resolve_model_dir(grpo.model.name)
    tokenizer = load_tokenizer(resolved.path)
    data, _ = build_data(grpo, tokenizer, resolve_chat_template(tokenizer, grpo.model.chat_template, resolved.family))
    held = {int(r["source"].rsplit(" ", 1)[1]) for r in data.val + (data.test or [])}  # "file:line N"
    source = Path(grpo.data.train)
    rows = []
    for n, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        text = worked(row["prompt"], row["answer"])
        if n not in held and text is not None:
            rows.append({"messages": [{"role": "system", "content": grpo.data.system},
                                      {"role": "user", "content": row["prompt"]},
                                      {"role": "assistant", "content": text}]})  # fmt: skip
    sft_file = out / "coldstart.jsonl"
    sft_file.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[: args.sft_rows]), "utf-8")
    t0, c0 = time.perf_counter(), time.process_time()
    before = scores(grpo)
    sft = load_config(None, values={
        "model.name": grpo.model.name, "method": "lora", "lora.r": 16, "lora.alpha": 32, "lora.targets": "all-linear",
        "data.train": str(sft_file), "data.split": [1.0, 0.0, 0.0], "data.max_length": 160, "optim.lr": 3e-4,
        "optim.schedule": "constant", "train.micro_batch_size": 8, "train.max_steps": args.sft_steps,
        "train.progress": False, "train.seed": 0, "output": str(out / "sft"),
    })  # fmt: skip
    train(sft, console=Console(stderr=True))
    t_sft = time.perf_counter() - t0
    merged = out / "merged"
    subprocess.run([sys.executable, "-m", "dstune.cli", "merge", str(out / "sft"), "-o", str(merged)], check=True)
    grpo = grpo.model_copy(update={"model": grpo.model.model_copy(update={"name": str(merged)})})
    after_sft = scores(grpo)
    result = train(grpo, console=Console(stderr=True))
    after = {k: result.val.get(k) for k in PICK}
    report = {
        "cold_start_rows": min(len(rows), args.sft_rows), "sft_steps": args.sft_steps, "grpo_steps": result.steps,
        "before": before, "after_cold_start": after_sft, "after_grpo": after,
        "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
        "wall_s_to_cold_start": round(t_sft, 1),
    }  # fmt: skip
    (out / "result.json").write_text(json.dumps(report, indent=1), "utf-8")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
