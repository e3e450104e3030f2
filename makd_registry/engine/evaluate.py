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
    """Metrics of ``model`` on ``data.validation`` (a :class:`TaskData`)."""
    if data.validation is None:
        return {}
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ctx = autocast or contextlib.nullcontext
    try:
        if data.task == "instruction":
            return _instruction(model, data, tokenizer, device, max_new_tokens, ctx)
        preds: list[Any] = []
        labels: list[int] = []
        nll, tokens = 0.0, 0
        for start, batch in _batches(data.validation, batch_size, pad_id, device):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            with ctx():
                out = model(**inputs)
            if data.task == "causal_lm":
                logits = out.logits.float()[:, :-1]
                target = batch["labels"][:, 1:]
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    target.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
                nll += loss.item()
                tokens += int((target != -100).sum())
            elif data.task == "qa":
                preds += _qa_spans(out, data.validation_raw, start)
            else:
                preds += out.logits.argmax(-1).tolist()
                labels += batch["labels"].tolist()
        if data.task == "causal_lm":
            mean = nll / max(tokens, 1)
            return {"perplexity": math.exp(min(mean, 700)), "loss": mean}
        if data.task == "qa":
            return squad_metrics(preds, data.validation_raw["answers"])
        return classification_metrics(preds, labels)
    finally:
        model.train(was_training)


def _qa_spans(out: Any, raw: dict[str, Any], start: int, max_answer: int = 30) -> list[str]:
    texts = []
    starts, ends = out.start_logits.float(), out.end_logits.float()
    for i in range(starts.shape[0]):
        offsets = raw["offsets"][start + i]
        context = raw["context"][start + i]
        valid = torch.tensor(
            [o is not None for o in offsets] + [False] * (starts.shape[1] - len(offsets)),
            device=starts.device,
        )
        s = starts[i].masked_fill(~valid, -1e9)
        e = ends[i].masked_fill(~valid, -1e9)
        scores = s[:, None] + e[None, :]
        n = scores.shape[0]
        allowed = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu()
        allowed &= ~torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(max_answer)
        best = int(scores.masked_fill(~allowed, -1e18).argmax())
        a, b = divmod(best, n)
        if offsets[a] is None or offsets[b] is None:
            texts.append("")
        else:
            texts.append(context[offsets[a][0] : offsets[b][1]])
    return texts


def _instruction(model, data, tokenizer, device, max_new_tokens, ctx) -> dict[str, float]:
    scores = []
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    for row, reference in zip(data.validation, data.validation_raw["references"], strict=True):
        ids = torch.tensor([row["input_ids"]], device=device)
        with ctx():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        scores.append(rouge_l(text, reference))
    return {"rouge_l": 100 * sum(scores) / len(scores)}
