"""The sharded engines against DDP on the same ranks: per-rank peak memory, step time and the loss curve.

Runs ``dstune train --nproc N`` on the same config once with ``train.distributed=auto`` (every rank holds
the whole model: DDP, which is also what accelerate gives a user who asks it for FSDP or DeepSpeed on a
CPU) and once per engine in ``--engines``, in one invocation:

    .venv/bin/python benchmarks/bench_sharded.py                          # SmolLM2-135M, full fine-tuning
    .venv/bin/python benchmarks/bench_sharded.py --engines fsdp2,zero2,zero3,zero3-offload

Peak memory is each rank's (``summary.json: memory``, ``measured_mb_per_rank``: CUDA's max allocated on a
GPU, else the peak RSS of the process, which includes the Python/torch runtime both sides share), and the machine's
(``node_peak_mb``: how far ``MemAvailable`` fell during the run; nothing else may run meanwhile). ``--set KEY=VALUE``
applies to the sharded runs only. The per-step losses of the two engines must agree (rel 1e-4 in fp32): memory must
not come from changed maths.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def run(engine: str, args) -> dict:
    out = Path(args.out) / engine
    cmd = [sys.executable, "-m", "dstune.cli", "train", "--model", args.model, "--method", args.method,
           "--data", str(SHARED / "alpaca_en_demo.json"), "--output", str(out), "--max-steps", str(args.steps),
           "--nproc", str(args.nproc), "--set", f"train.distributed={engine.removesuffix('-offload')}",
           "--set", f"train.offload={'all' if engine.endswith('-offload') else 'none'}",
           "--set", f"train.micro_batch_size={args.micro_batch}", "--set", f"data.max_length={args.max_length}",
           "--set", f"train.precision={args.precision}", "--set", "train.progress=false",
           "--set", "data.split=[1.0,0.0,0.0]", "--set", "train.seed=0"]  # fmt: skip
    if engine != "auto":
        cmd += [a for s in args.set for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    with NodeMemory() as node:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{engine} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    summary = json.loads((out / "summary.json").read_text())
    return {
        "engine": engine,
        "losses": losses,
        "peak_mb_rank0": summary["memory"]["measured_mb"],
        "peak_mb_per_rank": summary["memory"].get("measured_mb_per_rank"),
        "startup_mb_per_rank": summary["memory"].get("startup_mb_per_rank"),
        "final_save_mb_per_rank": summary["memory"].get("final_save_mb_per_rank"),
        "measured": summary["memory"].get("measured"),
        "predicted_mb": summary["memory"].get("predicted_mb"),
        "train_wall_s": summary["wall_s"],
        "process_wall_s": round(wall, 1),
        "s_per_step": round(summary["wall_s"] / args.steps, 2),
        "node_peak_mb": node.peak_mb,
    }


class NodeMemory:
    """The machine's peak memory in use while the run's ranks live: how far ``MemAvailable`` of
    /proc/meminfo fell below its value at the start, sampled every 50 ms. Unlike the sum of the ranks' RSS it
    counts memory the ranks share once, and not the page cache of memory-mapped checkpoint files (the
    kernel can drop it). Nothing else may run on the machine meanwhile."""

    def __enter__(self):
        self.start = self.low = available_mb()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.05):
            self.low = min(self.low, available_mb())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak_mb = round(self.start - self.low, 1)


def available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--method", default="full")
    p.add_argument("--engines", default="fsdp2", help="comma-separated: fsdp2, zero2, zero3, zero3-offload")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    p.add_argument("--out", default=None, help="where the runs go (default: a new temporary folder)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE for the sharded runs (not DDP)")
    args = p.parse_args(argv)
    args.out = args.out or tempfile.mkdtemp(prefix="dstune-bench-sharded-")
    ddp = run("auto", args)
    print(json.dumps(ddp))
    results, ok = {"ddp": ddp}, True
    for engine in args.engines.split(","):
        mine = run(engine, args)
        worst = max(abs(a - b) / abs(a) for a, b in zip(ddp["losses"], mine["losses"]))
        agree = len(ddp["losses"]) == len(mine["losses"]) and worst < 1e-4
        ok &= agree
        mine |= {
            "peak_memory_over_ddp": round(mine["peak_mb_rank0"] / ddp["peak_mb_rank0"], 3),
            "peak_memory_over_ddp_per_rank": [
                round(a / b, 3) for a, b in zip(mine["peak_mb_per_rank"] or [], ddp["peak_mb_per_rank"] or [])
            ],
            "node_peak_over_ddp": round(mine["node_peak_mb"] / ddp["node_peak_mb"], 3),
            "step_time_over_ddp": round(mine["s_per_step"] / ddp["s_per_step"], 3),
            "max_rel_loss_diff": worst,
            "losses_agree": agree,
        }
        results[engine] = mine
        print(json.dumps(mine))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **results}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
