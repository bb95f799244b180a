"""Host memory of a sharded run's final save of a whole model, by ``train.save_shard_size``.

Runs the same ``dstune train --nproc N`` (full or freeze, so ``final/`` is the whole model) once per shard size and
prints each rank's ``summary.json: memory: final_save_mb_per_rank`` (what the save added to the process's peak
resident memory). A shard size above the model's size holds the whole model at once, as gathering it and calling
``save_pretrained`` did; a smaller one bounds what rank 0 holds to one file:

    .venv/bin/python benchmarks/bench_final_save.py --model /tmp/ds1b --method freeze --sizes 500MB,5GB
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_sharded  # noqa: E402  (this folder's runner: the same command and summary reading)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--method", default="freeze", help="full or freeze (an adapter's final/ is small)")
    p.add_argument("--engine", default="fsdp2", help="fsdp2, zero2, zero3")
    p.add_argument("--sizes", default="500MB,5GB", help="comma-separated train.save_shard_size values")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="dstune-bench-final-save-")
    rows = {}
    for size in args.sizes.split(","):
        run_args = argparse.Namespace(
            model=args.model, method=args.method, nproc=args.nproc, steps=args.steps, micro_batch=2,
            max_length=64, precision="fp32", threads=1, out=f"{out}/{size}", set=[f"train.save_shard_size={size}"],
        )  # fmt: skip
        r = bench_sharded.run(args.engine, run_args)
        files = len(list(Path(out, size, args.engine, "final").glob("*.safetensors")))
        rows[size] = {k: r[k] for k in ("final_save_mb_per_rank", "peak_mb_per_rank", "losses")} | {"files": files}
        print(size, json.dumps(rows[size]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
