"""``dstune eval RUN --data FILE``: score a trained run on a data file and write ``eval.json`` and a report.

What is measured follows the data:

- every file: loss and perplexity over the tokens that carry loss, tokenized exactly as in training
  (the run's chat template, ``max_length`` and ``train_on``);
- conversations (alpaca, messages): the model answers each prompt greedily and the answers are scored
  against the reference replies with BLEU, ROUGE-1/2/L and exact match (reasoning before ``</think>``
  is left out of both, so R1-style models are scored on their answers);
- classification rows: each label name is scored as the reply (the summed log-probability of its
  tokens and the end of turn, as trained), the softmax over the labels gives class probabilities,
  and the top one is the prediction: accuracy, precision/recall/F1 (macro and per class), confusion
  matrix; for two labels also the thresholds on p(positive) that maximise F1 and that reach a
  target recall. Tune thresholds on a validation file, not on the test file you report;
- a run trained with a classification head (``task: classification``, ``labels.json`` in the run): the
  head's softmax gives the class probabilities directly, with the same metrics and thresholds; the loss
  is the head's cross-entropy (no perplexity).

``max_samples`` (``--max-samples N``) is one rule for every run and metric: only the first N rows are used,
loss and perplexity included, as if the file held only them; without it every row is used.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dstune.config import load_config
from dstune.core.collate import collate
from dstune.core.facts import pad_id
from dstune.data import DataError, load_examples
from dstune.data.formats import strip_reasoning
from dstune.data.tokenize import IGNORE, tokenize_examples
from dstune.errors import UsageError
from dstune.evaluate import metrics as M
from dstune.evaluate.answers import answer_text
from dstune.evaluate.loss import evaluate_loss
from dstune.rundir import NotARunError, RunDir

_SAMPLES = 20  # examples kept in eval.json for a person to read


@torch.no_grad()
def score_labels(model, tokenizer, template: str, example: dict, labels: list[str]) -> list[float]:
    """Log-probability of each label as the reply to a classification example's prompt.

    The example is rendered once per label with the training path (``tokenize_examples``), so the
    tokens scored are exactly the tokens that carried loss in training: the label and the end of turn.
    Nothing is truncated: cutting a long text would cut the label it is scored on.
    """
    candidates = [
        {**example, "messages": example["messages"][:-1] + [{"role": "assistant", "content": label}]}
        for label in labels
    ]
    tok = tokenize_examples(candidates, tokenizer, template, max_length=10**9)
    if len(tok.rows) != len(labels):
        raise DataError(f"{example['source']}: cannot score every label ({tok.dropped})")
    pad = pad_id(tokenizer)
    batch = collate(tok.rows, pad)
    device = next(model.parameters()).device
    logits = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    ).logits
    target = batch["labels"][:, 1:].to(device)
    nll = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE, reduction="none"
    )
    return (-nll.sum(dim=1)).tolist()


def _head_probabilities(
    loaded, examples: list[dict], labels: list[str], max_length: int, batch_size: int
) -> tuple[list[list[float]], float, int]:
    """Class probabilities from a classification head, the mean cross-entropy, and the rows scored."""
    from dstune.data.classify import tokenize_classification
    from dstune.evaluate.loss import classifier_outputs

    rows = tokenize_classification(examples, loaded.tokenizer, labels, max_length).rows
    if len(rows) != len(examples):
        raise DataError(f"{len(examples) - len(rows)} rows contain a control token and cannot be classified")
    tok = loaded.tokenizer
    pad = pad_id(tok)
    _, probs, losses = classifier_outputs(loaded.model, rows, batch_size, pad)
    return probs, sum(losses) / max(len(rows), 1), len(rows)


def _classification(
    loaded,
    examples: list[dict],
    labels: list[str],
    positive: str | None,
    target_recall: float,
    head_probs: list[list[float]] | None = None,
) -> dict:
    y_true, y_pred, probs, samples = [], [], [], []
    for i, ex in enumerate(examples):
        if head_probs is not None:
            p = head_probs[i]
        else:
            scores = torch.tensor(
                score_labels(loaded.model, loaded.tokenizer, loaded.chat_template, ex, labels)
            )
            p = torch.softmax(scores, dim=0).tolist()
        y_true.append(ex["label"])
        y_pred.append(labels[max(range(len(labels)), key=p.__getitem__)])
        probs.append(p)
        if len(samples) < _SAMPLES:
            samples.append(
                {
                    "source": ex["source"],
                    "text": ex["messages"][-2]["content"][:300],
                    "label": ex["label"],
                    "predicted": y_pred[-1],
                    "probabilities": dict(zip(labels, (round(x, 6) for x in p))),
                }
            )
    out: dict[str, Any] = {
        "classification": M.classification_metrics(y_true, y_pred, labels),
        "samples": samples,
    }
    if len(labels) == 2:
        positive = positive or labels[-1]
        if positive not in labels:
            raise DataError(f"--positive-label {positive!r} is not one of the labels {labels}")
        k = labels.index(positive)
        y = [int(t == positive) for t in y_true]
        pos_scores = [p[k] for p in probs]
        if 0 < sum(y) < len(y):
            out["thresholds"] = {
                "positive_label": positive,
                "score": f"p({positive})",
                "tuned_on": "this data",
                "best_f1": M.best_f1_threshold(y, pos_scores),
                "target_recall": {
                    "target": target_recall,
                    **M.threshold_for_recall(y, pos_scores, target_recall),
                },
            }
    return out


def _generation(loaded, examples: list[dict], max_new_tokens: int) -> dict:
    from dstune.generate import generate_reply

    hyps, refs, samples = [], [], []
    for ex in examples:
        last = max(i for i, m in enumerate(ex["messages"]) if m["role"] == "assistant")
        prompt = [{"role": m["role"], "content": m["content"]} for m in ex["messages"][:last]]
        reply = generate_reply(loaded, prompt, max_new_tokens=max_new_tokens)
        hyps.append(answer_text(reply))
        refs.append(answer_text(ex["messages"][last]["content"]))
        if len(samples) < _SAMPLES:
            samples.append(
                {
                    "source": ex["source"],
                    "prompt": prompt[-1]["content"][:300],
                    "reference": refs[-1][:300],
                    "prediction": reply[:300],
                }
            )
    return {
        "generation": {
            "bleu": M.bleu(hyps, refs),
            "rouge": M.rouge(hyps, refs),
            "exact_match": M.exact_match(hyps, refs),
            "examples": len(refs),
        },
        "samples": samples,
    }


def evaluate_run(
    run_dir: str | Path,
    data: str | Path,
    *,
    max_samples: int | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 4,
    positive_label: str | None = None,
    target_recall: float = 0.9,
    text_column: str | None = None,
    label_column: str | None = None,
    task: str | None = None,
    write: bool = True,
) -> dict:
    """Evaluates a run directory on a data file and writes ``eval.json``, ``eval.md`` and charts into it.

    Args:
        run_dir: a directory written by ``dstune train``.
        data: a data file in any format dstune reads; the run's ``data.*`` options (format, columns,
            system prompt, reasoning policy) apply.
        max_samples: use only the first this many examples of ``data`` for every metric, loss and
            perplexity included (as if the file held only them); None uses every row.
        max_new_tokens: tokens generated per answer.
        batch_size: rows per forward pass for the loss.
        positive_label: the positive class of a binary task (default: the last label in sorted order,
            "1" of 0/1).
        target_recall: the recall the second tuned threshold must reach.
        text_column, label_column: classification columns of ``data`` when they differ from the run's
            (a file written by ``dstune data prepare`` always has ``text`` and ``label``).
        task: a run with a head per task (``classify.heads``): the task whose head classifies ``data``;
            None picks the one task whose labels hold the file's.
        write: write the files; False only returns the results.

    Returns:
        The content of ``eval.json``.

    Raises:
        NotARunError: ``run_dir`` is not a finished run.
        DataError: a bad data file or row.
    """
    from dstune.generate import load_for_inference
    from dstune.models.classify import read_heads, read_labels

    run = Path(run_dir)
    if not RunDir(run).run_json.is_file() or not RunDir(run).config.is_file():
        raise NotARunError(
            f"{run} is not a run directory (no run.json and config.yaml); give the --output "
            "directory of a dstune train run"
        )
    if task is not None and read_heads(run) is None:
        raise UsageError(f"--task {task}: {run} was not trained with a head per task (classify.heads)")
    dc = load_config(RunDir(run).config).data
    loaded_data = load_examples(
        data,
        dc.format,
        dc.lenient,
        None,
        dc.system,
        text_column=text_column or dc.text_column,
        label_column=label_column or dc.label_column,
    )
    total, examples = len(loaded_data.examples), _first(loaded_data.examples, max_samples)
    if dc.reasoning == "strip":
        examples = [strip_reasoning(ex) for ex in examples]
    loaded = load_for_inference(str(run))
    head_labels = read_labels(run)
    common = dict(total=total, max_samples=max_samples, batch_size=batch_size)
    common.update(positive_label=positive_label, target_recall=target_recall)
    if head_labels is not None:  # a classification head: no tokens to predict, no perplexity
        result = _evaluate_head(
            run, data, loaded, loaded_data.format, examples, head_labels, dc, task=task, **common
        )
    else:
        result = _evaluate_lm(
            run, data, loaded, loaded_data.format, examples, dc, max_new_tokens=max_new_tokens, **common
        )
    return _write_eval(run, result) if write else result


def _evaluate_head(
    run: Path,
    data,
    loaded,
    fmt: str,
    examples: list[dict],
    head_labels: list[str],
    dc,
    *,
    total: int,
    max_samples: int | None,
    batch_size: int,
    positive_label: str | None,
    target_recall: float,
    task: str | None = None,
) -> dict[str, Any]:
    """The metrics of a classification-head run: its class probabilities, loss, accuracy and F1; for a
    run with a head per task, of the head of ``task`` (``_head_of``)."""
    if fmt != "classification":
        raise DataError(
            f"{run} is a classification run (labels {head_labels}) but {data} holds "
            f"{fmt} rows; give a file with a text and a label column"
        )
    from dstune.models.classify import read_heads

    heads, named = read_heads(run), examples
    if heads:
        task, (start, end) = _head_of(run, data, heads, head_labels, examples, task)
        own = [name.split(":", 1)[1] for name in head_labels[start:end]]
        unknown = sorted({ex["label"] for ex in examples} - set(own))
        if unknown:
            raise DataError(f"{data}: labels {unknown} are not among the labels {own} of task {task!r}")
        named = [{**ex, "label": f"{task}:{ex['label']}"} for ex in examples]
    elif unknown := sorted({ex["label"] for ex in examples} - set(head_labels)):
        raise DataError(
            f"{data}: labels {unknown} are not among the run's labels {head_labels} (labels.json)"
        )
    probs, loss, scored = _head_probabilities(loaded, named, head_labels, dc.max_length, batch_size)
    if heads:  # the task's own head: its classes and their probabilities (the block sums to 1)
        head_labels, probs = own, [p[start:end] for p in probs]
    result = {
        "run": str(run),
        "data": str(data),
        "format": "classification",
        "task": "classification",
        "head": f"sequence classification, the head of task {task}" if heads else "sequence classification",
        "rows": total,
        "max_samples": max_samples,
        "scored_rows": scored,
        "dropped": {},
        "loss": loss,
        "ppl": None,
        "tokens": 0,
        "labels": head_labels,
        **({"head_task": task} if heads else {}),
    }
    result.update(_classification(loaded, examples, head_labels, positive_label, target_recall, probs))
    return result


def _head_of(
    run: Path,
    data,
    heads: dict[str, list[int]],
    head_labels: list[str],
    examples: list[dict],
    task: str | None,
) -> tuple[str, list[int]]:
    """The task (and its block) whose head classifies ``data``: ``task``, or the one task whose labels hold
    every label of the file."""
    own = {name: {label.split(":", 1)[1] for label in head_labels[s:e]} for name, (s, e) in heads.items()}
    if task is None:
        found = {ex["label"] for ex in examples}
        fits = [name for name, labels in own.items() if found <= labels]
        if len(fits) != 1:
            raise UsageError(
                f"{run} has a head per task ({', '.join(f'{n}: {sorted(v)}' for n, v in own.items())}); "
                f"the labels of {data} ({sorted(found)}) fit {fits or 'none of them'}: choose one with --task"
            )
        task = fits[0]
    if task not in heads:
        raise UsageError(f"--task {task}: {run}'s tasks are {', '.join(heads)}")
    return task, heads[task]


def _evaluate_lm(
    run: Path,
    data,
    loaded,
    fmt: str,
    examples: list[dict],
    dc,
    total: int,
    max_samples: int | None,
    batch_size: int,
    max_new_tokens: int,
    positive_label: str | None,
    target_recall: float,
) -> dict[str, Any]:
    """The metrics of a language-model run: loss and perplexity, then answers or labels by generation."""
    tok = loaded.tokenizer
    rows = tokenize_examples(examples, tok, loaded.chat_template, dc.max_length, dc.overflow, dc.train_on)
    loss = evaluate_loss(loaded.model, rows.rows, batch_size, pad_id(tok))
    task = "classification" if fmt == "classification" else "text" if fmt == "text" else "generation"
    result: dict[str, Any] = {
        "run": str(run),
        "data": str(data),
        "format": fmt,
        "task": task,
        "rows": total,
        "max_samples": max_samples,
        "scored_rows": len(rows.rows),
        "dropped": rows.dropped,
        "loss": loss.get("loss"),
        "ppl": M.perplexity(loss["loss"]) if loss else None,
        "tokens": loss.get("tokens", 0),
    }
    if task == "classification":
        info = RunDir(run).read_json(RunDir.DATA_REPORT)
        trained = info.get("read", {}).get("train", {}).get("labels")
        labels = sorted(set(trained or []) | {ex["label"] for ex in examples})
        result["labels"] = labels
        result.update(_classification(loaded, examples, labels, positive_label, target_recall))
    elif task == "generation":
        result.update(_generation(loaded, examples, max_new_tokens))
    return result


def _first(examples: list[dict], max_samples: int | None) -> list[dict]:
    """The examples every metric uses: the first ``max_samples`` ones, or all of them."""
    if max_samples is not None and max_samples < 1:
        raise UsageError(
            f"--max-samples must be at least 1, got {max_samples}; leave it out to use every row"
        )
    return examples[:max_samples] if max_samples else examples


def _write_eval(run: Path, result: dict) -> dict:
    """Writes ``eval.json``, the charts and ``eval.md`` into the run directory; returns ``result``."""
    from dstune.report.charts import plot_confusion, plot_run_curves

    RunDir(run).eval_json.write_text(
        json.dumps(result, indent=2, ensure_ascii=False, default=_json_number), "utf-8"
    )
    charts = plot_run_curves(run, RunDir(run).plots)
    if "classification" in result:
        c = result["classification"]
        charts["confusion"] = plot_confusion(
            c["confusion_matrix"], c["labels"], RunDir(run).plots / "confusion.png"
        )
    RunDir(run).eval_md.write_text(
        render_eval_md(result, {k: p.relative_to(run) for k, p in charts.items()}), "utf-8"
    )
    return result


def _json_number(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


def _f(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render_eval_md(result: dict, charts: dict[str, Path]) -> str:
    """The evaluation as a Markdown report linking the charts (paths relative to the run directory)."""
    limited = (
        f"the first {result['max_samples']} used (--max-samples), "
        if result.get("max_samples") and result["max_samples"] < result["rows"]
        else ""
    )
    lines = [
        f"# Evaluation of {Path(result['run']).name}",
        "",
        f"Data: `{result['data']}` ({result['format']}, "
        f"{result['rows']} rows, {limited}{result['scored_rows']} scored for loss)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| loss | {_f(result['loss'])} |",
        f"| perplexity | {_f(result['ppl'], 2)} |",
    ]
    if "generation" in result:
        g = result["generation"]
        lines += [
            f"| BLEU ({g['bleu']['tokenize']}) | {g['bleu']['bleu']:.2f} |",
            *(
                f"| {name} ({g['rouge']['segmentation']}) | {g['rouge'][k]:.4f} |"
                for k, name in (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"))
            ),
            f"| exact match | {g['exact_match']:.4f} |",
            f"| answers generated | {g['examples']} |",
        ]
    if "classification" in result:
        c = result["classification"]
        lines += [
            f"| accuracy | {c['accuracy']:.4f} |",
            f"| precision (macro) | {c['precision_macro']:.4f} |",
            f"| recall (macro) | {c['recall_macro']:.4f} |",
            f"| F1 (macro) | {c['f1_macro']:.4f} |",
            "",
            "| class | precision | recall | F1 | support |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v['support']} |"
            for k, v in c["per_class"].items()
        ]
        lines += [
            "",
            "Confusion matrix (rows true, columns predicted; index: label): "
            + ", ".join(f"{i}: {lab}" for i, lab in enumerate(c["labels"])),
            "",
        ]
        lines += ["| | " + " | ".join(c["labels"]) + " |", "|---" * (len(c["labels"]) + 1) + "|"]
        lines += [
            f"| {lab} | " + " | ".join(map(str, row)) + " |"
            for lab, row in zip(c["labels"], c["confusion_matrix"])
        ]
        if "thresholds" in result:
            t = result["thresholds"]
            lines += ["", f"Thresholds on {t['score']} (tuned on this data):", ""]
            points = (
                ("best F1", t["best_f1"]),
                (f"recall >= {t['target_recall']['target']}", t["target_recall"]),
            )
            for name, point in points:
                lines.append(
                    f"- {name}: threshold {point['threshold']:.4f} (precision {point['precision']:.4f}, "
                    f"recall {point['recall']:.4f}, F1 {point['f1']:.4f})"
                )
    if charts:
        lines += ["", "## Charts", ""] + [f"![{name}]({path.as_posix()})" for name, path in charts.items()]
    if result.get("samples"):
        lines += ["", "## Samples", ""]
        for s in result["samples"][:5]:
            lines.append(
                "- " + "; ".join(f"**{k}**: {str(v)[:160]!s}".replace("\n", " ") for k, v in s.items())
            )
    return "\n".join(lines) + "\n"
