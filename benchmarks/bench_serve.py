"""Load test of ``dstune serve``: N concurrent clients against the server on loopback, next to a plain loop.

    .venv/bin/python benchmarks/bench_serve.py --model /work/demo-run          # the recorded run
    .venv/bin/python benchmarks/bench_serve.py --model tiny:deepseek-llm --duration 10 --clients 4  # smoke

1. ``dstune serve MODEL`` starts as a subprocess on a free loopback port (``--max-queue``, ``--timeout``).
2. ``--clients`` threads send chat completions (greedy, ``--max-tokens``, the held-out identity questions
   in turn) for ``--duration`` seconds; a 429 is counted and the client waits what Retry-After says (1 s,
   or ``--retry-wait``) before its next request; any other answer or a broken connection counts as lost. Requests still in flight when time is up
   are waited for, so every request sent is accounted for: ok + 429 + lost = sent.
3. The server stops; the same prompts then go through a plain transformers ``generate`` loop in this
   process (``dstune.generate.load_for_inference``, batch 1, greedy) for the same duration.
Reported: p50/p95 latency of answered requests, generated tokens/s, and the load average before and after.
Results go to ``benchmarks/results/serve_<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def _questions() -> list[str]:
    from dstune.demo import demo_paths

    return json.loads(demo_paths()[1].read_text(encoding="utf-8"))["questions"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(model: str, port: int, max_queue: int, timeout: float) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "dstune.cli",
        "serve",
        model,
        "--port",
        str(port),
        "--max-queue",
        str(max_queue),
        "--timeout",
        str(timeout),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start within 600 s")


def _client(url, model, questions, max_tokens, stop_at, offset, log, lock, retry_wait) -> None:
    with httpx.Client(base_url=url, timeout=600) as http:
        i = offset
        while time.monotonic() < stop_at:
            body = {
                "model": model,
                "max_tokens": max_tokens,
                "temperature": 0,
                "messages": [{"role": "user", "content": questions[i % len(questions)]}],
            }
            i += 1
            t0 = time.monotonic()
            wait = retry_wait
            try:
                response = http.post("/v1/chat/completions", json=body)
                status = response.status_code
                tokens = response.json()["usage"]["completion_tokens"] if status == 200 else 0
                if wait is None:  # as the openai client does: wait what the server's Retry-After says
                    wait = float(response.headers.get("retry-after", 1))
            except (httpx.HTTPError, ValueError, KeyError):
                status, tokens = -1, 0
            with lock:
                log.append(
                    {
                        "status": status,
                        "latency": time.monotonic() - t0,
                        "tokens": tokens,
                        "end": time.monotonic(),
                    }
                )
            if status == 429:
                time.sleep(wait or 0)


def bench_server(model, clients, duration, max_tokens, max_queue, retry_wait=None) -> dict:
    proc, url = _start_server(model, _free_port(), max_queue, timeout=600)
    try:
        served = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        questions, log, lock = _questions(), [], threading.Lock()
        t0 = time.monotonic()
        threads = [
            threading.Thread(
                target=_client,
                args=(url, served, questions, max_tokens, t0 + duration, k, log, lock, retry_wait),
            )
            for k in range(clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        health = httpx.get(f"{url}/health").json()
    finally:
        proc.terminate()
        proc.wait(60)
    ok = [r for r in log if r["status"] == 200]
    wall = max(r["end"] for r in log) - t0
    return {
        "sent": len(log),
        "ok": len(ok),
        "rejected_429": sum(r["status"] == 429 for r in log),
        "lost": sum(r["status"] not in (200, 429) for r in log),
        "server_jobs": health["served"],
        **_latency(ok),
        "tokens": sum(r["tokens"] for r in ok),
        "wall_s": round(wall, 1),
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 2),
    }


def bench_loop(model, duration, max_tokens) -> dict:
    """The same prompts, one at a time, through ``generate`` in this process."""
    import torch

    from dstune.core.facts import pad_id
    from dstune.generate import load_for_inference

    loaded, questions, log = load_for_inference(model), _questions(), []
    tok = loaded.tokenizer
    t0 = time.monotonic()
    while time.monotonic() < t0 + duration:
        q = questions[len(log) % len(questions)]
        start = time.monotonic()
        text = tok.apply_chat_template(
            [{"role": "user", "content": q}],
            add_generation_prompt=True,
            tokenize=False,
            chat_template=loaded.chat_template,
        )
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = loaded.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_tokens,
                eos_token_id=tok.eos_token_id,
                pad_token_id=pad_id(tok),
            )
        log.append({"latency": time.monotonic() - start, "tokens": out.shape[1] - ids.shape[1]})
    wall = time.monotonic() - t0
    return {
        "requests": len(log),
        **_latency(log),
        "tokens": sum(r["tokens"] for r in log),
        "wall_s": round(wall, 1),
        "tokens_per_s": round(sum(r["tokens"] for r in log) / wall, 2),
    }


def _latency(rows: list[dict]) -> dict:
    if not rows:
        return {"p50_s": None, "p95_s": None}
    lat = sorted(r["latency"] for r in rows)
    p95 = statistics.quantiles(lat, n=20)[-1] if len(lat) > 1 else lat[0]
    return {"p50_s": round(statistics.median(lat), 2), "p95_s": round(p95, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = "/work/demo-run" if Path("/work/demo-run/final").is_dir() else "smollm2"
    parser.add_argument("--model", default=default, help="run directory or model spec to serve")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load, and of the plain loop")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-queue", type=int, default=8, help="the server's --max-queue")
    parser.add_argument(
        "--retry-wait", type=float, help="seconds a client waits after a 429; default: the Retry-After header"
    )
    parser.add_argument("--result", help="where the JSON goes; default benchmarks/results/serve_<model>.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    server = bench_server(
        args.model, args.clients, args.duration, args.max_tokens, args.max_queue, args.retry_wait
    )
    load_mid = os.getloadavg()
    loop = bench_loop(args.model, args.duration, args.max_tokens)
    result = {
        "model": args.model,
        "clients": args.clients,
        "duration_s": args.duration,
        "max_tokens": args.max_tokens,
        "max_queue": args.max_queue,
        "retry_wait": args.retry_wait,
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after_server": load_mid,
        "loadavg_after_loop": os.getloadavg(),
        "server": server,
        "plain_generate_loop": loop,
    }
    name = Path(args.model).name.replace(":", "_")
    out = Path(args.result) if args.result else ROOT / "benchmarks" / "results" / f"serve_{name}.json"
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(result, indent=2))
    assert server["lost"] == 0, "requests were lost"
    assert server["ok"] + server["rejected_429"] == server["sent"]


if __name__ == "__main__":
    main()
