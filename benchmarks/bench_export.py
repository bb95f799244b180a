"""Export the demo run and prove the files: GGUF logits and identity answers, quantised safetensors
size, speed and perplexity. Figures go to docs/benchmarks.md ("Export").

    PYTHONPATH=src python benchmarks/bench_export.py /work/demo-run /work/demo-export
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from dstune.demo import carries_identity, demo_paths
from dstune.export import export_model
from dstune.export.source import load_source
from dstune.export.verify import agreement, load_with_transformers, next_token_logits
from dstune.generate import Loaded, generate_replies

GENERIC = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Explain photosynthesis simply.",
    "How do I reverse a list in Python?",
    "Give me three tips for sleeping well.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Name a famous painter.",
    "What does a CPU do?",
    "Suggest a name for a cat.",
    "How many legs does a spider have?",
    "Summarise the plot of Cinderella.",
    "What is machine learning?",
    "Tell me a fun fact.",
]


def prompt_rows(src, questions: list[str]) -> list[list[int]]:
    tok = src.tokenizer
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}],
            add_generation_prompt=True,
            tokenize=False,
            chat_template=src.chat_template,
        )
        for q in questions
    ]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def gguf_checks(run: str, out: Path, src, heldout: dict) -> dict:
    rows = prompt_rows(src, heldout["questions"] + GENERIC)  # 20 prompts
    ref = next_token_logits(src.model, rows)
    results = {}
    for quant in ("f16", "q8_0"):
        t0 = time.perf_counter()
        res = export_model(run, out / "gguf", quant=quant)
        seconds = time.perf_counter() - t0
        model = load_with_transformers(res.path)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(res.path.parent), gguf_file=res.path.name)
        loaded = Loaded(model, tok, tok.chat_template, src.family)  # the tokenizer and template in the file
        answers = generate_replies(
            loaded, [[{"role": "user", "content": q}] for q in heldout["questions"]], max_new_tokens=48
        )
        named = carries_identity(heldout)
        results[quant] = {
            **agreement(ref, next_token_logits(model, rows)),
            "size_mib": res.size_bytes / 2**20,
            "export_s": seconds,
            "identity": sum(map(named, answers)),
            "answers": answers,
        }
        print(quant, json.dumps(results[quant], ensure_ascii=False), flush=True)
    return results


@torch.no_grad()
def perplexity(model, ids: torch.Tensor) -> float:
    return math.exp(model(ids, labels=ids).loss.item())


@torch.no_grad()
def tokens_per_s(model, ids: torch.Tensor, new: int = 64) -> float:
    model.generate(ids[:, :8], max_new_tokens=4, do_sample=False)  # warm-up
    t0 = time.perf_counter()
    out = model.generate(ids[:, :32], max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return (out.shape[1] - 32) / (time.perf_counter() - t0)


def safetensors_checks(run: str, out: Path, src) -> dict:
    from transformers import AutoModelForCausalLM

    text = Path("README.md").read_text(encoding="utf-8")[:6000]  # the same English text for every model
    ids = src.tokenizer(text, return_tensors="pt")["input_ids"][:, :1024]
    plain = out / "fp32"
    if not plain.exists():
        src.model.save_pretrained(plain)
    rows = {
        "fp32": {
            "size_mib": sum(p.stat().st_size for p in plain.glob("*.safetensors")) / 2**20,
            "ppl": perplexity(src.model, ids),
            "tok_s": tokens_per_s(src.model, ids),
        }
    }
    for quant in ("int8", "nf4"):
        res = export_model(run, out / quant, fmt="safetensors", quant=quant)
        model = AutoModelForCausalLM.from_pretrained(str(res.path), device_map="cpu").eval()
        rows[quant] = {
            "size_mib": res.size_bytes / 2**20,
            "ppl": perplexity(model, ids),
            "tok_s": tokens_per_s(model, ids),
        }
    for name, row in rows.items():
        print(name, json.dumps(row), flush=True)
    return {"text_tokens": ids.shape[1], **rows}


def main() -> None:
    run, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    heldout = json.loads(Path(demo_paths()[1]).read_text(encoding="utf-8"))
    src = load_source(run)
    report = {
        "gguf": gguf_checks(run, out, src, heldout),
        "safetensors": safetensors_checks(run, out, src),
        "threads": torch.get_num_threads(),
    }
    (out / "bench_export.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
