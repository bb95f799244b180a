"""train.precision: auto, bf16 autocast where the device computes bf16 natively, fp32 elsewhere."""

import json

import pytest
import torch
import yaml

from dstune.config import RunConfig
from dstune.core import facts
from dstune.core.facts import native_bf16, resolve_precision
from dstune.train.build import resolve_auto_precision

NATIVE = {"avx512_bf16": True, "amx_bf16": False, "avx2": True}
EMULATED = {"avx512_bf16": False, "amx_bf16": False, "avx2": True}


def test_a_set_precision_is_kept_whatever_the_device():
    for setting in ("fp32", "bf16", "fp16"):
        assert resolve_precision(setting, "cpu") == (setting, f"train.precision={setting}")


def test_auto_reads_the_cpu_flags_torch_reports(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: NATIVE)
    assert resolve_precision("auto", "cpu") == ("bf16", "auto: this CPU computes bf16 natively (avx512_bf16)")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {**EMULATED, "amx_bf16": True})
    assert resolve_precision("auto", "cpu")[0] == "bf16"
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: EMULATED)
    assert resolve_precision("auto", "cpu") == ("fp32", "auto: no native bf16 on this cpu")


def test_auto_on_this_machine_follows_its_real_flags():
    flags = torch.cpu.get_capabilities()
    native = bool(flags.get("avx512_bf16") or flags.get("amx_bf16"))
    assert (native_bf16("cpu") is not None) == native
    assert resolve_precision("auto", "cpu")[0] == ("bf16" if native else "fp32")
    if not torch.cuda.is_available():
        assert native_bf16("cuda") is None


def _cfg(small_file, out, **train):
    return RunConfig.model_validate({
        "model": {"name": "tiny:deepseek-llm"}, "data": {"train": str(small_file), "max_length": 32},
        "train": {"max_steps": 2, "micro_batch_size": 2, "progress": False, **train}, "output": str(out),
    })


@pytest.mark.parametrize("flags, expected", [(NATIVE, "bf16"), (EMULATED, "fp32")])
def test_a_run_saves_and_logs_the_precision_auto_chose(small_file, tmp_path, monkeypatch, capsys, flags, expected):
    from dstune.train.loop import train

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)
    result = train(_cfg(small_file, tmp_path / "run"))
    out = capsys.readouterr().out
    assert f"precision: {expected} (auto: " in out
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["precision"] == expected  # a resume on another machine sees the change
    assert result.summary["speed"]["precision"] == expected
    if expected == "bf16":  # fp32 master weights: the LoRA weights the run trained stay fp32
        from safetensors.torch import load_file

        ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
        assert {t.dtype for t in load_file(str(ckpt / "trainable.safetensors")).values()} == {torch.float32}


def test_resuming_with_auto_on_the_same_machine_is_not_a_config_change(small_file, tmp_path, monkeypatch):
    from dstune.train.loop import train

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: NATIVE)
    train(_cfg(small_file, tmp_path / "run"))
    train(_cfg(small_file, tmp_path / "run", max_steps=3), resume=True, allow_config_change=True)
    changes = [json.loads(line) for line in (tmp_path / "run" / "config_changes.jsonl").read_text().splitlines()]
    assert {c["key"] for row in changes for c in row["changes"]} == {"train.max_steps"}


def test_a_deepspeed_json_that_disagrees_with_what_auto_chose_is_refused(small_file, tmp_path, monkeypatch):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    cfg = _cfg(small_file, tmp_path / "run", distributed="zero2", deepspeed=str(ds))  # auto: not compared yet
    monkeypatch.setattr(facts, "native_bf16", lambda device_type: None)
    with pytest.raises(ValueError, match=r"bf16.enabled to True, but train.precision=bf16 is False"):
        resolve_auto_precision(cfg)
    assert not (tmp_path / "run").exists()
