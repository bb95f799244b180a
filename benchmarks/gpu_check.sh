#!/usr/bin/env bash
# The first thing to run on a machine with a CUDA GPU (issues 24 and 28), in about 8 minutes:
#   1. the machine: GPU, driver, torch/CUDA versions, the optional kernels installed (flash-attn, liger);
#   2. speed: dstune's defaults against HF Trainer + peft (benchmarks/bench_train.py; both on the GPU,
#      peak = torch.cuda.max_memory_allocated), on SmolLM2 (real weights) and on tiny DeepSeek-V3;
#   3. the memory planner: predicted against measured peak (max allocated) for the tiny families
#      (benchmarks/bench_plan.py --quick);
#   4. the sharded engines (FSDP2, DeepSpeed ZeRO-3 + offload) on the GPU, as a group of one process.
# Each part has its own time limit, and one that fails or runs out is reported and the next one runs.
# Figures go to stdout and to $OUT (default runs/gpu-check); record them in docs/benchmarks.md with the
# machine and date.
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: torch sees no CUDA GPU here; nothing to measure (the CPU figures come from the" \
       "benchmarks themselves, see docs/benchmarks.md)" >&2
  exit 2
fi

part() {  # part NAME SECONDS COMMAND...: runs one part with a limit, its output to $OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt" | tail -n 25
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || echo "== $name: exit $rc$([ "$rc" -eq 124 ] && echo ' (time limit)')"
}

echo "== machine ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv 2>&1 | tee "$OUT/machine.txt"
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/machine.txt"
import importlib.util
import torch
import transformers
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"{torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
for pkg in ("flash_attn", "liger_kernel", "bitsandbytes", "deepspeed", "vllm"):
    print(f"  {pkg}: {'installed' if importlib.util.find_spec(pkg) else 'not installed'}")
EOF

part train-smollm2 140 "$PY" benchmarks/bench_train.py --model smollm2 --rows 200 --steps 8 --micro-batch 4 \
  --max-length 256 --out "$OUT/bench-smollm2"
part train-smollm2-bf16 140 "$PY" benchmarks/bench_train.py --model smollm2 --rows 200 --steps 8 \
  --micro-batch 4 --max-length 256 --precision bf16 --out "$OUT/bench-smollm2-bf16"
part train-tiny-v3 70 "$PY" benchmarks/bench_train.py --out "$OUT/bench-v3"
part plan 80 env PYTHONPATH=src "$PY" benchmarks/bench_plan.py --quick
# The sharded engines' CUDA path on one GPU (a group of one; CPU tests cover two ranks): FSDP2 moving each
# layer to the GPU as it shards it, and ZeRO-3 on CUDA, bf16, 3 steps each.
part sharded 80 bash -c "for example in fsdp2-lora-deepseek-v3-tiny zero3-offload-lora-deepseek-v3-tiny; do
  '$PY' -m dstune.cli train examples/\$example.yaml --max-steps 3 --output '$OUT'/\$example --set train.precision=bf16 \
    --set data.max_samples=32 --set data.max_length=128 --set train.progress=false --set train.eval_every=0 \
    --set train.save_every=0 || exit 1
done"
echo "== done ($(date -u +%H:%M:%S)); outputs in $OUT"
