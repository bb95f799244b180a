"""``dstune explain`` (issue 27): gradient x input is complete on a linear model, attention rows are softmaxes
and their PNG opens, the logit lens's last layer is the model's own greedy choice, and the command works end
to end on a LoRA run and a classifier run, refusing bad input in one line with exit status 2."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from conftest import SHARED_DATA
from matplotlib.image import imread
from typer.testing import CliRunner

from dstune.cli import app
from dstune.explain import attention, attribution, lens, render
from dstune.generate import load_for_inference, prompt_ids

SHRINK = [
    "--max-steps",
    "2",
    "--set",
    "data.max_length=64",
    "--set",
    "data.max_samples=64",
    "--set",
    "train.progress=false",
    "--set",
    "train.eval_batches=2",
    "--set",
    "train.seed=5",
]
PROMPT = "Who are you? 你好"
runner = CliRunner()


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    loaded = load_for_inference("tiny:deepseek-llm")
    return loaded, prompt_ids(loaded, _user(PROMPT))


# --------------------------------------------------------------------------- gradient x input


def test_gradient_x_input_sums_to_f_x_minus_f_0_on_a_linear_model():
    """Completeness: for f(x) = sum_i w_i . x_i + b the scores are w_i . x_i and add up to f(x) - f(0)."""
    torch.manual_seed(0)
    x = torch.randn(7, 16, dtype=torch.float64)
    w, b = torch.randn(7, 16, dtype=torch.float64), 0.75

    def f(e):
        return (w * e).sum() + b

    scores = attribution.gradient_x_input(f, x)
    assert scores.shape == (7,)
    torch.testing.assert_close(scores, (w * x).sum(-1), rtol=0, atol=1e-12)
    assert math.isclose(float(scores.sum()), float(f(x) - f(torch.zeros_like(x))), abs_tol=1e-12)


def test_gradient_x_input_of_a_linear_layer_on_summed_embeddings_is_complete():
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 1).double()
    x = torch.randn(1, 5, 16, dtype=torch.float64)

    def f(e):
        return head(e.sum(1))[0, 0]

    scores = attribution.gradient_x_input(f, x)
    with torch.no_grad():
        gap = float(f(x) - f(torch.zeros_like(x)))
    assert scores.shape == (5,) and math.isclose(float(scores.sum()), gap, rel_tol=1e-12, abs_tol=1e-12)


def test_attribution_on_a_tiny_model_gives_one_finite_value_per_token(tiny):
    loaded, ids = tiny
    x = attribution.input_embeddings(loaded.model, ids)
    scores = attribution.gradient_x_input(attribution.next_token_score(loaded.model, 5), x)
    assert scores.shape == (len(ids),) and torch.isfinite(scores).all() and scores.abs().sum() > 0


# --------------------------------------------------------------------------- attention


def test_attention_rows_are_softmaxes_and_the_png_opens(tiny, tmp_path):
    loaded, ids = tiny
    before = loaded.model.config._attn_implementation
    maps = attention.attention_maps(loaded.model, ids)
    assert loaded.model.config._attn_implementation == before  # eager only for the pass
    assert len(maps) == loaded.model.config.num_hidden_layers
    texts = render.token_texts(loaded.tokenizer, ids)
    for heads in ([0, 1], "mean", "all"):
        panels = attention.select_heads(maps[-1], heads)
        for _, matrix in panels:
            assert matrix.shape == (len(ids), len(ids))
            torch.testing.assert_close(matrix.sum(-1), torch.ones(len(ids)), rtol=0, atol=1e-5)
        path = render.plot_attention(panels, texts, tmp_path / f"a-{heads}.png", "test")
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_layer_and_head_choices_resolve_and_name_the_option_when_out_of_range():
    assert attention.parse_choice("0,-1", "--layers") == [0, -1]
    assert attention.resolve_indices([0, -1], 4, "--layers", "layers") == [0, 3]
    assert attention.parse_choice("MEAN", "--heads") == "mean"
    with pytest.raises(Exception, match="--layers 2: the model has 2 layers"):
        attention.resolve_indices([2], 2, "--layers", "layers")
    with pytest.raises(Exception, match="--layers 'mean'"):
        attention.parse_choice("mean", "--layers")


def test_cjk_tokens_get_ascii_labels_and_byte_pieces_show_their_bytes(tiny):
    loaded, _ = tiny
    tok = loaded.tokenizer
    # the DeepSeek tokenizer has 你好 as one token and no token for 齉 (U+9F49, e9 bd 89 in UTF-8)
    texts = render.token_texts(tok, tok("你好 齉", add_special_tokens=False)["input_ids"])
    assert texts == ["你好", " ", "<e9 bd>", "<89>"]
    labels = [render.ascii_label(t, i) for i, t in enumerate(texts)]
    assert labels == ["0 \\u4f60\\u597d", "1 ' '", "2 <e9 bd>", "3 <89>"]
    assert render.ascii_label("<｜User｜>") == "<|User|>"


def test_pngs_with_cjk_tokens_titles_and_labels_draw_no_missing_glyph(tmp_path):
    """Every text a PNG draws is ASCII: matplotlib warns 'Glyph ... missing from font(s)' and draws a box
    for a CJK character (a token, a label, a run's name in a title)."""
    texts, scores = ["<｜User｜>", "房间", "<e9 bd>", "\n"], [0.5, -0.25, 0.0, 1.0]
    square = torch.softmax(torch.randn(2, 4, 4), -1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        render.plot_attention(
            [("head 0", square[0]), ("head 1", square[1])], texts, tmp_path / "a.png", "运行 好"
        )
        render.plot_attribution(texts, scores, tmp_path / "b.png", "towards label '正面'")
        render.plot_lens([[("正面", 0.7), ("负面", 0.3)]], tmp_path / "c.png", "运行: label '正面'")
    assert not [str(w.message) for w in caught if "missing from font" in str(w.message)]
    for name in "abc":
        assert imread(tmp_path / f"{name}.png").ndim == 3


# --------------------------------------------------------------------------- logit lens


@pytest.mark.parametrize("family", ["tiny:deepseek-llm", "tiny:deepseek-v3", "tiny:r1-distill-qwen"])
def test_logit_lens_last_layer_is_the_models_greedy_choice(family):
    torch.manual_seed(0)
    loaded = load_for_inference(family)
    ids = prompt_ids(loaded, _user(PROMPT))
    steps = lens.logit_lens(loaded.model, ids, new_tokens=3, top_k=4)
    greedy = loaded.model.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=3,
        do_sample=False, pad_token_id=0,
    )[0, len(ids):].tolist()  # fmt: skip
    assert [s.chosen for s in steps] == greedy
    for step in steps:
        assert len(step.layers) == loaded.model.config.num_hidden_layers
        assert step.layers[-1][0][0] == step.chosen and len(step.layers[0]) == 4
        assert all(p >= q for row in step.layers for (_, p), (_, q) in zip(row, row[1:]))


def test_logit_lens_last_layer_reads_the_models_own_probabilities(tiny):
    """Final norm then head on the last layer's raw output is the model's output: the same numbers, not
    only the same argmax."""
    loaded, ids = tiny
    (step,) = lens.logit_lens(loaded.model, ids, new_tokens=1, top_k=3)
    with torch.no_grad():
        probs = torch.softmax(loaded.model(torch.tensor([ids])).logits[0, -1], -1)
    values, top = probs.topk(3)
    assert [i for i, _ in step.layers[-1]] == top.tolist()
    torch.testing.assert_close(torch.tensor([p for _, p in step.layers[-1]]), values, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_classifier_lens_last_layer_is_the_heads_softmax(pooling):
    from dstune.models.classify import load_classifier
    from dstune.models.load import resolve_model_dir

    torch.manual_seed(0)
    model = load_classifier(
        resolve_model_dir("tiny:deepseek-llm").path, ["neg", "neu", "pos"], 0, pooling=pooling
    )
    ids = [1, 300, 301, 302, 303, 304]
    step = lens.classifier_lens(model.eval(), ids, top_k=3)
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids])).logits[0], -1)
    assert step.chosen == int(probs.argmax()) == step.layers[-1][0][0]
    torch.testing.assert_close(
        sorted(p for _, p in step.layers[-1]), sorted(probs.tolist()), rtol=1e-4, atol=1e-6
    )


def test_logit_lens_on_smollm2_ends_in_its_greedy_answer(smollm2_dir):
    """Real weights: the final norm's weights are not ones, so reading transformers' ``hidden_states[-1]``
    (already normed) through the norm again would give other probabilities; the hooks' raw outputs do not."""
    loaded = load_for_inference(smollm2_dir)
    ids = prompt_ids(loaded, _user("What is the capital of France?"))
    steps = lens.logit_lens(loaded.model, ids, new_tokens=2, top_k=3)
    with torch.no_grad():
        probs = torch.softmax(loaded.model(torch.tensor([ids])).logits[0, -1], -1)
    assert steps[0].chosen == int(probs.argmax()) == steps[0].layers[-1][0][0]
    assert math.isclose(steps[0].layers[-1][0][1], float(probs.max()), rel_tol=1e-4)
    assert len(steps[0].layers) == 30 and steps[0].layers[0][0][0] != steps[0].chosen  # the lens moves


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-step LoRA run and a 2-step LoRA classifier run of tiny DeepSeek-LLM."""
    root = tmp_path_factory.mktemp("explain")
    lm = runner.invoke(
        app,
        [
            "train",
            "--model",
            "tiny:deepseek-llm",
            "--data",
            str(SHARED_DATA / "alpaca_en_demo.json"),
            "-o",
            str(root / "lora"),
            *SHRINK,
        ],
    )
    assert lm.exit_code == 0, lm.output
    cls = runner.invoke(
        app,
        [
            "train",
            "--model",
            "tiny:deepseek-llm",
            "--data",
            str(SHARED_DATA / "chnsenticorp_htl.csv"),
            "--set",
            "task=classification",
            "-o",
            str(root / "cls"),
            *SHRINK,
        ],
    )
    assert cls.exit_code == 0, cls.output
    return root


def _written(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.startswith("  ")]


def test_explain_a_lora_run_writes_every_file_into_run_explain(runs):
    res = runner.invoke(
        app,
        [
            "explain",
            str(runs / "lora"),
            "--prompt",
            PROMPT,
            "--layers",
            "0,-1",
            "--heads",
            "0,1",
            "--new-tokens",
            "2",
        ],
    )
    assert res.exit_code == 0 and res.exception is None, res.output
    out = runs / "lora" / "explain"
    names = {
        "attention_layer0.png",
        "attention_layer1.png",
        "attribution.json",
        "attribution.html",
        "attribution.png",
        "lens.json",
        "lens_1.png",
        "lens_2.png",
    }
    assert {p.name for p in out.iterdir()} == names
    assert sorted(_written(res.output)) == sorted(str(out / n) for n in names)
    for png in out.glob("*.png"):
        assert imread(png).ndim == 3
    record = json.loads((out / "attribution.json").read_text(encoding="utf-8"))
    html = (out / "attribution.html").read_text(encoding="utf-8")
    assert html.count('<span class="t"') == len(record["tokens"]) and "你好" in html
    lens_json = json.loads((out / "lens.json").read_text(encoding="utf-8"))
    assert [s["step"] for s in lens_json["steps"]] == [1, 2]
    assert record["id"] == lens_json["steps"][0]["chosen"]["id"]  # towards the first generated token


def test_explain_a_classifier_run_attributes_the_label_chat_predicts(runs, tmp_path):
    from dstune.chat import classify_text

    text = "房间很干净，服务也很好，下次还会再来。"
    res = runner.invoke(
        app, ["explain", str(runs / "cls"), "--prompt", text, "--heads", "mean", "--out", str(tmp_path / "x")]
    )
    assert res.exit_code == 0 and res.exception is None, res.output
    probs = classify_text(load_for_inference(str(runs / "cls")), text)
    predicted = max(probs, key=probs.get)
    record = json.loads((tmp_path / "x" / "attribution.json").read_text(encoding="utf-8"))
    lens_json = json.loads((tmp_path / "x" / "lens.json").read_text(encoding="utf-8"))
    assert record["towards"].startswith(f"label {predicted!r}")
    assert len(lens_json["steps"]) == 1 and lens_json["steps"][0]["chosen"]["text"] == predicted
    assert sorted(t["text"] for t in lens_json["steps"][0]["layers"][-1]["top"]) == sorted(probs)


@pytest.mark.parametrize(
    "args, option",
    [
        (["{root}/no-such-run"], "RUN"),
        (["{root}/lora", "--layers", "2"], "--layers"),
        (["{root}/lora", "--layers", "-3"], "--layers"),
        (["{root}/lora", "--heads", "4"], "--heads"),
        (["{root}/lora", "--heads", "first"], "--heads"),
        (["{root}/cls", "--target", "maybe"], "--target"),
    ],
)
def test_bad_input_is_one_line_naming_the_option_and_exit_2(runs, tmp_path, args, option):
    args = [a.format(root=runs) for a in args]
    res = runner.invoke(app, ["explain", *args, "--prompt", "hi", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and option in res.output and "Traceback" not in res.output
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit)
    assert not (tmp_path / "out").exists()  # checked before anything is written
