"""Tokenising raw examples for each task (cached by ``datasets``' fingerprints).

* ``classification`` / ``pair_classification``: ``input_ids``, ``attention_mask`` (and
  ``token_type_ids``), ``labels``;
* ``qa``: question + context (truncated context), ``labels`` = (start, end) token of the
  first answer; windows whose answer was cut off are dropped from training; evaluation keeps
  offsets to map predicted spans back to text;
* ``causal_lm``: the whole text tokenised and cut into blocks of ``max_length`` tokens,
  ``labels`` = ``input_ids`` (shifted in the loss);
* ``instruction``: prompts ("instruction\\n\\ninput\\n\\n") with reference outputs, for
  generation-based evaluation only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sources import DataError, load_split, require_columns

MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels")


@dataclass
class TaskData:
    """Tokenised training and evaluation sets of one task."""

    task: str
    train: Any = None  # datasets.Dataset with MODEL_COLUMNS
    validation: Any = None
    #: evaluation-only columns kept per validation row (QA offsets, references)
    validation_raw: Any = None
    num_labels: int | None = None


def _columns(spec: Any) -> dict[str, str]:
    if spec.task == "classification":
        return {"text_column": spec.text_column, "label_column": spec.label_column}
    if spec.task == "pair_classification":
        if spec.text_pair_column is None:
            raise DataError("data.text_pair_column: pair_classification needs the second text")
        return {
            "text_column": spec.text_column,
            "text_pair_column": spec.text_pair_column,
            "label_column": spec.label_column,
        }
    if spec.task == "qa":
        return {
            "question_column": spec.question_column,
            "context_column": spec.context_column,
            "answers_column": spec.answers_column,
        }
    if spec.task == "causal_lm":
        return {"text_column": spec.text_column}
    return {"instruction_column": spec.instruction_column, "output_column": spec.output_column}


def load_task_data(spec: Any, tokenizer: Any, *, base_dir: Path) -> TaskData:
    """Load and tokenise the data section ``spec`` (a ``DataSection``)."""
    if tokenizer is None:
        raise DataError(
            "no tokenizer: give teacher.tokenizer (or a model directory with tokenizer files)"
        )
    out = TaskData(task=spec.task)
    columns = _columns(spec)
    for split in ("train", "validation"):
        ref = getattr(spec, split)
        if ref is None:
            continue
        if split == "train" and spec.task == "instruction":
            raise DataError(
                "data.train: instruction data is for evaluation only (Self-Instruct asks not "
                "to train on it); train on another task"
            )
        raw = load_split(
            ref,
            base_dir=base_dir,
            split=spec.train_split if split == "train" else spec.validation_split,
            subset=spec.subset,
            limit=spec.train_limit if split == "train" else spec.validation_limit,
            what=f"data.{split}",
        )
        if (
            spec.task == "causal_lm"
            and "text" in raw.column_names
            and spec.text_column not in raw.column_names
        ):
            raw = raw.rename_column("text", spec.text_column)
        if spec.task == "instruction" and spec.input_column not in raw.column_names:
            raw = _flatten_instances(raw, spec)
        require_columns(raw, columns, ref, f"data.{split}")
        tokenised, kept = _tokenise(spec, raw, tokenizer, train=split == "train")
        setattr(out, split, tokenised)
        if split == "validation":
            out.validation_raw = kept
    if out.train is not None and spec.task in ("classification", "pair_classification"):
        labels = out.train.unique("labels")
        if any(not isinstance(v, int) or v < 0 for v in labels):
            raise DataError(f"data.train: labels must be integers >= 0, got {sorted(labels)[:5]}")
        out.num_labels = max(labels) + 1
    return out


def _flatten_instances(raw: Any, spec: Any) -> Any:
    """Self-Instruct records keep input/output in ``instances[0]``."""
    if "instances" not in raw.column_names:
        return raw

    def flat(row: dict[str, Any]) -> dict[str, Any]:
        first = (row["instances"] or [{}])[0]
        return {
            spec.input_column: first.get("input", ""),
            spec.output_column: first.get("output", ""),
        }

    return raw.map(flat, remove_columns=["instances"])


def _tokenise(spec: Any, raw: Any, tokenizer: Any, *, train: bool) -> tuple[Any, Any]:
    task = spec.task
    n = spec.max_length
    if task in ("classification", "pair_classification"):
        pair = spec.text_pair_column if task == "pair_classification" else None

        def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
            texts = batch[spec.text_column]
            enc = tokenizer(texts, batch[pair] if pair else None, truncation=True, max_length=n)
            enc["labels"] = batch[spec.label_column]
            return dict(enc)

        data = raw.map(encode, batched=True, remove_columns=raw.column_names)
        return data, None
    if task == "qa":
        return _tokenise_qa(spec, raw, tokenizer, train=train)
    if task == "causal_lm":
        return _tokenise_lm(spec, raw, tokenizer), None
    return _tokenise_instruction(spec, raw, tokenizer)


def _tokenise_lm(spec: Any, raw: Any, tokenizer: Any) -> Any:
    import datasets

    from ..models.loading import quiet_transformers

    text = "\n".join(t for t in raw[spec.text_column] if t is not None)
    with quiet_transformers():  # the whole text is longer than model_max_length, on purpose
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = spec.max_length
    blocks = [ids[i : i + n] for i in range(0, len(ids) - n + 1, n)]
    if not blocks:
        raise DataError(f"the text has {len(ids)} tokens, fewer than one block of {n}")
    return datasets.Dataset.from_dict(
        {"input_ids": blocks, "attention_mask": [[1] * n] * len(blocks), "labels": blocks}
    )


def _tokenise_qa(spec: Any, raw: Any, tokenizer: Any, *, train: bool) -> tuple[Any, Any]:
    n = spec.max_length

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        enc = tokenizer(
            [q.lstrip() for q in batch[spec.question_column]],
            batch[spec.context_column],
            truncation="only_second",
            max_length=n,
            return_offsets_mapping=True,
        )
        starts, ends, keep, offsets = [], [], [], []
        for i, answers in enumerate(batch[spec.answers_column]):
            seq = enc.sequence_ids(i)
            offs = enc["offset_mapping"][i]
            ctx = [j for j, s in enumerate(seq) if s == 1]
            start_tok = end_tok = 0
            found = False
            if answers["text"]:
                a_start = answers["answer_start"][0]
                a_end = a_start + len(answers["text"][0])
                if ctx and offs[ctx[0]][0] <= a_start and offs[ctx[-1]][1] >= a_end:
                    start_tok = next(j for j in ctx if offs[j][1] > a_start)
                    end_tok = next(j for j in reversed(ctx) if offs[j][0] < a_end)
                    found = True
            starts.append(start_tok)
            ends.append(end_tok)
            keep.append(found or not train)
            offsets.append([o if s == 1 else None for o, s in zip(offs, seq, strict=True)])
        enc["labels"] = [[s, e] for s, e in zip(starts, ends, strict=True)]
        enc["keep"] = keep
        enc["offsets"] = offsets
        enc.pop("offset_mapping")
        return dict(enc)

    data = raw.map(encode, batched=True, remove_columns=raw.column_names)
    if train:
        data = data.filter(lambda row: row["keep"])
        if len(data) == 0:
            raise DataError("data.train: no QA example has its answer inside max_length tokens")
        return data.remove_columns(["keep", "offsets"]), None
    kept = {
        "offsets": data["offsets"],
        "context": raw[spec.context_column],
        "answers": [a["text"] for a in raw[spec.answers_column]],
    }
    return data.remove_columns(["keep", "offsets"]), kept


def _tokenise_instruction(spec: Any, raw: Any, tokenizer: Any) -> tuple[Any, Any]:
    prompts = []
    for row in raw:
        extra = row.get(spec.input_column) or ""
        prompt = row[spec.instruction_column].strip() + "\n\n"
        if extra.strip():
            prompt += extra.strip() + "\n\n"
        prompts.append(prompt)
    enc = tokenizer(prompts, truncation=True, max_length=spec.max_length)
    import datasets

    data = datasets.Dataset.from_dict(
        {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    )
    return data, {"references": list(raw[spec.output_column]), "prompts": prompts}
