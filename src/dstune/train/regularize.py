"""Regularisation that acts on the model: NEFTune noise, LayerDrop, dropout overrides, early stopping.

Label smoothing lives in ``train/loss.py`` (an argument of ``token_loss_sum``), weight decay in the
parameter groups (``train/optim.py``) and LoRA dropout in ``lora.dropout``.

Everything here acts only in training mode (``module.training``): evaluation, generation and the saved
model are unchanged. Random draws use torch's global generator, which checkpoints save and restore, so
a resumed run draws the same noise and drops the same layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dstune.config import RegularizeConfig
from dstune.core.facts import restore_trainable, snapshot_trainable
from dstune.errors import UsageError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers (``model.layers`` in every DeepSeek family, under peft too).

    Raises:
        ValueError: if the model has no ``layers`` ModuleList.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            return module
    raise UsageError("regularize.layerdrop/hidden_dropout: this model has no 'layers' list of decoder layers")


def add_neftune(model: nn.Module, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """Adds NEFTune noise to the input embeddings in training (Jain et al. 2023, Algorithm 1).

    The noise is uniform in ``[-m, m]`` with ``m = alpha / sqrt(L * d)``, L the (padded) sequence length
    and d the embedding width, as in transformers' ``neftune_post_forward_hook``.
    """

    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        mag = alpha / math.sqrt(output.size(1) * output.size(2))
        return output + torch.empty_like(output).uniform_(-mag, mag)

    return model.get_input_embeddings().register_forward_hook(hook)


def add_layerdrop(model: nn.Module, probs: float | list[float]) -> list[int]:
    """Skips decoder layer i with probability ``probs[i]`` in training (Fan et al. 2020, LayerDrop).

    A skipped layer returns its input unchanged (identity on the residual stream), never zeros, and is
    not computed at all, so it costs nothing and its weights get no gradient that step. Under DDP, set
    ``find_unused_parameters`` since a skipped layer's parameters take no part in the step.

    Returns:
        The indices of layers that can be dropped.

    Raises:
        ValueError: a list whose length is not the number of decoder layers.
    """
    layers = decoder_layers(model)
    if isinstance(probs, list):
        if len(probs) != len(layers):
            raise UsageError(
                f"regularize.layerdrop has {len(probs)} probabilities but the model has "
                f"{len(layers)} decoder layers; give one number or {len(layers)}"
            )
    else:
        probs = [probs] * len(layers)
    active = []
    for i, (layer, p) in enumerate(zip(layers, probs)):
        if p <= 0:
            continue
        active.append(i)
        original = layer.forward

        def forward(*args, _layer=layer, _p=p, _original=original, **kwargs):
            # p == 1 draws nothing, so a fully dropped layer leaves the random stream of the run as is.
            if _layer.training and (_p >= 1 or torch.rand(()).item() < _p):
                return args[0] if args else kwargs["hidden_states"]
            return _original(*args, **kwargs)

        layer.forward = forward  # an instance attribute: nn.Module.__call__ (and checkpointing) use it
    return active


def set_attention_dropout(model: nn.Module, p: float) -> int:
    """Sets the attention-probability dropout of every attention module; returns how many were set.

    transformers reads ``self.attention_dropout`` at every forward (Llama, Qwen2, DeepSeek-V2/V3), so
    setting the attribute is enough; the model's config is left as loaded.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "attention_dropout") and isinstance(
            getattr(module, "attention_dropout"), (int, float)
        ):
            module.attention_dropout = p
            n += 1
    if n == 0:
        raise UsageError(
            "regularize.attention_dropout: no attention module of this model has an "
            "'attention_dropout' setting"
        )
    return n


def add_hidden_dropout(model: nn.Module, p: float) -> int:
    """Dropout on the output of every attention and MLP block before it joins the residual stream.

    DeepSeek, Llama and Qwen2 have no such dropout (their configs set none); this is the "residual
    dropout" of the original Transformer (Vaswani et al. 2017, sec. 5.4). Returns the hooked blocks.
    """

    def hook(module: nn.Module, args, output):
        if isinstance(output, tuple):  # attention returns (output, weights)
            return (F.dropout(output[0], p, module.training),) + tuple(output[1:])
        return F.dropout(output, p, module.training)

    n = 0
    for layer in decoder_layers(model):
        for block in ("self_attn", "mlp"):
            if hasattr(layer, block):
                getattr(layer, block).register_forward_hook(hook)
                n += 1
    return n


def apply_regularization(model: nn.Module, cfg: RegularizeConfig) -> str | None:
    """Applies NEFTune, LayerDrop and the dropout overrides of ``cfg`` to ``model`` in place.

    Returns:
        One line saying what was applied, for the printed run header, or None when nothing was.
    """
    said = []
    if cfg.neftune_alpha > 0:
        add_neftune(model, cfg.neftune_alpha)
        said.append(f"NEFTune alpha {cfg.neftune_alpha:g}")
    if (max(cfg.layerdrop) if isinstance(cfg.layerdrop, list) else cfg.layerdrop) > 0:
        said.append(f"LayerDrop on layers {add_layerdrop(model, cfg.layerdrop)}")
    if cfg.attention_dropout is not None:
        said.append(
            f"attention dropout {cfg.attention_dropout:g} "
            f"({set_attention_dropout(model, cfg.attention_dropout)} modules)"
        )
    if cfg.hidden_dropout is not None and cfg.hidden_dropout > 0:
        said.append(
            f"hidden dropout {cfg.hidden_dropout:g} ({add_hidden_dropout(model, cfg.hidden_dropout)} blocks)"
        )
    if cfg.label_smoothing > 0:
        said.append(f"label smoothing {cfg.label_smoothing:g}")
    return "regularisation: " + ", ".join(said) if said else None


class EarlyStopping:
    """Stops after ``early_stop_patience`` evaluations without a validation improvement, and keeps the best
    weights (in CPU memory) when ``keep_best`` is set.

    The metric is ``train.best_metric`` (validation loss by default; accuracy or F1 for a classifier),
    with ``sign`` +1 when lower is better and -1 when higher is; ``early_stop_min_delta`` is in the
    metric's units. The counters live in ``counters`` (``TrainState.early``), so a checkpoint saves them
    and a resumed run goes on counting; the best weights themselves are not checkpointed.
    """

    def __init__(
        self, cfg: RegularizeConfig, metric: str = "loss", sign: int = 1, counters: dict | None = None
    ):
        self.cfg, self.metric, self.sign = cfg, metric, sign
        self.counters = counters if counters is not None else {"best": math.inf, "best_step": None, "bad": 0}
        self.stopped_at, self.last_step = None, None
        self._best_state: dict[str, torch.Tensor] | None = None

    @property
    def best_step(self) -> int | None:
        return self.counters["best_step"]

    def update(self, step: int, metrics: dict[str, float], model: nn.Module | None) -> bool:
        """Records one evaluation; returns True when training should stop."""
        value = metrics.get(self.metric) if metrics else None
        if value is None or not math.isfinite(value):
            return False
        self.last_step, c = step, self.counters
        if self.sign * value < c["best"] - self.cfg.early_stop_min_delta:  # c["best"] holds sign x value
            c.update(best=self.sign * value, best_step=step, bad=0)
            if self.cfg.keep_best:
                self._best_state = snapshot_trainable(model)
        else:
            c["bad"] += 1
        if self.cfg.early_stop_patience and c["bad"] >= self.cfg.early_stop_patience:
            self.stopped_at = step
            return True
        return False

    def finish(self, step: int, metrics: dict[str, float], model: nn.Module, validate) -> dict[str, float]:
        """Takes the end-of-run evaluation into account and, with ``keep_best``, puts the best weights
        back in ``model`` (re-validating them); returns the validation metrics of the kept weights."""
        if self.last_step != step:  # the end-of-run evaluation of weights not evaluated yet
            stopped_at = self.stopped_at
            self.update(step, metrics, model)
            self.stopped_at = stopped_at
        if not self.cfg.keep_best or self._best_state is None or self.best_step == step:
            return metrics
        restore_trainable(model, self._best_state)
        return validate()

    def summary(self) -> dict:
        best = None if math.isinf(self.counters["best"]) else self.sign * self.counters["best"]
        return {
            "metric": self.metric,
            "best": best,
            "best_val_loss": best if self.metric == "loss" else None,
            "best_step": self.best_step,
            "stopped_at": self.stopped_at,
            "kept_best": bool(self.cfg.keep_best and self._best_state),
        }
