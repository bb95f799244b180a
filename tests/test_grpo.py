"""GRPO (issue 25): the advantages, clipped objective, KL and loss aggregations against worked examples; the
built-in rewards; user rewards loaded only by name; prompt-only data with file:line errors; training on a
tiny DeepSeek model with LoRA and full fine-tuning, bitwise resume, and a step that moves the policy
towards the completions with positive advantage."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

from dstune.config import ConfigError, RunConfig, load_config
from dstune.core.loss import IGNORE
from dstune.data import DataError, load_examples
from dstune.errors import UsageError
from dstune.train.grpo import aggregate, clipped_token_loss, group_advantages, k3_kl
from dstune.train.loop import train
from dstune.train.rewards import accuracy, final_answer, format_reward, length, load_reward


def make_cfg(grpo_files, out: Path, method: str = "lora", **over) -> RunConfig:
    base = {
        "model": {"name": "tiny:deepseek-llm"},
        "objective": "grpo",
        "method": method,
        "grpo": {"num_generations": 4, "max_new_tokens": 8, "rewards": [f"{grpo_files['rewards']}:low_ids"]},
        "data": {"train": str(grpo_files["data"]), "max_length": 64, "split": [0.75, 0.25, 0.0]},
        "lora": {"r": 8, "alpha": 16},
        "optim": {"lr": 1e-2 if method == "lora" else 1e-3, "schedule": "constant"},
        "train": {
            "micro_batch_size": 2,
            "max_steps": 4,
            "progress": False,
            "seed": 3,
            "eval_batches": 1,
            "precision": "fp32",
        },  # the hand computations are fp32
        "output": str(out),
    }
    for key, value in over.items():
        section, _, leaf = key.partition("__")
        if isinstance(value, dict):
            base.setdefault(section, {}).setdefault(leaf, {}).update(value)
        else:
            base.setdefault(section, {})[leaf] = value
    return RunConfig.model_validate(base)


# ----------------------------------------------------------------------------- the formulas


def test_group_advantages_worked_example():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv, std = group_advantages(rewards, 4, scale=True)
    s = math.sqrt(1 / 3)  # the unbiased std of (1, 0, 0, 1)
    want = [0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4), 0, 0, 0, 0]
    assert adv.tolist() == pytest.approx(want, rel=1e-6)
    assert std.tolist() == pytest.approx([s, 0.0])
    plain, _ = group_advantages(rewards, 4, scale=False)  # Dr. GRPO: centred only
    assert plain.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


def test_clipped_objective_worked_example():
    # Three tokens of one completion with advantage +1 and one with advantage -1, ratios on both sides of
    # the clip range [0.8, 1.28] (eps_low 0.2, eps_high 0.28 as DAPO's clip-higher).
    new = torch.log(torch.tensor([[1.5, 1.0, 0.5], [0.5, 1.1, 1.5]]))
    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -1.0])
    loss, binds = clipped_token_loss(new, old, adv, 0.2, 0.28)
    # A>0: -min(r, clip(r)) = -(1.28, 1.0, 0.5); A<0: -min(-r, -clip(r)) = (0.8, 1.1, 1.5)
    assert loss.flatten().tolist() == pytest.approx([-1.28, -1.0, -0.5, 0.8, 1.1, 1.5], rel=1e-6)
    assert binds.tolist() == [[True, False, False], [True, False, False]]
    # The ratio-1 case (one update per generation): the gradient is -A d log p, the policy gradient.
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = clipped_token_loss(logp, logp.detach(), torch.tensor([0.7]), 0.2, 0.2)
    loss.sum().backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-0.7, -0.7])


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    p = torch.tensor([-1.0, -2.0, -0.5])
    assert k3_kl(p, p).tolist() == [0.0, 0.0, 0.0]
    r = torch.tensor([-1.5, -1.0, -0.5])
    d = r - p
    assert k3_kl(p, r).tolist() == pytest.approx((torch.exp(d) - d - 1).tolist())
    assert (k3_kl(p, r)[:2] > 0).all()


def test_loss_aggregations_worked_example():
    loss = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert float(aggregate(loss, mask, "grpo", 8)) == pytest.approx(2.0 + 4.0)  # token means, summed
    assert float(aggregate(loss, mask, "dr_grpo", 8)) == pytest.approx(10.0 / 8)
    assert float(aggregate(loss, mask, "dapo", 8)) == pytest.approx(10.0)


# ----------------------------------------------------------------------------- rewards


def test_accuracy_reads_the_final_answer():
    assert final_answer("<think>3 + 4 = 7, then 7 * 2</think> The answer is 14.") == "14"
    assert final_answer("so \\boxed{1,469} and 12 more") == "1,469"
    cases = ["<think>135?</think>135", "It is 1,469.", "答案是 199。", "<think>199</think> no", "135.0"]
    got = accuracy([""] * 5, cases, answer=["135", "1469", "199", "199", "135"])
    assert got == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert accuracy(["p"], ["yes"], answer=[None]) == [None]  # a row without an answer: not applicable
    assert accuracy(["p"], ["Paris."], answer=["paris"]) == [1.0]


def test_format_reward_follows_r1_and_tolerates_a_prefilled_think():
    prompts = ["<|User|>q<|Assistant|>"] * 4 + ["<|User|>q<|Assistant|><think>\n"]
    completions = [
        "<think>add them</think> 12",
        "12",  # no thinking
        "<think>add them</think>",  # no answer after it
        "<think>a<think>b</think> 12",  # nested
        "add them</think>\n12",  # R1's template opened the thinking already
        "2 + 3 = 5</think>\n76 x 3 = 21</think> 21",  # two closes (SmolLM2 learned this under GRPO)
    ]
    prompts.append(prompts[-1])
    assert format_reward(prompts, completions) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_length_reward_is_dapos_soft_overlong_penalty():
    ids = [[0] * n for n in (10, 12, 14, 16)]
    got = length(["p"] * 4, [""] * 4, completion_ids=ids, max_new_tokens=16, length_cache=4)
    assert got == [0.0, 0.0, -0.5, -1.0]


def test_user_rewards_load_only_by_name_and_fail_clearly(grpo_files, tmp_path):
    fn = load_reward(f"{grpo_files['rewards']}:low_ids")
    assert fn([""], [""], completion_ids=[[1, 100000]]) == [0.5]
    assert load_reward("math:sqrt") is math.sqrt  # module:function, importable
    with pytest.raises(UsageError, match="no such file"):
        load_reward(f"{tmp_path}/missing.py:f")
    with pytest.raises(UsageError, match="has no function 'nope'"):
        load_reward(f"{grpo_files['rewards']}:nope")
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n", encoding="utf-8")
    with pytest.raises(UsageError, match="cannot import .*ModuleNotFoundError"):
        load_reward(f"{broken}:f")


def test_reward_file_paths_in_a_config_are_taken_from_the_configs_folder(grpo_files, tmp_path):
    path = grpo_files["dir"] / "run.yaml"
    path.write_text(
        "objective: grpo\ngrpo:\n  rewards: [rewards.py:low_ids, {name: format, weight: 0.5}]\n"
        "data:\n  train: arith.jsonl\n",
        encoding="utf-8",
    )
    cfg = load_config(path)
    assert cfg.grpo.rewards[0].name == f"{grpo_files['rewards']}:low_ids"
    assert (cfg.grpo.rewards[1].name, cfg.grpo.rewards[1].weight) == ("format", 0.5)


# ----------------------------------------------------------------------------- config and data


@pytest.mark.parametrize(
    "over, message",
    [
        ({"grpo__rewards": ["acc"]}, "unknown reward 'acc'"),
        ({"train__packing": True}, "cannot pack"),
        ({"train__eval_generate": 4}, "validates the rewards of its own completions"),
        ({"grpo__max_new_tokens": 64}, "must be larger than grpo.max_new_tokens"),
        ({"train__best_metric": "rewards/accuracy"}, "choose one of .*'reward/low_ids'"),
        ({"grpo__num_generations": 1}, "num_generations"),
    ],
)
def test_bad_grpo_configs_are_refused_before_anything_is_written(grpo_files, tmp_path, over, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        make_cfg(grpo_files, tmp_path / "never", **over)
    assert not (tmp_path / "never").exists()


def test_prompt_rows_are_read_with_their_answers_and_other_fields(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "What is 2 + 3?", "answer": 5, "level": "easy"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    loaded = load_examples(path)
    assert loaded.format == "prompt"
    first, second = loaded.examples
    assert (first["answer"], first["fields"]) == ("5", {"level": "easy"})
    assert second["answer"] is None and second["prompt"][0]["role"] == "system"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "2 + 3?", "answer": [5]}, r"p.jsonl, line 2: field 'answer' is list"),
        ({"prompt": "2 + 3?", "answer": "  "}, r"p.jsonl, line 2: field 'answer' is empty"),
        ({"prompt": 7, "answer": "7"}, r"p.jsonl, line 2: .*'prompt'"),
    ],
)
def test_bad_prompt_rows_stop_with_file_line_and_field(tmp_path, row, message):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"prompt": "1 + 1?", "answer": "2"}) + "\n" + json.dumps(row), encoding="utf-8"
    )
    with pytest.raises(DataError, match=message):
        load_examples(path)


def test_accuracy_reward_needs_answers(grpo_files, tmp_path):
    path = tmp_path / "no_answers.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}"}) for i in range(8)), encoding="utf-8")
    cfg = make_cfg(grpo_files, tmp_path / "run", data__train=str(path), grpo__rewards=["accuracy"])
    with pytest.raises(DataError, match=r"no_answers.jsonl:line \d+: no 'answer' field"):
        train(cfg, console=Console(quiet=True))


# ----------------------------------------------------------------------------- training


def test_loss_sum_equals_a_hand_computation_on_a_fixed_batch(grpo_files, tmp_path):
    """The objective's loss on sampled completions equals the GRPO formula computed from full logits."""
    from dstune.train.build import build

    run = build(make_cfg(grpo_files, tmp_path / "run", method="full", grpo__loss_type="grpo"))
    obj = run.objective
    window = [run.batches.at(0)[0]]
    torch.manual_seed(0)
    batch = obj.prepare(run.model, window, run.engine)[0]
    got = obj.loss_sum(run.model, batch) / obj.units(batch)
    # By hand: per-token log-probs from the full logits, ratio exp(0) = 1, loss -A per token, the mean over
    # each completion's tokens, then over completions; the value is -mean(A) = 0 up to rounding, so also
    # compare the gradient with that of -sum_i A_i mean_t log p_it / n.
    logits = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["labels"][:, 1:] != IGNORE
    logp = logits[:, :-1].float().log_softmax(-1).gather(2, batch["labels"][:, 1:].clamp(min=0)[..., None])
    per_seq = (logp.squeeze(-1) * keep).sum(1) / keep.sum(1).clamp(min=1)
    want = -(batch["advantages"] * per_seq).sum() / len(per_seq)
    assert float(got.detach()) == pytest.approx(float(-batch["advantages"].mean()), abs=1e-6)
    head = run.model.get_output_embeddings().weight
    g_got = torch.autograd.grad(got, head)[0]
    g_want = torch.autograd.grad(want, head)[0]
    assert torch.allclose(g_got, g_want, atol=1e-7, rtol=1e-4)
    assert g_got.abs().sum() > 0  # the rewards differ within groups: there is something to learn


def test_a_step_moves_the_policy_towards_completions_with_positive_advantage(grpo_files, tmp_path):
    from dstune.train.build import build
    from dstune.train.preference import sequence_logps

    run = build(make_cfg(grpo_files, tmp_path / "run", method="full"))
    obj = run.objective
    batch = obj.prepare(run.model, [run.batches.at(0)[0]], run.engine)[0]
    inputs = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        before = sequence_logps(run.model, *inputs)[0]
    (obj.loss_sum(run.model, batch) / obj.units(batch)).backward()
    with torch.no_grad():
        for p in run.params:
            p -= 0.5 * p.grad  # plain gradient descent: first order, no optimizer state
        after = sequence_logps(run.model, *inputs)[0]
    change = after - before
    adv = batch["advantages"]
    assert float((adv * change).sum()) > 0
    assert change[adv > 0].mean() > change[adv < 0].mean()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_grpo_trains_logs_rewards_and_resumes_bitwise(grpo_files, tmp_path, method):
    over = dict(train__max_steps=4, train__save_every=2, train__eval_every=2, train__grad_accum=2)
    out = tmp_path / "a"
    full = train(make_cfg(grpo_files, out, method, **over), console=Console(quiet=True))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["split"] == "train"]
    assert len(steps) == 4 and all("reward/low_ids" in r and "reward_std" in r for r in steps)
    assert all(r["reward/low_ids/std"] >= 0 for r in steps)  # each function's spread, not only the total's
    assert all(0 < r["completion_length"] <= 8 for r in steps)
    val = [r for r in rows if r["split"] == "val"]
    assert val and val[-1]["loss"] == pytest.approx(-val[-1]["reward"])
    samples = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "completion", "answer", "rewards", "step"} <= set(samples[0])
    assert (out / "reward.png").is_file()
    shutil.rmtree(out / "checkpoints" / "step-000004")
    shutil.rmtree(out / "final")
    resumed = train(make_cfg(grpo_files, out, method, **over), resume=True, console=Console(quiet=True))
    assert resumed.train_losses == full.train_losses
    for name, p in full.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, dict(resumed.model.named_parameters())[name]), name


@pytest.mark.parametrize("method", ["lora", "full"])
def test_kl_to_the_reference_starts_at_zero(grpo_files, tmp_path, method):
    """beta > 0: the reference is the adapter disabled (LoRA) or a frozen copy (full); at the first step
    the policy equals it, so the KL estimate is 0, and it grows once the weights move."""
    cfg = make_cfg(
        grpo_files, tmp_path / "run", method, grpo__beta=0.05, train__max_steps=3, train__log_every=1
    )
    train(cfg, console=Console(quiet=True))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kl = [r["kl"] for r in rows if r["split"] == "train"]
    assert kl[0] == pytest.approx(0.0, abs=1e-6)
    assert kl[-1] > 1e-6


@pytest.mark.parametrize("loss_type", ["dr_grpo", "dapo"])
def test_loss_types_and_truncation_masking_train(grpo_files, tmp_path, loss_type):
    cfg = make_cfg(
        grpo_files,
        tmp_path / "run",
        grpo__loss_type=loss_type,
        grpo__mask_truncated=True,
        grpo__scale_rewards=False,
        train__max_steps=2,
    )
    result = train(cfg, console=Console(quiet=True))
    # A random tiny model never stops within 8 tokens: every completion is truncated, so with
    # mask_truncated nothing carries loss and the weights do not move.
    assert result.summary["val"]["truncated"] == 1.0
    assert all(loss == 0.0 for loss in result.train_losses)


def test_example_config_loads():
    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / "grpo.yaml")
    assert cfg.objective == "grpo" and cfg.data.format in ("auto", "prompt")


@pytest.mark.slow  # a minute or more on 2 CPU cores; run by CI's slow suite
def test_tune_searches_beta_group_size_and_lr_on_the_reward(grpo_files, tmp_path):
    import optuna

    from dstune.tune.study import run_tune

    cfg = make_cfg(grpo_files, tmp_path / "unused", train__max_steps=2, train__eval_every=1)
    space = {
        "grpo.beta": {"type": "categorical", "choices": [0.0, 0.04]},
        "grpo.num_generations": {"type": "categorical", "choices": [2, 4]},
        "optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
    }
    cfg = cfg.model_copy(
        update={
            "tune": cfg.tune.model_copy(
                update={
                    "output": str(tmp_path / "study"),
                    "trials": 2,
                    "sampler": "random",
                    "pruner": "none",
                    "objective": "reward/low_ids",
                    "space": space,
                }  # fmt: skip
            )
        }
    )
    cfg = RunConfig.model_validate(cfg.model_dump())
    result = run_tune(cfg, console=Console(quiet=True))
    assert result.study.direction == optuna.study.StudyDirection.MAXIMIZE
    done = [t for t in result.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2 and all(0 <= t.value <= 1 for t in done)
    best = load_config(result.study_dir / "best.yaml")
    assert (
        best.objective == "grpo" and best.grpo.num_generations == result.best.params["grpo.num_generations"]
    )


@pytest.mark.slow  # a minute or more on 2 CPU cores; run by CI's slow suite
@pytest.mark.parametrize("method", ["freeze", "qlora"])
def test_grpo_trains_with_the_other_methods(grpo_files, tmp_path, method):
    """Every method where the maths allows: freeze trains the top layers; QLoRA's 4-bit base generates
    and trains its adapter (bitsandbytes on CPU); the weights move."""
    cfg = make_cfg(grpo_files, tmp_path / "run", method, train__max_steps=2, train__eval_every=0)
    result = train(cfg, console=Console(quiet=True))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
    assert all(r["grad_norm"] > 0 for r in rows if r["split"] == "train")
    assert "reward/low_ids" in result.summary["val"]


@pytest.mark.slow  # a minute or more on 2 CPU cores; run by CI's slow suite
@pytest.mark.parametrize("family", ["tiny:deepseek-v3", "tiny:r1-distill-qwen"])
def test_grpo_on_moe_and_r1_families_renders_prompts_as_at_inference(grpo_files, tmp_path, family):
    """V3's routed experts and R1-Distill's template: the prompt ends where generation starts (R1 opens
    <think> itself, and the format reward counts it as opened), and completions stop at the end token."""
    from dstune.train.build import build

    cfg = make_cfg(grpo_files, tmp_path / "run", model__name=family, train__max_steps=2, train__eval_every=0)
    run = build(cfg)
    row = run.data.train[0]
    prompt = run.tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}],
        tokenize=False,
        add_generation_prompt=True,
        chat_template=run.template,
    )
    assert row["prompt_text"].endswith(prompt[-12:])
    assert run.tokenizer.eos_token_id in run.objective.stop_ids
    if family.startswith("tiny:r1"):
        assert row["prompt_text"].rstrip().endswith("<think>")
        assert format_reward([row["prompt_text"]], ["5 + 7 = 12</think> 12"]) == [1.0]
    result = train(cfg, console=Console(quiet=True))
    assert result.steps == 2 and "reward/low_ids" in result.summary["val"]


@pytest.mark.parametrize(
    "model,tail",
    [("tiny:deepseek-llm", "<｜Assistant｜>"), ("tiny:r1-distill-qwen", "<｜Assistant｜><think>")],
)
def test_data_inspect_shows_prompt_rows_as_generation_sees_them(grpo_files, model, tail):
    from dstune.data.inspect import inspect_file, render_inspection

    report = inspect_file(grpo_files["data"], model=model, examples=1)
    text = render_inspection(report)
    first = json.loads(grpo_files["data"].read_text(encoding="utf-8").splitlines()[0])
    assert report["format"] == "prompt" and report["examples"] == 24, report
    # The prompt as rendered for sampling (R1's template prefills <think>), its answer, and no trained token.
    assert f"line 1 prompt (answer '{first['answer']}')" in text and "0 trained" in text
    shown = text.split("line 1 prompt", 1)[1]
    assert f"{first['prompt']}{tail}" in shown and "[[" not in shown
