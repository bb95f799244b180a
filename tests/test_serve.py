"""`dstune serve`: the OpenAI-compatible API on a real uvicorn server on loopback, on tiny models.

Every route streamed and not; adapters picked by the request's model answer as each run does alone (and
unlike the base); R1 reasoning comes apart; stop sequences, seeds, usage and finish reasons; each bad
request gets OpenAI's error shape and status and the server answers a good request afterwards; a full
queue gives 429, a missing key 401, a slow request 504; a client that leaves mid-stream stops generation.
The official openai client is used against the server too; the slow test serves the demo run.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from _matrix import cell_config, write_data
from typer.testing import CliRunner

from dstune.cli import app as cli_app
from dstune.errors import UsageError
from dstune.generate import Loaded, generate_reply, load_for_inference
from dstune.serve.app import create_app
from dstune.serve.host import load_host

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

BASE = "tiny:deepseek-llm"
HI = [{"role": "user", "content": "Who are you?"}]


@contextlib.contextmanager
def serving(app):
    """Runs ``app`` on a real uvicorn server on a free loopback port, in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 5-step LoRA runs on tiny DeepSeek-LLM, with different seeds and learning rates."""
    from rich.console import Console

    from dstune.train.loop import train

    root = tmp_path_factory.mktemp("serve")
    data = write_data(root)
    out = {}
    for name, seed, lr in (("alpha", 1, 3e-2), ("beta", 2, 5e-2)):
        cfg = cell_config(
            "deepseek-llm",
            "lora",
            data,
            root / name,
            {"train": {"max_steps": 5, "seed": seed}, "optim": {"lr": lr}},
        )
        out[name] = train(cfg, console=Console(quiet=True)).run_dir
    return out


@pytest.fixture(scope="module")
def host(runs):
    return load_host(str(runs["alpha"]), [("beta", str(runs["beta"]))])


@pytest.fixture(scope="module")
def url(host):
    with serving(create_app(host, max_queue=1, timeout=120)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


def chat(client, model="alpha", **fields):
    body = {"model": model, "messages": HI, "max_tokens": 6, "temperature": 0, **fields}
    return client.post("/v1/chat/completions", json=body)


def events(response) -> list:
    """The JSON payloads of a server-sent event stream, up to ``[DONE]`` (asserted to be last)."""
    lines = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", lines[-3:]
    return [json.loads(line) for line in lines[:-1]]


def stream_chat(client, model="alpha", **fields) -> list:
    body = {"model": model, "messages": HI, "max_tokens": 6, "temperature": 0, "stream": True, **fields}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/event-stream"
        )
        return events(response)


def delta_text(chunks, key="content") -> str:
    return "".join(c["choices"][0]["delta"].get(key) or "" for c in chunks if c["choices"])


def assert_openai_error(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error


# --------------------------------------------------------------------------- routes


def test_models_lists_the_run_each_adapter_and_the_base(client, runs):
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == [runs["alpha"].name, "beta", BASE]
    assert all(m["object"] == "model" and m["owned_by"] == "dstune" for m in data["data"])


def test_chat_answers_like_the_run_alone_streamed_or_not(client, runs):
    whole = chat(client, runs["alpha"].name).json()
    assert whole["object"] == "chat.completion" and whole["id"].startswith("chatcmpl-")
    choice = whole["choices"][0]
    assert choice["message"]["role"] == "assistant" and "reasoning_content" not in choice["message"]
    alone = generate_reply(load_for_inference(str(runs["alpha"])), HI, max_new_tokens=6)
    assert choice["message"]["content"].strip() == alone
    usage = whole["usage"]
    assert usage["completion_tokens"] == 6 and choice["finish_reason"] == "length"
    assert usage["total_tokens"] == usage["prompt_tokens"] + 6 and usage["prompt_tokens"] > 3

    chunks = stream_chat(client, runs["alpha"].name, stream_options={"include_usage": True})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert delta_text(chunks) == choice["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"] == usage


def test_completions_continue_raw_text_streamed_or_not(client):
    body = {"model": "alpha", "prompt": "The quick brown fox", "max_tokens": 5, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json()
    assert whole["object"] == "text_completion" and whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == 5
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        chunks = events(response)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_adapters_picked_by_model_answer_as_each_run_alone_and_unlike_the_base(client, runs):
    served = {
        m: chat(client, m, max_tokens=8).json()["choices"][0]["message"]["content"].strip()
        for m in ("alpha", "beta", BASE)
    }
    assert len(set(served.values())) == 3, served
    alone = {"beta": str(runs["beta"]), BASE: BASE}
    for model, target in alone.items():
        assert served[model] == generate_reply(load_for_inference(target), HI, max_new_tokens=8), model
    # switching back and forth leaves no adapter behind
    assert (
        chat(client, "alpha", max_tokens=8).json()["choices"][0]["message"]["content"].strip()
        == served["alpha"]
    )


def test_adapters_on_a_bare_base_model_spec(runs):
    """``dstune serve tiny:deepseek-llm --adapter alpha=RUN --adapter beta=RUN``: the spec is the base."""
    bare = load_host(BASE, [("alpha", str(runs["alpha"])), ("beta", str(runs["beta"]))])
    assert list(bare.adapters) == [BASE, "alpha", "beta"]
    with serving(create_app(bare)) as base, httpx.Client(base_url=base, timeout=60) as c:
        served = {
            m: chat(c, m, max_tokens=8).json()["choices"][0]["message"]["content"].strip()
            for m in bare.adapters
        }
    for model, target in {BASE: BASE, "alpha": str(runs["alpha"]), "beta": str(runs["beta"])}.items():
        assert served[model] == generate_reply(load_for_inference(target), HI, max_new_tokens=8), model


def test_stop_sequence_cuts_the_reply_where_it_first_appears(client):
    body = {"model": "alpha", "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0}
    full = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    expected = full[: full.find(stop)]
    cut = client.post("/v1/completions", json={**body, "stop": [stop, "never-there"]}).json()
    assert cut["choices"][0]["text"] == expected and cut["choices"][0]["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] < 12
    with client.stream("POST", "/v1/completions", json={**body, "stop": stop, "stream": True}) as response:
        chunks = events(response)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_seed_reproduces_a_sampled_reply(client):
    sampled = {"temperature": 1.0, "top_p": 0.95, "max_tokens": 8}
    first = chat(client, seed=123, **sampled).json()["choices"][0]["message"]["content"]
    assert chat(client, seed=123, **sampled).json()["choices"][0]["message"]["content"] == first
    assert delta_text(stream_chat(client, seed=123, **sampled)) == first
    assert chat(client, seed=124, **sampled).json()["choices"][0]["message"]["content"] != first


# --------------------------------------------------------------------------- bad requests

LONG = "word " * 3000  # more tokens than tiny models' 2048 positions
BAD = {
    "malformed JSON": ('{"model": "alpha", "messages": [', 400, None),
    "not an object": ("[1, 2]", 400, None),
    "unknown model": ({"model": "gpt-4"}, 404, "model"),
    "negative max_tokens": ({"max_tokens": -5}, 400, "max_tokens"),
    "temperature above 2": ({"temperature": 3.5}, 400, "temperature"),
    "top_p of 0": ({"top_p": 0}, 400, "top_p"),
    "n above 1": ({"n": 2}, 400, "n"),
    "no messages": ({"messages": []}, 400, "messages"),
    "unknown role": ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
    "five stops": ({"stop": list("abcde")}, 400, "stop"),
    "prompt longer than the context": ({"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    "prompt + max_tokens over the context": ({"max_tokens": 2045}, 400, "messages"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_request_gets_an_openai_error_and_the_server_keeps_serving(client, case):
    body, status, param = BAD[case]
    if isinstance(body, str):
        response = client.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    else:
        response = chat(client, **body)
    error = assert_openai_error(response, status, param)
    if "context" in case:
        assert error["code"] == "context_length_exceeded" and "2048" in error["message"], error
        assert any(ch.isdigit() for ch in error["message"].split("2048", 1)[1]), error  # names the lengths
    if case == "malformed JSON":
        assert "JSON" in error["message"]
    if case == "unknown model":
        assert error["code"] == "model_not_found" and "alpha" in error["message"]
    assert chat(client, max_tokens=1).status_code == 200


def test_unknown_routes_and_methods_answer_in_openai_shape(client):
    assert_openai_error(client.get("/v1/nothing"), 404)
    assert_openai_error(client.get("/v1/chat/completions"), 405)


def test_a_client_leaving_mid_stream_stops_generation_and_the_server_goes_on(client, url):
    before = client.get("/health").json()
    body = {"model": "alpha", "messages": HI, "max_tokens": 2000, "temperature": 0, "stream": True}
    with (
        httpx.Client(base_url=url, timeout=60) as other,
        other.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        assert sum(1 for _, line in zip(range(6), lines) if line.startswith("data: ")) >= 2
    t0 = time.monotonic()
    while (after := client.get("/health").json())["served"] == before["served"] or after["busy"]:
        assert time.monotonic() - t0 < 60, "generation went on after the client left"
        time.sleep(0.05)
    assert after["tokens"] - before["tokens"] < 1000, after  # stopped long before its 2000 tokens
    assert chat(client, max_tokens=1).status_code == 200


def test_a_full_queue_answers_429_at_once_and_the_queued_request_is_served(client, url):
    long = {"model": "alpha", "messages": HI, "max_tokens": 1500, "temperature": 0, "stream": True}
    queued: dict = {}
    with (
        httpx.Client(base_url=url, timeout=120) as busy,
        busy.stream("POST", "/v1/chat/completions", json=long) as running,
    ):
        lines = running.iter_lines()  # kept open: a closed iterator would close the connection
        while not next(lines).startswith("data: "):  # generating now
            pass
        waiter = threading.Thread(
            target=lambda: queued.update(r=chat(httpx.Client(base_url=url, timeout=120)))
        )
        waiter.start()
        deadline = time.monotonic() + 20
        while client.get("/health").json()["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        t0 = time.monotonic()
        refused = chat(client)
        assert time.monotonic() - t0 < 2
        error = assert_openai_error(refused, 429)
        assert error["code"] == "rate_limit_exceeded" and refused.headers["retry-after"]
    waiter.join(60)  # the long stream was dropped: the queued request runs and is answered
    assert queued["r"].status_code == 200 and queued["r"].json()["usage"]["completion_tokens"] == 6


def test_an_api_key_is_required_when_set(host):
    with serving(create_app(host, api_key="s3cret")) as base, httpx.Client(base_url=base, timeout=60) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            error = assert_openai_error(c.get("/v1/models", headers=headers), 401)
            assert error["code"] == "invalid_api_key"
            assert_openai_error(c.post("/v1/chat/completions", json={}, headers=headers), 401)
        good = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=good).status_code == 200
        assert (
            c.post(
                "/v1/chat/completions", headers=good, json={"model": "alpha", "messages": HI, "max_tokens": 1}
            ).status_code
            == 200
        )


def test_a_request_over_the_timeout_gets_504_and_the_next_is_served(host):
    with serving(create_app(host, timeout=1.5)) as base, httpx.Client(base_url=base, timeout=60) as c:
        t0 = time.monotonic()
        error = assert_openai_error(chat(c, max_tokens=1500), 504)
        assert error["code"] == "timeout" and time.monotonic() - t0 < 10
        body = {"model": "alpha", "messages": HI, "max_tokens": 1500, "temperature": 0, "stream": True}
        with c.stream(
            "POST", "/v1/chat/completions", json=body
        ) as response:  # started: the error is an event
            last = [line for line in response.iter_lines() if line.startswith("data: ")][-1]
        assert json.loads(last[len("data: ") :])["error"]["code"] == "timeout"
        assert chat(c, max_tokens=1).status_code == 200


# --------------------------------------------------------------------------- R1 reasoning


@pytest.fixture(scope="module")
def r1():
    return load_host("tiny:r1-distill-qwen")


def test_r1_reasoning_comes_apart_from_the_answer(r1):
    """R1's prompt opens <think>: a random tiny model never closes it, so the whole reply is reasoning."""
    model = "tiny:r1-distill-qwen"
    with serving(create_app(r1)) as base, httpx.Client(base_url=base, timeout=60) as c:
        message = chat(c, model).json()["choices"][0]["message"]
        chunks = stream_chat(c, model)
    alone = generate_reply(r1.loaded, HI, max_new_tokens=6)
    assert message["reasoning_content"] == alone and message["content"] == ""
    assert delta_text(chunks, "reasoning_content") == alone and delta_text(chunks) == ""


def test_the_openai_client_reads_r1_reasoning_apart(r1):
    openai = pytest.importorskip("openai")
    model = "tiny:r1-distill-qwen"
    with serving(create_app(r1)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        ask = dict(model=model, messages=HI, max_tokens=6, temperature=0)
        message = client.chat.completions.create(**ask).choices[0].message
        chunks = list(client.chat.completions.create(**ask, stream=True))
    assert message.reasoning_content == generate_reply(r1.loaded, HI, max_new_tokens=6)  # an extra field
    streamed = "".join(
        getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices
    )
    assert streamed == message.reasoning_content and not message.content


def test_streamed_think_tags_split_across_pieces_become_reasoning_and_content_deltas():
    import asyncio

    from dstune.serve.app import _stream
    from dstune.serve.sse import Reply
    from dstune.serve.worker import Job

    async def run():
        job = Job("m", [], None, 8, 0.0, 1.0, None, [], time.monotonic() + 9, asyncio.get_running_loop())
        for piece in ["Let me th", "ink.</th", "ink>\n\nIt is", " 4."]:
            job.events.put_nowait(("text", piece))
        job.events.put_nowait(("end", {"finish_reason": "stop", "completion_tokens": 9}))
        return [
            c
            async for c in _stream(job, Reply("m", chat=True), {"thinking": True, "prompt_tokens": 3}, False)
        ]

    chunks = [json.loads(e[len("data: ") :]) for e in asyncio.run(run())[:-1]]
    assert delta_text(chunks, "reasoning_content") == "Let me think." and delta_text(chunks) == "It is 4."
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


# --------------------------------------------------------------------------- the openai client


def test_the_official_openai_client_streamed_and_not(url, runs):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()][1:] == ["beta", BASE]
    reply = client.chat.completions.create(model="beta", messages=HI, max_tokens=6, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6
    stream = client.chat.completions.create(
        model="beta", messages=HI, max_tokens=6, temperature=0, stream=True
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        == reply.choices[0].message.content
    )
    text = client.completions.create(model="alpha", prompt="Hello", max_tokens=4, temperature=0)
    assert text.usage.completion_tokens == 4
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HI)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="beta", messages=HI, max_tokens=-1)


# --------------------------------------------------------------------------- startup refusals (CLI)


def test_a_classification_run_is_refused_at_startup(monkeypatch):
    import dstune.serve.host as host_module

    classifier = Loaded(model=None, tokenizer=None, chat_template="", family="llama", labels=["neg", "pos"])
    monkeypatch.setattr(host_module, "load_for_inference", lambda target: classifier)
    with pytest.raises(UsageError, match="is a classifier"):
        load_host("runs/sentiment")


def test_an_adapter_trained_on_another_base_is_refused(runs):
    with pytest.raises(UsageError, match="not on the served base"):
        load_host("tiny:r1-distill-qwen", [("alpha", str(runs["alpha"]))])


def test_cli_refusals_name_the_fix(runs):
    res = CliRunner().invoke(cli_app, ["serve", BASE, "--engine", "vllm"])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "needs vLLM and a CUDA GPU" in text and "leave out --engine" in text, text
    res = CliRunner().invoke(cli_app, ["serve", BASE, "--adapter", "no-equals-sign"])
    assert res.exit_code == 2 and "expected NAME=RUN" in " ".join(res.output.split())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        res = CliRunner().invoke(cli_app, ["serve", BASE, "--port", str(taken.getsockname()[1])])
    assert res.exit_code == 2 and "pick another --port" in " ".join(res.output.split()), res.output


def test_vllm_gets_the_base_and_each_lora_by_name(runs):
    from dstune.serve.vllm import vllm_argv

    argv = vllm_argv(str(runs["alpha"]), [("beta", str(runs["beta"]))], host="127.0.0.1", port=9, api_key="k")
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and "--enable-lora" in argv
    at = argv.index("--lora-modules")
    assert argv[at + 1 :] == [
        f"{runs['alpha'].name}={runs['alpha'] / 'final'}",
        f"beta={runs['beta'] / 'final'}",
    ]
    assert (
        argv[argv.index("--model") + 1] == json.loads((runs["alpha"] / "run.json").read_text())["base_model"]
    )


def test_binding_beyond_loopback_without_a_key_warns(monkeypatch):
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    res = CliRunner().invoke(cli_app, ["serve", BASE, "--host", "0.0.0.0", "--port", port])
    text = " ".join(res.output.split())
    assert res.exit_code == 0 and "warning:" in text and "without an API key" in text, text
    res = CliRunner().invoke(cli_app, ["serve", BASE, "--port", port])
    assert res.exit_code == 0 and "warning" not in res.output and "serving tiny:deepseek-llm" in res.output


# --------------------------------------------------------------------------- the demo run, served


DEMO = Path("/work/demo-run")


@pytest.mark.slow
def test_the_served_demo_run_answers_held_out_identity_questions_with_its_new_name():
    openai = pytest.importorskip("openai")
    from dstune.demo import carries_identity, demo_paths

    run = Path(__import__("os").environ.get("DSTUNE_DEMO_RUN", DEMO))
    if not (run / "final").is_dir():
        pytest.skip(f"no finished demo run at {run} (make one with: dstune demo --out {run})")
    heldout = json.loads(demo_paths()[1].read_text(encoding="utf-8"))
    named = carries_identity(heldout)
    with serving(create_app(load_host(str(run)))) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        whole, streamed = [], []
        for q in heldout["questions"]:
            ask = dict(
                model=run.name, messages=[{"role": "user", "content": q}], max_tokens=48, temperature=0
            )
            whole.append(client.chat.completions.create(**ask).choices[0].message.content)
            chunks = client.chat.completions.create(**ask, stream=True)
            streamed.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    print(json.dumps({"whole": whole, "streamed": streamed}, ensure_ascii=False, indent=1))
    assert streamed == whole
    assert sum(map(named, whole)) >= len(whole) - 1, whole
