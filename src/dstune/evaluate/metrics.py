"""Evaluation metrics: perplexity, BLEU, ROUGE, exact match, classification scores, threshold tuning.

Every function takes plain Python lists and returns plain numbers or dicts, so the same code serves
``dstune eval``, an evaluation inside training and a notebook. Chinese text is handled throughout:
BLEU uses sacrebleu's ``zh`` tokenizer (one token per CJK character) and ROUGE segments words with jieba.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from typing import Sequence

from dstune.errors import UsageError

_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"[a-z0-9]+")


def perplexity(loss: float) -> float:
    """``exp(loss)`` for a mean next-token loss in nats; inf when that overflows a float."""
    return math.exp(loss) if loss < 709 else math.inf


def is_chinese(texts: str | Sequence[str], share: float = 0.3) -> bool:
    """Whether CJK ideographs make up at least ``share`` of the non-space characters of ``texts``.

    A share rather than "any CJK character": English answers quoting one Chinese name stay English,
    Chinese answers with English terms in them stay Chinese.
    """
    text = texts if isinstance(texts, str) else "".join(texts)
    chars = [c for c in text if not c.isspace()]
    return bool(chars) and sum(bool(_CJK.match(c)) for c in chars) / len(chars) >= share


# --------------------------------------------------------------------------- generation


def bleu(hypotheses: Sequence[str], references: Sequence[str], tokenize: str | None = None) -> dict:
    """Corpus BLEU with sacrebleu (one reference per hypothesis).

    Args:
        hypotheses: model outputs.
        references: the expected outputs, in the same order.
        tokenize: a sacrebleu tokenizer; None picks ``zh`` when any reference is Chinese
            (``is_chinese``), else sacrebleu's default ``13a``. ``13a`` splits on spaces and
            punctuation, so a Chinese sentence would be one "word" and BLEU would be near 0; ``zh``
            splits CJK characters and tokenizes the rest as ``13a`` does, so it is right for a mixed set.

    Returns:
        ``{"bleu": 0-100, "precisions": [p1..p4 in %], "bp": brevity penalty, "tokenize": name}``.
    """
    import sacrebleu

    _check_pairs(hypotheses, references)
    tokenize = tokenize or ("zh" if any(map(is_chinese, references)) else "13a")
    result = sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize=tokenize)
    return {
        "bleu": result.score,
        "precisions": list(result.precisions),
        "bp": result.bp,
        "tokenize": tokenize,
    }


def rouge_tokens(text: str, chinese: bool) -> list[str]:
    """Tokens ROUGE counts: jieba words for Chinese, lowercase alphanumeric words otherwise.

    Punctuation is not a token in either case (as in the ``rouge-score`` package's tokenizer).
    """
    if chinese:
        import jieba

        jieba.setLogLevel(logging.WARNING)  # it logs the dictionary loading on first use
        return [t for t in jieba.lcut(text.lower()) if any(c.isalnum() for c in t)]
    return _WORD.findall(text.lower())


def _prf(overlap: int, n_hyp: int, n_ref: int) -> tuple[float, float, float]:
    p = overlap / n_hyp if n_hyp else 0.0
    r = overlap / n_ref if n_ref else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def rouge_n(hyp: Sequence[str], ref: Sequence[str], n: int) -> tuple[float, float, float]:
    """ROUGE-N precision, recall and F1 of one token sequence against one reference (clipped counts)."""
    h = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
    r = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
    return _prf(sum((h & r).values()), sum(h.values()), sum(r.values()))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row of memory)."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, start=1):
            prev_diag, row[j] = row[j], (prev_diag + 1 if x == y else max(row[j], row[j - 1]))
    return row[-1]


def rouge_l(hyp: Sequence[str], ref: Sequence[str]) -> tuple[float, float, float]:
    """ROUGE-L precision, recall and F1 (beta = 1) from the longest common subsequence."""
    return _prf(lcs_length(hyp, ref), len(hyp), len(ref))


def rouge(hypotheses: Sequence[str], references: Sequence[str], chinese: bool | None = None) -> dict:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures, averaged over the pairs (as ``rouge-score`` reports).

    Written here rather than taken from the ``rouge-score`` package because that package's tokenizer
    keeps only ``[a-z0-9]`` and so drops every Chinese character: Chinese needs word segmentation
    (jieba) first, and the counting on top is a few lines.

    Args:
        hypotheses: model outputs.
        references: expected outputs, same order.
        chinese: segment every pair with jieba (True) or into words (False); None decides per pair
            from its reference (``is_chinese``), so a mixed English/Chinese set is scored right.

    Returns:
        ``{"rouge1", "rouge2", "rougeL"}`` in [0, 1], and ``"segmentation"``: "jieba", "words" or
        "mixed" (some pairs each way).
    """
    _check_pairs(hypotheses, references)
    scores = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    used = set()
    for hyp, ref in zip(hypotheses, references):
        zh = is_chinese(ref) if chinese is None else chinese
        used.add("jieba" if zh else "words")
        h, r = rouge_tokens(hyp, zh), rouge_tokens(ref, zh)
        scores["rouge1"] += rouge_n(h, r, 1)[2]
        scores["rouge2"] += rouge_n(h, r, 2)[2]
        scores["rougeL"] += rouge_l(h, r)[2]
    n = max(len(references), 1)
    segmentation = used.pop() if len(used) == 1 else "mixed" if used else "words"
    return {**{k: v / n for k, v in scores.items()}, "segmentation": segmentation}


def normalize_answer(text: str) -> str:
    """Text as compared by exact match: stripped, case folded, runs of whitespace as one space."""
    return " ".join(text.casefold().split())


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Share of hypotheses equal to their reference after ``normalize_answer``."""
    _check_pairs(hypotheses, references)
    if not references:
        return 0.0
    return sum(normalize_answer(h) == normalize_answer(r) for h, r in zip(hypotheses, references)) / len(
        references
    )


def _check_pairs(hypotheses: Sequence, references: Sequence) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references; they must pair up")


# --------------------------------------------------------------------------- classification


def classification_metrics(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str] | None = None
) -> dict:
    """Accuracy, macro and per-class precision/recall/F1, and the confusion matrix (scikit-learn).

    Args:
        y_true: true label names.
        y_pred: predicted label names.
        labels: the classes in the order to report them; None takes the sorted union of both lists.

    Returns:
        ``{"accuracy", "precision_macro", "recall_macro", "f1_macro", "per_class": {label: {"precision",
        "recall", "f1", "support"}}, "labels": [...], "confusion_matrix": rows = true, columns =
        predicted, in ``labels`` order}``. A class never predicted has precision 0 (not an error).
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    _check_pairs(y_pred, y_true)
    labels = list(labels) if labels is not None else sorted(set(y_true) | set(y_pred))
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision_macro": float(p.mean()),
        "recall_macro": float(r.mean()),
        "f1_macro": float(f.mean()),
        "per_class": {
            lab: {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(support[i]),
            }
            for i, lab in enumerate(labels)
        },
        "labels": labels,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def _pr_points(y_true: Sequence[int], scores: Sequence[float]):
    from sklearn.metrics import precision_recall_curve

    if len(set(y_true) - {0, 1}) or 1 not in y_true:
        raise UsageError(
            "threshold tuning needs binary labels (1 = positive) with at least one positive example"
        )
    precision, recall, thresholds = precision_recall_curve(list(y_true), list(scores))
    # sklearn appends a last point (precision 1, recall 0) that has no threshold.
    return precision[:-1], recall[:-1], thresholds


def _point(p: float, r: float, t: float) -> dict:
    return {
        "threshold": float(t),
        "precision": float(p),
        "recall": float(r),
        "f1": float(2 * p * r / (p + r)) if p + r else 0.0,
    }


def best_f1_threshold(y_true: Sequence[int], scores: Sequence[float]) -> dict:
    """The decision threshold (predict positive when ``score >= threshold``) with the highest F1.

    Args:
        y_true: 1 for the positive class, 0 otherwise.
        scores: the model's score (e.g. probability) for the positive class.

    Returns:
        ``{"threshold", "precision", "recall", "f1"}`` at that threshold; among equal F1s the lowest
        threshold.
    """
    precision, recall, thresholds = _pr_points(y_true, scores)
    f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall)]
    best = max(range(len(f1)), key=lambda i: (f1[i], -i))
    return _point(precision[best], recall[best], thresholds[best])


def threshold_for_recall(y_true: Sequence[int], scores: Sequence[float], target: float) -> dict:
    """The strictest threshold whose recall still reaches ``target``.

    Lowering a threshold can only raise recall, so every threshold below this one also reaches the
    target, with equal or lower precision; this one is the operating point to ship when missing a
    positive is what must be bounded (fraud, a rare disease).

    Args:
        y_true: 1 for the positive class, 0 otherwise.
        scores: scores for the positive class.
        target: the recall to reach, in (0, 1].

    Returns:
        ``{"threshold", "precision", "recall", "f1"}``.
    """
    if not 0 < target <= 1:
        raise UsageError(f"target recall must be in (0, 1], got {target}")
    precision, recall, thresholds = _pr_points(y_true, scores)
    # thresholds increase and recall does not increase along them: take the last that reaches the target.
    i = max(i for i in range(len(thresholds)) if recall[i] >= target - 1e-12)
    return _point(precision[i], recall[i], thresholds[i])
