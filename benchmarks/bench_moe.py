"""transformers' MoE experts implementations against each other: the per-expert loop and the batched ones.

transformers 5.24 runs the fused experts of DeepSeek V2/V3 (``mlp.experts.gate_up_proj`` [experts, 2 x inner,
hidden]) through ``config._experts_implementation`` (``train.experts_implementation`` in dstune):

- ``eager``: a Python loop over the experts that received tokens, one gather and two matmuls each;
- ``batched_mm``: each (token, expert) pair gathers its expert's weights and one batched matmul runs;
- ``grouped_mm``: tokens sorted by expert, one ``torch._grouped_mm`` per projection (transformers' default
  where it can dispatch).

    .venv/bin/python benchmarks/bench_moe.py                 # CPU, fp32
    .venv/bin/python benchmarks/bench_moe.py --tokens 2048 --repeats 5

Two shapes: the whole tiny:deepseek-v3 model (4 experts, hidden 64: dominated by everything but the experts)
and one DeepSeek-V3 MoE block with 64 routed experts, top-6 routing and a quarter of DeepSeek-V2-Lite's
widths (hidden 512, expert inner 352), where the expert computation is most of the work. Each is timed
forward + backward, best of ``--repeats`` after one warm-up, and the outputs and gradients are checked
equal to the eager loop's.
"""

from __future__ import annotations

import argparse
import time

import torch

IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_tiny_model(tokens: int, repeats: int) -> dict:
    from dstune.models.load import load_model, resolve_model_dir

    torch.manual_seed(0)
    ids = torch.randint(3, 5000, (max(1, tokens // 256), 256))
    out = {}
    for impl in IMPLEMENTATIONS:
        model = load_model(resolve_model_dir("tiny:deepseek-v3"))
        model.set_experts_implementation(impl)

        def step():
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()

        out[impl] = _time(step, repeats)
    return out


def bench_moe_block(tokens: int, repeats: int) -> tuple[dict, dict]:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(hidden_size=512, moe_intermediate_size=352, n_routed_experts=64, num_experts_per_tok=6,
                           n_shared_experts=2, n_group=8, topk_group=3, intermediate_size=1408)
    torch.manual_seed(0)
    x0 = torch.randn(1, tokens, cfg.hidden_size)
    times, errors, ref = {}, {}, None
    for impl in IMPLEMENTATIONS:
        cfg._experts_implementation = impl
        torch.manual_seed(1)
        block = DeepseekV3MoE(cfg)
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.05)
        x = x0.clone().requires_grad_(True)

        def step():
            block.zero_grad(set_to_none=True)
            x.grad = None
            block(x).square().mean().backward()

        times[impl] = _time(step, repeats)
        got = (block(x).detach(), block.experts.gate_up_proj.grad.clone(), x.grad.clone())
        if ref is None:
            ref = got
        errors[impl] = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(got, ref))
    return times, errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per forward pass")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU; {args.tokens} tokens, "
          f"forward + backward, best of {args.repeats}")
    tiny = bench_tiny_model(args.tokens, args.repeats)
    block, errors = bench_moe_block(args.tokens, args.repeats)
    print(f"{'experts_implementation':<24}{'tiny:deepseek-v3 s':>20}{'64-expert block s':>20}{'max rel. diff':>16}")
    for impl in IMPLEMENTATIONS:
        print(f"{impl:<24}{tiny[impl]:>20.3f}{block[impl]:>20.3f}{errors[impl]:>16.1e}")
    for impl in IMPLEMENTATIONS[1:]:
        print(f"{impl} vs eager: tiny model {tiny['eager'] / tiny[impl]:.2f}x, 64-expert block "
              f"{block['eager'] / block[impl]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
