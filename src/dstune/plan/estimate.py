"""Per-device peak memory of one training step, from a run config and the model's config alone.

The model is built on the meta device (shapes, no storage), the method's choice of trainable tensors is
made on it with the methods' own target resolution, and every component is counted in bytes: weights,
trainable parameters, gradients, optimizer states, activations, logits, workspace. The counts follow what
dstune's step really keeps (train/build.py, core/forward.py): fp32 master weights and gradients for what
trains, frozen weights in the compute dtype, activations saved by autograd only where a gradient flows
(an input is saved by a Linear only when its weight, or a LoRA on it, trains), the output layer computed
in chunks. Sharding (ZeRO 1/2/3 over ``devices``) and CPU offload are modelled as in the ZeRO paper
(Rajbhandari et al. 2020, sec. 5), so the plan answers for engines before they exist.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from dstune.config import RunConfig
from dstune.core.facts import layer_index, resolve_precision
from dstune.core.forward import chunk_size
from dstune.gpus import GIB
from dstune.models.inspect import param_kind
from dstune.models.load import load_config_only

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Linear layers that read the same input tensor: under fp32 autograd saves that tensor once for all of
# them; under autocast each call casts (and saves) its own bf16 copy (autocast caches only weights).
_SHARED_INPUT = {
    "q_proj": "attn",
    "k_proj": "attn",
    "v_proj": "attn",
    "q_a_proj": "attn",
    "kv_a_proj_with_mqa": "attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
}
# bitsandbytes NF4: 4 bits a weight plus one absmax per 64-weight block, fp32 (4/64 B), or with double
# quantisation an 8-bit absmax and one fp32 scale per 256 blocks (QLoRA sec. 3: 0.127 bits a parameter).
_NF4_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}
CUDA_CONTEXT = 0.75 * GIB  # CUDA context + cuBLAS/NCCL workspaces, outside torch's allocator statistics
FRAGMENTATION = 0.10  # caching-allocator slack on top of the peak allocated (PyTorch's own guidance)


@dataclass(frozen=True)
class Setup:
    """What the planner needs beyond a run config: the devices and how state is spread over them.

    Args:
        devices: GPUs in all (per node x nodes); data parallel over all of them.
        nodes: machines; CPU offload is counted per node.
        zero: 0 (replicated, what dstune runs today), 1 (optimizer sharded), 2 (+ gradients),
            3 (+ parameters).
        offload: none, optimizer (states and fp32 master weights on the CPU), all (parameters too).
        device_type: cuda adds the CUDA context and a fragmentation margin; cpu counts allocations only.
    """

    devices: int = 1
    nodes: int = 1
    zero: int = 0
    offload: str = "none"
    device_type: str = "cuda"


@dataclass
class Breakdown:
    """Bytes per device for each component, the CPU memory an offload needs, and how it was counted."""

    parts: dict[str, float]
    cpu_bytes: float
    margin: float
    facts: dict = field(default_factory=dict)

    @property
    def allocated(self) -> float:
        """Peak bytes allocated by tensors (what allocator statistics report)."""
        return sum(self.parts.values())

    @property
    def total(self) -> float:
        """What the device must hold: the allocated peak plus the workspace/fragmentation margin."""
        return self.allocated + self.margin


@dataclass
class _Shapes:
    params: list[tuple[str, tuple[int, ...], str]]  # name, shape, kind
    quantizable: set[str]  # weight names bitsandbytes would quantise
    trainable: list[tuple[int, ...]]  # shapes of what trains (new adapter tensors included)
    trained_params: set[str]  # base parameters that train
    lora_modules: set[str]  # Linear modules that carry a LoRA
    head: set[str] = field(default_factory=set)  # the output layer's parameter names (tied: the embedding's)
    by_layer: dict[int, list[tuple[str, tuple[int, ...], str]]] = field(default_factory=dict)
    linears: dict[int, list[tuple[str, nn.Linear]]] = field(default_factory=dict)


def meta_model(config) -> nn.Module:
    """The model of ``config`` on the meta device (no storage; V3's 671B in about a second)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))


def _shapes(model: nn.Module, cfg: RunConfig) -> _Shapes:
    from dstune.methods.lora import expert_targets, is_plain_linear, resolve_targets

    head = model.get_output_embeddings()
    quantizable = {
        f"{n}.weight"
        for n, m in model.named_modules()
        if is_plain_linear(m) and m is not head and param_kind(f"{n}.weight") != "router"
        and n.rsplit(".", 1)[-1] != "gate"
    }  # fmt: skip
    params = [(n, tuple(p.shape), param_kind(n)) for n, p in model.named_parameters()]
    trained, extra, lora = _method_tensors(model, cfg, params, resolve_targets, expert_targets)
    trainable = [s for n, s, _ in params if n in trained] + extra
    shapes = _Shapes(params, quantizable, trainable, trained, lora, _head_names(model))
    for item in params:
        if (i := layer_index(item[0])) is not None:
            shapes.by_layer.setdefault(i, []).append(item)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (i := layer_index(name)) is not None:
            shapes.linears.setdefault(i, []).append((name, module))
    return shapes


def _head_names(model: nn.Module) -> set[str]:
    """Names of the output layer's parameters; with tied embeddings named_parameters lists the shared
    matrix once, as the embedding, so the head is found by identity, not by name."""
    head = model.get_output_embeddings()
    ids = {id(p) for p in head.parameters()} if head is not None else set()
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _method_tensors(model, cfg, params, resolve_targets, expert_targets):
    """(base parameters that train, shapes of new trainable tensors, Linear modules with a LoRA)."""
    c, m = model.config, cfg.method
    hidden, layers = c.hidden_size, c.num_hidden_layers
    if m == "full":
        return {n for n, _, _ in params}, [], set()
    if m == "freeze":
        first = layers - cfg.freeze.top_layers
        head = _head_names(model) if cfg.freeze.train_head else set()
        return {n for n, _, _ in params if (layer_index(n) or -1) >= first} | head, [], set()
    if m in ("lora", "qlora"):
        lc = cfg.lora
        modules = set(resolve_targets(model, lc.targets)) | set(expert_targets(model, lc.experts)[0])
        if lc.top_layers:
            modules = {n for n in modules if (layer_index(n) or 0) >= layers - lc.top_layers}
        shapes = []
        for name in sorted(modules):
            lin = model.get_submodule(name)
            shapes += [(lc.r, lin.in_features), (lin.out_features, lc.r)]
            if lc.use_dora:
                shapes.append((lin.out_features,))
        for name in expert_targets(model, lc.experts)[1]:  # fused experts: one LoRA per expert
            e, out, inp = dict((n, s) for n, s, _ in params)[name]
            shapes += [(e * lc.r, inp), (out, e * lc.r)]
        return set(), shapes, modules
    vt = cfg.prompt.virtual_tokens
    if m == "prefix":
        return set(), [(vt, layers * 2 * hidden)], set()
    if m == "prompt":
        return set(), [(vt, hidden)], set()
    if m == "ptuning":
        enc = cfg.prompt.encoder_hidden_size or hidden
        return set(), [(vt, hidden), (enc, hidden), (enc, enc), (hidden, enc)], set()
    if m == "adapter":
        bottleneck = max(1, hidden // cfg.adapter.reduction)
        sites = 2 if cfg.adapter.where == "both" else 1
        return set(), [(bottleneck, hidden), (hidden, bottleneck)] * (layers * sites), set()
    inter = getattr(c, "intermediate_size", None) or hidden * 4  # ia3: keys, values, MLP down inputs
    return set(), [(hidden + hidden + inter,)] * layers, set()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def with_planned_precision(cfg: RunConfig, setup: Setup) -> RunConfig:
    """``cfg`` with ``train.precision: auto`` as a run would decide it on ``setup``'s device: bf16 on a
    GPU (the planner's cards are taken as Ampere or later: plan a V100 or T4 with ``--precision fp32``),
    and on this machine's CPU what the run itself would pick."""
    if cfg.train.precision != "auto":
        return cfg
    precision = "bf16" if setup.device_type == "cuda" else resolve_precision("auto", setup.device_type)[0]
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": precision})})


def estimate(
    cfg: RunConfig, setup: Setup | None = None, config=None, model=None, cache: dict | None = None
) -> Breakdown:
    """The per-device peak of one training step (forward, backward, optimizer step) of ``cfg``.

    Args:
        cfg: the run config (model, method, precision, micro-batch, length, checkpointing, optimizer).
        setup: devices, ZeRO stage, offload (default: one device, nothing sharded).
        config: the model's transformers config, when the caller has it (default: loaded from
            ``cfg.model.name`` without weights, see ``models.load.load_config_only``).
        model: ``meta_model(config)``, when the caller estimates many variants of one model.
        cache: a dict the caller keeps across those calls: what trains is worked out once per method.

    Returns:
        A Breakdown in bytes; ``facts`` holds the counts it was computed from.
    """
    setup = setup or Setup()
    cfg = with_planned_precision(cfg, setup)
    config = config or load_config_only(cfg.model.name, revision=cfg.model.revision)
    model = model if model is not None else meta_model(config)
    key = (cfg.method, cfg.lora.model_dump_json(), cfg.freeze.model_dump_json(), cfg.prompt.model_dump_json())
    shapes = cache.get(key) if cache is not None else None
    if shapes is None:
        shapes = _shapes(model, cfg)
        if cache is not None:
            cache[key] = shapes
    tc = cfg.train
    act = _BYTES[tc.precision]
    mixed = tc.precision != "fp32"
    n_train = sum(_numel(s) for s in shapes.trainable)
    frozen = _frozen_bytes(shapes, cfg, act)
    # ZeRO with bf16 keeps a bf16 working copy on the device and the fp32 master with the optimizer
    # (ZeRO paper sec. 3: 2 + 2 + 12 bytes a parameter); dstune's own loop keeps fp32 weights and grads.
    master = 4 if (setup.zero and mixed) else 0
    weight_b = 2 if master else 4
    trainable = n_train * weight_b
    grads = n_train * weight_b
    optimizer = _optimizer_bytes(cfg.optim.optimizer, shapes.trainable) + n_train * master
    cached = 0.0
    if mixed and not setup.zero:  # autocast keeps a bf16 copy of every trainable matrix it casts
        cached = 2 * sum(_numel(s) for s in shapes.trainable if len(s) == 2)
    weights = frozen + cached
    weights, trainable, grads, optimizer, workspace, cpu = _place(
        setup, shapes, act, weights, trainable, grads, optimizer
    )
    if cfg.method == "qlora":  # bitsandbytes de-quantises one weight at a time to the compute dtype
        workspace += _largest_quantized(shapes) * (2 if torch.cuda.is_available() or mixed else 4)
    activations, transient, act_facts = _activations(model, cfg, shapes)
    logits, head_grad = _logits(model, cfg, shapes)
    # Two moments compete for the peak (measured: docs/benchmarks.md "Memory planner"). The output
    # layer's forward: every activation saved, a chunk of logits with its log-sum-exp temporary, the
    # head's gradient accumulator; gradients do not exist yet (zero_grad freed them) unless accumulation
    # keeps them. The backward: layer by layer activations are freed as gradients appear, so the peak is
    # the larger end (all activations plus the head gradient and its copy, or all gradients) plus one
    # layer's transient. What the sum of the lines counts twice is the "overlap" line (<= 0).
    kept_grads = grads if tc.grad_accum > 1 else 0.0
    forward_extra = activations + logits + head_grad + kept_grads
    if kept_grads:
        backward_extra = activations + grads + head_grad + transient
    else:
        backward_extra = max(activations + 2 * head_grad, grads) + transient
    counted = activations + grads + logits + head_grad + transient
    parts = {
        "weights": weights,
        "trainable": trainable,
        "gradients": grads,
        "optimizer": optimizer,
        "activations": activations,
        "logits": logits + head_grad,
        "workspace": workspace + transient,
        "overlap": min(0.0, max(forward_extra, backward_extra) - counted),
    }
    allocated = sum(parts.values())
    margin = CUDA_CONTEXT + FRAGMENTATION * allocated if setup.device_type == "cuda" else 0.0
    facts = {
        "total_params": sum(_numel(s) for _, s, _ in shapes.params),
        "trainable_params": n_train,
        **act_facts,
    }
    return Breakdown(parts, cpu, margin, facts)


def _place(setup: Setup, shapes: _Shapes, act: int, weights, trainable, grads, optimizer) -> tuple:
    """Shards the states over the devices by ZeRO stage and moves offloaded ones to the CPU.

    Returns:
        (weights, trainable, gradients, optimizer, workspace) per device, and the CPU bytes per node.
    """
    n = max(1, setup.devices)
    workspace, cpu = 0.0, 0.0
    if setup.zero >= 1:
        optimizer /= n
    if setup.zero >= 2:
        grads /= n
    if setup.zero >= 3:
        weights, trainable = weights / n, trainable / n
        workspace += 2 * _largest_param(shapes, act)  # the gathered parameter and the one prefetched
    per_node = n // max(1, setup.nodes)  # each process's shard lives in its own node's memory
    if setup.offload in ("optimizer", "all"):
        cpu += optimizer * per_node
        optimizer = 0.0
    if setup.offload == "all":
        cpu += (weights + trainable) * per_node
        weights, trainable = 0.0, 0.0
        workspace = max(workspace, 2 * _largest_param(shapes, act))
    return weights, trainable, grads, optimizer, workspace, cpu


def _frozen_bytes(shapes: _Shapes, cfg: RunConfig, act: int) -> float:
    """Frozen base weights: compute dtype (train/build.py cast_frozen), or 4/8-bit under QLoRA."""
    total = 0.0
    for name, shape, _ in shapes.params:
        if name in shapes.trained_params:
            continue
        if cfg.method == "qlora" and name in shapes.quantizable:
            per = _NF4_BYTES[cfg.qlora.double_quant] if cfg.qlora.bits == 4 else 1.0 + 4 / shape[-1]
        else:
            per = act
        total += _numel(shape) * per
    return total


def _optimizer_bytes(optimizer: str, trainable: list[tuple[int, ...]]) -> float:
    """AdamW: fp32 m and v (8 B a parameter); 8-bit AdamW: 1-byte m and v plus an fp32 scale per
    2,048-value block (Dettmers et al. 2022); Adafactor: a factored second moment, rows + columns of each
    matrix, no first moment (Shazeer & Stern 2018; transformers' default beta1=None)."""
    if optimizer == "adamw":
        return 8.0 * sum(_numel(s) for s in trainable)
    if optimizer == "adamw8bit":
        return (2 + 8 / 2048) * sum(_numel(s) for s in trainable)
    return 4.0 * sum(s[0] + s[-1] if len(s) >= 2 else s[0] for s in trainable)


def _largest_param(shapes: _Shapes, act: int) -> float:
    """ZeRO-3 gathers one parameter (a fused expert tensor on V2/V3) at a time, plus one prefetched."""
    return max((_numel(s) for _, s, _ in shapes.params), default=0) * act


def _largest_quantized(shapes: _Shapes) -> int:
    return max((_numel(s) for n, s, _ in shapes.params if n in shapes.quantizable), default=0)


def tokens_per_row(cfg: RunConfig) -> int:
    """Positions one row computes: ``data.max_length`` (a packed row is full), plus the virtual tokens
    that prompt and p-tuning put in front of it."""
    extra = cfg.prompt.virtual_tokens if cfg.method in ("prompt", "ptuning") else 0
    return cfg.data.max_length + extra


def _first_grad_layer(cfg: RunConfig, shapes: _Shapes, layers: int) -> int:
    """The lowest decoder layer whose activations autograd keeps: below it nothing needs a gradient."""
    if cfg.method in ("full", "prefix", "prompt", "ptuning", "adapter", "ia3"):
        return 0
    if any(k == "embeddings" for n, _, k in shapes.params if n in shapes.trained_params):
        return 0  # a tied head trains the input embeddings: the gradient goes down through every layer
    found = [layer_index(n) for n in shapes.trained_params | shapes.lora_modules]
    found = [i for i in found if i is not None]
    return min(found, default=layers)


def _layer_bytes(model, cfg: RunConfig, shapes: _Shapes, index: int, seq: int) -> float:
    """Bytes a token leaves saved for backward in decoder layer ``index``.

    Counted from autograd's rules: RMSNorm keeps its fp32 input (and the normalised tensor when its
    weight trains); SDPA/flash keep q, k, v, the output and a log-sum-exp, no T x T scores (eager keeps
    the softmax); SwiGLU keeps gate, silu(gate) and up; MoE keeps the router scores and, per chosen
    expert, the token's copy and the expert's gate/up/silu outputs; a Linear keeps its input only when
    its weight or a LoRA on it trains (fp32: once per shared input; autocast: one bf16 copy per call).
    MLA is counted from its own widths (DeepSeek-V2 paper sec. 2.1): q and k are nope + rope wide.
    """
    c, a = model.config, _BYTES[cfg.train.precision]
    mixed = cfg.train.precision != "fp32"
    heads, hidden = c.num_attention_heads, c.hidden_size
    if getattr(c, "kv_lora_rank", None):
        qk, v = c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
        core = heads * (2 * qk + 2 * v) * a
    else:
        hd = getattr(c, "head_dim", None) or hidden // heads
        core = 4 * heads * hd * a  # q, k, v (repeated to every head, transformers' repeat_kv), output
    core += heads * 4  # the softmax's log-sum-exp, fp32
    if cfg.train.attention == "eager":
        core += 2 * heads * seq * a  # the T x T probabilities, and dropout's copy of them
    total = core
    inputs: dict[str, float] = {}
    moe = False
    for name, shape, kind in shapes.by_layer.get(index, []):
        moe |= kind == "experts"
        if kind == "norm" and len(shape) == 1:
            total += 4 * shape[0] + (a * shape[0] if name in shapes.trained_params else 0)
    for name, module in shapes.linears.get(index, []):
        if f"{name}.weight" in shapes.trained_params or name in shapes.lora_modules:
            leaf = name.rsplit(".", 1)[-1]
            key = name if mixed else _SHARED_INPUT.get(leaf, name)
            inputs[key] = module.in_features * (a if mixed else 4)
    total += sum(inputs.values())
    if moe:
        k, experts = c.num_experts_per_tok, getattr(c, "n_routed_experts", None) or c.num_local_experts
        inter = c.moe_intermediate_size
        shared = inter * (getattr(c, "n_shared_experts", None) or 0)
        total += 2 * experts * 4 + k * (3 * inter + 2 * hidden) * a + 3 * shared * a
    else:
        total += 3 * c.intermediate_size * a
    return total


def _activations(model, cfg: RunConfig, shapes: _Shapes) -> tuple[float, float, dict]:
    """Saved activations of all layers (or, with checkpointing, each layer's input plus the one layer
    being recomputed), the backward pass's transient (the gradients of one layer's activations) and
    the counts they came from."""
    tc, layers = cfg.train, model.config.num_hidden_layers
    seq = tokens_per_row(cfg)
    tokens = tc.micro_batch_size * seq
    first = _first_grad_layer(cfg, shapes, layers)
    per_layer = [_layer_bytes(model, cfg, shapes, i, seq) * tokens for i in range(first, layers)]
    if not per_layer:
        return 0.0, 0.0, {"tokens": tokens, "grad_layers": 0, "layer_bytes": 0.0}
    biggest = max(per_layer)
    embeds_train = any(k == "embeddings" for n, _, k in shapes.params if n in shapes.trained_params)
    residual = 4 if (tc.precision == "fp32" or embeds_train) else _BYTES[tc.precision]
    if tc.gradient_checkpointing:
        kept = len(per_layer) * tokens * model.config.hidden_size * residual + biggest
    else:
        kept = sum(per_layer)
    return kept, biggest, {"tokens": tokens, "grad_layers": len(per_layer), "layer_bytes": biggest}


def _logits(model, cfg: RunConfig, shapes: _Shapes) -> tuple[float, float]:
    """The output layer's forward peak and the head's fp32 gradient accumulator (0 when it is frozen).

    dstune computes the head ``chunk_tokens`` labelled tokens at a time (core/forward.py): one chunk of
    fp32 logits plus torch's logsumexp temporary of the same size (8 B a logit; under autocast the bf16
    matmul output is freed before logsumexp runs). Training the head adds its gradient, accumulated
    in fp32 over the chunks and copied once in backward. With chunk_tokens=0: the whole [tokens, vocab]
    logits, their fp32 copy, the log-softmax and its gradient.
    """
    tc = cfg.train
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    labelled = tc.micro_batch_size * (cfg.data.max_length - 1)  # next-token labels: one fewer a row
    head_trains = bool(shapes.head & shapes.trained_params)
    head_grad = vocab * hidden * 4.0 if head_trains else 0.0
    chunk = chunk_size(tc.chunk_tokens, vocab)
    if chunk == 0:
        return labelled * vocab * (_BYTES[tc.precision] + 12.0), head_grad
    small = labelled * hidden * 8.0  # the labelled hidden states and their gradient
    return min(chunk, labelled) * vocab * 8.0 + small, head_grad
