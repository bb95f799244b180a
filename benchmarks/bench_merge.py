"""Merging a LoRA run shard by shard against the in-memory merge that peft users run (issue 24).

    .venv/bin/python benchmarks/bench_merge.py                          # the recorded run (docs/benchmarks.md)
    .venv/bin/python benchmarks/bench_merge.py --run runs/my-lora-run   # an existing LoRA run

1. Without ``--run``: a LoRA run on SmolLM2-135M-Instruct (real weights, offline), r 16 on every linear
   layer, 3 steps on Alpaca rows, so the adapter is non-zero.
2. ``dstune merge`` of that run twice, each in a fresh process (``os.wait4`` gives its peak resident
   memory): ``--mode memory`` (the whole model loaded, peft's ``merge_and_unload``, ``save_pretrained``:
   what LLaMA-Factory's export and a TRL+PEFT script do) and ``--mode shards`` (``dstune.merge_shards``),
   both with the same ``--max-shard-size`` and ``--dtype``.
3. Both outputs loaded and compared tensor by tensor (they must be equal).
Results: ``benchmarks/results/merge_smollm2.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"


def lora_run(out: Path) -> Path:
    from rich.console import Console

    from dstune.config import RunConfig
    from dstune.train.loop import train

    train(RunConfig.model_validate({
        "model": {"name": "smollm2"}, "method": "lora", "output": str(out),
        "data": {"train": str(DATA), "max_samples": 48, "max_length": 128},
        "lora": {"r": 16, "alpha": 32, "targets": "all-linear"}, "optim": {"lr": 1e-3},
        "train": {"max_steps": 3, "micro_batch_size": 4, "progress": False, "seed": 0},
    }), console=Console(quiet=True))  # fmt: skip
    return out


def timed_merge(run: Path, out: Path, mode: str, shard: str, dtype: str) -> dict:
    """One ``merge_run`` in a child process: its wall time and peak resident memory. The peak is the child's
    own ``VmHWM`` (since its exec): ``ru_maxrss`` would inherit the parent's peak at fork on Linux."""
    code = (
        "import sys; from dstune.merge import merge_run; "
        "r = merge_run(sys.argv[1], sys.argv[2], mode=sys.argv[3], max_shard_size=sys.argv[4], dtype=sys.argv[5]); "
        "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
        "print(r.mode, hwm)"
    )
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, str(run), str(out), mode, shard, dtype],
                          capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - start
    last = (done.stdout.strip().splitlines() or [""])[-1].split()  # after any library chatter
    if done.returncode != 0 or not last or last[0] != mode:
        raise SystemExit(f"merge --mode {mode} failed ({done.returncode}): {done.stderr[-2000:]}")
    return {"mode": mode, "wall_s": round(wall, 2), "peak_rss_mb": round(int(last[1]) / 1024, 1)}


def import_baseline() -> float:
    """Peak resident memory (MB) of a process that only imports what ``dstune merge`` imports."""
    code = (
        "import dstune.merge, dstune.merge_shards, peft, transformers; "
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return round(int(done.stdout.split()[-1]) / 1024, 1)


def same_weights(a: Path, b: Path) -> int:
    import torch

    from dstune.models.load import load_model

    sa, sb = load_model(str(a)).state_dict(), load_model(str(b)).state_dict()
    bad = [n for n in sa if not torch.equal(sa[n], sb[n])]
    if sa.keys() != sb.keys() or bad:
        raise SystemExit(f"the merges differ: {bad[:5]} {set(sa) ^ set(sb)}")
    return len(sa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="an existing LoRA run (default: train one on SmolLM2)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_merge"))
    parser.add_argument("--max-shard-size", default="100MB")
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--result", type=Path, default=ROOT / "benchmarks" / "results" / "merge_smollm2.json")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run = args.run or lora_run(args.out / "run")
    rows = []
    for mode in ("memory", "shards"):
        target = args.out / f"merged-{mode}"
        if target.exists():
            import shutil

            shutil.rmtree(target)
        rows.append(timed_merge(run, target, mode, args.max_shard_size, args.dtype))
        print(rows[-1], flush=True)
    tensors = same_weights(args.out / "merged-memory", args.out / "merged-shards")
    memory, shards = rows
    baseline = import_baseline()
    result = {
        "run": str(run), "max_shard_size": args.max_shard_size, "dtype": args.dtype, "rows": rows,
        "imports_only_peak_rss_mb": baseline,
        "equal_tensors": tensors,
        "peak_rss_ratio_shards_to_memory": round(shards["peak_rss_mb"] / memory["peak_rss_mb"], 3),
        "wall_ratio_memory_to_shards": round(memory["wall_s"] / shards["wall_s"], 2),
    }  # fmt: skip
    print(f"imports alone: {baseline} MB")
    print(f"{tensors} tensors equal; shards/memory peak RSS {result['peak_rss_ratio_shards_to_memory']}x, "
          f"speed {result['wall_ratio_memory_to_shards']}x")  # fmt: skip
    args.result.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
