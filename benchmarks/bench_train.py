"""dstune against the baseline a user would otherwise run: Hugging Face Trainer + peft.

Both sides train the same model with the same LoRA settings on the same tokenised rows, in the same
order, with the same micro-batch, accumulation, learning-rate schedule and seed, each in its own
subprocess (so peak memory is measured per side), in one invocation:

    .venv/bin/python benchmarks/bench_train.py                     # CPU: tiny DeepSeek-V3, alpaca_zh_demo
    .venv/bin/python benchmarks/bench_train.py --model tiny:deepseek-llm --steps 20
    .venv/bin/python benchmarks/bench_train.py --packing --chunk-tokens 1024   # dstune's fast path

With ``--packing`` (or ``--group-by-length``) dstune's micro-batches hold other examples than a shuffled
order would; the baseline then replays each dstune micro-batch's examples unpacked, padded to the longest
as DataCollatorForSeq2Seq does, so both train on the same examples per step with the same per-token loss.

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
                  "seed": 0, "progress": False, "log_every": 1,
                  "packing": args.packing, "chunk_tokens": args.chunk_tokens, "group_by_length": args.group_by_length,
                  # --precision default: dstune's own default (auto) against the Trainer's (fp32)
                  **({"precision": args.precision} if args.precision != "default" else {})},
        "output": str(Path(args.out) / "dstune"),
    }


def _setting(text: str) -> tuple[str, str]:
    """``--set KEY=VALUE`` as (key, value text), as ``dstune train --set`` takes it."""
    key, eq, value = text.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"expects key.sub=value, got {text!r}")
    return key.strip(), value


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_dstune(args) -> dict:
    from rich.console import Console

    from dstune.config import RunConfig, apply_override, parse_value
    from dstune.train.batching import Prefetcher
    from dstune.train.loop import train

    data = _config(args)
    for key, value in args.set or []:
        apply_override(data, key, parse_value(value))
    cfg = RunConfig.model_validate(data)
    stamps, calls, fetch = [], [0], Prefetcher.next

    def stamped(self):  # the loop fetches grad_accum micro-batches at the start of each step
        if calls[0] % args.grad_accum == 0:
            stamps.append((time.perf_counter(), time.process_time()))
        calls[0] += 1
        return fetch(self)

    Prefetcher.next = stamped
    t0 = time.perf_counter()
    result = train(cfg, console=Console(quiet=True))
    wall = time.perf_counter() - t0
    return {"losses": result.train_losses, "stamps": stamps, "peak_mb": _peak_memory_mb(),
            "wall_s": wall, "padding": result.summary["padding_share"],
            "precision": result.summary["speed"]["precision"]}


def _same_rows(args):
    """The tokenised rows dstune trains on, micro-batch by micro-batch, for the baseline to replay.

    Returns:
        cfg, the resolved model, the tokenizer, and one list of (unpacked) example rows per micro-batch.
    """
    from dstune.config import RunConfig
    from dstune.data import prepare_data
    from dstune.data.pack import pack_rows
    from dstune.models.load import load_tokenizer, resolve_model_dir
    from dstune.models.templates import resolve_chat_template
    from dstune.train.batching import MicroBatches

    cfg = RunConfig.model_validate(_config(args))
    resolved = resolve_model_dir(cfg.model.name)
    tok = load_tokenizer(resolved.path)
    data = prepare_data(cfg.data, tok, resolve_chat_template(tok, "auto", resolved.family), cfg.train.seed)
    by_source = {r["source"]: r for r in data.train}
    rows = pack_rows(data.train, args.max_length, cfg.train.seed) if args.packing else data.train
    batches = MicroBatches(rows, args.micro_batch, cfg.train.seed, tok.pad_token_id,
                           group_by_length=args.group_by_length)
    steps = []
    for _ in range(args.steps * args.grad_accum):
        members = [rows[i] for i in batches.next()[1]]
        steps.append([by_source[s] for r in members for s in r["source"].split("+")] if args.packing else members)
    return cfg, resolved, tok, steps


def run_baseline(args) -> dict:
    """Trainer + peft as the peft docs show it: DataCollatorForSeq2Seq pads each batch to its longest row."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from dstune.methods.lora import resolve_targets

    cfg, resolved, tok, steps = _same_rows(args)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=resolve_targets(model, "attention")))
    losses: list[float] = []

    starts = [sum(len(b) for b in steps[:k]) for k in range(len(steps))]
    batches = [list(range(a, a + len(b))) for a, b in zip(starts, steps)]

    class Replay(Trainer):  # replay dstune's micro-batches instead of shuffling, so the losses are comparable
        def get_train_dataloader(self):
            return DataLoader(self.train_dataset, batch_sampler=batches, collate_fn=self.data_collator)

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
    dataset = [{"input_ids": r["input_ids"], "labels": r["labels"]} for b in steps for r in b]
    stamps = []

    class Stamp(TrainerCallback):
        def on_step_begin(self, *a, **k):
            stamps.append((time.perf_counter(), time.process_time()))

    trainer = Replay(model=model, args=targs, train_dataset=dataset, callbacks=[Stamp()],
                     data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    pad = _padding(args)
    return {"losses": losses, "stamps": stamps, "peak_mb": _peak_memory_mb(), "wall_s": wall,
            "padding": 1 - pad["real_tokens"] / pad["padded_tokens"]}


def _padding(args) -> dict:
    """Non-padding tokens of the run and the tokens of the baseline's padded micro-batches; ``timed_tokens``
    are the non-padding tokens of the timed steps (2 to N-1, see ``_rates``)."""
    _, _, _, steps = _same_rows(args)
    real = sum(len(r["input_ids"]) for b in steps for r in b)
    padded = sum(max(len(r["input_ids"]) for r in b) * len(b) for b in steps)
    timed = steps[args.grad_accum:(args.steps - 1) * args.grad_accum]
    return {"real_tokens": real, "padded_tokens": padded, "timed_tokens": sum(len(r["input_ids"]) for b in timed for r in b)}


def _rates(result: dict, timed_tokens: int) -> dict:
    """Non-padding tokens/s over steps 2 to N-1, by wall clock and by the process's CPU time.

    The first step (warm-up: allocator, lazy initialisation) and the last (its end is not stamped) are left
    out. CPU time (user + system of all the process's threads) is less sensitive than the wall clock to other
    jobs on a shared machine, because the two sides run one after the other, not together.
    """
    (w0, c0), (w1, c1) = result["stamps"][1], result["stamps"][-1]
    steps = len(result["stamps"]) - 2
    return {"wall": timed_tokens / (w1 - w0), "cpu": timed_tokens / (c1 - c0), "step_s": (w1 - w0) / steps,
            "step_cpu_s": (c1 - c0) / steps}


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
    ap.add_argument("--precision", default="default", choices=["default", "fp32", "bf16"],
                    help="both sides in fp32 or bf16; default: each side's own default (the Trainer: fp32; "
                         "dstune: train.precision=auto, bf16 autocast where the device computes bf16 natively)")
    ap.add_argument("--packing", action="store_true", help="dstune packs examples (train.packing)")
    ap.add_argument("--chunk-tokens", default="auto", type=lambda v: v if v == "auto" else int(v),
                    help="dstune's train.chunk_tokens (default: auto, as dstune's own default)")
    ap.add_argument("--group-by-length", action="store_true", help="dstune's train.group_by_length")
    ap.add_argument("--set", action="append", type=_setting, metavar="KEY=VALUE",
                    help="a dstune config setting for dstune's side only (repeatable), as `dstune train --set`: "
                         "to measure what one setting changes")
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
    print(f"model {args.model}, {args.rows} rows of {Path(args.data).name}, micro-batch {args.micro_batch} x "
          f"accumulation {args.grad_accum}, {args.steps} steps, max length {args.max_length}, {args.precision}, "
          f"packing {args.packing}, chunk_tokens {args.chunk_tokens}, group_by_length {args.group_by_length}; "
          f"{pad['real_tokens']} non-padding tokens trained by each side")
    print(f"{'':<10}{'tokens/s':>10}{'tok/cpu-s':>11}{'step s':>9}{'cpu s':>8}{'peak MB':>9}{'padding':>9}"
          f"{'final loss':>12}  precision")
    baseline_precision = "bf16" if args.precision == "bf16" else "fp32"
    rate, cpu = {}, {}
    for side, r in results.items():
        rates = _rates(r, pad["timed_tokens"])
        rate[side], cpu[side] = rates["wall"], rates["cpu"]
        final = sum(r["losses"][-5:]) / len(r["losses"][-5:])
        r["final"] = final
        print(f"{side:<10}{rates['wall']:>10.1f}{rates['cpu']:>11.1f}{rates['step_s']:>9.3f}{rates['step_cpu_s']:>8.2f}"
              f"{r['peak_mb']:>9.0f}{r['padding']:>9.1%}{final:>12.4f}  {r.get('precision') or baseline_precision}")
    gap = abs(results["dstune"]["final"] - results["baseline"]["final"]) / results["baseline"]["final"]
    print(f"loss gate: final losses differ by {gap:.2%} ({'ok' if gap <= 0.02 else 'FAILED'}, limit 2%)")
    print(f"dstune/baseline: tokens/s {rate['dstune'] / rate['baseline']:.2f}x (per CPU second "
          f"{cpu['dstune'] / cpu['baseline']:.2f}x), "
          f"peak memory {results['dstune']['peak_mb'] / results['baseline']['peak_mb']:.2f}x")
    return 0 if gap <= 0.02 else 1


if __name__ == "__main__":
    sys.exit(main())
