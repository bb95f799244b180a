"""Knowledge distillation (``objective: distill``): a student learns from a teacher with the same tokenizer.

``mode: logits`` (Hinton et al. 2015, sec. 2): on every labelled token the loss is
``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(label)``, with both distributions softened
by the temperature T (T^2 keeps the soft term's gradient scale as T changes); summed over the labelled tokens
like the supervised loss, so accumulation and data parallelism normalise it the same way. The teacher is a
run directory or model, or ``base``: the student's own base with its adapter disabled, which keeps a LoRA
run close to what the base model predicted (distillation against forgetting, as in LwF, Li & Hoiem 2016).

``mode: sequence`` (Kim & Rush 2016; how the DeepSeek-R1-Distill models were made): before the first step
the teacher answers every training prompt greedily, and the student trains on those answers with the plain
label loss. Greedy decoding is deterministic, so a resumed run rebuilds the same rows. Validation in both
modes is the plain cross-entropy on the validation labels, comparable with a run that trains on labels
alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dstune.config import DistillConfig
from dstune.core.loss import IGNORE
from dstune.errors import UsageError
from dstune.train.preference import _Stats, answer_logits
from dstune.train.rollout import generate_ids, stop_ids


def distill_token_losses(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, temperature: float, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token loss of logits ``[tokens, vocab]``: alpha T^2 KL(teacher^T || student^T) + (1 - alpha) CE.
    Returns the mixed loss, the KL and the CE (each per token, fp32)."""
    s, t = student.float(), teacher.float()
    log_s = F.log_softmax(s / temperature, dim=-1)
    log_t = F.log_softmax(t / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    ce = F.cross_entropy(s, target, reduction="none")
    return alpha * temperature**2 * kl + (1 - alpha) * ce, kl.detach(), ce.detach()


@dataclass
class DistillObjective:
    """Logit distillation from ``teacher`` (a model, or "base": the student with its adapter disabled).

    Only the labelled positions get logits, from the last hidden states, so no ``rows x length x vocab``
    tensor exists for the prompts (as the preference objectives do).
    """

    cfg: DistillConfig
    teacher: object
    stats: _Stats = field(default_factory=_Stats)
    chunk_tokens: int = 0  # validation: the plain label loss

    def prepare(self, model, window: list[dict], engine) -> list[dict]:
        return window

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"][:, 1:] != IGNORE).sum()

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = batch["input_ids"], batch["attention_mask"], batch["labels"]
        student, target, _ = answer_logits(model, *inputs)
        with torch.no_grad():
            if self.teacher == "base":
                with getattr(model, "module", model).disable_adapter():
                    teacher = answer_logits(model, *inputs)[0]
            else:
                teacher = answer_logits(self.teacher, *inputs)[0]
        loss, kl, ce = distill_token_losses(student, teacher, target, self.cfg.temperature, self.cfg.alpha)
        self.stats.add("distill_kl", kl)
        self.stats.add("label_ce", ce)
        return loss.sum()

    def take_metrics(self) -> dict[str, float]:
        """The mean KL and label cross-entropy per token since the last call."""
        means, self.stats = self.stats.means(), _Stats()
        return means


def load_teacher(cfg, tokenizer, device: torch.device) -> torch.nn.Module:
    """The teacher of ``distill.teacher`` in eval mode without gradients, refused when its tokenizer is
    not the student's (the logits would be over different vocabularies)."""
    from dstune.generate import load_for_inference
    from dstune.models.load import load_tokenizer, resolve_model_dir
    from dstune.rundir import RunDir

    target = cfg.distill.teacher
    run = RunDir(target)  # the tokenizer first: a wrong teacher is refused before its weights load
    where = run.final if run.run_json.is_file() else resolve_model_dir(target).path
    teacher_tokenizer = load_tokenizer(str(where))
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UsageError(
            f"distill.teacher: {target} has another tokenizer than the student {cfg.model.name} "
            f"({len(teacher_tokenizer)} against {len(tokenizer)} tokens); distillation compares next-token "
            f"distributions, so both must share one vocabulary"
        )
    loaded = load_for_inference(target, trust_remote_code=cfg.model.trust_remote_code)
    if loaded.labels is not None:
        raise UsageError(f"distill.teacher: {target} is a classifier; a teacher generates text")
    return loaded.model.to(device).eval().requires_grad_(False)


def teacher_answers(cfg, teacher, rows: list[dict], tokenizer, template, pad_id: int, engine) -> list[dict]:
    """Sequence-level distillation: each row's prompt (its tokens before the first label) with the teacher's
    greedy answer as the labels, in batches of ``train.micro_batch_size`` prompts."""
    stops = stop_ids(tokenizer, template)
    out = []
    step = cfg.train.micro_batch_size
    for start in range(0, len(rows), step):
        part = rows[start : start + step]
        prompts = [r["input_ids"][: next(i for i, t in enumerate(r["labels"]) if t != IGNORE)] for r in part]
        answers = generate_ids(teacher, prompts, engine, pad_id, stops, cfg.distill.max_new_tokens)
        for row, prompt, answer in zip(part, prompts, answers):
            ids = (prompt + answer)[: cfg.data.max_length]
            if len(ids) > len(prompt):
                out.append({"input_ids": ids, "labels": [IGNORE] * len(prompt) + ids[len(prompt) :],
                            "source": row["source"]})  # fmt: skip
    return out


def make_distill(cfg, tokenizer, template, pad_id: int, model, data, engine):
    """The distillation objective of ``cfg``; in sequence mode the training rows are replaced by the
    teacher's answers and the objective is the plain label loss (returned as None)."""
    teacher = "base" if cfg.distill.teacher == "base" else load_teacher(cfg, tokenizer, engine.device)
    if cfg.distill.mode == "logits":
        return DistillObjective(cfg.distill, teacher)
    if teacher == "base":
        raise UsageError("distill.mode=sequence needs a teacher that generates: name its run or model")
    data.train = teacher_answers(cfg, teacher, data.train, tokenizer, template, pad_id, engine)
    data.report["distill"] = {"teacher": cfg.distill.teacher, "mode": "sequence", "rows": len(data.train)}
    return None
