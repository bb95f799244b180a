"""The method x family matrix: what each cell runs and checks (used by tests/test_matrix.py).

One cell = one tiny family and one method:
1. ``dstune.train.loop.train`` for 20 steps on one fixed batch; the loss must drop by the method's bar;
2. the run's ``final/`` reloaded in a fresh Python process (``dstune.generate.load_for_inference``, and
   plain peft where the format allows) gives the logits of the model that was trained;
3. ``generate`` with the KV cache equals greedy decoding by repeated full forward passes (no cache);
4. mergeable methods: ``dstune.merge.merge_run`` output has the unmerged logits (fp32, 1e-4), differs from
   the base model, and loads with plain ``transformers.AutoModelForCausalLM`` in the fresh process.

A combination that cannot work raises an explained error when the model is prepared; the cell records the
reason, and the test checks that the refusal is the expected, explained one (never a silent skip).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from dstune.config import RunConfig
from dstune.methods import MERGEABLE

FAMILIES = ["deepseek-llm", "deepseek-v2", "deepseek-v3", "r1-distill-qwen", "deepseek-v32", "deepseek-v4"]
METHODS = ["full", "freeze", "lora", "qlora", "adapter", "prefix", "ptuning", "prompt", "ia3"]

# (learning rate, loss bar: last loss < bar x first loss) per method, on a random tiny model in 20 steps.
# Measured on tiny:deepseek-llm, 2 x 16 tokens: full 12.4 -> 0.5, lora (2e-2) -> ~0.6x, adapter -> ~0.6x,
# prefix -> ~0.65x, ia3 -> ~0.7x (0.86x on V4, whose IA3 reaches only kv_proj and the shared experts),
# prompt / ptuning -> ~0.85x (a few hundred parameters, all in the input).
SETTINGS = {
    "full": (3e-3, 0.5), "freeze": (3e-3, 0.6), "lora": (3e-2, 0.8), "qlora": (3e-2, 0.8),
    "adapter": (3e-2, 0.8), "prefix": (3e-1, 0.85), "ptuning": (3e-2, 0.95), "prompt": (1.0, 0.93),
    "ia3": (3e-1, 0.9),
}
SECTIONS = {"prompt": {"virtual_tokens": 8, "init_text": None}, "adapter": {"reduction": 4},
            "freeze": {"top_layers": 1}}

# Cells that must refuse, with a phrase of the reason (asserted, and shown in docs/methods.md).
EXPECTED_UNSUPPORTED = {
    ("deepseek-v32", "prefix"): "indexer",
    ("deepseek-v4", "prefix"): "compress",
    ("deepseek-v4", "ptuning"): "hash-routed",
    ("deepseek-v4", "prompt"): "hash-routed",
}
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
IDS = [[0, 128803, 3476, 2058, 128804, 1, 885, 301], [0, 4571, 128803, 1203, 98, 128804, 44, 1]]
TEXT = ["The quick brown fox jumps over the lazy dog near the river bank.",
        "DeepSeek models use multi-head latent attention and mixture of experts."]


def selected(request, test_name: str, param: str) -> list:
    """The values of ``param`` of the ``test_name`` items this pytest session runs (after -m / -k
    deselection), so a module fixture trains only the cells that will be checked."""
    return [item.callspec.params[param] for item in request.session.items
            if getattr(item, "originalname", "") == test_name and hasattr(item, "callspec")]


def write_data(directory: Path) -> Path:
    """Two short texts: with micro-batch 2 every step sees the same fixed batch."""
    path = directory / "fixed.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in TEXT), encoding="utf-8")
    return path


def cell_config(family: str, method: str, data: Path, out: Path, extra: dict | None = None) -> RunConfig:
    """The run config of one cell; ``extra`` adds settings per section, e.g. ``{"lora": {"use_dora": True}}``."""
    lr, _ = SETTINGS[method]
    config = {
        "model": {"name": f"tiny:{family}"}, "method": method,
        "data": {"train": str(data), "format": "text", "split": [1.0, 0.0, 0.0], "max_length": 16},
        "optim": {"lr": lr, "schedule": "constant"}, **{k: dict(v) for k, v in SECTIONS.items()},
        "train": {"micro_batch_size": 2, "max_steps": 20, "progress": False, "seed": 7, "precision": "fp32"},
        "output": str(out)}
    for section, values in (extra or {}).items():
        config.setdefault(section, {}).update(values)
    return RunConfig.model_validate(config)


@torch.no_grad()
def greedy_without_cache(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding by a full forward pass over the whole sequence for every new token."""
    seq = ids
    for _ in range(n):
        logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False).logits
        seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
    return seq[:, ids.shape[1]:]


def run_cell(family: str, method: str, data: Path, work: Path, extra: dict | None = None) -> dict:
    """Trains one cell and runs the in-process checks; the fresh-process checks come later (``reload``)."""
    from dstune.train.loop import train

    row: dict = {"family": family, "method": method}
    t0 = time.perf_counter()
    try:
        result = train(cell_config(family, method, data, work / "run", extra), console=Console(quiet=True))
    except (ValueError, ImportError) as exc:  # an explained refusal; test_matrix checks it was expected
        row.update(status="unsupported", reason=str(exc).split("\n")[0])
        return row
    except Exception as exc:  # noqa: BLE001 - recorded as this cell's failure, the other cells still run
        row.update(status="error", reason=f"{type(exc).__name__}: {exc}")
        return row
    try:
        _check_in_process(row, result, family, method, work)
    except Exception as exc:  # noqa: BLE001
        row.update(status="error", reason=f"{type(exc).__name__}: {exc}")
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _check_in_process(row: dict, result, family: str, method: str, work: Path) -> None:
    from dstune.merge import merge_run
    from dstune.models.load import load_model, resolve_model_dir

    losses = result.train_losses
    model = result.model.eval()
    ids = torch.tensor(IDS)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    save_file({"logits": logits.contiguous()}, str(work / "expected.safetensors"))
    prompt = ids[:1, :6]
    with torch.no_grad():
        cached = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                do_sample=False, use_cache=True, pad_token_id=1, eos_token_id=None)
    trainable = result.summary["trainable"]
    row.update(status="trained", first_loss=losses[0], last_loss=losses[-1], bar=SETTINGS[method][1],
               generate_cached=cached[0, prompt.shape[1]:].tolist(),
               generate_no_cache=greedy_without_cache(model, prompt, 5)[0].tolist(),
               trainable=sum(v["trainable"] for v in trainable.values()),
               total=sum(v["trainable"] + v["frozen"] for v in trainable.values()))
    if method in MERGEABLE:
        merged = merge_run(work / "run", work / "merged")
        row["merged"] = merged.merged
        base = load_model(resolve_model_dir(f"tiny:{family}"), dtype=torch.float32).eval()
        with torch.no_grad():
            row["base_max_diff"] = (base(input_ids=ids).logits - logits).abs().max().item()


_RELOAD = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from dstune.generate import load_for_inference
ids = torch.tensor(json.loads(sys.argv[2]))
def reload_cell(work, out):
    with torch.no_grad():
        m = load_for_inference(str(work / "run")).model
        out["reloaded"] = m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().contiguous()
        final = work / "run" / "final"
        cfg = json.loads((final / "adapter_config.json").read_text()) if (final / "adapter_config.json").exists() else {}
        if cfg.get("peft_type") in ("LORA", "IA3") and not json.loads((work / "run" / "run.json").read_text())["method"] == "qlora":
            from peft import PeftModel
            from transformers import AutoModelForCausalLM
            base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32)
            plain = PeftModel.from_pretrained(base, str(final)).eval()
            out["plain_peft"] = plain(input_ids=ids).logits.float().contiguous()
        if (work / "merged" / "config.json").exists():
            from transformers import AutoModelForCausalLM
            merged = AutoModelForCausalLM.from_pretrained(str(work / "merged"), dtype=torch.float32).eval()
            out["merged_plain_transformers"] = merged(input_ids=ids).logits.float().contiguous()


import traceback
for work in json.loads(sys.argv[1]):
    work = Path(work)
    out = {}
    try:
        reload_cell(work, out)
    except Exception:
        (work / "reload_error.txt").write_text(traceback.format_exc())
    if out:
        save_file(out, str(work / "reloaded.safetensors"))
"""


def reload_in_fresh_process(works: list[Path]) -> None:
    """Reloads every trained cell in one new Python process and writes its logits next to the cell."""
    if not works:
        return
    subprocess.run([sys.executable, "-c", _RELOAD, json.dumps([str(w) for w in works]), json.dumps(IDS)],
                   check=True, timeout=1800)


def reloaded_logits(work: Path) -> dict[str, torch.Tensor]:
    """The fresh process's logits for a cell, and the in-process ones as ``expected``."""
    if (work / "reload_error.txt").exists():
        raise RuntimeError("reloading in a fresh process failed:\n" + (work / "reload_error.txt").read_text())
    out = load_file(str(work / "reloaded.safetensors"))
    out["expected"] = load_file(str(work / "expected.safetensors"))["logits"]
    return out


def check_trained(row: dict, work: Path) -> list[str]:
    """What is wrong with one trained cell (empty when every check passes)."""
    out = []
    if not row["last_loss"] < row["bar"] * row["first_loss"]:
        out.append(f"loss {row['first_loss']:.3f} -> {row['last_loss']:.3f}, bar {row['bar']}x")
    if row["generate_cached"] != row["generate_no_cache"]:
        out.append(f"generate with cache {row['generate_cached']} != greedy without {row['generate_no_cache']}")
    logits = reloaded_logits(work)
    expected = logits["expected"]
    # Reloading is exact (0.0) except where PiSSA rebuilds its residual base weight: fp32 round-off, up to
    # 1.1e-5 on an AMD EPYC (under 1e-5 on Intel). A missing or wrong adapter moves logits by far more.
    for key, atol in (("reloaded", 5e-5), ("plain_peft", 5e-5), ("merged_plain_transformers", 1e-4)):
        if key in logits:
            diff = (logits[key] - expected).abs().max().item()
            row[f"{key}_max_diff"] = diff
            if diff > atol:
                out.append(f"{key} logits differ by {diff:.2e} (> {atol})")
    if row["method"] in MERGEABLE:
        if "merged_plain_transformers" not in logits:
            out.append("merged checkpoint missing")
        if row["base_max_diff"] < 1e-3:
            out.append(f"trained model equals the base model (max diff {row['base_max_diff']:.1e})")
    return out
