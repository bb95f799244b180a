"""``train.distributed: zero2 | zero3``: DeepSpeed ZeRO behind the same loop, with ``train.offload``.

ZeRO-2 shards the optimizer states (with the fp32 master weights) and the gradients over the ranks;
ZeRO-3 the weights too, gathering each layer while it computes. The loop stays dstune's: it tells
DeepSpeed which backward ends the accumulation window (``set_gradient_accumulation_boundary``), reads the
gradient norm before the update so the stability guard can decide, and either steps or skips. DeepSpeed
averages gradients over the ranks like DDP, so the loop's ``num_processes / units`` loss scale is right.

What is called here that DeepSpeed documents only in its code (checked with deepspeed 0.19.8 on two gloo
ranks: equal to one process within 1e-6 for ZeRO-2, ZeRO-3 and both with offload, tests/test_sharded.py):
- the pre-clip norm: ZeRO-3's ``_get_norm_groups`` combined by ``combine_grad_norm_groups``, ZeRO-2's
  ``scaled_global_norm``; the public alternative gathers every gradient whole (``safe_get_full_grad``);
- skipping an update: DeepSpeed's step runs (it frees the gradient partitions and keeps its counters)
  with the inner optimizer's ``step`` a no-op for that one call;
- ZeRO-2 links its per-parameter views of the optimizer states after the first group's first update
  only, so with several parameter groups the later ones are re-linked before they are read
  (``_lazy_init_hp_params_optimizer_state``), and after a load the fp32 master is copied into the
  forward's weights (``update_lp_params``; ZeRO-3: ``_reassign_or_swap_out_partitioned_parameters``).
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from dstune.config import RunConfig
from dstune.config.deepspeed import ZERO_STAGE, deepspeed_config
from dstune.train.checkpoint import Trainable, group_names
from dstune.train.dist import ProcessGroupEngine
from dstune.train.stream_save import gathered, gathered_named


def import_deepspeed():
    """deepspeed, for the CPU when there is no GPU. Its shared-memory all-reduce for CPUs is a C++
    extension compiled on first use (about a minute): dstune's CPU runs use gloo's instead."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError:
        from dstune.errors import UsageError

        raise UsageError(
            "train.distributed=zero2/zero3 needs DeepSpeed: pip install 'dstune[deepspeed]' "
            "(on a machine with CUDA, DeepSpeed compiles its kernels with the CUDA toolkit on first use)"
        ) from None
    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def moe_blocks(model: torch.nn.Module) -> list[type]:
    """The classes of the model's mixture-of-experts blocks (``DeepseekV3MoE``...): ZeRO-3 gathers them
    as one leaf, or a rank whose tokens skip an expert hangs in backward waiting for its weights."""
    return sorted(
        {type(m) for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate")},
        key=lambda c: c.__name__,
    )


class ZeroEngine(ProcessGroupEngine):
    """DeepSpeed ZeRO-2/3 over all ranks; the interface of ``engine.Engine``."""

    def __init__(self, cfg: RunConfig):
        self.deepspeed = import_deepspeed()
        super().__init__(cfg)
        self.cfg = cfg
        self.stage = ZERO_STAGE[cfg.train.distributed]
        self._boundary = True
        # A one-process run (no torchrun): DeepSpeed reads LOCAL_RANK from zero.Init to the end of training.
        os.environ.setdefault("LOCAL_RANK", "0")

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """``deepspeed.initialize`` with dstune's optimizer (its groups and lrs, which the lr schedule
        keeps setting); returns the DeepSpeed engine as the model (under ZeRO-3 every forward must go
        through it) and an optimizer whose ``step``/``zero_grad`` drive DeepSpeed's."""
        self.groups = group_names(model, optimizer)
        hidden = getattr(model.config, "hidden_size", None)
        config = deepspeed_config(self.cfg.train, self.cfg.optim, self.num_processes, hidden)
        if self.stage == 3 and (blocks := moe_blocks(model)):
            self.deepspeed.utils.set_z3_leaf_modules(model, blocks)
        engine, _, _, _ = self.deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.engine, self.optimizer = engine, ZeroOptimizer(engine, optimizer)
        return engine, self.optimizer

    def unwrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return getattr(model, "module", model)

    @contextmanager
    def loading(self, model_dir: str):
        """ZeRO-3: transformers builds the model inside ``deepspeed.zero.Init`` (each parameter is split
        over the ranks as it is created) and copies the checkpoint in layer by layer from rank 0, the
        Hugging Face Trainer's way (``HfDeepSpeedConfig``), so no rank holds the whole model in memory.
        Only for the load and the method's setup: a model loaded later in the process (a distillation
        teacher, an evaluation) is not partitioned."""
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        if self.stage != 3 or self.cfg.method == "qlora" or config.get("quantization_config"):
            # transformers loads a quantised model whole in every process (no zero.Init), and peft's setup
            # must then not treat its weights as partitioned
            if self.stage == 3 and config.get("quantization_config") and self.is_main_process:
                warnings.warn(
                    f"{model_dir} stores quantised (e.g. FP8) weights, which every rank loads whole; "
                    "`dstune dequantize` it first so that ZeRO-3 partitions the model while it loads",
                    stacklevel=3,
                )
            yield
            return
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        hidden = config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size")
        ds = deepspeed_config(self.cfg.train, self.cfg.optim, self.num_processes, hidden)
        del ds["train_batch_size"]  # zero.Init checks it against a world of one: DeepSpeed is not started
        keep = HfDeepSpeedConfig(ds)
        try:
            yield
        finally:
            unset_hf_deepspeed_config()
            del keep

    @contextmanager
    def no_sync(self, model: torch.nn.Module):
        """The next backward does not end the window (the loop calls it after this block: remembered)."""
        self._boundary = False
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.set_gradient_accumulation_boundary(self._boundary)
        self.engine.backward(loss, scale_wrt_gas=False)
        self.optimizer.pending = "reduced" if self._boundary else "partial"
        self._boundary = True

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        """The global gradient norm before clipping (every rank calls it). DeepSpeed clips to
        ``optim.max_grad_norm`` (its ``gradient_clipping``) inside the step."""
        from deepspeed.runtime.utils import combine_grad_norm_groups

        opt = self.engine.optimizer
        norm = (
            combine_grad_norm_groups(opt._get_norm_groups()) if self.stage == 3 else opt.scaled_global_norm()
        )
        return torch.as_tensor(norm, dtype=torch.float32) / opt.loss_scale

    # -------------------------------------------------------------- gathered state (all ranks call these)

    def _trainable(self):
        return [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]

    def _flats(self, group: int) -> list[torch.Tensor]:
        """The flat fp32 partitions the inner optimizer updates for parameter group ``group`` (its state
        keys); ZeRO-3 empties ``param_groups[...]["params"]`` outside its step and keeps them by sub-group."""
        opt = self.engine.optimizer
        if self.stage == 3:
            subs = sorted(opt.sub_group_to_group_id.items())
            return [opt.fp32_partitioned_groups_flat[s] for s, g in subs if g == group]
        return list(opt.optimizer.param_groups[group]["params"])

    def _link_states(self) -> None:
        if self.stage == 2:
            self.engine.optimizer._hp_optimizer_states_linked = False
            self.engine.optimizer._lazy_init_hp_params_optimizer_state()

    def gather_state(self, model, optimizer) -> Trainable:
        """Whole fp32 weights and AdamW moments by name on rank 0's CPU (empty elsewhere)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        inner = self.engine.optimizer.optimizer
        stepped = bool(inner.state)
        if stepped:
            self._link_states()
        weights, moments = {}, {}
        for name, p in self._trainable():
            shape = getattr(p, "ds_shape", p.shape)
            full = [safe_get_full_fp32_param(p)]
            if stepped:
                full += [safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")]
            if self.is_main_process:
                weights[name] = full[0].detach().cpu().reshape(shape).clone()
                if stepped:
                    moments[name] = {
                        k: t.cpu().reshape(shape).clone() for k, t in zip(("exp_avg", "exp_avg_sq"), full[1:])
                    }
        if not self.is_main_process:
            return Trainable.empty()
        state, groups = {}, []
        for g, (group, names) in enumerate(zip(inner.param_groups, self.groups)):
            step = inner.state.get(self._flats(g)[0], {}).get("step") if stepped else None
            state |= {n: {"step": torch.tensor(float(step)), **moments[n]} for n in names if n in moments}
            groups.append({k: v for k, v in group.items() if k != "params"} | {"params": names})
        return Trainable.from_named(weights, {"state": state, "param_groups": groups})

    def load_state(self, model, optimizer, trainable: Trainable) -> None:
        """Every rank passes the same whole dicts and keeps its partition; the fp32 master is then
        copied into the weights the forward uses."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        opt = self.engine.optimizer
        inner, sd = opt.optimizer, trainable.optimizer
        for group, saved in zip(inner.param_groups, sd["param_groups"]):
            group.update({k: v for k, v in saved.items() if k not in ("params", "initial_lr")})
        if sd["state"]:
            for g, saved in enumerate(sd["param_groups"]):
                step = float(sd["state"][saved["params"][0]]["step"])
                for flat in self._flats(g):  # AdamW makes its state at the first step: make it now
                    s = inner.state[flat]
                    s.setdefault("exp_avg", torch.zeros_like(flat))
                    s.setdefault("exp_avg_sq", torch.zeros_like(flat))
                    s["step"] = torch.tensor(step)
            self._link_states()
        states = trainable.named_optimizer()["state"]
        for name, p in self._trainable():
            safe_set_full_fp32_param(p, trainable.weights[name])
            if (state := states.get(name)) is not None:
                for key in ("exp_avg", "exp_avg_sq"):
                    safe_set_full_optimizer_state(p, state[key], key)
        if self.stage == 2:
            opt.update_lp_params()
        else:
            for i in range(len(opt.fp16_groups)):
                opt._reassign_or_swap_out_partitioned_parameters(i)

    def final_state(self, model):
        """What ``save_pretrained`` writes: an adapter's trained fp32 weights (the master copy) gathered on
        rank 0, or, for a full or partly frozen model, every weight gathered one at a time as it is
        written (``stream_save``): the trained ones from the fp32 master, the frozen ones as they are."""
        if hasattr(model, "peft_config"):
            trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            pairs = gathered_named(trained, self._whole, self.is_main_process)
            return {n: t for n, t in pairs if t is not None}
        return gathered(model, self._whole, self.is_main_process)

    def _whole(self, name: str, p: torch.Tensor) -> torch.Tensor:
        """One parameter's whole value (every rank calls it): the fp32 master of a trained one."""
        from deepspeed.utils import safe_get_full_fp32_param

        if p.requires_grad:
            return safe_get_full_fp32_param(p).reshape(getattr(p, "ds_shape", p.shape))
        if not hasattr(p, "ds_id"):  # ZeRO-2 keeps the weights whole; a buffer
            return p.detach()
        with self.deepspeed.zero.GatheredParameters([p]):
            return p.detach().clone()


class ZeroOptimizer:
    """The loop's optimizer under ZeRO: ``step`` is DeepSpeed's step; a ``zero_grad`` after a window
    without a step (the stability guard skipped the update) runs DeepSpeed's step with the update itself
    left out, so its gradient partitions are freed and its counters stay in line."""

    def __init__(self, engine, optimizer: torch.optim.Optimizer):
        self.engine, self.client = engine, optimizer
        self.pending: str | None = None  # gradients since the last step: None, "partial" or "reduced"

    @property
    def param_groups(self):
        return self.client.param_groups  # the lr schedule sets the lrs DeepSpeed's optimizer reads

    def step(self) -> None:
        self.engine.step()
        self.pending = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.pending == "partial":  # an out-of-memory error inside an accumulation window
            from dstune.errors import DstuneError

            raise DstuneError(
                "out of memory inside an accumulation window under DeepSpeed ZeRO, which cannot drop the "
                "gradients it accumulated; lower train.micro_batch_size (dstune plan shows what fits)"
            )
        if self.pending == "reduced":
            inner = self.engine.optimizer.optimizer
            inner.step = lambda *a, **k: None  # this one step updates nothing
            try:
                self.engine.step()
            finally:
                del inner.step
            if not inner.state and hasattr(self.engine.optimizer, "_hp_optimizer_states_linked"):
                self.engine.optimizer._hp_optimizer_states_linked = False  # link at the first real step
        self.pending = None
