"""Nothing a user did not ask for executes: no pickles, no remote code, no paths out of a model dir."""

import json
import pickle
import re
import shutil
import struct
from pathlib import Path

import pytest

from dstune.models.load import ModelSpecError, load_model, resolve_model_dir
from dstune.models.safety import UnsafeModelError, check_model_dir

SRC = Path(__file__).resolve().parents[1] / "src"


class _Canary:
    """Unpickling this object creates a file: proof that a pickle was executed."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture()
def tiny_dir(tmp_path) -> Path:
    src = Path(resolve_model_dir("tiny:deepseek-llm").path)
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_pickled_weights_are_refused_and_never_unpickled(tiny_dir, tmp_path):
    canary = tmp_path / "canary"
    for f in tiny_dir.glob("*.safetensors"):
        f.unlink()
    (tiny_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Canary(canary)))
    with pytest.raises(ModelSpecError, match="pytorch_model.bin.*--allow-pickle"):
        load_model(str(tiny_dir))
    assert not canary.exists()


def test_train_cli_refuses_pickle_model(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from dstune.cli import app

    canary = tmp_path / "canary"
    for f in tiny_dir.glob("*.safetensors"):
        f.unlink()
    (tiny_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Canary(canary)))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "hi", "output": "hello"}) + "\n" * 1 +
                    json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "c", "output": "d"}))
    res = CliRunner().invoke(app, ["train", "--model", str(tiny_dir), "--data", str(data), "--output", str(tmp_path / "r")])
    assert res.exit_code == 2 and "allow-pickle" in res.output
    assert not canary.exists()


def test_shard_index_leaving_the_directory_is_refused(tiny_dir):
    (tiny_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "../../etc/passwd"}}))
    with pytest.raises(UnsafeModelError, match="outside the model directory"):
        check_model_dir(tiny_dir)
    with pytest.raises(UnsafeModelError):
        load_model(str(tiny_dir))


def test_oversized_safetensors_header_is_refused(tiny_dir):
    weights = next(tiny_dir.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    weights.write_bytes(bytes(data))
    with pytest.raises(UnsafeModelError, match="header claims"):
        check_model_dir(tiny_dir)


def test_remote_code_needs_a_pinned_revision():
    from dstune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="pinned"):
        load_config(overrides=["model.trust_remote_code=true"])
    assert load_config().model.trust_remote_code is False


def test_source_never_unpickles():
    """Static check over the package: torch.load only with weights_only=True, and no pickle loads."""
    offenders = []
    for f in SRC.rglob("*.py"):
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bpickle\.loads?\(|\bcloudpickle\b|\bdill\b", code):
                offenders.append(f"{f}:{n}: {line.strip()}")
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{f}:{n}: {line.strip()}")
            if re.search(r"trust_remote_code\s*=\s*True", code):
                offenders.append(f"{f}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
