"""The CLI end to end on tiny models: train, generate, inspect, and errors that exit cleanly."""

import json
from pathlib import Path

from typer.testing import CliRunner

from dstune.cli import app

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
runner = CliRunner()


def test_help_lists_every_command_and_option_defaults():
    out = runner.invoke(app, ["--help"]).output
    for cmd in ["train", "demo", "inspect", "generate"]:
        assert cmd in out
    train_help = runner.invoke(app, ["train", "--help"]).output
    for opt in ["--model", "--data", "--method", "--output", "--max-steps", "--epochs", "--set", "--resume"]:
        assert opt in train_help


def test_train_v3_lora_on_alpaca_zh_leaves_an_adapter_plain_peft_loads(tmp_path):
    """The issue's acceptance command, with a data cap so it stays a few seconds."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "x"
    res = runner.invoke(app, ["train", "--model", "tiny:deepseek-v3", "--data", str(SHARED / "alpaca_zh_demo.json"),
                              "--method", "lora", "--max-steps", "20", "--output", str(out),
                              "--set", "data.max_samples=200", "--set", "data.max_length=96",
                              "--set", "train.progress=false", "--set", "train.eval_batches=2"])
    assert res.exit_code == 0, res.output
    assert "routed experts: FROZEN" in res.output and str(out) in res.output
    cfg = (out / "config.yaml").read_text()
    assert "tiny:deepseek-v3" in cfg and "max_samples: 200" in cfg
    adapter_cfg = json.loads((out / "final" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(adapter_cfg["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(out / "final"))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["val"]["loss"] > 0

    gen = runner.invoke(app, ["generate", str(out), "--prompt", "你好", "--max-new-tokens", "5"])
    assert gen.exit_code == 0, gen.output
    assert "> 你好" in gen.output


def test_train_unknown_set_key_names_closest(tmp_path):
    res = runner.invoke(app, ["train", "--data", "x.jsonl", "--output", str(tmp_path / "r"), "--set", "lora.rank=4"])
    assert res.exit_code == 2
    assert "lora.rank" in res.output and "lora.r" in res.output


def test_train_without_data_says_how_to_give_it(tmp_path):
    res = runner.invoke(app, ["train", "--output", str(tmp_path / "r")])
    assert res.exit_code == 2 and "--data" in res.output


def test_train_bad_data_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n{oops\n')
    res = runner.invoke(app, ["train", "--model", "tiny:deepseek-llm", "--data", str(bad), "--output", str(tmp_path / "r")])
    assert res.exit_code == 2, res.output
    assert "bad.jsonl" in res.output and "line 3" in res.output
    assert not (tmp_path / "r").exists()


def test_inspect_deepseek_v3_from_config_alone():
    res = runner.invoke(app, ["inspect", "deepseek-ai/DeepSeek-V3"])
    assert res.exit_code == 0, res.output
    text = res.output.lower()
    for word in ["layers", "hidden", "expert", "kv_lora_rank", "attention", "embed"]:
        assert word in text, word


def test_inspect_unknown_model_is_explained():
    res = runner.invoke(app, ["inspect", "tiny:no-such-family"])
    assert res.exit_code == 2
    assert "deepseek-v3" in res.output  # lists what is accepted
