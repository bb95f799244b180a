"""``dstune serve --engine vllm``: hand the model and its LoRA adapters to vLLM's own OpenAI server.

vLLM batches requests on a GPU (continuous batching, paged KV cache), which the in-process engine does not;
it needs a CUDA GPU and the ``vllm`` package, and is refused without them. It applies LoRA adapters only
(``--enable-lora --lora-modules name=path``), and cannot apply LoRA on DeepSeek's routed MoE experts
(vLLM #10446): such runs, and the other methods, are served merged (``dstune merge``) instead.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from dstune.errors import UsageError
from dstune.rundir import RunDir


def check_vllm_available() -> None:
    """Raises UsageError unless vLLM is installed and a CUDA GPU is present."""
    import torch

    missing = []
    if importlib.util.find_spec("vllm") is None:
        missing.append("the vllm package is not installed (pip install vllm)")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible to torch")
    if missing:
        raise UsageError(
            "--engine vllm needs vLLM and a CUDA GPU: "
            + "; ".join(missing)
            + ". Serve with the built-in engine instead (leave out --engine)"
        )


def vllm_argv(
    target: str,
    adapters: list[tuple[str, str]],
    *,
    host: str,
    port: int,
    api_key: str | None,
) -> list[str]:
    """The command line that starts vLLM's OpenAI server for a model or run and its LoRA adapters.

    Raises:
        UsageError: a run vLLM cannot apply as a LoRA adapter (another method, adapters on routed
            experts, a classifier), saying to merge it first.
    """
    loras: list[tuple[str, str]] = []
    if RunDir(target).run_json.is_file():
        info = RunDir(target).read_json(RunDir.RUN)
        if info.get("method") in ("full", "freeze"):  # final/ is a whole model
            model, served = str(RunDir(target).final), Path(target).resolve().name
        else:
            model, served = info["base_model"], info.get("model") or "base"
            loras.append((Path(target).resolve().name, _lora_dir(target)))
    else:
        from dstune.models.load import resolve_model_dir

        model, served = str(resolve_model_dir(target).path), target
    loras += [(name, _lora_dir(run)) for name, run in adapters]
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        served,
        "--host",
        host,
        "--port",
        str(port),
    ]
    if api_key:
        argv += ["--api-key", api_key]
    if loras:
        rank = max(_lora_rank(path) for _, path in loras)  # vLLM takes powers of two from 8
        argv += [
            "--enable-lora",
            "--max-lora-rank",
            str(1 << max(3, (rank - 1).bit_length())),
            "--lora-modules",
        ]
        argv += [f"{name}={path}" for name, path in loras]
    return argv


def _lora_dir(run: str) -> str:
    rd = RunDir(run)
    if not rd.run_json.is_file():
        raise UsageError(f"{run} is not a run directory (no {RunDir.RUN})")
    info = rd.read_json(RunDir.RUN)
    merge = f"merge it first (dstune merge {run} --out DIR) and serve DIR"
    if info.get("task") == "classification":
        raise UsageError(f"{run} is a classification run: vLLM serves text generation only")
    if info.get("method") not in ("lora", "qlora") or not (rd.final / "adapter_config.json").is_file():
        raise UsageError(
            f"{run}: vLLM applies LoRA adapters only, and this is a {info.get('method')} run; " + merge
        )
    if rd.config.is_file():
        from dstune.config import load_config

        if load_config(rd.config).lora.experts in ("routed", "all"):
            raise UsageError(
                f"{run} has LoRA on routed MoE experts, which vLLM cannot apply (vLLM #10446); " + merge
            )
    return str(rd.final)


def _lora_rank(path: str) -> int:
    return int(json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8")).get("r", 8))
