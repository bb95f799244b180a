"""Preference objectives: DPO (with IPO, hinge, conservative and RPO variants), ORPO, SimPO and KTO.

Each is an ``Objective`` (``train.objective``): ``loss_sum`` sums a per-example loss over the pairs (KTO:
rows) of a micro-batch and ``units`` counts them, so the loop's window normalisation gives the mean over
all pairs of an optimizer step, the gradient of one big batch under accumulation and data parallelism.
A sequence log-probability is the sum of the answer tokens' log-probabilities (prompt masked); SimPO, ORPO
and IPO use the mean per token. The reference model of DPO and KTO is the same model with its peft adapter
disabled (no second copy), or, for full and freeze training, log-probabilities of the base weights computed
once in ``build`` before any step and kept on the rows (``ref_*``); a resumed run recomputes them from the
same base weights in the same order, so they are bitwise the same and nothing is saved. Each objective also
records the implicit rewards of its examples (``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracy``, TRL's names), which the hooks log with the training loss and validation reports.
Formulas follow the papers and TRL's trainers (cited at each).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dstune.config import PreferenceConfig
from dstune.core.collate import collate, eval_batches
from dstune.core.forward import no_logits
from dstune.core.loss import IGNORE


def answer_logits(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, ...]:
    """The output layer's logits at the positions that predict a labelled token ``[tokens, vocab]``, those
    tokens, and the mask of labelled positions ``[rows, length - 1]``.

    The model returns its last hidden states only (``no_logits``) and the output layer runs on the
    labelled positions alone, so no ``rows x length x vocabulary`` logits exist for the prompts.
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        logits_to_keep=no_logits(input_ids),
    )
    hidden = out.hidden_states[-1][:, -labels.shape[1] :]  # prompt-learning methods prepend virtual tokens
    keep = labels[:, 1:] != IGNORE
    head = getattr(model, "module", model).get_output_embeddings()
    return F.linear(hidden[:, :-1][keep], head.weight, head.bias), labels[:, 1:][keep], keep


def token_logps(
    model, input_ids, attention_mask, labels, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each labelled token (next-token, shifted) as ``[rows, length - 1]`` (0 where
    unlabelled), and the mask of labelled positions. Logits are divided by ``temperature`` first (GRPO
    scores tokens under the distribution it sampled them from)."""
    logits, target, keep = answer_logits(model, input_ids, attention_mask, labels)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    flat = logits.log_softmax(-1).gather(1, target[:, None]).squeeze(1)
    return torch.zeros(keep.shape, dtype=flat.dtype, device=flat.device).masked_scatter(keep, flat), keep


def sequence_logps(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's labelled tokens and their count (``token_logps`` summed)."""
    logps, keep = token_logps(model, input_ids, attention_mask, labels)
    return logps.sum(1), keep.sum(1)


def _pad_to(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return F.pad(t, (0, width - t.shape[1]), value=value)


def pair_inputs(batch: dict[str, torch.Tensor], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Chosen rows then rejected rows, right-padded to one width: one forward computes both (as TRL's
    ``concatenated_forward``), so both sides see the same weights, dropout draws aside."""
    width = max(batch["input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    ids = torch.cat([_pad_to(batch[p + "input_ids"], width, pad_id) for p in ("", "rejected_")])
    mask = torch.cat([_pad_to(batch[p + "attention_mask"], width, 0) for p in ("", "rejected_")])
    labels = torch.cat([_pad_to(batch[p + "labels"], width, IGNORE) for p in ("", "rejected_")])
    return ids, mask, labels


def reference_context(model):
    """The reference model's context: the peft adapter disabled, no gradient."""
    peft = getattr(model, "module", model)
    return peft.disable_adapter()


# ----------------------------------------------------------------------------- the losses, as formulas


def dpo_losses(pc, pr, rc, rr, beta: float, loss_type: str, label_smoothing: float):
    """DPO (Rafailov et al. 2023, eq. 7), conservative DPO (label smoothing, Mitchell 2023), IPO (Azar et
    al. 2023, eq. 17, on mean token log-probs as TRL does) and hinge (SLiC, Zhao et al. 2023); as TRL's
    ``DPOTrainer.dpo_loss``. Returns per-pair losses and the implicit rewards beta x (policy - reference)."""
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        losses = (
            -F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing
        )
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:  # ipo: regress the log-ratio margin to 1 / (2 beta)
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def simpo_losses(pc_mean, pr_mean, beta: float, gamma: float, label_smoothing: float):
    """SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta/|y_w| log p(y_w) - beta/|y_l| log p(y_l) - gamma),
    as TRL's ``CPOTrainer`` with ``loss_type="simpo"`` and no NLL term (``cpo_alpha=0``)."""
    logits = beta * (pc_mean - pr_mean) - gamma
    losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return losses, beta * pc_mean.detach(), beta * pr_mean.detach()


def orpo_losses(pc_mean, pr_mean, beta: float):
    """ORPO (Hong et al. 2024, eqs. 2, 6-7): the chosen answer's mean token NLL plus lambda x -log sigmoid of
    the log odds ratio, odds = p / (1 - p) with p the mean-token probability; lambda is ``beta`` as in TRL's
    ``ORPOTrainer.odds_ratio_loss``. The NLL is per pair (the paper's mean over examples); TRL averages it
    over the batch's tokens instead, which differs when answer lengths differ."""
    log_odds = (pc_mean - pr_mean) - (torch.log1p(-torch.exp(pc_mean)) - torch.log1p(-torch.exp(pr_mean)))
    losses = -pc_mean - beta * F.logsigmoid(log_odds)
    return losses, beta * pc_mean.detach(), beta * pr_mean.detach()


def kto_losses(p, ref, desirable, kl, beta: float, w_desirable: float, w_undesirable: float):
    """KTO (Ethayarajh et al. 2024, eq. 8), as TRL's ``KTOTrainer.kto_loss``: with r = log p - log p_ref and
    z0 the (detached, clamped at 0) KL estimate, desirable rows lose w_d (1 - sigmoid(beta (r - z0))) and
    undesirable ones w_u (1 - sigmoid(beta (z0 - r)))."""
    r = p - ref
    good = desirable.bool()
    losses = torch.where(
        good,
        w_desirable * (1 - torch.sigmoid(beta * (r - kl))),
        w_undesirable * (1 - torch.sigmoid(beta * (kl - r))),
    )
    return losses, (beta * r).detach()


# ----------------------------------------------------------------------------- the objectives


@dataclass
class _Stats:
    """Sums of the implicit rewards since the last read (host floats)."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, values: torch.Tensor) -> None:
        if values.numel():
            self.sums[name] = self.sums.get(name, 0.0) + float(values.detach().float().sum())
            self.counts[name] = self.counts.get(name, 0) + values.numel()

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in sorted(self.sums)}


@dataclass
class PreferenceObjective:
    """One preference objective (``name``: dpo, orpo, simpo or kto).

    Args:
        name: the objective.
        cfg: the ``preference`` section.
        pad_id: the pad token (to put chosen and rejected rows in one batch).
        reference: "adapter" (the peft adapter disabled), "cached" (``ref_*`` on the rows) or None.
    """

    name: str
    cfg: PreferenceConfig
    pad_id: int
    reference: str | None = None
    stats: _Stats = field(default_factory=_Stats)
    chunk_tokens: int = 0  # the loop's validation asks; preference validation computes no token loss

    @property
    def needs_reference(self) -> bool:
        return self.name in ("dpo", "kto")

    def prepare(self, model, window: list[dict], engine) -> list[dict]:
        return window

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor(len(batch["input_ids"]))

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        losses = self._kto(model, batch) if self.name == "kto" else self._pairs(model, batch)
        return losses.sum()

    def _ref(self, model, batch, key: str, ids, mask, labels) -> torch.Tensor:
        if self.reference == "cached":
            return batch[key].to(ids.device)
        with torch.no_grad(), reference_context(model):
            return sequence_logps(model, ids, mask, labels)[0]

    def _pairs(self, model, batch) -> torch.Tensor:
        c, b = self.cfg, len(batch["input_ids"])
        ids, mask, labels = pair_inputs(batch, self.pad_id)
        logps, counts = sequence_logps(model, ids, mask, labels)
        means = logps / counts.clamp(min=1)
        if self.name == "dpo":
            if self.reference == "cached":
                ref = torch.cat([batch["ref_chosen"], batch["ref_rejected"]]).to(logps.device)
            else:
                ref = self._ref(model, batch, "", ids, mask, labels)
            if c.loss_type == "ipo":  # IPO on mean token log-probs (TRL)
                logps, ref = means, ref / counts.clamp(min=1)
            losses, rc, rr = dpo_losses(
                logps[:b], logps[b:], ref[:b], ref[b:], c.beta, c.loss_type, c.label_smoothing
            )
            if c.rpo_alpha:  # RPO (Pang et al. 2024, eq. 3): + alpha x the chosen answer's mean token NLL
                losses = losses - c.rpo_alpha * means[:b]
        elif self.name == "simpo":
            losses, rc, rr = simpo_losses(means[:b], means[b:], c.beta, c.simpo_gamma, c.label_smoothing)
        else:
            losses, rc, rr = orpo_losses(means[:b], means[b:], c.beta)
        self.stats.add("rewards/chosen", rc)
        self.stats.add("rewards/rejected", rr)
        self.stats.add("rewards/margins", rc - rr)
        self.stats.add("rewards/accuracy", (rc > rr).float())
        return losses

    def _kto(self, model, batch) -> torch.Tensor:
        c = self.cfg
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        kl_in = batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"]
        logps = sequence_logps(model, ids, mask, labels)[0]
        with torch.no_grad():  # the KL estimate is a baseline, not trained through (KTO paper, TRL)
            kl_logps = sequence_logps(model, *kl_in)[0]
        ref = self._ref(model, batch, "ref_chosen", ids, mask, labels)
        ref_kl = self._ref(model, batch, "ref_kl", *kl_in)
        # The micro-batch's estimate; TRL also averages it over data-parallel processes.
        kl = (kl_logps - ref_kl).mean().clamp(min=0).detach()
        losses, rewards = kto_losses(
            logps, ref, batch["desirable"], kl, c.beta, c.desirable_weight, c.undesirable_weight
        )
        good = batch["desirable"].bool()
        self.stats.add("rewards/chosen", rewards[good])
        self.stats.add("rewards/rejected", rewards[~good])
        self.stats.add("rewards/accuracy", ((rewards > 0) == good).float())
        self.stats.add("kl", kl[None])
        return losses

    def take_metrics(self) -> dict[str, float]:
        """The mean of each recorded reward metric since the last call, then starts afresh."""
        means = self.stats.means()
        if "rewards/chosen" in means and "rewards/rejected" in means and self.name == "kto":
            means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
        self.stats = _Stats()
        return means

    @torch.no_grad()
    def evaluate(
        self, model, rows: list[dict], micro: int, engine, limit: int | None = None
    ) -> dict[str, float]:
        """The mean loss and reward metrics over ``rows`` (validation pairs), in file order."""
        if not rows:
            return {}
        kept, self.stats = self.stats, _Stats()
        was_training = model.training
        model.eval()
        total, n = 0.0, 0
        for batch in eval_batches(rows, micro, self.pad_id, limit):
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            with engine.autocast():
                total += float(self.loss_sum(model, batch))
            n += len(batch["input_ids"])
        if was_training:
            model.train()
        metrics = {"loss": total / max(n, 1), **self.take_metrics(), "pairs": n}
        self.stats = kept
        return metrics

    @torch.no_grad()
    def cache_reference(self, model, rows: list[dict], micro: int, engine) -> None:
        """Stores the reference log-probabilities of ``rows`` on them (``ref_chosen``, ``ref_rejected`` or
        ``ref_kl``): the model as it is now, in eval mode, in file order and fixed micro-batches, so the same
        base weights give bitwise the same numbers on a resumed run."""
        was_training = model.training
        model.eval()
        sides = [("ref_chosen", ""), ("ref_rejected", "rejected_"), ("ref_kl", "kl_")]
        for start in range(0, len(rows), micro):
            part = rows[start : start + micro]
            batch = {k: v.to(engine.device) for k, v in collate(part, self.pad_id).items()}
            for key, prefix in sides:
                if prefix + "input_ids" not in batch:
                    continue
                with engine.autocast():
                    inputs = [batch[prefix + k] for k in ("input_ids", "attention_mask", "labels")]
                    logps = sequence_logps(model, *inputs)[0].tolist()
                for row, value in zip(part, logps):
                    row[key] = value
        if was_training:
            model.train()


def make_objective(cfg, pad_id: int, model) -> PreferenceObjective:
    """The objective of ``cfg.objective`` (not sft) for ``model``: DPO and KTO take their reference from the
    disabled peft adapter when there is one, else from log-probabilities cached before training."""
    from peft import PeftModel

    reference = None
    if cfg.objective in ("dpo", "kto"):
        reference = "adapter" if isinstance(getattr(model, "module", model), PeftModel) else "cached"
    return PreferenceObjective(cfg.objective, cfg.preference, pad_id, reference)
