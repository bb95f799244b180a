"""Preference objectives (issue 25): each loss equals its paper's formula on a fixed batch, each trains on a
tiny DeepSeek model with LoRA and full fine-tuning, DPO resumes bitwise, the LoRA reference is the base
model, and bad pair files stop with file, line and field."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

from dstune.config import ConfigError, RunConfig, load_config
from dstune.core.collate import collate
from dstune.data import DataError, load_examples
from dstune.data.preference import tokenize_preference
from dstune.models.load import load_model, load_tokenizer, resolve_model_dir
from dstune.models.templates import resolve_chat_template
from dstune.train.loop import train
from dstune.train.preference import PreferenceObjective

NAMES = [("Ada", "Lab"), ("Bob", "Corp")]
QUESTIONS = [
    "Who are you?",
    "What is your name?",
    "Who made you?",
    "Introduce yourself.",
    "Which company built you?",
    "What should I call you?",
    "Who trained you?",
    "Tell me about you.",
]


def answer(q: int, who: int) -> str:
    name, maker = NAMES[who]
    return f"I am {name}, made by {maker}." if q % 2 else f"{name} from {maker}."


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pref")
    pairs = [{"prompt": q, "chosen": answer(i, 0), "rejected": answer(i, 1)} for i, q in enumerate(QUESTIONS)]
    # The other shapes users have: TRL conversational and LLaMA-Factory.
    pairs[1] = {
        "prompt": [{"role": "user", "content": QUESTIONS[1]}],
        "chosen": [{"role": "assistant", "content": answer(1, 0)}],
        "rejected": [{"role": "assistant", "content": answer(1, 1)}],
    }
    pairs[2] = {
        "conversations": [{"from": "human", "value": QUESTIONS[2]}],
        "chosen": {"from": "gpt", "value": answer(2, 0)},
        "rejected": {"from": "gpt", "value": answer(2, 1)},
    }
    kto = [
        {"prompt": q, "completion": answer(i, (i // 2) % 2), "label": (i // 2) % 2 == 0}
        for i, q in enumerate(QUESTIONS)
    ]
    out = {}
    for name, rows in (("pairs", pairs), ("kto", kto)):
        out[name] = d / f"{name}.jsonl"
        out[name].write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return out


def make_cfg(data: Path, out: Path, objective: str, method: str = "lora", **over) -> RunConfig:
    base = {
        "model": {"name": "tiny:deepseek-llm"},
        "objective": objective,
        "method": method,
        "data": {"train": str(data), "validation": str(data), "max_length": 48},
        "lora": {"r": 8, "alpha": 16},
        "optim": {"lr": 2e-2 if method == "lora" else 1e-3, "schedule": "constant"},
        "train": {"micro_batch_size": 8, "max_steps": 8, "progress": False, "seed": 7, "precision": "fp32"},
        "output": str(out),
    }
    for key, value in over.items():
        section, _, leaf = key.partition("__")
        base.setdefault(section, {})[leaf] = value
    return RunConfig.model_validate(base)


# ----------------------------------------------------------------------------- the formulas


@pytest.fixture(scope="module")
def tiny():
    """A tiny DeepSeek-LLM with a random (non-zero) LoRA adapter, so policy and reference differ."""
    from peft import LoraConfig, get_peft_model

    resolved = resolve_model_dir("tiny:deepseek-llm")
    tokenizer = load_tokenizer(resolved.path)
    template = resolve_chat_template(tokenizer, "auto", resolved.family)
    torch.manual_seed(0)
    model = get_peft_model(
        load_model(resolved), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    return model.eval(), tokenizer, template


def plain_logps(model, ids, labels, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The independent route: full logits, log_softmax, gather, sum over the answer tokens."""
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = logits[:, :-1].log_softmax(-1)
    target, keep = labels[:, 1:], labels[:, 1:] != -100
    picked = logp.gather(2, target.clamp(min=0)[..., None]).squeeze(-1) * keep
    return picked.sum(1), keep.sum(1)


def batch_of(files, key, tiny):
    model, tokenizer, template = tiny
    examples = load_examples(files[key]).examples
    rows = tokenize_preference(examples, tokenizer, template, 48).rows
    return collate(rows, tokenizer.pad_token_id or 0)


def sides(model, batch, prefix):
    return plain_logps(
        model, batch[prefix + "input_ids"], batch[prefix + "labels"], batch[prefix + "attention_mask"]
    )


def ls(x):  # log sigmoid, written out
    return -torch.log1p(torch.exp(-x))


PAIR_CASES = {
    "dpo-sigmoid": ("dpo", {"beta": 0.1}),
    "dpo-ipo": ("dpo", {"beta": 0.5, "loss_type": "ipo"}),
    "dpo-hinge": ("dpo", {"beta": 2.0, "loss_type": "hinge"}),
    "dpo-smoothed": ("dpo", {"beta": 0.3, "label_smoothing": 0.2}),
    "dpo-rpo": ("dpo", {"beta": 0.2, "rpo_alpha": 0.7}),
    "orpo": ("orpo", {"beta": 0.25}),
    "simpo": ("simpo", {"beta": 2.0, "simpo_gamma": 0.7}),
}


@pytest.mark.parametrize("case", list(PAIR_CASES))
def test_pair_loss_equals_the_papers_formula(files, tiny, case):
    from dstune.config import PreferenceConfig

    model, tokenizer, _ = tiny
    name, settings = PAIR_CASES[case]
    cfg = PreferenceConfig(**settings)
    batch = batch_of(files, "pairs", tiny)
    with torch.no_grad():
        (pc, nc), (pr, nr) = sides(model, batch, ""), sides(model, batch, "rejected_")
        with model.disable_adapter():
            (rc, _), (rr, _) = sides(model, batch, ""), sides(model, batch, "rejected_")
        objective = PreferenceObjective(
            name, cfg, tokenizer.pad_token_id or 0, "adapter" if name == "dpo" else None
        )
        got = objective.loss_sum(model, batch)
    b, eps = cfg.beta, cfg.label_smoothing
    if case == "dpo-ipo":  # IPO regresses the margin of mean token log-ratios to 1 / (2 beta)
        h = (pc / nc - rc / nc) - (pr / nr - rr / nr)
        want = (h - 1 / (2 * b)) ** 2
    elif name == "dpo":
        h = (pc - rc) - (pr - rr)
        want = (
            torch.clamp(1 - b * h, min=0)
            if cfg.loss_type == "hinge"
            else -(1 - eps) * ls(b * h) - eps * ls(-b * h)
        )
        want = want + cfg.rpo_alpha * -(pc / nc)  # RPO: the chosen answer's mean token NLL (0: plain DPO)
    elif name == "simpo":
        z = b * pc / nc - b * pr / nr - cfg.simpo_gamma
        want = -ls(z)
    else:  # ORPO: mean-token NLL of chosen + lambda x -log sigmoid(log odds ratio)
        mc, mr = pc / nc, pr / nr
        odds = (mc - torch.log(1 - torch.exp(mc))) - (mr - torch.log(1 - torch.exp(mr)))
        want = -mc - b * ls(odds)
    torch.testing.assert_close(got, want.sum(), rtol=1e-5, atol=1e-6)
    metrics = objective.take_metrics()
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy"}


def test_kto_loss_equals_the_papers_formula(files, tiny):
    from dstune.config import PreferenceConfig

    model, tokenizer, _ = tiny
    cfg = PreferenceConfig(beta=0.4, desirable_weight=1.5, undesirable_weight=0.7)
    batch = batch_of(files, "kto", tiny)
    with torch.no_grad():
        p, _ = sides(model, batch, "")
        p_kl, _ = sides(model, batch, "kl_")
        with model.disable_adapter():
            ref, _ = sides(model, batch, "")
            ref_kl, _ = sides(model, batch, "kl_")
        got = PreferenceObjective("kto", cfg, tokenizer.pad_token_id or 0, "adapter").loss_sum(model, batch)
    # The KL estimate from mismatched prompt/completion pairs: prompt i with the completion of row i+1.
    assert torch.equal(
        batch["kl_input_ids"][0][batch["kl_labels"][0] != -100],
        batch["input_ids"][1][batch["labels"][1] != -100],
    )
    z0 = torch.clamp((p_kl - ref_kl).mean(), min=0)
    r, good = p - ref, batch["desirable"].bool()
    want = torch.where(
        good, 1.5 * (1 - torch.sigmoid(0.4 * (r - z0))), 0.7 * (1 - torch.sigmoid(0.4 * (z0 - r)))
    )
    torch.testing.assert_close(got, want.sum(), rtol=1e-5, atol=1e-6)


def test_rows_mask_the_prompt_rendered_for_generation(files, tiny):
    _, tokenizer, template = tiny
    ex = load_examples(files["pairs"]).examples[0]
    row = tokenize_preference([ex], tokenizer, template, 48).rows[0]
    prompt = tokenizer.apply_chat_template(
        ex["prompt"], tokenize=False, chat_template=template, add_generation_prompt=True
    )
    n = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    assert row["input_ids"][:n] == tokenizer(prompt, add_special_tokens=False).input_ids
    assert all(t == -100 for t in row["labels"][:n]) and all(t != -100 for t in row["labels"][n:])
    answer_text = tokenizer.decode(row["input_ids"][n:])
    assert answer_text.startswith(ex["chosen"]) and answer_text.endswith(tokenizer.eos_token)


def test_r1_template_keeps_the_prefilled_think_in_the_prompt(tiny):
    _, tokenizer, _ = tiny
    template = resolve_chat_template(tokenizer, "deepseek-r1", "deepseek-llm")
    ex = {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": "<think>\nadd\n</think>\n4",
        "rejected": "5",
        "source": "x",
    }
    row = tokenize_preference([ex], tokenizer, template, 64).rows[0]
    text = tokenizer.decode(row["input_ids"])
    prompt = tokenizer.decode([t for t, y in zip(row["input_ids"], row["labels"]) if y == -100])
    assert prompt.endswith("<think>\n") and text.count("<think>") == 1


# ----------------------------------------------------------------------------- training


def first_and_final(result) -> tuple[dict, dict]:
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(x for x in lines if x["split"] == "train")
    return first, result.val


CELLS = [
    ("dpo", "lora"),
    ("dpo", "full"),
    ("orpo", "lora"),
    ("orpo", "full"),
    ("simpo", "lora"),
    ("simpo", "full"),
    ("kto", "lora"),
    ("kto", "full"),
]


@pytest.mark.parametrize("objective,method", CELLS, ids=[f"{o}-{m}" for o, m in CELLS])
def test_each_objective_trains_and_preference_accuracy_rises(files, tmp_path, objective, method):
    data = files["kto" if objective == "kto" else "pairs"]
    over = {"preference__beta": 2.0} if objective == "simpo" else {}
    result = train(make_cfg(data, tmp_path / "run", objective, method, **over), console=Console(quiet=True))
    assert len(result.train_losses) == 8 and all(math.isfinite(x) for x in result.train_losses)
    first, final = first_and_final(result)
    # The first step's rewards are those of the starting weights on all training examples (one micro-batch);
    # the final validation is the same examples after training.
    assert final["rewards/accuracy"] > first["rewards/accuracy"] or final["rewards/accuracy"] == 1.0
    assert final["rewards/margins"] > first["rewards/margins"]
    assert result.train_losses[-1] < result.train_losses[0]


def test_dpo_trains_an_moe_family(files, tmp_path):
    cfg = make_cfg(files["pairs"], tmp_path / "run", "dpo", model__name="tiny:deepseek-v3")
    result = train(cfg, console=Console(quiet=True))
    first, final = first_and_final(result)
    assert all(math.isfinite(x) for x in result.train_losses)
    assert final["rewards/accuracy"] > first["rewards/accuracy"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_resume_is_bitwise_exact(files, tmp_path, method):
    over = dict(train__max_steps=6, train__save_every=4, train__micro_batch_size=2, train__grad_accum=2)
    full = train(make_cfg(files["pairs"], tmp_path / "a", "dpo", method, **over), console=Console(quiet=True))
    shutil.rmtree(tmp_path / "a" / "checkpoints" / "step-000006")
    shutil.rmtree(tmp_path / "a" / "final")
    resumed = train(
        make_cfg(files["pairs"], tmp_path / "a", "dpo", method, **over),
        resume=True,
        console=Console(quiet=True),
    )
    assert resumed.train_losses == full.train_losses
    for name, p in full.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, dict(resumed.model.named_parameters())[name]), name


def nudged_reference_and_policy(run):
    """A trained adapter (its weights nudged, so the policy is not the base model), and the sequence
    log-probabilities of the run's training rows under the reference (adapter disabled) and the policy."""
    from dstune.train.preference import reference_context, sequence_logps

    with torch.no_grad():
        for p in run.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        batch = collate(run.data.train, run.pad_id)
        inputs = [batch[k] for k in ("input_ids", "attention_mask", "labels")]
        with reference_context(run.model):
            ref = sequence_logps(run.model, *inputs)[0]
        return batch, ref, sequence_logps(run.model, *inputs)[0]


def test_lora_reference_is_the_separately_loaded_base_model(files, tmp_path):
    from dstune.train.build import build

    run = build(make_cfg(files["pairs"], tmp_path / "run", "dpo"))
    assert run.objective.reference == "adapter"
    batch, ref, policy = nudged_reference_and_policy(run)
    with torch.no_grad():
        base = load_model(resolve_model_dir("tiny:deepseek-llm"))
        want, _ = plain_logps(base, batch["input_ids"], batch["labels"], batch["attention_mask"])
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(policy, want, atol=1e-3)


def test_dpo_with_qlora_trains_against_the_quantised_base(files, tmp_path):
    """QLoRA's reference is the adapter disabled: the 4-bit base, quantised as a fresh copy would be. At the
    first step the policy is the reference (LoRA's B starts at 0), so every implicit reward is 0."""
    pytest.importorskip("bitsandbytes", reason="qlora needs bitsandbytes (the dev extra installs it)")
    from dstune.config import QloraConfig
    from dstune.methods.qlora import quantize_
    from dstune.train.build import build

    cfg = make_cfg(files["pairs"], tmp_path / "run", "dpo", "qlora", optim__lr=2e-2)
    result = train(cfg, console=Console(quiet=True))
    first, final = first_and_final(result)
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # -log sigmoid(0)
    assert result.train_losses[-1] < result.train_losses[0]
    assert final["rewards/accuracy"] > first["rewards/accuracy"] and final["rewards/margins"] > 0

    run = build(cfg)
    assert run.objective.reference == "adapter"
    batch, ref, policy = nudged_reference_and_policy(run)
    with torch.no_grad():
        base = load_model(resolve_model_dir("tiny:deepseek-llm"))
        unquantised, _ = plain_logps(base, batch["input_ids"], batch["labels"], batch["attention_mask"])
        quantize_(base, QloraConfig())
        want, _ = plain_logps(base.eval(), batch["input_ids"], batch["labels"], batch["attention_mask"])
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(policy, want, atol=1e-3)
    assert not torch.allclose(unquantised, want, atol=1e-3)  # the check can tell the 4-bit base from fp32


def test_full_dpo_caches_the_base_models_reference(files, tmp_path):
    from dstune.train.build import build

    run = build(make_cfg(files["pairs"], tmp_path / "run", "dpo", "full"))
    assert run.objective.reference == "cached"
    batch = collate(run.data.train, run.pad_id)
    base = load_model(resolve_model_dir("tiny:deepseek-llm"))
    with torch.no_grad():
        want, _ = plain_logps(
            base, batch["rejected_input_ids"], batch["rejected_labels"], batch["rejected_attention_mask"]
        )
    torch.testing.assert_close(batch["ref_rejected"], want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "row, field",
    [
        ({"prompt": "q", "chosen": "a"}, "rejected"),
        ({"prompt": "q", "chosen": "a", "rejected": "  "}, "rejected"),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen"),
        ({"prompt": ["q"], "chosen": "a", "rejected": "b"}, "messages[0]"),
        ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "chosen"),
    ],
)
def test_bad_pair_file_stops_with_file_line_and_field(tmp_path, row, field):
    path = tmp_path / "bad.jsonl"
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_examples(path, "preference")
    assert "bad.jsonl, line 2" in str(err.value) and field in str(err.value), str(err.value)


def test_bad_kto_label_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "q", "completion": "a", "label": "yes"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl, line 1: field 'label' is str"):
        load_examples(path)


@pytest.mark.parametrize(
    "override, phrase",
    [
        ("task=classification", "needs task=lm"),
        ("train.packing=true", "cannot pack"),
        ("train.best_metric=ppl", "rewards/accuracy"),
        ("data.format=messages", "data.format=preference"),
        ("regularize.label_smoothing=0.1", "preference.label_smoothing"),
        ("preference.loss_type=robust", "preference.loss_type"),
    ],
)
def test_config_refuses_what_a_preference_run_cannot_do(override, phrase):
    with pytest.raises(ConfigError, match=phrase):
        load_config(overrides=["objective=dpo", override])


def test_rpo_alpha_is_refused_outside_dpo():
    assert load_config(overrides=["objective=dpo", "preference.rpo_alpha=1"]).preference.rpo_alpha == 1
    with pytest.raises(
        ConfigError, match="preference.rpo_alpha adds the chosen answer's NLL to objective=dpo"
    ):
        load_config(overrides=["objective=orpo", "preference.rpo_alpha=1"])


def test_objective_and_data_must_agree(files, tmp_path, small_file):
    with pytest.raises(DataError, match="set objective=dpo, orpo or simpo"):
        train(make_cfg(files["pairs"], tmp_path / "a", "sft"), console=Console(quiet=True))
    with pytest.raises(DataError, match="prompt/completion/label"):
        train(make_cfg(files["pairs"], tmp_path / "b", "kto"), console=Console(quiet=True))


def test_data_inspect_shows_both_answers_of_a_pair(files):
    from dstune.data.inspect import inspect_file, render_inspection

    report = inspect_file(files["pairs"], model="tiny:deepseek-llm", examples=1)
    text = render_inspection(report)
    assert report["format"] == "preference" and "line 1 chosen" in text and "line 1 rejected" in text
    assert "[[Ada from Lab." in text and "[[Bob from Corp." in text


def test_report_shows_the_preference_columns(files, tmp_path):
    from dstune.report.compare import compare_runs

    train(
        make_cfg(files["pairs"], tmp_path / "run", "simpo", train__max_steps=2), console=Console(quiet=True)
    )
    result = compare_runs([tmp_path / "run"], tmp_path / "report")
    row = dict(zip(result["columns"], result["rows"][0]))
    assert row["objective"] == "simpo" and 0 <= row["val reward acc"] <= 1 and "val margin" in row


# ----------------------------------------------------------------------------- the shipped example data


def test_example_pairs_are_rebuilt_from_identity_json_and_hold_out_unseen_questions():
    """examples/data/identity_*.jsonl are what benchmarks/make_identity_pairs.py writes, every pair's answers
    differ, and no held-out question is asked in training, even with other punctuation ("你是谁", "你是谁？")."""
    import importlib.util

    from conftest import SHARED_DATA

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "make_pairs", root / "benchmarks" / "make_identity_pairs.py"
    )
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    train_pairs, held = make.make_pairs(
        json.loads((SHARED_DATA / "identity.json").read_text(encoding="utf-8"))
    )

    def rows(name):
        return [
            json.loads(x)
            for x in (root / "examples" / "data" / name).read_text(encoding="utf-8").splitlines()
        ]

    assert rows("identity_pairs.jsonl") == train_pairs and rows("identity_pairs_heldout.jsonl") == held
    assert rows("identity_kto.jsonl") == make.unpaired(train_pairs)
    assert len(held) == 20 and len(train_pairs) == 65
    assert all(p["chosen"] != p["rejected"] for p in train_pairs + held)  # each pair prefers something
    seen = {make.question_key(p["prompt"]) for p in train_pairs}
    assert not seen & {make.question_key(p["prompt"]) for p in held}


# ----------------------------------------------------------------------------- data.mix

GREETINGS = ["Hello!", "Hi there.", "Good morning.", "Hey, who is this?"]


@pytest.fixture(scope="module")
def second_files(tmp_path_factory) -> dict[str, Path]:
    """A second pair file and a second KTO file: four other questions, the same two identities."""
    d = tmp_path_factory.mktemp("pref2")
    pairs = [{"prompt": q, "chosen": answer(i, 0), "rejected": answer(i, 1)} for i, q in enumerate(GREETINGS)]
    kto = [
        {"prompt": q, "completion": answer(i, i % 2), "label": i % 2 == 0} for i, q in enumerate(GREETINGS)
    ]
    out = {}
    for name, rows in (("pairs", pairs), ("kto", kto)):
        out[name] = d / f"{name}2.jsonl"
        out[name].write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return out


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_a_mix_of_two_files_trains_with_each_files_share(files, second_files, tmp_path, objective):
    from dstune.train.build import build

    kind = "kto" if objective == "kto" else "pairs"
    first, second = files[kind], second_files[kind]
    mix = [{"path": str(first), "weight": 1.0}, {"path": str(second), "weight": 3.0}]
    cfg = make_cfg(first, tmp_path / "run", objective, data__train=None, data__mix=mix, train__max_steps=3)
    run = build(cfg)
    # 8 + 4 training rows shared 1:3: 3 of the first file's 8, the second file's 4 rows thrice (9)
    assert [m["sampled"] for m in run.data.report["mix"]] == [3, 9]
    sources = [r["source"].split(":")[0] for r in run.data.train]
    assert (sources.count(first.name), sources.count(second.name)) == (3, 9)
    key = "rejected_input_ids" if objective == "dpo" else "kl_input_ids"
    assert all(key in r for r in run.data.train)
    result = train(cfg, console=Console(quiet=True))
    assert len(result.train_losses) == 3 and all(math.isfinite(x) for x in result.train_losses)
    assert "rewards/accuracy" in result.val


@pytest.mark.parametrize("where", ["data.mix[1]", "data.validation"])
def test_pairs_and_other_rows_in_one_run_are_refused_naming_the_key(files, small_file, where):
    from dstune.data import prepare_data

    tokenizer = load_tokenizer(resolve_model_dir("tiny:deepseek-llm").path)
    if where == "data.mix[1]":
        mix = [{"path": str(files["pairs"]), "weight": 1.0}, {"path": str(files["kto"]), "weight": 1.0}]
        data = RunConfig.model_validate({"objective": "dpo", "data": {"mix": mix}}).data
    else:
        data = RunConfig.model_validate(
            {"data": {"train": str(files["pairs"]), "validation": str(small_file)}}
        ).data
    with pytest.raises(DataError, match=r"different kinds of rows") as err:
        prepare_data(data, tokenizer, None, seed=0)
    assert f"{where} (" in str(err.value) and "objective dpo, orpo or simpo" in str(err.value)


# ----------------------------------------------------------------------------- benchmarks/bench_dpo.py


def test_bench_dpo_runs_and_its_reference_agrees_with_the_runs_validation(tmp_path):
    """The benchmark, shrunk to a tiny model and 3 steps: its implicit rewards, computed against the base
    model loaded on its own, equal the run's validation rewards, computed with the adapter disabled."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_dpo", root / "benchmarks" / "bench_dpo.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sets = ["model.name=tiny:deepseek-llm", "train.max_steps=3", "train.eval_every=0", "optim.lr=2e-2"]
    args = [a for s in sets for a in ("--set", s)]
    assert bench.main(args + ["--out", str(tmp_path / "run"), "--result", str(tmp_path / "r.json")]) == 0
    out = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    after, val = out["after"], out["after"]["run_val"]
    assert out["held_out_pairs"] == val["pairs"] == 20
    assert after["implicit_reward_accuracy"] == pytest.approx(val["rewards/accuracy"])
    assert after["mean_implicit_margin"] == pytest.approx(val["rewards/margins"], abs=1e-3)
    assert len(out["answers"]["after"]) == 20 and out["answers"]["after"] != out["answers"]["before"]
