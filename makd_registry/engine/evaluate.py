"""Evaluating a model on the validation set of its task."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from ..data.collate import collate
from .metrics import classification_metrics, rouge_l, squad_metrics

#: the metric each task reports first (plots, progress, "best")
MAIN_METRIC = {
    "classification": "accuracy",
    "pair_classification": "accuracy",
    "qa": "f1",
    "causal_lm": "perplexity",
    "instruction": "rouge_l",
}

#: the longest answer span (in tokens) QA evaluation considers
MAX_ANSWER_TOKENS = 30


def _batches(dataset: Any, size: int, pad_id: int, device: torch.device):
    for start in range(0, len(dataset), size):
        rows = dataset.select(range(start, min(start + size, len(dataset))))
        batch = collate(list(rows), pad_id)
        yield start, {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    model: Any,
    data: Any,
    tokenizer: Any,
    *,
    batch_size: int,
    device: torch.device,
    autocast: Any = None,
    max_new_tokens: int = 64,
) -> dict[str, float]:
    """Metrics of ``model`` on ``data.validation`` (a :class:`TaskData`), and those of
    each ``data.extra_validation`` set as ``name.metric``."""
    sets = data.evaluation_sets() if hasattr(data, "evaluation_sets") else [("", data)]
    out: dict[str, float] = {}
    for name, view in sets:
        if view.validation is None:
            continue
        scores = _evaluate_set(model, view, tokenizer, batch_size, device, autocast, max_new_tokens)
        out.update({(f"{name}.{k}" if name else k): v for k, v in scores.items()})
    return out


def _evaluate_set(model, data, tokenizer, batch_size, device, autocast, max_new_tokens):
    """Metrics of ``model`` on ``data.validation`` (the arguments of :func:`evaluate`)."""
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ctx = autocast or contextlib.nullcontext
    try:
        if data.task == "instruction":
            return _instruction(model, data, tokenizer, device, max_new_tokens, ctx, batch_size)
        if data.task == "causal_lm":
            nll, tokens = _response_nll(model, data.validation, batch_size, pad_id, device, ctx)
            mean = nll / max(tokens, 1)
            return {"perplexity": math.exp(min(mean, 700)), "loss": mean}
        preds: list[Any] = []
        spans: list[Any] = []
        labels: list[int] = []
        for start, batch in _batches(data.validation, batch_size, pad_id, device):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            with ctx():
                out = model(**inputs)
            if data.task == "qa":
                offsets = data.validation_raw["offsets"][start : start + len(out.start_logits)]
                spans += qa_best_spans(out.start_logits, out.end_logits, offsets)
            else:
                preds += out.logits.argmax(-1).tolist()
                labels += batch["labels"].tolist()
        if data.task == "qa":
            preds = qa_predictions(spans, data.validation_raw)
            return squad_metrics(preds, data.validation_raw["answers"])
        return classification_metrics(preds, labels)
    finally:
        model.train(was_training)


def qa_best_spans(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    offsets: list[list[list[int] | None]],
    max_answer: int = MAX_ANSWER_TOKENS,
) -> list[tuple[float, int, int] | None]:
    """The best span of each window: ``(score, first character, end character)`` in its
    context, or None for a window without context tokens.

    The score of tokens ``a..b`` is ``start[a] + end[b]``, over context tokens only
    (``offsets[w][t]`` is None elsewhere: question, special and padding tokens), with
    ``a <= b < a + max_answer``."""
    starts, ends = start_logits.float(), end_logits.float()
    width = starts.shape[1]
    valid = torch.zeros(len(offsets), width, dtype=torch.bool)
    for w, offs in enumerate(offsets):
        valid[w, : len(offs)] = torch.tensor([o is not None for o in offs], dtype=torch.bool)
    valid = valid.to(starts.device)
    band = torch.ones(width, width, dtype=torch.bool, device=starts.device).triu()
    band &= ~torch.ones(width, width, dtype=torch.bool, device=starts.device).triu(max_answer)
    scores = starts[:, :, None] + ends[:, None, :]
    allowed = band[None] & valid[:, :, None] & valid[:, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    best = scores.reshape(len(offsets), -1).max(-1)
    out: list[tuple[float, int, int] | None] = []
    for w, (score, flat) in enumerate(
        zip(best.values.tolist(), best.indices.tolist(), strict=True)
    ):
        if score == float("-inf"):
            out.append(None)
            continue
        a, b = divmod(flat, width)
        out.append((score, offsets[w][a][0], offsets[w][b][1]))
    return out


def qa_predictions(spans: list[tuple[float, int, int] | None], raw: dict[str, Any]) -> list[str]:
    """One answer per question: the text of the best-scoring span over its windows
    (``raw["example"][w]`` is the question of window ``w``), "" if none has context."""
    best: dict[int, tuple[float, int, int]] = {}
    for span, example in zip(spans, raw["example"], strict=True):
        if span is not None and (example not in best or span[0] > best[example][0]):
            best[example] = span
    texts = []
    for i, context in enumerate(raw["context"]):
        span = best.get(i)
        texts.append(context[span[1] : span[2]] if span else "")
    return texts


def _instruction(model, data, tokenizer, device, max_new_tokens, ctx, batch_size):
    """Rouge-L of greedy answers to the validation prompts (batched, left-padded), and the
    perplexity of the reference responses (teacher-forced, over the tokens in the loss)."""
    from ..generation import continue_prompts

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    raw = data.validation_raw
    answers = continue_prompts(
        model,
        raw["prompt_ids"],
        max_new_tokens=max_new_tokens,
        pad_id=int(pad or 0),
        eos_id=eos,
        device=device,
        autocast=ctx,
        batch_size=batch_size,
    )
    texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
    scores = [rouge_l(t, r) for t, r in zip(texts, raw["references"], strict=True)]
    nll, tokens = _response_nll(model, data.validation, batch_size, int(pad or 0), device, ctx)
    mean = nll / max(tokens, 1)
    return {
        "rouge_l": 100 * sum(scores) / len(scores),
        "perplexity": math.exp(min(mean, 700)),
        "loss": mean,
    }


def _response_nll(model, rows, batch_size, pad_id, device, ctx) -> tuple[float, int]:
    """Summed next-token NLL of the labelled tokens (the responses) and their number."""
    nll, tokens = 0.0, 0
    for _, batch in _batches(rows, batch_size, pad_id, device):
        with ctx():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits.float()[:, :-1]
        target = batch["labels"][:, 1:]
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            target.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        ).item()
        tokens += int((target != -100).sum())
    return nll, tokens
