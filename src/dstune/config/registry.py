"""The registry of methods and tasks: what the rest of dstune needs to know about each, in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    """What the rest of dstune needs to know about a method; its ``prepare`` function is in ``methods``.

    Args:
        sections: the config sections it reads (their keys decide the checkpoint's shapes).
        merges: whether ``dstune merge`` can fold it into the base weights.
        help: one line for ``--help`` and the README's method table.
    """

    sections: tuple[str, ...]
    merges: bool
    help: str


# The one registry of methods: adding a method is a line here and its prepare function in methods.METHODS.
METHODS: dict[str, MethodSpec] = {
    "full": MethodSpec((), True, "every parameter"),
    "freeze": MethodSpec(("freeze",), True, "the top decoder layers (freeze.top_layers) and the head"),
    "lora": MethodSpec(("lora",), True, "LoRA adapters (peft) on lora.targets"),
    "qlora": MethodSpec(("lora", "qlora"), True, "LoRA on a 4- or 8-bit quantised base (bitsandbytes)"),
    "adapter": MethodSpec(("adapter",), False, "bottleneck adapters after attention and/or MLP"),
    "prefix": MethodSpec(("prompt",), False, "learned key/value prefixes in every layer (peft)"),
    "ptuning": MethodSpec(("prompt",), False, "virtual-token embeddings from a prompt encoder (peft)"),
    "prompt": MethodSpec(("prompt",), False, "learned input embeddings (peft prompt tuning)"),
    "ia3": MethodSpec(("ia3",), True, "IA3 vectors rescaling keys, values and MLP activations (peft)"),
}
# The validation metrics each task computes; with train.eval_generate an LM run also scores its answers.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "lm": ("loss", "ppl"),
    "classification": ("loss", "accuracy", "precision_macro", "recall_macro", "f1_macro"),
}
GENERATION_METRICS = ("bleu", "rouge1", "rouge2", "rougeL", "exact_match")
# Training objectives (``train.objective``): the loss a run optimises. sft is next-token cross-entropy; the
# others learn from preferences (``preference``) or from rewards of sampled completions (``grpo``).
OBJECTIVES: dict[str, str] = {
    "sft": "next-token cross-entropy on the answers (supervised fine-tuning)",
    "dpo": "direct preference optimisation on prompt/chosen/rejected pairs, against a reference model",
    "orpo": "odds-ratio preference optimisation: SFT on chosen plus an odds-ratio term, no reference",
    "simpo": "simple preference optimisation: length-normalised rewards with a margin, no reference",
    "kto": "Kahneman-Tversky optimisation on unpaired prompt/completion/label rows, against a reference",
    "grpo": "group relative policy optimisation: sample completions of prompts, score them with rewards",
    "distill": "knowledge distillation: match a teacher's next-token distributions (or learn its answers)",
}
# The data format each preference objective reads.
OBJECTIVE_FORMATS: dict[str, str] = {"dpo": "preference", "orpo": "preference", "simpo": "preference",
                                     "kto": "kto", "grpo": "prompt"}  # fmt: skip
# Validation metrics of a preference run (the same as logged on training steps).
PREFERENCE_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy")
# The reward functions ``objective: grpo`` has built in (``train.rewards``); users name their own as
# module:function.
BUILTIN_REWARDS: dict[str, str] = {
    "accuracy": "1 when the completion's final answer (\\boxed{}, else the last number or line) equals the "
    "row's answer",
    "format": "1 when the completion is <think>...</think> then an answer (R1's format)",
    "length": "0 up to max_new_tokens - length_cache tokens, then down to -1 at max_new_tokens (DAPO)",
}
# Validation metrics of a GRPO run (also ``reward/NAME`` for each reward function). Its loss is the negated
# mean reward of the greedy completions, so "lower is better" holds for every objective's default metric.
GRPO_METRICS = ("loss", "reward", "completion_length", "truncated")
