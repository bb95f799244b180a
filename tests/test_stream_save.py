"""The final save of a sharded whole model (``train/stream_save.py``): weights gathered and written one at a
time must give the files ``save_pretrained`` gives: the same tensors under the same names (DeepSeek-V3's
fused experts reverted to one tensor per expert, a tied weight once), the same config, cut into shards
with an index when they exceed ``train.save_shard_size``, and loadable by plain transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dstune.models.load import load_model, resolve_model_dir
from dstune.train.stream_save import gathered, save_streamed


def tensors(directory) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("family", ["deepseek-v3", "smollm2-tied"])
def test_streamed_save_writes_what_save_pretrained_writes(family, tmp_path):
    if family == "smollm2-tied":  # a tied output layer: written once, under the name transformers keeps
        model = AutoModelForCausalLM.from_config(_tied_config())
    else:
        model = load_model(resolve_model_dir(f"tiny:{family}"))
    with torch.no_grad():  # trained weights: not the values an initialiser would give again
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(str(tmp_path / "plain"), safe_serialization=True)
    reads = []
    whole = lambda name, t: reads.append(name) or t  # noqa: E731  (a one-process "gather": the tensor itself)
    save_streamed(model, gathered(model, whole, True), tmp_path / "streamed", max_bytes=200_000)
    plain, streamed = tensors(tmp_path / "plain"), tensors(tmp_path / "streamed")
    assert sorted(streamed) == sorted(plain)
    for name in plain:
        assert torch.equal(streamed[name], plain[name]), name
    assert len(reads) == len(set(reads))  # each weight gathered once
    files = sorted(p.name for p in (tmp_path / "streamed").glob("*.safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(plain) and set(index["weight_map"].values()) == set(files)
    for name in ("config.json", "generation_config.json"):
        if (tmp_path / "plain" / name).exists():
            assert (tmp_path / "streamed" / name).read_text() == (tmp_path / "plain" / name).read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "streamed"))
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    if family == "deepseek-v3":  # fused in the model, one tensor per expert in the files
        assert any(".experts.gate_up_proj" in n for n, _ in model.named_parameters())
        assert any(".experts.0.gate_proj.weight" in n for n in streamed)


def _tied_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
