"""``dstune serve``: the command; registered in ``dstune.cli`` (kept apart so cli.py stays short).

It prints errors as ``dstune.cli`` does (one ``error:`` line, exit status 2), through ``dstune.clikit``:
importing ``dstune.cli`` here would make a cycle between the two packages (tests/test_layers.py).
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import subprocess
from typing import List, Optional

import typer

from dstune.clikit import console
from dstune.clikit import fail as _fail
from dstune.errors import DstuneError, MissingExtra, UsageError


def serve_command(
    target: str = typer.Argument(
        ..., help="run directory, or a model spec (hub id, local dir, .gguf, smollm2, tiny:<family>)"
    ),
    adapter: Optional[List[str]] = typer.Option(
        None, "--adapter", help="NAME=RUN: one more LoRA run on the same base, served as model NAME (repeat)"
    ),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port"),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="address to bind; loopback by default (0.0.0.0: every interface)"
    ),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="DSTUNE_API_KEY", help="require 'Authorization: Bearer KEY' on /v1 requests"
    ),
    max_queue: int = typer.Option(
        16, "--max-queue", min=1, help="requests that may wait while one generates; more get 429 at once"
    ),
    timeout: float = typer.Option(
        300.0, "--timeout", min=0.001, help="seconds a request may take, queue wait included, before a 504"
    ),
    engine: str = typer.Option(
        "dstune", "--engine", help="dstune (built in, CPU or GPU) or vllm (vLLM's server; needs a GPU)"
    ),
) -> None:
    """Serve a model or run over an OpenAI-compatible HTTP API, streamed or not; LoRA adapters by name.

    Routes /v1/models, /v1/chat/completions and /v1/completions; R1 reasoning comes back apart as
    reasoning_content; errors have OpenAI's shape. One request generates at a time."""
    try:
        adapters = [_parse_adapter(a) for a in adapter or []]
        if engine not in ("dstune", "vllm"):
            raise UsageError(f"--engine {engine!r}: accepted are dstune and vllm")
        if engine == "vllm":
            _hand_to_vllm(target, adapters, host, port, api_key, console)
            return
        _check_port_free(host, port)
        app, served = _build(target, adapters, api_key, max_queue, timeout)
    except DstuneError as exc:
        _fail(str(exc))
    import uvicorn

    if not _is_loopback(host) and api_key is None:
        console.print(
            f"[bold yellow]warning:[/] serving on {host}, reachable from other machines, without an API "
            f"key: anyone who can reach port {port} can use the model (set --api-key)",
            highlight=False,
        )
    console.print(
        f"serving {', '.join(served)} at http://{host}:{port}/v1 (queue {max_queue}, timeout {timeout:g} s)",
        highlight=False,
    )
    # Ctrl-C stops the server; uvicorn re-raises the signal once it has shut down, which dstune's own
    # handler would report as an interrupted command (exit 130): here it is the normal way to stop.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, previous)
    console.print("server stopped")


def _build(target, adapters, api_key, max_queue, timeout):
    try:
        from dstune.serve.app import create_app
    except ImportError as exc:
        raise MissingExtra(
            f"dstune serve needs FastAPI and uvicorn ({exc.name} is missing): pip install 'dstune[serve]'"
        ) from exc
    from dstune.serve.host import load_host

    host = load_host(target, adapters)
    return create_app(host, api_key=api_key, max_queue=max_queue, timeout=timeout), list(host.adapters)


def _parse_adapter(spec: str) -> tuple[str, str]:
    name, sep, run = spec.partition("=")
    if not sep or not name.strip() or not run.strip():
        raise UsageError(f"--adapter {spec!r}: expected NAME=RUN, e.g. --adapter support=runs/support")
    return name.strip(), run.strip()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from exc


def _hand_to_vllm(target, adapters, host, port, api_key, console) -> None:
    from dstune.serve.vllm import check_vllm_available, vllm_argv

    check_vllm_available()
    argv = vllm_argv(target, adapters, host=host, port=port, api_key=api_key)
    console.print(f"handing over to vLLM: {' '.join(argv)}", highlight=False, markup=False)
    raise typer.Exit(subprocess.call(argv))
