"""`dstune export`: GGUF files that an independent reader loads with the merged model's next-token logits
(f16: top-1 identical, q8_0: top-1 agreement >= 95%), an Ollama Modelfile beside them, quantised
safetensors that plain transformers loads, and refusals that write nothing (issue 26).

llama and qwen2 q8_0 files are read by transformers' own GGUF loader; f16 files, and deepseek2 files,
which transformers does not read, are read back with gguf.GGUFReader through the exporter's inverse
mapping (a weaker check: see dstune.export.verify).
"""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from _matrix import TEXT, cell_config, write_data
from typer.testing import CliRunner

from dstune.cli import app
from dstune.export import export_model
from dstune.export.modelfile import modelfile_text
from dstune.export.source import load_source
from dstune.export.verify import agreement, load_with_reader, load_with_transformers, next_token_logits
from dstune.models.templates import DEEPSEEK_R1_TEMPLATE, DEEPSEEK_V3_TEMPLATE

FAMILIES = {
    "deepseek-llm": "llama",
    "r1-distill-qwen": "qwen2",
    "deepseek-v2": "deepseek2",
    "deepseek-v3": "deepseek2",
}
THRESHOLD = {"f16": 1.0, "q8_0": 0.95}


def _rows(n: int = 20, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 5000, (8,), generator=g).tolist() for _ in range(n)]


def _prefixes(tokenizer) -> list[list[int]]:
    """20 prefixes of the texts the tiny runs were trained on, where a trained model's choice is decisive.

    A random-weight model with a 129,280-token vocabulary is no test of top-1 agreement: its best two
    logits are often closer than q8_0's rounding (measured: 2 of 20 random prompts flipped on tiny V2).
    """
    rows = [tokenizer(t)["input_ids"] for t in TEXT]
    return [row[: 4 + i // 2] for i, row in enumerate(rows * 10)][:20]


def _read_back(path, like, arch):
    return load_with_transformers(path) if arch != "deepseek2" else load_with_reader(path, like, arch)


# Opening a GGUF file with the DeepSeek tokenizer parses ~2.5 million metadata values in Python (~18 s on
# the CI's cores; transformers' loader opens it twice): f16 is read back once, by gguf.GGUFReader through
# the exporter's inverse mapping, and that reader also serves the metadata checks; q8_0 is read back by
# transformers' own loader (llama, qwen2), the independent consumer.


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def _train(family: str, root) -> str:
    from rich.console import Console

    from dstune.train.loop import train

    # LoRA on every linear layer, routed experts included: such a run must be merged before any export.
    extra = {
        "train": {"max_steps": 20},
        "lora": {"experts": "all"} if family in ("deepseek-v2", "deepseek-v3") else {},
    }
    cfg = cell_config(family, "lora", write_data(root), root / family, extra)
    return str(train(cfg, console=Console(quiet=True)).run_dir)


@pytest.mark.slow  # a 20-step run per family: 70-190 s each on 2 cores
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_tiny_family_round_trips_f16_exactly_and_q8_0_within_5_percent(family, tmp_path):
    run = _train(family, tmp_path)
    src = load_source(run)
    rows = _prefixes(src.tokenizer)
    ref = next_token_logits(src.model, rows)
    readers = {}
    for quant, threshold in THRESHOLD.items():
        res = export_model(run, tmp_path / "out", quant=quant)
        assert res.path.name == f"{family}-{quant}.gguf" and res.arch == FAMILIES[family]
        if quant == "f16":
            readers[quant] = gguf.GGUFReader(str(res.path))
            back = load_with_reader(readers[quant], src.model, res.arch)
        else:
            back = _read_back(res.path, src.model, res.arch)
        found = agreement(ref, next_token_logits(back, rows))
        assert found["top1"] >= threshold, (quant, found)
    reader = readers["f16"]
    assert _field(reader, "general.architecture") == FAMILIES[family]
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "deepseek-v3"  # the tiny presets use DeepSeek's tokenizer
    assert (
        _field(reader, "tokenizer.ggml.bos_token_id") == 0
        and _field(reader, "tokenizer.ggml.eos_token_id") == 1
    )
    assert len(reader.fields["tokenizer.ggml.merges"].data) > 100_000
    assert _field(reader, "tokenizer.chat_template") == src.chat_template
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == src.model.config.vocab_size
    assert (res.path.parent / "Modelfile").is_file()
    assert not [p for p in res.path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from rich.console import Console

    from dstune.train.loop import train

    root = tmp_path_factory.mktemp("export")
    cfg = cell_config("deepseek-llm", "lora", write_data(root), root / "lora", {"train": {"max_steps": 5}})
    return train(cfg, console=Console(quiet=True)).run_dir


def test_a_lora_run_exports_merged_with_the_ollama_commands(lora_run, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["export", str(lora_run), "--out", str(out), "--quant", "f16"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "ollama create lora-f16 -f Modelfile" in text and "ollama run lora-f16" in text, text
    gguf_file = out / "lora-f16.gguf"
    merged, base = load_source(str(lora_run)).model, load_source("tiny:deepseek-llm").model
    rows = _rows(8)
    exported = next_token_logits(load_with_transformers(gguf_file), rows)
    assert agreement(next_token_logits(merged, rows), exported)["max_abs_diff"] < 0.02  # f16 rounding
    assert agreement(next_token_logits(base, rows), exported)["max_abs_diff"] > 0.05  # the adapter is in


def test_a_run_that_cannot_merge_is_refused_before_anything_is_written(tmp_path):
    from rich.console import Console

    from dstune.train.loop import train

    cfg = cell_config(
        "deepseek-llm", "prefix", write_data(tmp_path), tmp_path / "prefix", {"train": {"max_steps": 1}}
    )
    run = train(cfg, console=Console(quiet=True)).run_dir
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["export", str(run), "--out", str(out)])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and text.count("error:") == 1, text
    assert "a prefix run cannot be exported" in text and "key/value positions" in text, text
    assert not out.exists()


def test_a_classification_run_is_refused(lora_run, tmp_path):
    import shutil

    run = tmp_path / "classifier"
    shutil.copytree(lora_run, run)
    (run / "labels.json").write_text(json.dumps(["neg", "pos"]), encoding="utf-8")
    res = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "classification run cannot be exported" in " ".join(res.output.split())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["deepseek-v32", "deepseek-v4"])
def test_families_without_a_gguf_layout_are_refused(family, tmp_path):
    res = CliRunner().invoke(app, ["export", f"tiny:{family}", "--out", str(tmp_path / "out")])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and f"family '{family}' cannot be exported to GGUF" in text, text
    assert "Exportable: deepseek-llm, deepseek-v2, deepseek-v3" in text and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--quant", "q3_k"], "--quant 'q3_k' is not a GGUF type this exporter writes; accepted: f32, f16"),
        (["--format", "safetensors", "--quant", "q8_0"], "accepted: int8, nf4"),
        (["--format", "onnx"], "--format 'onnx' is not one of gguf, safetensors"),
    ],
)
def test_bad_options_get_one_clear_line(args, needle, tmp_path):
    res = CliRunner().invoke(app, ["export", "tiny:deepseek-llm", "--out", str(tmp_path / "o"), *args])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and text.count("error:") == 1 and needle in text, text
    assert not (tmp_path / "o").exists()


def test_a_failing_export_leaves_no_half_file(tmp_path, monkeypatch):
    import dstune.export.gguf_file as gguf_file

    def broken(model, arch):
        yield "token_embd.weight", torch.zeros(4, 32)
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_file, "to_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model("tiny:deepseek-llm", tmp_path, quant="q8_0")
    assert not list(tmp_path.iterdir())


def test_modelfile_holds_the_go_template_stops_and_defaults():
    v3 = modelfile_text("m.gguf", DEEPSEEK_V3_TEMPLATE, "<｜end▁of▁sentence｜>", 4096)
    assert v3.startswith("FROM ./m.gguf\n")
    assert '{{- if eq .Role "user" }}<｜User｜>{{ .Content }}' in v3 and "<｜Assistant｜>{{ end }}" in v3
    assert v3.count('PARAMETER stop "<｜end▁of▁sentence｜>"') == 1 and 'PARAMETER stop "<｜User｜>"' in v3
    assert "PARAMETER temperature 0.7" in v3 and "PARAMETER num_ctx 4096" in v3
    r1 = modelfile_text("m.gguf", DEEPSEEK_R1_TEMPLATE, "<｜end▁of▁sentence｜>", 2048)
    assert "<｜Assistant｜><think>\n{{ end }}" in r1 and "PARAMETER temperature 0.6" in r1
    chatml = modelfile_text("m.gguf", "{{'<|im_start|>' + message['role']}}", "<|im_end|>", 2048)
    assert "<|im_start|>assistant" in chatml and chatml.count('PARAMETER stop "<|im_end|>"') == 1
    other = modelfile_text("m.gguf", "{{ messages }}", "</s>", 2048)
    assert (
        'TEMPLATE """' not in other and "embedded in the GGUF" in other and 'PARAMETER stop "</s>"' in other
    )


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantised_safetensors_load_in_plain_transformers(lora_run, quant, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    res = export_model(str(lora_run), tmp_path / quant, fmt="safetensors", quant=quant)
    config = json.loads((res.path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert (res.path / "tokenizer.json").is_file() and not list(res.path.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(str(res.path), device_map="cpu").eval()
    rows = _rows(8)
    ref, found = next_token_logits(load_source(str(lora_run)).model, rows), next_token_logits(model, rows)
    # 4 bits move single logits by about 1 on a random-weight model; the vectors stay aligned (nf4 min 0.948).
    cosine = torch.nn.functional.cosine_similarity(ref, found, dim=-1).min().item()
    assert cosine > 0.9, cosine


@pytest.mark.slow
def test_a_trained_smollm2_run_exports_and_answers_alike(smollm2_dir, tmp_path):
    """A real pretrained model, a real LoRA run: q8_0 keeps >= 95% of next-token choices on chat prompts."""
    from rich.console import Console

    from dstune.demo import demo_config
    from dstune.train.loop import train

    run = train(demo_config(str(tmp_path / "run"), max_steps=10), console=Console(quiet=True)).run_dir
    src = load_source(str(run))
    questions = ["Who are you?", "What is the capital of France?", "Write a haiku.", "What is 2+2?"] * 5
    texts = [
        src.tokenizer.apply_chat_template(
            [{"role": "user", "content": q + " " * i}],
            add_generation_prompt=True,
            chat_template=src.chat_template,
            tokenize=False,
        )
        for i, q in enumerate(questions)
    ]
    rows = [src.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ref = next_token_logits(src.model, rows)
    for quant, threshold in THRESHOLD.items():
        res = export_model(str(run), tmp_path / "gguf", quant=quant)
        assert res.arch == "llama"
        top1 = agreement(ref, next_token_logits(load_with_transformers(res.path), rows))["top1"]
        assert round(top1 * len(rows)) >= threshold * len(rows)  # in prompts: 19 of 20 is 0.95, not float32's 0.9499


@pytest.mark.parametrize("family", ["deepseek-v2", "deepseek-v3"])
def test_deepseek2_files_name_only_tensors_llama_cpp_defines_for_the_arch(family, tmp_path):
    """An independent check of the deepseek2 layout, which no installed reader loads: every tensor name is
    one the gguf package (llama.cpp's own constants) lists for MODEL_ARCH.DEEPSEEK2, for a block that
    exists, and every block has its attention tensors."""
    res = export_model(f"tiny:{family}", tmp_path / "out", quant="f16")
    reader = gguf.GGUFReader(str(res.path))
    blocks = _field(reader, "deepseek2.block_count")
    allowed = {
        gguf.TENSOR_NAMES[t].format(bid=b) + suffix
        for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.DEEPSEEK2]
        for b in range(blocks)
        for suffix in (".weight", ".bias")
    }
    names = {t.name for t in reader.tensors}
    assert names <= allowed, sorted(names - allowed)
    for b in range(blocks):
        assert {f"blk.{b}.attn_kv_a_mqa.weight", f"blk.{b}.attn_output.weight"} <= names, b
    assert {"token_embd.weight", "output_norm.weight"} <= names
