"""Predicted against measured peak memory of one training step, on a CPU (docs/benchmarks.md "Memory planner").

Each row builds a run with dstune's own ``build`` and runs two optimizer steps through ``backward_window``
(forward, backward, clipping, AdamW step); the peak is measured with the tracking allocator of
``dstune.train.measure`` (profiler memory events, not RSS) and compared with ``dstune.plan.estimate``.

    PYTHONPATH=src python benchmarks/bench_plan.py            # tiny families and SmolLM2, a few minutes
    PYTHONPATH=src python benchmarks/bench_plan.py --quick    # tiny families only

On a CUDA machine the runs go to the GPU (dstune's default device) and the measured peak is
``torch.cuda.max_memory_allocated``; the prediction is then made for ``Setup(device_type="cuda")``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dstune.config import load_config
from dstune.plan.autofit import device_type
from dstune.plan.estimate import Setup, estimate
from dstune.quiet import quiet_libraries
from dstune.train.measure import measure_step, write_text_data

MIB = 2**20
# (model, method, max_length, checkpointing, precision); micro-batch 2, packed full rows, AdamW.
TINY = [
    (m, method, length, ckpt, "fp32")
    for m in ("tiny:deepseek-llm", "tiny:deepseek-v3")
    for method in ("full", "freeze", "lora", "qlora", "prefix")
    for length, ckpt in ((64, False), (256, False), (256, True))
] + [
    ("tiny:deepseek-v2", "lora", 128, False, "fp32"),
    ("tiny:r1-distill-qwen", "full", 128, False, "fp32"),
    ("tiny:deepseek-llm", "lora", 256, False, "bf16"),
    ("tiny:deepseek-llm", "full", 256, True, "bf16"),
]
SMOLLM2 = [
    ("smollm2", "full", 128, False, "fp32"),
    ("smollm2", "lora", 128, False, "fp32"),
    ("smollm2", "lora", 256, True, "fp32"),
    ("smollm2", "freeze", 256, False, "fp32"),
    ("smollm2", "prefix", 128, False, "fp32"),
]


def row(data: Path, model: str, method: str, length: int, ckpt: bool, precision: str) -> dict:
    """One configuration: predicted and measured peak bytes."""
    values = {
        "model.name": model,
        "method": method,
        "data.train": str(data),
        "data.format": "text",
        "data.max_length": length,
        "data.cache": False,
        "train.packing": True,
        "train.micro_batch_size": 2,
        "train.gradient_checkpointing": ckpt,
        "train.precision": precision,
        "train.progress": False,
        "train.prefetch": 0,
    }
    cfg = load_config(values=values)
    start = time.perf_counter()
    measured = measure_step(cfg)["peak"]
    predicted = estimate(cfg, Setup(device_type=device_type())).allocated
    return {"predicted": predicted, "measured": measured, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny families only")
    args = parser.parse_args()
    quiet_libraries(True)
    rows = TINY + ([] if args.quick else SMOLLM2)
    print("| model | method | tokens | ckpt | precision | predicted MiB | measured MiB | error |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_text_data(Path(tmp) / "text.jsonl")
        for model, method, length, ckpt, precision in rows:
            try:
                r = row(data, model, method, length, ckpt, precision)
            except Exception as exc:  # a run that fails is a row of the table, not the end of it
                print(
                    f"| {model} | {method} | 2 x {length} | {'on' if ckpt else 'off'} | {precision} | "
                    f"failed: {type(exc).__name__}: {str(exc)[:80]} | | |",
                    flush=True,
                )
                continue
            err = r["predicted"] / r["measured"] - 1
            print(
                f"| {model} | {method} | 2 x {length} | {'on' if ckpt else 'off'} | {precision} | "
                f"{r['predicted'] / MIB:.1f} | {r['measured'] / MIB:.1f} | {err:+.1%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
