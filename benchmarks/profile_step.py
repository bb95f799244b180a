"""Where a LoRA training step's time goes: dstune's step against the HF Trainer's, on one micro-batch.

Both sides get the same padded micro-batch (the first ``--micro-batch`` rows dstune would train on) and the
same model with the same LoRA initialisation. Each runs ``--warmup`` untimed steps, then ``--steps`` steps
under ``torch.profiler``; the script prints the CPU time by operator (self time, top 15) and by part of the
model (forward time of each module kind: attention, MLP, norms, output layer and loss; the backward pass
as a whole; the optimizer):

    .venv/bin/python benchmarks/profile_step.py --model smollm2 --micro-batch 4 --max-length 256

The Trainer's step is what ``Trainer.training_step`` does: ``model(**batch).loss`` (full logits, the
model's own cross-entropy), ``backward``, then clipping and AdamW. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import SHARED, _config  # noqa: E402  (the same run settings as the speed benchmark)

# Module kinds by the last part of their name in a Llama/Qwen2/DeepSeek model.
KINDS = {"self_attn": "attention", "mlp": "mlp", "input_layernorm": "norm", "post_attention_layernorm": "norm",
         "norm": "norm", "embed_tokens": "embedding", "rotary_emb": "rope"}


def _label_modules(model) -> list:
    """Wraps each module of a known kind in a ``record_function`` range, so forward time is attributed."""
    handles = []
    for name, module in model.named_modules():
        kind = KINDS.get(name.rsplit(".", 1)[-1])
        if kind is None:
            continue

        def pre(mod, args, kind=kind):
            mod._range = torch.profiler.record_function(f"part::{kind}")
            mod._range.__enter__()

        def post(mod, args, out):
            mod._range.__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def _dstune_step(args):
    from rich.console import Console

    from dstune.config import RunConfig
    from dstune.core.collate import collate
    from dstune.train.build import build
    from dstune.train.optim import clip_gradients

    cfg = RunConfig.model_validate(_config(args))
    run = build(cfg, Console(quiet=True))
    batch = collate(run.data.train[: args.micro_batch], run.tokenizer.pad_token_id)

    def step():
        with torch.profiler.record_function("part::forward+loss"), run.engine.autocast():
            loss = run.objective.loss_sum(run.model, batch)
        with torch.profiler.record_function("part::backward"):
            (loss / run.objective.units(batch)).backward()
        with torch.profiler.record_function("part::optimizer"):
            clip_gradients(run.params, cfg.optim, run.engine)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)

    return run.model, step, batch, run.speed["precision"]


def _trainer_step(args, batch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dstune.methods.lora import resolve_targets
    from dstune.models.load import resolve_model_dir

    resolved = resolve_model_dir(args.model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=resolve_targets(model, "attention")))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    def step():
        with torch.profiler.record_function("part::forward+loss"):
            loss = model(**batch).loss
        with torch.profiler.record_function("part::backward"):
            loss.backward()
        with torch.profiler.record_function("part::optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return model, step


def profile(name: str, model, step, args) -> None:
    for _ in range(args.warmup):
        step()
    handles = _label_modules(model)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    wall, cpu = (time.perf_counter() - t0) / args.steps, (time.process_time() - c0) / args.steps
    for h in handles:
        h.remove()
    events = prof.key_averages()
    parts = defaultdict(float)
    for e in events:
        if e.key.startswith("part::"):
            parts[e.key[6:]] += e.cpu_time_total / 1e6 / args.steps
    ops = sorted((e for e in events if not e.key.startswith("part::")), key=lambda e: -e.self_cpu_time_total)
    total_self = sum(e.self_cpu_time_total for e in events if not e.key.startswith("part::")) or 1
    print(f"\n== {name}: {wall:.3f} s/step wall, {cpu:.2f} CPU s/step (under the profiler)")
    print("   parts (inclusive wall s/step): " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(parts.items())))
    print(f"   {'operator':<44}{'self s/step':>12}{'share':>8}{'calls/step':>11}")
    for e in ops[:15]:
        print(f"   {e.key[:43]:<44}{e.self_cpu_time_total / 1e6 / args.steps:>12.3f}"
              f"{e.self_cpu_time_total / total_self:>8.1%}{e.count / args.steps:>11.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=str(SHARED / "alpaca_zh_demo.json"))
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--side", choices=["both", "dstune", "trainer"], default="both")
    ap.add_argument("--precision", default="default", choices=["default", "fp32"],
                    help="dstune's train.precision: its default (auto: bf16 autocast where the CPU computes bf16 "
                         "natively) or fp32; the Trainer's step is fp32, its default")
    ap.add_argument("--out", default="runs/profile-step")
    args = ap.parse_args(argv)
    args.grad_accum, args.packing, args.chunk_tokens, args.group_by_length = 1, False, "auto", False
    model, step, batch, precision = _dstune_step(args)
    tokens = int(batch["attention_mask"].sum())
    print(f"micro-batch: {tuple(batch['input_ids'].shape)}, {tokens} non-padding tokens, dstune in {precision}, "
          f"{int((batch['labels'] != -100).sum())} labelled; torch threads {torch.get_num_threads()}")
    if args.side in ("both", "dstune"):
        profile("dstune", model, step, args)
    del model, step
    if args.side in ("both", "trainer"):
        model, step = _trainer_step(args, batch)
        profile("HF Trainer step", model, step, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
