"""`dstune merge`: a sharded fp32 checkpoint with tokenizer and chat template that plain transformers loads
and that answers like the unmerged run; methods that cannot merge are refused with the reason, and nothing
is written (issue 30: they used to exit 0 with an exported folder no loader took as a model)."""

from __future__ import annotations

import json

import pytest
import torch
from _matrix import cell_config, write_data
from typer.testing import CliRunner

from dstune.cli import app
from dstune.generate import generate_reply, load_for_inference
from dstune.train.loop import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from rich.console import Console

    root = tmp_path_factory.mktemp("merge")
    data = write_data(root)
    out = {}
    for name, method, extra in [("lora", "lora", {"lora": {"experts": "all"}})]:
        cfg = cell_config("deepseek-v3", method, data, root / name, {**extra, "train": {"max_steps": 5}})
        out[name] = train(cfg, console=Console(quiet=True)).run_dir
    return root, out


def test_merge_writes_shards_tokenizer_template_and_answers_like_the_run(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, run = runs
    out = root / "merged"
    res = CliRunner().invoke(app, ["merge", str(run["lora"]), "--out", str(out), "--max-shard-size", "20MB"])
    assert res.exit_code == 0, res.output
    assert "merged lora run" in " ".join(res.output.split())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    assert not list(out.glob("*.bin"))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template and "<｜Assistant｜>" in tok.chat_template
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    unmerged = load_for_inference(str(run["lora"]))
    ids = torch.tensor([[0, 128803, 3476, 2058, 128804, 1]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, unmerged.model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    question = [{"role": "user", "content": "Who are you?"}]
    assert generate_reply(load_for_inference(str(out)), question, max_new_tokens=8) == \
        generate_reply(unmerged, question, max_new_tokens=8)


UNMERGEABLE = {"adapter": "non-linearity", "prefix": "key/value positions", "ptuning": "virtual-token",
               "prompt": "virtual-token"}


@pytest.fixture(scope="module")
def unmergeable(tmp_path_factory):
    """A 1-step run of every method that cannot merge, on tiny DeepSeek-LLM."""
    from rich.console import Console

    root = tmp_path_factory.mktemp("unmergeable")
    data = write_data(root)
    return {method: train(cell_config("deepseek-llm", method, data, root / method, {"train": {"max_steps": 1}}),
                          console=Console(quiet=True)).run_dir for method in UNMERGEABLE}


@pytest.mark.parametrize("method", sorted(UNMERGEABLE))
def test_merge_of_an_unmergeable_run_is_refused_and_writes_nothing(unmergeable, method, tmp_path):
    run = unmergeable[method]
    new, empty = tmp_path / "new" / "merged", tmp_path / "empty"
    empty.mkdir()
    for out in (new, empty):
        res = CliRunner().invoke(app, ["merge", str(run), "--out", str(out)])
        assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
        text = " ".join(res.output.split())
        assert text.count("error:") == 1 and "cannot be merged" in text and UNMERGEABLE[method] in text, text
        assert f"dstune generate {run}" in text
    assert not new.parent.exists() and not any(empty.iterdir())


def test_the_run_an_unmerged_method_points_to_generates(unmergeable):
    res = CliRunner().invoke(app, ["generate", str(unmergeable["prompt"]), "--prompt", "hi", "--max-new-tokens", "2"])
    assert res.exit_code == 0 and "> hi" in res.output, res.output


def test_merge_refuses_a_non_empty_output(runs, tmp_path):
    root, run = runs
    (tmp_path / "keep.txt").write_text("mine")
    res = CliRunner().invoke(app, ["merge", str(run["lora"]), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "not empty" in " ".join(res.output.split())
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_merge_of_a_directory_that_is_not_a_run_is_explained(tmp_path):
    res = CliRunner().invoke(app, ["merge", str(tmp_path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "not a run directory" in " ".join(res.output.split())
