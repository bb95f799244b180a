"""``explain``: load a run or model, tokenize one prompt as at inference, write every picture.

Every choice (``--layers``, ``--heads``, ``--target``, counts) is checked against the loaded model before
the output folder is made, so a bad option leaves nothing behind.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dstune.errors import DstuneError, UsageError
from dstune.explain import attention, attribution, lens, render
from dstune.explain.options import ExplainOptions
from dstune.generate import Loaded, classifier_ids, load_for_inference, prompt_ids
from dstune.rundir import RunDir


@dataclass
class ExplainResult:
    """What ``explain`` wrote: the folder, the files in it, and the prediction the attribution explains."""

    out: Path
    written: list[Path] = field(default_factory=list)
    explained: str = ""


def default_out(target: str) -> Path:
    """``RUN/explain`` for a run directory; ``runs/explain-<model>`` for a model spec (no run to write in)."""
    if RunDir(target).run_json.is_file():
        return Path(target) / "explain"
    return Path("runs") / ("explain-" + re.sub(r"[^A-Za-z0-9._-]+", "-", target).strip("-."))


def _load(target: str) -> Loaded:
    try:
        return load_for_inference(target)
    except DstuneError as exc:
        if Path(target).exists():
            raise
        raise UsageError(
            f"RUN {target!r}: there is no run directory at that path, and as a model spec: {exc}"
        ) from exc


@dataclass
class _Plan:
    """The checked choices: token ids, layer and head indices, the attribution's target."""

    ids: list[int]
    layers: list[int]
    heads: list[int] | str
    target_id: int | None  # a token id (generator) or label index (classifier); None: the prediction


def _plan(loaded: Loaded, prompt: str, options: ExplainOptions) -> _Plan:
    layer_choice = attention.parse_choice(options.layers, "--layers")
    head_choice = attention.parse_choice(options.heads, "--heads")
    if options.new_tokens < 1 or options.top_k < 1:
        raise UsageError(
            f"--new-tokens and --top-k must be at least 1, got {options.new_tokens}, {options.top_k}"
        )
    tok, classifier = loaded.tokenizer, loaded.labels is not None
    if classifier:  # read as in training: no chat template (data.classify)
        ids = classifier_ids(loaded, prompt)
    elif options.raw:
        ids = tok(prompt)["input_ids"]
    else:
        system = [{"role": "system", "content": options.system}] if options.system else []
        ids = prompt_ids(loaded, system + [{"role": "user", "content": prompt}])
    if not ids:
        raise UsageError("--prompt is empty after tokenization; give some text")
    n_layers = len(lens.readout(loaded.model).layers)
    layers = attention.resolve_indices(layer_choice, n_layers, "--layers", "layers")
    n_heads = loaded.model.config.num_attention_heads
    heads = (
        head_choice
        if isinstance(head_choice, str)
        else attention.resolve_indices(head_choice, n_heads, "--heads", "attention heads")
    )
    target_id = None
    if options.target is not None and classifier:
        if options.target not in loaded.labels:
            raise UsageError(f"--target {options.target!r} is not one of the run's labels {loaded.labels}")
        target_id = loaded.labels.index(options.target)
    elif options.target is not None:
        target_ids = tok(options.target, add_special_tokens=False)["input_ids"]
        if not target_ids:
            raise UsageError(
                "--target is empty after tokenization; give the text the answer should start with"
            )
        target_id = target_ids[0]
    return _Plan(ids, layers, heads, target_id)


def explain(
    target: str, prompt: str, out: str | Path | None = None, options: ExplainOptions | None = None
) -> ExplainResult:
    """Writes attention maps, the gradient x input attribution and the logit lens of one prompt.

    Args:
        target: a run directory written by ``dstune train`` (LoRA and other adapters, full, a
            classifier), or a model spec (``tiny:<family>``, ``smollm2``, a hub id or directory).
        prompt: the user message (a classifier: the text to classify).
        out: the folder to write; None: ``default_out(target)``.
        options: layers, heads, target and counts; None: the defaults.

    Returns:
        The folder, the files written in it, and what the attribution explains.

    Raises:
        UsageError: a missing run, or an option the model cannot satisfy (naming the option).
    """
    options = options or ExplainOptions()
    loaded = _load(target)
    plan = _plan(loaded, prompt, options)
    out = Path(out) if out is not None else default_out(target)
    name = Path(target).name or target
    texts = render.token_texts(loaded.tokenizer, plan.ids)
    out.mkdir(parents=True, exist_ok=True)
    result = ExplainResult(out)
    maps = attention.attention_maps(loaded.model, plan.ids)
    for layer in plan.layers:
        panels = attention.select_heads(maps[layer], plan.heads)
        title = f"{name}: attention of layer {layer} (of {len(maps)})"
        result.written.append(
            render.plot_attention(panels, texts, out / f"attention_layer{layer}.png", title)
        )
    if loaded.labels is not None:
        steps = [lens.classifier_lens(loaded.model, plan.ids, top_k=options.top_k)]
    else:
        steps = lens.logit_lens(
            loaded.model, plan.ids, new_tokens=options.new_tokens, top_k=options.top_k,
            eos_id=loaded.tokenizer.eos_token_id,
        )  # fmt: skip
    chosen = plan.target_id if plan.target_id is not None else steps[0].chosen
    result.explained, written = _write_attribution(loaded, plan.ids, texts, chosen, out, name)
    result.written += written
    result.written += _write_lens(loaded, steps, out, name)
    return result


def _name_of(loaded: Loaded, index: int) -> str:
    """A token id's text, or a classifier's label index's name."""
    if loaded.labels is not None:
        return loaded.labels[index]
    return render.token_texts(loaded.tokenizer, [index])[0]


def _write_attribution(loaded, ids, texts, chosen: int, out: Path, name: str) -> tuple[str, list[Path]]:
    """attribution.json, .html and .png towards ``chosen``; returns what was explained, and the files."""
    model = loaded.model
    if loaded.labels is not None:
        score, what = attribution.label_score(model, chosen), f"label {loaded.labels[chosen]!r} (its logit)"
    else:
        score = attribution.next_token_score(model, chosen)
        what = f"next token {_name_of(loaded, chosen)!r} (its log-probability)"
    x = attribution.input_embeddings(model, ids)
    scores = attribution.gradient_x_input(score, x).tolist()
    with torch.no_grad():
        at_x, at_zero = float(score(x)), float(score(torch.zeros_like(x)))
    title = f"{name}: gradient x input towards {what}"
    record = {
        "towards": what,
        "id": chosen,
        "score": at_x,
        "score_at_zero_embeddings": at_zero,
        "sum_of_attributions": sum(scores),  # equals score - score_at_zero only for a linear model
        "tokens": [
            {"index": i, "id": t, "text": s, "score": v}
            for i, (t, s, v) in enumerate(zip(ids, texts, scores))
        ],
    }
    path = out / "attribution.json"
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False), encoding="utf-8")
    return what, [
        path,
        render.attribution_html(texts, scores, out / "attribution.html", title),
        render.plot_attribution(texts, scores, out / "attribution.png", title),
    ]


def _write_lens(loaded: Loaded, steps: list[lens.LensStep], out: Path, name: str) -> list[Path]:
    """lens.json and one lens_N.png per predicted token (a classifier: one, over its labels)."""
    classifier, written, record = loaded.labels is not None, [], []
    for n, step in enumerate(steps, 1):
        layers = [[(_name_of(loaded, i), p) for i, p in top] for top in step.layers]
        chosen = _name_of(loaded, step.chosen)
        record.append({
            "step": n,
            "chosen": {"id": step.chosen, "text": chosen},
            "layers": [
                {"layer": li, "top": [{"id": i, "text": t, "prob": p} for (i, _), (t, p) in zip(top, named)]}
                for li, (top, named) in enumerate(zip(step.layers, layers))
            ],
        })  # fmt: skip
        what = f"label {chosen!r}" if classifier else f"generated token {n}: {render.ascii_label(chosen)!r}"
        title = f"{name}: logit lens, {what}; top {len(layers[0])} after each layer"
        written.append(render.plot_lens(layers, out / f"lens_{n}.png", title))
    path = out / "lens.json"
    kind = "labels of the classification head" if classifier else "next tokens (greedy generation)"
    path.write_text(json.dumps({"predicts": kind, "steps": record}, indent=1, ensure_ascii=False), "utf-8")
    return [path, *written]
