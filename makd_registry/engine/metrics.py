"""Evaluation metrics as plain functions: classification, SQuAD, perplexity, Rouge-L."""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence


def classification_metrics(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy, F1 (binary: of class 1; otherwise macro) and Matthews correlation."""
    n = len(labels)
    if n == 0 or n != len(predictions):
        raise ValueError("predictions and labels must be non-empty and of equal length")
    classes = sorted(set(labels) | set(predictions))
    accuracy = sum(p == y for p, y in zip(predictions, labels, strict=True)) / n

    def f1_of(c: int) -> float:
        tp = sum(p == c and y == c for p, y in zip(predictions, labels, strict=True))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels, strict=True))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels, strict=True))
        return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)

    f1 = f1_of(1) if set(classes) <= {0, 1} else sum(f1_of(c) for c in classes) / len(classes)
    return {"accuracy": accuracy, "f1": f1, "mcc": matthews(predictions, labels, classes)}


def matthews(predictions: Sequence[int], labels: Sequence[int], classes: Sequence[int]) -> float:
    """Multi-class Matthews correlation coefficient (Gorodkin's R_K)."""
    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    confusion = [[0] * k for _ in range(k)]
    for p, y in zip(predictions, labels, strict=True):
        confusion[index[y]][index[p]] += 1
    t = [sum(row) for row in confusion]  # true counts per class
    p = [sum(confusion[i][j] for i in range(k)) for j in range(k)]  # predicted counts
    c = sum(confusion[i][i] for i in range(k))
    s = len(labels)
    num = c * s - sum(pk * tk for pk, tk in zip(p, t, strict=True))
    den = math.sqrt(s * s - sum(x * x for x in p)) * math.sqrt(s * s - sum(x * x for x in t))
    return 0.0 if den == 0 else num / den


def _normalize_answer(text: str) -> str:
    """SQuAD's official normalisation: lower case, no punctuation, articles or extra spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, truth: str) -> float:
    pred, gold = _normalize_answer(prediction).split(), _normalize_answer(truth).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Exact match and F1 in percent, each the best over an example's reference answers."""
    if not predictions or len(predictions) != len(answers):
        raise ValueError("predictions and answers must be non-empty and of equal length")
    em = f1 = 0.0
    for pred, golds in zip(predictions, answers, strict=True):
        golds = list(golds) or [""]
        em += max(float(_normalize_answer(pred) == _normalize_answer(g)) for g in golds)
        f1 += max(squad_f1(pred, g) for g in golds)
    return {"exact_match": 100 * em / len(predictions), "f1": 100 * f1 / len(predictions)}


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F-measure (β = 1) on lower-cased whitespace tokens, via the LCS."""
    a, b = prediction.lower().split(), reference.lower().split()
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)
