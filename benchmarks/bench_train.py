"""dstune against the baseline a user would otherwise run: Hugging Face Trainer + peft.

Both sides train the same model with the same LoRA settings on the same tokenised rows, in the same
order, with the same micro-batch, accumulation, learning-rate schedule and seed, each in its own
subprocess (so peak memory is measured per side), in one invocation:

    .venv/bin/python benchmarks/bench_train.py                     # CPU: tiny DeepSeek-V3, alpaca_zh_demo
    .venv/bin/python benchmarks/bench_train.py --model tiny:deepseek-llm --steps 20

It prints non-padding tokens/s, step time, peak memory (CPU: peak RSS; CUDA: max allocated), padding
share and the final training loss (mean of the last 5 steps) of both; the losses must agree within 2%
(a correctness gate: speed must never come from changed maths). The ratio dstune/baseline is last.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _config(args) -> dict:
    return {
        "model": {"name": args.model},
        "data": {"train": args.data, "max_length": args.max_length, "max_samples": args.rows, "split": [1.0, 0.0, 0.0]},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "attention"},
        "optim": {"lr": args.lr, "schedule": "linear", "warmup_steps": 0, "max_grad_norm": 1.0},
        "train": {"micro_batch_size": args.micro_batch, "grad_accum": args.grad_accum, "max_steps": args.steps,
                  "precision": args.precision, "seed": 0, "progress": False, "log_every": 1},
        "output": str(Path(args.out) / "dstune"),
    }


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_dstune(args) -> dict:
    from rich.console import Console

    from dstune.config import RunConfig
    from dstune.train.loop import train

    cfg = RunConfig.model_validate(_config(args))
    t0 = time.perf_counter()
    result = train(cfg, console=Console(quiet=True))
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["split"] == "train"][-1]
    # The loop's own clock starts at the first step (loading and tokenising excluded, as for the
    # baseline's trainer.train()); tokens_per_s counts non-padding tokens.
    real = _padding(args)["real_tokens"]
    return {"losses": result.train_losses, "train_s": real / last["tokens_per_s"], "peak_mb": _peak_memory_mb(),
            "wall_s": wall}


def _same_rows(args):
    """The tokenised rows and the exact micro-batch order dstune uses, for the baseline to replay."""
    from dstune.config import RunConfig
    from dstune.data import prepare_data
    from dstune.models.load import load_tokenizer, resolve_model_dir
    from dstune.models.templates import resolve_chat_template
    from dstune.train.batching import MicroBatches

    cfg = RunConfig.model_validate(_config(args))
    resolved = resolve_model_dir(cfg.model.name)
    tok = load_tokenizer(resolved.path)
    data = prepare_data(cfg.data, tok, resolve_chat_template(tok, "auto", resolved.family), cfg.train.seed)
    batches = MicroBatches(data.train, args.micro_batch, cfg.train.seed, tok.pad_token_id)
    order = [i for _ in range(args.steps * args.grad_accum) for i in batches.next()[1]]
    return cfg, resolved, tok, [data.train[i] for i in order]


def run_baseline(args) -> dict:
    """Trainer + peft as the peft docs show it: DataCollatorForSeq2Seq pads each batch to its longest row."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from dstune.methods.lora import resolve_targets

    cfg, resolved, tok, rows = _same_rows(args)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=resolve_targets(model, "attention")))
    losses: list[float] = []

    class Replay(Trainer):  # replay dstune's order instead of shuffling, so the losses are comparable
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

        def log(self, logs, *a, **k):
            if "loss" in logs:
                losses.append(logs["loss"])
            super().log(logs, *a, **k)

    targs = TrainingArguments(
        output_dir=str(Path(args.out) / "baseline"), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
        report_to=[], seed=0, bf16=args.precision == "bf16", use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=True, weight_decay=0.0)
    dataset = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    trainer = Replay(model=model, args=targs, train_dataset=dataset,
                     data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    return {"losses": losses, "train_s": wall, "peak_mb": _peak_memory_mb(), "wall_s": wall}


def _padding(args) -> dict:
    _, _, _, rows = _same_rows(args)
    real = sum(len(r["input_ids"]) for r in rows)
    padded = 0
    for start in range(0, len(rows), args.micro_batch):
        chunk = rows[start:start + args.micro_batch]
        padded += max(len(r["input_ids"]) for r in chunk) * len(chunk)
    return {"real_tokens": real, "padded_tokens": padded}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny:deepseek-v3")
    ap.add_argument("--data", default=str(SHARED / "alpaca_zh_demo.json"))
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--out", default="runs/bench-train")
    ap.add_argument("--side", choices=["dstune", "baseline"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:  # child process: run one side, print its figures as JSON
        out = run_dstune(args) if args.side == "dstune" else run_baseline(args)
        print("RESULT " + json.dumps(out))
        return 0

    import shutil

    shutil.rmtree(args.out, ignore_errors=True)
    results = {}
    for side in ("baseline", "dstune"):
        passed = sys.argv[1:] if argv is None else argv
        cmd = [sys.executable, __file__, *passed, "--side", side]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        results[side] = json.loads(line[len("RESULT "):])
    pad = _padding(args)
    share = 1 - pad["real_tokens"] / pad["padded_tokens"]
    print(f"model {args.model}, {args.rows} rows of {Path(args.data).name}, micro-batch {args.micro_batch} x "
          f"accumulation {args.grad_accum}, {args.steps} steps, max length {args.max_length}, {args.precision}")
    print(f"{'':<10}{'tokens/s':>12}{'step s':>10}{'peak MB':>10}{'padding':>10}{'final loss':>12}")
    rate = {}
    for side, r in results.items():
        rate[side] = pad["real_tokens"] / r["train_s"]
        final = sum(r["losses"][-5:]) / len(r["losses"][-5:])
        r["final"] = final
        print(f"{side:<10}{rate[side]:>12.1f}{r['train_s'] / args.steps:>10.3f}{r['peak_mb']:>10.0f}"
              f"{share:>10.1%}{final:>12.4f}")
    gap = abs(results["dstune"]["final"] - results["baseline"]["final"]) / results["baseline"]["final"]
    print(f"loss gate: final losses differ by {gap:.2%} ({'ok' if gap <= 0.02 else 'FAILED'}, limit 2%)")
    print(f"dstune/baseline: tokens/s {rate['dstune'] / rate['baseline']:.2f}x, "
          f"peak memory {results['dstune']['peak_mb'] / results['baseline']['peak_mb']:.2f}x")
    return 0 if gap <= 0.02 else 1


if __name__ == "__main__":
    sys.exit(main())
