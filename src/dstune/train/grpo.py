"""GRPO: group relative policy optimisation with verifiable rewards (DeepSeekMath, Shao et al. 2024, sec.
4.1; DeepSeek-R1), as an ``Objective`` of the one training loop.

Before each optimizer step ``prepare`` turns the window's prompt micro-batches into completion batches:
it samples ``num_generations`` completions per prompt with the KV cache (transformers' ``generate``), scores
them with the reward functions (``train.rewards``), and normalises each reward within its prompt's group
into an advantage. ``loss_sum`` then computes the clipped policy objective on the completion tokens, plus
beta x the k3 KL estimate to the reference model when ``grpo.beta`` > 0 (the adapter disabled for peft
methods, a frozen copy of the starting weights for full and freeze). Each generation is used for one
update (TRL's default ``num_iterations=1``), so the old policy is the current one: the ratio is 1 with the
gradient of the policy gradient, and the clip only binds when completions are reused. Sampling draws from
the global torch generator, which checkpoints save, so a resumed run samples the same completions.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from dstune.config import GrpoConfig
from dstune.core.collate import collate
from dstune.core.loss import IGNORE
from dstune.train.preference import _Stats, token_logps
from dstune.train.rewards import load_reward, score
from dstune.train.rollout import generate_ids, stop_ids


def clipped_token_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token clipped surrogate, negated (PPO, Schulman et al. 2017, eq. 7; GRPO eq. 3):
    ``-min(ratio x A, clip(ratio, 1 - eps_low, 1 + eps_high) x A)``, and where the clip binds."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    binds = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return loss, binds


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate exp(r - p) - (r - p) - 1 (Schulman's k3, GRPO eq. 4)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def group_advantages(rewards: torch.Tensor, group: int, scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each reward minus its group's mean, divided by the group's std when ``scale`` (GRPO eq. 3, sec.
    4.1.2; Dr. GRPO drops the division). Returns the advantages and each group's std."""
    r = rewards.view(-1, group)
    std = r.std(dim=1, keepdim=True)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (std + 1e-4)
    return adv.reshape(-1), std.squeeze(1)


def aggregate(loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int) -> torch.Tensor:
    """The micro-batch's share of the step loss, to be divided by the window's ``units``: grpo sums each
    completion's token mean (units: completions); dr_grpo sums tokens / max_new_tokens (units:
    completions, Liu et al. 2025); dapo sums tokens (units: the window's completion tokens, Yu et al.
    2025)."""
    loss = loss * mask
    if loss_type == "grpo":
        return (loss.sum(1) / mask.sum(1).clamp(min=1)).sum()
    if loss_type == "dr_grpo":
        return loss.sum() / max_new_tokens
    return loss.sum()


@dataclass
class GrpoObjective:
    """The GRPO objective of one run.

    Args:
        cfg: the ``grpo`` section.
        tokenizer: decodes completions for the rewards.
        pad_id: the pad token; ``stop_ids``: the tokens that end a completion.
        rewards: (name, function, weight) of each reward.
        rows: the training rows; a micro-batch carries their indices (``row``).
        reference: None (beta 0), "adapter" (the peft adapter disabled) or a frozen model.
    """

    cfg: GrpoConfig
    tokenizer: object
    pad_id: int
    stop_ids: list[int]
    rewards: list[tuple[str, object, float]]
    rows: list[dict]
    reference: object = None
    stats: _Stats = field(default_factory=_Stats)
    samples: list[dict] = field(default_factory=list)  # the last validation's logged completions
    chunk_tokens: int = 0
    vllm: dict | None = None  # grpo.generation=vllm: VllmRollout's arguments; the engine starts at first use
    _rollout: object = None

    # ------------------------------------------------------------------ rollouts

    def generate(self, model, rows: list[dict], engine, sample: bool) -> tuple[list[list[int]], list | None]:
        """Completions of ``rows`` (``num_generations`` sampled each, or one greedy) and, from vLLM, the
        sampler's log-probability of each of their tokens (None from transformers: it is the policy)."""
        c = self.cfg
        prompts, n = [r["input_ids"] for r in rows], c.num_generations if sample else 1
        if self.vllm is None:
            return generate_ids(
                model, prompts, engine, self.pad_id, self.stop_ids, c.max_new_tokens,
                n=n, sample=sample, temperature=c.temperature, top_p=c.top_p,
            ), None  # fmt: skip
        return self._rollout.generate(
            prompts, self.stop_ids, c.max_new_tokens,
            n=n, sample=sample, temperature=c.temperature, top_p=c.top_p,
        )  # fmt: skip

    def sync_rollout(self, model, engine) -> None:
        """grpo.generation=vllm: starts vLLM at the first call, then pushes the policy's weights to it."""
        if self.vllm is None:
            return
        from dstune.train.vllm_rollout import VllmRollout

        if self._rollout is None:
            self._rollout = VllmRollout(**self.vllm)
        self._rollout.sync(engine.unwrap_model(model))

    def _score(self, rows: list[dict], completions: list[list[int]]) -> tuple[torch.Tensor, dict]:
        """The total reward of each completion and each function's rewards (NaN: not applicable)."""
        group = len(completions) // len(rows)
        owners = [r for r in rows for _ in range(group)]
        names = sorted({k for r in rows for k in r["fields"]})
        kwargs = {
            "answer": [r["answer"] for r in owners],
            **{k: [r["fields"].get(k) for r in owners] for k in names if k not in ("answer",)},
            "completion_ids": completions,
            "max_new_tokens": self.cfg.max_new_tokens,
            "length_cache": self.cfg.length_cache or max(1, self.cfg.max_new_tokens // 4),
        }
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        prompts = [r["prompt_text"] for r in owners]
        each = score([(n, f) for n, f, _ in self.rewards], prompts, texts, kwargs)
        total = torch.zeros(len(completions), dtype=torch.float64)
        for name, _, weight in self.rewards:  # a None reward adds nothing (TRL's nansum)
            total += weight * torch.tensor(each[name], dtype=torch.float64).nan_to_num(0.0)
        return total.float(), {"texts": texts, "prompts": prompts, "each": each}

    def _batch(self, rows: list[dict], completions: list[list[int]], advantages: torch.Tensor, logps) -> dict:
        """Prompt + completion token rows, right-padded, with the completion tokens as labels; with vLLM's
        log-probabilities, those too (``sampling_logps``, aligned with ``token_logps``)."""
        group = len(completions) // len(rows)
        token_rows = []
        for k, comp in enumerate(completions):
            prompt = rows[k // group]["input_ids"]
            truncated = not comp or comp[-1] not in self.stop_ids
            labels = [IGNORE] * len(comp) if truncated and self.cfg.mask_truncated else comp
            token_rows.append({"input_ids": prompt + comp, "labels": [IGNORE] * len(prompt) + labels})
        batch = collate(token_rows, self.pad_id)
        batch["advantages"] = advantages
        if logps is not None and self.cfg.vllm_is_cap:
            sampled = torch.zeros(len(completions), batch["input_ids"].shape[1] - 1)
            for k, values in enumerate(logps):  # token j of the row is predicted at position j - 1
                start = len(rows[k // group]["input_ids"]) - 1
                sampled[k, start : start + len(values)] = torch.tensor(values)
            batch["sampling_logps"] = sampled
        return batch

    def prepare(self, model, window: list[dict], engine) -> list[dict]:
        """The window's prompt micro-batches as completion batches with advantages (one rollout each)."""
        out = []
        self.sync_rollout(model, engine)
        parts = [[self.rows[i] for i in batch["row"].tolist()] for batch in window]
        for rows, (completions, logps) in zip(parts, self._sample(model, parts, engine)):
            total, scored = self._score(rows, completions)
            advantages, std = group_advantages(total, self.cfg.num_generations, self.cfg.scale_rewards)
            self._record(total, scored["each"], completions)
            self.stats.add("reward_std", std)
            self.stats.add("frac_reward_zero_std", (std == 0).float())
            out.append(self._batch(rows, completions, advantages, logps))
        return out

    def _sample(self, model, parts: list[list[dict]], engine) -> list[tuple[list, list | None]]:
        """The sampled completions of each micro-batch's rows: transformers one micro-batch at a time (its
        memory grows with the batch), vLLM all of the step's in one call (it schedules them itself)."""
        if self.vllm is None:
            return [self.generate(model, rows, engine, sample=True) for rows in parts]
        completions, logps = self.generate(model, [r for rows in parts for r in rows], engine, sample=True)
        out, start = [], 0
        for rows in parts:
            end = start + len(rows) * self.cfg.num_generations
            out.append((completions[start:end], logps[start:end]))
            start = end
        return out

    def _record(self, total: torch.Tensor, each: dict, completions: list[list[int]]) -> None:
        self.stats.add("reward", total)
        for name, values in each.items():
            v = torch.tensor(values)
            v = v[~v.isnan()]
            self.stats.add(f"reward/{name}", v)
            if len(v) > 1:  # its spread in this batch (the mean over batches is logged)
                self.stats.add(f"reward/{name}/std", v.std()[None])
        self.stats.add("completion_length", torch.tensor([len(c) for c in completions], dtype=torch.float32))
        truncated = [not c or c[-1] not in self.stop_ids for c in completions]
        self.stats.add("truncated", torch.tensor(truncated, dtype=torch.float32))

    # ------------------------------------------------------------------ the loss

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.cfg.loss_type == "dapo":
            return (batch["labels"][:, 1:] != IGNORE).sum()
        return torch.tensor(len(batch["input_ids"]))

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.cfg
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        logps, keep = token_logps(model, ids, mask, labels, c.temperature)
        # One update per generation: the sampling policy is the current one (ratio 1, gradient intact).
        loss, binds = clipped_token_loss(
            logps, logps.detach(), batch["advantages"], c.epsilon, c.epsilon_high or c.epsilon
        )
        if "sampling_logps" in batch:  # vLLM sampled: truncated importance weights p_train / p_vllm
            ratio = torch.exp(logps.detach() - batch["sampling_logps"].to(logps.device))
            loss = loss * ratio.clamp(max=c.vllm_is_cap)
            self.stats.add("vllm/is_ratio", ratio[keep])
            self.stats.add("vllm/is_capped", (ratio[keep] > c.vllm_is_cap).float())
        if c.beta:
            with torch.no_grad():
                ref = self._reference_logps(model, ids, mask, labels)
            kl = k3_kl(logps, ref)
            loss = loss + c.beta * kl
            self.stats.add("kl", kl[keep])
        self.stats.add("clip_ratio", binds[keep].float())
        return aggregate(loss, keep.float(), c.loss_type, c.max_new_tokens)

    def _reference_logps(self, model, ids, mask, labels) -> torch.Tensor:
        if self.reference == "adapter":
            with getattr(model, "module", model).disable_adapter():
                return token_logps(model, ids, mask, labels, self.cfg.temperature)[0]
        return token_logps(self.reference, ids, mask, labels, self.cfg.temperature)[0]

    def take_metrics(self) -> dict[str, float]:
        """The mean of each recorded metric since the last call, then starts afresh."""
        means, self.stats = self.stats.means(), _Stats()
        return means

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def evaluate(self, model, rows: list[dict], micro: int, engine, limit: int | None = None) -> dict:
        """Greedy completions of the validation prompts, scored: the mean total reward, each function's
        mean, completion length and truncated share; ``loss`` is the negated mean reward. The first
        ``log_completions`` are kept in ``samples`` for the run directory."""
        if not rows:
            return {}
        kept, self.stats = self.stats, _Stats()
        rows = rows[: limit * micro] if limit else rows
        # as many sequences per generate call as in training; vLLM takes them all at once
        step = len(rows) if self.vllm else micro * self.cfg.num_generations
        self.samples = []
        self.sync_rollout(model, engine)
        for start in range(0, len(rows), step):
            part = rows[start : start + step]
            completions, _ = self.generate(model, part, engine, sample=False)
            total, scored = self._score(part, completions)
            self._record(total, scored["each"], completions)
            for i in range(min(len(part), self.cfg.log_completions - len(self.samples))):
                self.samples.append({
                    "source": part[i]["source"], "prompt": scored["prompts"][i],
                    "completion": scored["texts"][i], "answer": part[i]["answer"],
                    "rewards": {n: v[i] for n, v in scored["each"].items() if not math.isnan(v[i])},
                })  # fmt: skip
        metrics = self.take_metrics()
        self.stats = kept
        return {"loss": -metrics["reward"], **metrics, "prompts": len(rows)}


def make_grpo(
    cfg, tokenizer, template: str | None, pad_id: int, model, data, model_dir: str
) -> GrpoObjective:
    """The GRPO objective of ``cfg`` for ``model`` (before the engine wraps it), loaded from ``model_dir``.
    With ``grpo.beta`` > 0 the reference is the peft adapter disabled, or a frozen copy of the starting
    weights (full, freeze): the second copy costs the model's memory once more. ``grpo.prefill`` is
    appended to every prompt of ``data``'s train and validation rows."""
    from peft import PeftModel

    reference = None
    if cfg.grpo.beta:
        if isinstance(model, PeftModel):
            reference = "adapter"
        else:
            reference = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.grpo.prefill:
        extra = tokenizer(cfg.grpo.prefill, add_special_tokens=False)["input_ids"]
        for row in data.train + data.val:
            row["input_ids"] = row["input_ids"] + extra
            row["labels"] = row["labels"] + [IGNORE] * len(extra)
            row["prompt_text"] += cfg.grpo.prefill
    rows = data.train
    for i, row in enumerate(rows):  # micro-batches carry row indices; rewards read the rows' answers
        row["row"] = i
    fns = [(r.key, load_reward(r.name), r.weight) for r in cfg.grpo.rewards]
    stops = stop_ids(tokenizer, template)
    objective = GrpoObjective(cfg.grpo, tokenizer, pad_id, stops, fns, rows, reference)
    if cfg.grpo.generation == "vllm":
        longest = max(len(r["input_ids"]) for r in data.train + data.val) + cfg.grpo.max_new_tokens
        g = cfg.grpo
        objective.vllm = dict(
            model_dir=model_dir, precision=cfg.train.precision, max_model_len=longest, seed=cfg.train.seed,
            memory=g.vllm_memory, kv_cache_gb=g.vllm_kv_cache_gb, sleep=g.vllm_sleep,
            trust_remote_code=cfg.model.trust_remote_code,
        )  # fmt: skip
    return objective
