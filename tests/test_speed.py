"""Speed features that must not change the maths: packing and the chunked output layer."""

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from dstune.core.collate import collate
from dstune.core.forward import loss_sum, model_inputs
from dstune.data.pack import pack_rows, padding_share
from dstune.models.load import load_model, resolve_model_dir

FAMILIES = ["deepseek-llm", "deepseek-v2", "deepseek-v3", "r1-distill-qwen"]


def _rows(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(4, 20, (1,), generator=g))
        ids = torch.randint(3, 5000, (length,), generator=g).tolist()
        labels = [-100] * (length // 3) + ids[length // 3:]
        rows.append({"input_ids": ids, "labels": labels, "source": f"f:{i}"})
    return rows


def test_pack_rows_keeps_every_example_once_and_masks_boundaries():
    rows = _rows(20)
    packed = pack_rows(rows, max_length=40, seed=3)
    assert all(len(p["input_ids"]) <= 40 for p in packed)
    sources = [s for p in packed for s in p["source"].split("+")]
    assert sorted(sources) == sorted(r["source"] for r in rows)
    for p in packed:  # position ids restart at 0 where each example starts, and its first label is masked
        starts = [i for i, pos in enumerate(p["position_ids"]) if pos == 0]
        assert all(p["labels"][i] == -100 for i in starts)
    assert pack_rows(rows, 40, seed=3) == packed
    assert len(packed) < len(rows)


def test_packing_removes_padding():
    rows = _rows(40)
    assert padding_share(rows, 8) > 0.2
    packed = pack_rows(rows, 64, seed=0)
    batch = collate(packed[:4], pad_id=1)
    real = sum(len(p["input_ids"]) for p in packed[:4])
    assert real / batch["input_ids"].numel() > 0.85


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_logits_and_loss_equal_unpacked(family):
    model = load_model(resolve_model_dir(f"tiny:{family}"), dtype=torch.float32).eval()
    rows = _rows(5, seed=1)
    packed = pack_rows(rows, max_length=64, seed=0)
    batch = collate(packed, pad_id=1)
    with torch.no_grad():
        packed_logits = model(**model_inputs(batch)).logits
        packed_loss = loss_sum(model, batch)
        unpacked_loss = sum(loss_sum(model, collate([r], pad_id=1)) for r in rows)
        by_source = {r["source"]: r for r in rows}
        for b, p in enumerate(packed):
            offset = 0
            for src in p["source"].split("+"):
                r = by_source[src]
                n = len(r["input_ids"])
                alone = model(input_ids=torch.tensor([r["input_ids"]])).logits[0]
                torch.testing.assert_close(packed_logits[b, offset:offset + n], alone, rtol=1e-4, atol=1e-4)
                offset += n
    # Unpacked, an example's first label is never predicted either (the causal shift drops it).
    torch.testing.assert_close(packed_loss, unpacked_loss, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_output_layer_equals_full_logits(family):
    model = load_model(resolve_model_dir(f"tiny:{family}"), dtype=torch.float32)
    batch = collate(_rows(4, seed=2), pad_id=1)
    full = loss_sum(model, batch, label_smoothing=0.1)
    full.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    chunked = loss_sum(model, batch, label_smoothing=0.1, chunk_tokens=5)
    chunked.backward()
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        # Summation order differs: compare by relative norm. Measured ~1e-6 on Intel Xeon, up to 2.2e-5
        # for the final norm's weight (a sum over every token) on AMD EPYC; a wrong chunk is off by O(1).
        if p.grad is not None:
            rel = (p.grad - grads[n]).norm() / grads[n].norm().clamp(min=1e-12)
            assert rel < 1e-4, f"{n}: relative gradient difference {rel:.2e}"


def test_training_with_packing_and_chunked_output_layer(tmp_path):
    from test_train import make_cfg

    from dstune.train.loop import train

    rows = json.loads((Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_zh_demo.json")
                      .read_text(encoding="utf-8"))[:24]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    plain = train(make_cfg(data, tmp_path / "plain", train__max_steps=3, train__chunk_tokens=0))
    chunked = train(make_cfg(data, tmp_path / "chunked", train__max_steps=3, train__chunk_tokens=32))
    # The same batches, the output layer in chunks: the same losses up to summation order.
    torch.testing.assert_close(torch.tensor(chunked.train_losses), torch.tensor(plain.train_losses),
                               rtol=1e-5, atol=1e-5)
    packed = train(make_cfg(data, tmp_path / "packed", train__max_steps=8, train__packing=True,
                            train__chunk_tokens=32, data__max_length=256, optim__lr=2e-2))
    report = packed.summary["data"]
    assert report["packed"]["padding_share"] < report["padding_share"]
    assert packed.train_losses[-1] < packed.train_losses[0]


def _lora_model(family: str, lora: dict):
    from dstune.config import RunConfig
    from dstune.methods import prepare_model

    cfg = RunConfig.model_validate({"model": {"name": f"tiny:{family}"}, "data": {"train": "x.jsonl"},
                                    "method": "lora", "lora": {"r": 4, "targets": "attention", **lora}})
    torch.manual_seed(0)
    model = prepare_model(load_model(resolve_model_dir(cfg.model.name).path, dtype=torch.float32), cfg)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would hide a wrong update
            p.data.normal_(0, 0.05)
    return model


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = loss_sum(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@contextmanager
def _peft_fallbacks():
    """Counts the calls of peft's own ``lora.Linear.forward``, which ``LeanLinear`` falls back to."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    calls, base_forward = [], PeftLinear.forward

    def counted(self, *a, **k):
        calls.append(1)
        return base_forward(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PeftLinear, "forward", counted)
        yield calls


@pytest.mark.parametrize("family,lora", [("deepseek-llm", {"dropout": 0.0}), ("deepseek-v3", {"dropout": 0.0}),
                                         ("deepseek-llm", {"use_dora": True})])
def test_lean_lora_forward_equals_peft_in_loss_and_gradients(family, lora):
    from peft.tuners.lora.layer import Linear as PeftLinear

    from dstune.methods.lora_fast import LeanLinear

    model = _lora_model(family, lora)
    lean = [m for m in model.modules() if isinstance(m, PeftLinear)]
    assert lean and all(type(m) is LeanLinear for m in lean)
    batch = collate(_rows(4), pad_id=0)
    with _peft_fallbacks() as calls:
        got_loss, got = _loss_and_grads(model, batch)
    # The plain case takes the lean path; DoRA (a peft variant) is peft's own forward in every layer.
    assert len(calls) == (len(lean) if lora.get("use_dora") else 0)
    for m in lean:
        m.__class__ = PeftLinear
    want_loss, want = _loss_and_grads(model, batch)
    assert got.keys() == want.keys() and any("lora_A" in n for n in got)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-5)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)


def test_lean_lora_under_bf16_autocast_takes_the_lean_path_and_equals_peft():
    from peft.tuners.lora.layer import Linear as PeftLinear

    from dstune.train.build import cast_frozen

    model = _lora_model("deepseek-llm", {"dropout": 0.0})
    cast_frozen(model, "bf16")  # as a bf16 run keeps its frozen weights; the adapter stays fp32
    batch = collate(_rows(4), pad_id=0)
    with _peft_fallbacks() as calls, torch.autocast("cpu", dtype=torch.bfloat16):
        got_loss, got = _loss_and_grads(model, batch)
    assert not calls  # bf16 activations into fp32 adapters: still the lean path
    lean = [m for m in model.modules() if isinstance(m, PeftLinear)]
    for m in lean:
        m.__class__ = PeftLinear
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, want = _loss_and_grads(model, batch)
    assert {g.dtype for g in got.values()} == {torch.float32} and got.keys() == want.keys()
    # bf16 rounds the scaled rank-r intermediate where peft rounds the scaled update: bf16's tolerance.
    torch.testing.assert_close(got_loss, want_loss, rtol=2e-3, atol=0)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0.05, atol=0.02 * want[n].abs().max().item(), msg=n)


def test_lean_lora_defers_to_peft_when_the_adapter_is_disabled_or_merged():
    model = _lora_model("deepseek-llm", {})
    batch = collate(_rows(3), pad_id=0)
    with torch.no_grad():
        with_adapter = loss_sum(model, batch)
        with model.disable_adapter():
            without = loss_sum(model, batch)
        base = _lora_model("deepseek-llm", {}).get_base_model()
        for m in base.modules():  # the base weights alone: the same model with the adapter's B zeroed
            if hasattr(m, "lora_B"):
                m.lora_B["default"].weight.zero_()
        torch.testing.assert_close(without, loss_sum(base, batch))
        model.merge_adapter()
        torch.testing.assert_close(loss_sum(model, batch), with_adapter, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_adapter, without)
