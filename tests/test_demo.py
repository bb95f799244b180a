"""The offline demo: its pieces in the default suite, the whole thing as a slow test."""

import json

import pytest

from dstune.config import load_config
from dstune.demo import demo_config, demo_paths


def test_demo_data_is_bilingual_and_heldout_questions_are_unseen():
    from dstune.data import load_examples

    train_file, heldout_file = demo_paths()
    loaded = load_examples(str(train_file))
    assert loaded.format == "messages" and 30 <= len(loaded.examples) <= 80
    users = [m["content"] for e in loaded.examples for m in e["messages"] if m["role"] == "user"]
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in u) for u in users)  # Chinese
    assert any(u.isascii() for u in users)  # English
    heldout = json.loads(heldout_file.read_text(encoding="utf-8"))
    assert not set(heldout["questions"]) & set(users)
    replies = [m["content"] for e in loaded.examples for m in e["messages"] if m["role"] == "assistant"]
    assert all(heldout["name"] in r for r in replies)


def test_identity_is_the_new_name_or_maker_in_either_language():
    from dstune.demo import carries_identity

    _, heldout_file = demo_paths()
    hit = carries_identity(json.loads(heldout_file.read_text(encoding="utf-8")))
    assert hit("I am lumen, an AI assistant.") and hit("This assistant was built by Qingyun Lab.")
    assert hit("我是由青云实验室开发的AI助手。")
    assert not hit("I am SmolLM, created by Hugging Face.") and not hit("我是一个人工智能助手。")


def test_demo_config_matches_the_shipped_example():
    from pathlib import Path

    example = load_config(Path(__file__).resolve().parents[1] / "examples" / "lora-smollm2-identity.yaml")
    demo = demo_config("runs/smollm2-identity")
    assert example.model_dump(exclude={"data": {"train"}}) == demo.model_dump(exclude={"data": {"train"}})


@pytest.mark.slow
def test_demo_teaches_the_new_identity(tmp_path):
    from dstune.demo import run_demo

    report = run_demo(str(tmp_path / "demo"))
    assert report["identity_before"] == 0
    assert report["identity_after"] >= 4, report["after"]
    assert (tmp_path / "demo" / "loss.png").exists()
    # The wall time (under 5 minutes on 2 cores, issue 2) is measured and reported by the demo and the closing
    # notes, not asserted: CI machines of the same kind differ by 1.8x from day to day.
    assert report["wall_s"] > 0 and json.loads((tmp_path / "demo" / "demo.json").read_text())["after"] == report["after"]
