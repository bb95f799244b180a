"""Search spaces: which config fields a search varies, over which domains, and built-in presets.

A space maps a dotted config key (any field of RunConfig) to a domain. Two derived keys cover what
people actually tune together: ``lora.alpha_ratio`` (alpha = ratio x r, so the LoRA scale stays
meaningful when r changes) and ``train.batch`` ("4x2" = micro-batch 4 with 2 accumulation steps, so
the memory of a step and the tokens per update can be searched as one choice).
"""

from __future__ import annotations

from typing import Any, Literal

import optuna
from pydantic import BaseModel, ConfigDict, model_validator

from dstune.config import ConfigError, RunConfig, _closest, _known_keys
from dstune.errors import UsageError

DERIVED_KEYS = ("lora.alpha_ratio", "train.batch")


class Domain(BaseModel):
    """One searched field: a float or int range (optionally log-scaled) or a list of choices."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _complete(self) -> "Domain":
        if self.type == "categorical":
            if not self.choices:
                raise UsageError("a categorical domain needs 'choices: [...]'")
        else:
            if self.low is None or self.high is None or not self.low < self.high:
                raise UsageError(
                    f"a {self.type} domain needs low < high (got low={self.low}, high={self.high})"
                )
            if self.log and self.low <= 0:
                raise UsageError("a log domain needs low > 0")
        return self

    def grid(self) -> list[Any]:
        """The values a grid search visits: the choices, or int steps of a small int range."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int" and (self.high - self.low) / (self.step or 1) <= 16:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        raise UsageError(
            "grid search needs categorical domains (or small int ranges); "
            f"turn {self.low}..{self.high} into 'type: categorical, choices: [...]'"
        )


PRESETS: dict[str, dict[str, dict]] = {
    # LoRA learning rates sit an order of magnitude above full fine-tuning ones (Hu et al. 2021,
    # LoRA, sec. 5 and appendix D: 2e-4 .. 5e-4 typical); r and alpha/r follow the ablations there.
    "lora-default": {
        "optim.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
        "lora.r": {"type": "categorical", "choices": [4, 8, 16, 32, 64]},
        "lora.alpha_ratio": {"type": "categorical", "choices": [0.5, 1.0, 2.0, 4.0]},
        "lora.dropout": {"type": "float", "low": 0.0, "high": 0.2},
        "lora.targets": {"type": "categorical", "choices": ["attention", "all-linear"]},
        "optim.warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2},
        "optim.weight_decay": {"type": "float", "low": 0.0, "high": 0.1},
        "train.batch": {"type": "categorical", "choices": ["4x1", "2x2", "8x1"]},
    },
    "full-default": {
        "optim.lr": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
        "optim.weight_decay": {"type": "float", "low": 0.0, "high": 0.1},
        "optim.warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2},
        "optim.schedule": {"type": "categorical", "choices": ["cosine", "linear", "constant"]},
    },
    "method": {
        "method": {"type": "categorical", "choices": ["lora", "freeze", "full"]},
        "optim.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
    },
    "lr": {
        "optim.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
        "optim.warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2},
    },
    # objective: dpo | kto | orpo | simpo. DPO's beta is typically 0.01-0.5 (Rafailov et al. 2023 use
    # 0.1-0.5); SimPO's 2-10 (Meng et al. 2024, table 7), hence one wide log range.
    "preference": {
        "optim.lr": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
        "preference.beta": {"type": "float", "low": 0.01, "high": 10.0, "log": True},
    },
    # objective: grpo (with tune.objective: reward). beta 0 (no KL, DAPO and Dr. GRPO) against the 0.04 of
    # DeepSeekMath's GRPO (Shao et al. 2024, sec. 4.2); group sizes as in the R1 and DAPO reports (16) and
    # what fits a CPU (4, 8).
    "grpo": {
        "optim.lr": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
        "grpo.beta": {"type": "categorical", "choices": [0.0, 0.01, 0.04]},
        "grpo.num_generations": {"type": "categorical", "choices": [4, 8, 16]},
    },
}
# The space a search uses when the config names none: the method's obvious one.
DEFAULT_PRESET = {
    "lora": "lora-default",
    "qlora": "lora-default",
    "full": "full-default",
    "freeze": "full-default",
}


def default_preset(method: str) -> str:
    """The preset searched for ``method`` when ``tune.preset`` and ``tune.space`` are both unset."""
    return DEFAULT_PRESET.get(method, "lr")


def parse_space(space: dict[str, Any], preset: str | None = None) -> dict[str, Domain]:
    """Validates a space (dotted key -> domain), starting from a preset when one is named.

    Raises:
        ConfigError: naming an unknown key (with the closest valid one) or a bad domain.
    """
    merged: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"tune.preset: unknown preset '{preset}'; choose one of {sorted(PRESETS)}")
        merged.update(PRESETS[preset])
    merged.update(space or {})
    known = set(_known_keys(RunConfig)) | set(DERIVED_KEYS)
    out = {}
    for key, domain in merged.items():
        if key not in known:
            raise ConfigError(f"tune.space: unknown key '{key}'{_closest(key)}")
        try:
            out[key] = domain if isinstance(domain, Domain) else Domain.model_validate(domain)
        except Exception as exc:  # pydantic's message names the field inside the domain
            raise ConfigError(f"tune.space.{key}: {exc}") from None
    if not out:
        raise ConfigError(
            "tune: the search space is empty; set tune.preset (e.g. lora-default) or tune.space"
        )
    return out


def suggest(trial: optuna.Trial, space: dict[str, Domain]) -> dict[str, Any]:
    """Draws one value per searched key from the trial's sampler."""
    values = {}
    for key, d in space.items():
        if d.type == "categorical":
            # optuna stores categorical values as given; lists (module-name targets) become strings
            # so they are hashable, and are turned back here.
            choices = [c if not isinstance(c, list) else ",".join(c) for c in d.choices]
            values[key] = trial.suggest_categorical(key, choices)
        elif d.type == "int":
            values[key] = trial.suggest_int(key, int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
        else:
            values[key] = trial.suggest_float(key, d.low, d.high, log=d.log, step=d.step)
    return values


def to_overrides(values: dict[str, Any], base: RunConfig) -> dict[str, Any]:
    """Turns sampled values (derived keys included) into dotted config overrides."""
    out = dict(values)
    if "train.batch" in out:
        text = str(out.pop("train.batch"))
        try:
            micro, accum = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise ConfigError(f"tune.space.train.batch: '{text}' is not MICROxACCUM, e.g. 4x2") from None
        out["train.micro_batch_size"], out["train.grad_accum"] = micro, accum
    if "lora.alpha_ratio" in out:
        r = out.get("lora.r", base.lora.r)
        out["lora.alpha"] = float(out.pop("lora.alpha_ratio")) * r
    return out
