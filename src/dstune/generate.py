"""Load a model or a run directory for inference and answer with its chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dstune.core.facts import pad_id
from dstune.errors import UsageError
from dstune.models.load import load_model, load_tokenizer, resolve_model_dir
from dstune.models.templates import resolve_chat_template
from dstune.rundir import NotARunError, RunDir


@dataclass
class Loaded:
    """A model ready to answer: weights, tokenizer and the chat template it was trained with."""

    model: torch.nn.Module
    tokenizer: object
    chat_template: str
    family: str
    # A classifier (``task: classification``): its class names in head order, and the tokens per text it
    # was trained on (``data.max_length``). None for a language model, which generates text.
    labels: list[str] | None = None
    max_length: int | None = None


def load_for_inference(
    target: str, *, trust_remote_code: bool = False, revision: str | None = None
) -> Loaded:
    """Loads a run directory (base model plus adapter, or a full fine-tune) or any model spec.

    Args:
        target: a run directory written by ``dstune train``, or a model spec (hub id, local dir,
            ``.gguf`` file, ``tiny:<family>``).
    """
    run, rd = Path(target), RunDir(target)
    if rd.run_json.is_file():
        info, final = rd.read_json(RunDir.RUN), rd.final
        if not final.is_dir():
            raise NotARunError(
                f"{run} has no finished model at {final}; did the run end? "
                f"Resume it with: dstune train {rd.config} --resume"
            )
        tokenizer = load_tokenizer(str(final))
        # Every method's saved form (peft adapter, bottleneck adapters, QLoRA, full model) loads the way
        # it was trained; the run's config says how a QLoRA base was quantised.
        from dstune.config import load_config
        from dstune.methods import load_trained
        from dstune.models.classify import read_heads, read_labels

        cfg = load_config(rd.config) if rd.config.is_file() else None
        # A classification run (labels.json) is rebuilt as base + head of its labels + adapter.
        labels = read_labels(run)
        pad = pad_id(tokenizer)
        model = load_trained(
            final,
            info["base_model"],
            cfg,
            labels=labels,
            pad_id=pad if labels else None,
            heads=read_heads(run),
        )
        family = info.get("family", "")
        max_length = cfg.data.max_length if cfg is not None else None
    else:
        resolved = resolve_model_dir(target, revision=revision, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(resolved.path)
        labels, max_length = saved_classifier_labels(resolved.path), None
        if labels is not None:  # a merged classification run: the decoder with its trained head
            from dstune.models.classify import load_classifier

            pad = pad_id(tokenizer)
            model = load_classifier(resolved.path, labels, pad, trust_remote_code=trust_remote_code)
        else:
            model = load_model(
                resolved, dtype=torch.float32, trust_remote_code=trust_remote_code, revision=revision
            )
        family = resolved.family
    model.eval()
    template = resolve_chat_template(tokenizer, "auto", family)
    return Loaded(model, tokenizer, template, family, labels, max_length)


def saved_classifier_labels(model_dir: str | Path) -> list[str] | None:
    """The class names of a model directory saved as a sequence classifier (``dstune merge`` of a
    classification run, architecture ``*ForSequenceClassification``), or None for any other model."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    if not any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return None
    id2label = config.get("id2label") or {}
    return [id2label[k] for k in sorted(id2label, key=int)] or None


def check_generates(loaded: Loaded, target: str | None = None) -> None:
    """Refuses a classifier where text generation is asked for.

    Args:
        target: the run directory or model spec it was loaded from, named in the message with the
            commands that classify instead.

    Raises:
        UsageError: ``loaded`` is a classification model, saying what to use instead.
    """
    if loaded.labels is None:
        return
    message = (
        f"{target or 'this model'} is a classifier (task: classification, labels "
        f"{', '.join(loaded.labels)}): it predicts a label and cannot generate text"
    )
    if target is not None:
        message += f"; classify texts with 'dstune chat {target}'"
        if RunDir(target).run_json.is_file():  # dstune eval takes run directories only
            message += f" or a labelled file with 'dstune eval {target} --data FILE'"
    raise UsageError(message)


def prompt_ids(loaded: Loaded, messages: list[dict]) -> list[int]:
    """The token ids a generator answers ``messages`` from: the run's chat template with the generation
    prompt, tokenized without further special tokens (the template writes its own BOS)."""
    tok = loaded.tokenizer
    text = tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, chat_template=loaded.chat_template
    )
    return tok(text, add_special_tokens=False)["input_ids"]


def classifier_ids(loaded: Loaded, text: str) -> list[int]:
    """The token ids a classifier reads ``text`` as, as in training (``bos + text``, cut to
    ``data.max_length``; ``data.classify``).

    Raises:
        UsageError: the text holds a control token of the tokenizer, which training drops too.
    """
    from dstune.data.classify import tokenize_classification

    labels = loaded.labels
    example = {
        "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": labels[0]}],
        "label": labels[0],
        "source": "input",
    }
    rows = tokenize_classification([example], loaded.tokenizer, labels, loaded.max_length or 10**9).rows
    if not rows:
        raise UsageError(
            "the text holds a special (control) token of the tokenizer; training drops such rows"
        )
    return rows[0]["input_ids"]


def generate_reply(
    loaded: Loaded,
    messages: list[dict],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
    """The assistant's next reply to ``messages`` (greedy when ``temperature`` is 0)."""
    return generate_replies(
        loaded, [messages], max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
    )[0]


@torch.no_grad()
def generate_replies(
    loaded: Loaded,
    conversations: list[list[dict]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """The next reply to each conversation, from one batched ``generate`` call.

    Rows are left-padded by hand (the tokenizer may have no pad token and is shared, so its padding side
    is not touched); generate derives position ids from the attention mask, so a padded row is answered
    as it would be alone, up to float summation order.
    """
    check_generates(loaded)
    tok = loaded.tokenizer
    rows = [prompt_ids(loaded, m) for m in conversations]
    pad = pad_id(tok)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    device = next(loaded.model.parameters()).device
    torch.manual_seed(seed)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if temperature > 0
        else {"do_sample": False}
    )
    out = loaded.model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=tok.eos_token_id,
        **sampling,
    )
    return [tok.decode(row[width:], skip_special_tokens=True).strip() for row in out]
