"""Tokenising raw examples for each task (cached by ``datasets``' fingerprints).

* ``classification`` / ``pair_classification``: ``input_ids``, ``attention_mask`` (and
  ``token_type_ids``), ``labels`` (class ids, see :func:`label_mapping`);
* ``qa``: question + context, the context cut into overlapping windows of ``max_length``
  tokens (a quarter of ``max_length`` shared between neighbours); ``labels`` = (start, end)
  token of the first answer; training keeps the windows that hold the whole answer, and
  evaluation keeps every window with its offsets, to map predicted spans back to the
  context and pick the best window of each question;
* ``causal_lm``: the whole text tokenised and cut into blocks of ``max_length`` tokens,
  ``labels`` = ``input_ids`` (shifted in the loss);
* ``instruction``: a prompt (``instruction`` and ``input`` written "instruction\\n\\n
  input\\n\\n", or chat messages / the same through the tokenizer's chat template) and its
  response: ``input_ids`` = prompt + response (+ EOS), ``labels`` = the response tokens
  (-100 on the prompt), ``loss_mask`` = 1 on the response tokens (``data.loss_on:
  response``; with ``all`` labels cover every token and there is no ``loss_mask``), and
  ``prompt_length``; evaluation also keeps the prompts alone and the references, for
  generation (Rouge-L). A prompt too long for ``max_length`` is shortened inside its
  content (the input, else the instruction, or the last user message), keeping its
  template's start and end.

Cells are checked before tokenising: an empty, whitespace-only or non-text value in a text
column, a missing or unknown label, or an answer span that is not in its context is a
:class:`DataError` naming the file, the column and the first offending rows (or question
ids). Raw text (``causal_lm``) is the exception: blank lines belong to it, and missing
cells (an empty CSV cell) are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .sources import DataError, check_text_column, load_split, require_columns, row_list
from .sources import source_name as _source_name

MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels")


@dataclass
class TaskData:
    """Tokenised training and evaluation sets of one task."""

    task: str
    #: rows with MODEL_COLUMNS: a datasets.Dataset here; the trainer reads it only by
    #: ``len`` and ``train[i]`` (a row dict), so a list of row dicts serves as well
    train: Any = None
    validation: Any = None
    #: evaluation-only columns kept per validation row (QA offsets, references)
    validation_raw: Any = None
    num_labels: int | None = None
    #: classification: the name of each class id (``data.labels``, the string labels of the
    #: data, or a hub dataset's ClassLabel names); None for plain integer labels
    label_names: list[str] | None = None
    #: ``data.extra_validation``: name → (rows, evaluation-only columns), evaluated like
    #: ``validation``
    extra_validation: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def evaluation_sets(self) -> list[tuple[str, TaskData]]:
        """``("", self)`` and ``(name, a view with that set as validation)`` per extra set."""
        out: list[tuple[str, TaskData]] = [("", self)]
        for name, (rows, kept) in self.extra_validation.items():
            view = TaskData(self.task, None, rows, kept, self.num_labels, self.label_names)
            out.append((name, view))
        return out


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
    if spec.messages_column is not None:
        return {"messages_column": spec.messages_column}
    return {"instruction_column": spec.instruction_column, "output_column": spec.output_column}


def load_task_data(spec: Any, tokenizer: Any, *, base_dir: Path) -> TaskData:
    """Load, check and tokenise the data section ``spec`` (a ``DataSection``)."""
    if tokenizer is None:
        raise DataError(
            "no tokenizer: give teacher.tokenizer (or a model directory with tokenizer files)"
        )
    classify = spec.task in ("classification", "pair_classification")
    if getattr(spec, "labels", None) is not None and not classify:
        raise DataError(f"data.labels: only classification tasks have labels (task: {spec.task})")
    out = TaskData(task=spec.task)
    columns = _columns(spec)
    mapping: LabelMapping | None = None
    splits = [(split, getattr(spec, split), f"data.{split}") for split in ("train", "validation")]
    splits += [
        (f"extra:{name}", ref, f"data.extra_validation.{name}")
        for name, ref in spec.extra_validation.items()
    ]
    for split, ref, what in splits:
        if ref is None:
            continue
        train = split == "train"
        raw = load_split(
            ref,
            base_dir=base_dir,
            split=spec.train_split if train else spec.validation_split,
            subset=spec.subset,
            limit=spec.train_limit if train else spec.validation_limit,
            what=what,
        )
        if (
            spec.task == "causal_lm"
            and "text" in raw.column_names
            and spec.text_column not in raw.column_names
        ):
            raw = raw.rename_column("text", spec.text_column)
        if (
            spec.task == "instruction"
            and spec.messages_column is None
            and spec.input_column not in raw.column_names
        ):
            raw = _flatten_instances(raw, spec)
        require_columns(raw, columns, ref, what)
        where = f"{what}: {_source_name(ref, base_dir)}"
        _check_cells(spec, raw, where)
        if classify:
            if mapping is None:
                mapping = label_mapping(spec, raw, where)
                out.num_labels, out.label_names = mapping.num_labels, mapping.names
            ids = mapping.ids(raw[spec.label_column], where, spec.label_column)
            tokenised, kept = _tokenise_classification(spec, raw, tokenizer, ids), None
        else:
            tokenised, kept = _tokenise(spec, raw, tokenizer, train=train, where=where)
        if split.startswith("extra:"):
            out.extra_validation[split.removeprefix("extra:")] = (tokenised, kept)
            continue
        setattr(out, split, tokenised)
        if split == "validation":
            out.validation_raw = kept
    return out


# -- cell checks -------------------------------------------------------------------------


def _check_cells(spec: Any, raw: Any, where: str) -> None:
    """Text columns hold non-blank text; QA answers are spans of their context."""
    ids = raw["id"] if "id" in raw.column_names else None
    if spec.task in ("classification", "pair_classification"):
        check_text_column(raw, spec.text_column, where=where)
        if spec.task == "pair_classification":
            check_text_column(raw, spec.text_pair_column, where=where)
    elif spec.task == "qa":
        check_text_column(raw, spec.question_column, where=where, ids=ids)
        check_text_column(raw, spec.context_column, where=where, ids=ids)
        _check_answers(raw, spec, where, ids)
    elif spec.task == "causal_lm":
        # raw text: blank lines separate paragraphs, and an empty CSV/JSON cell adds nothing
        check_text_column(raw, spec.text_column, where=where, skip_missing=True, allow_blank=True)
    elif spec.messages_column is not None:
        _check_messages(raw, spec.messages_column, where, ids)
    else:  # instruction: the input is optional
        check_text_column(raw, spec.instruction_column, where=where, ids=ids)
        check_text_column(raw, spec.output_column, where=where, ids=ids)
        if spec.input_column in raw.column_names:
            check_text_column(
                raw, spec.input_column, where=where, ids=ids, skip_missing=True, allow_blank=True
            )


def _check_messages(raw: Any, column: str, where: str, ids: Any) -> None:
    """Every cell is a conversation: a list of at least two ``{role, content}`` messages
    with text content, the last one the assistant's (the response)."""
    problems: list[int] = []
    first = ""
    for i, messages in enumerate(raw[column]):
        why = ""
        if not isinstance(messages, list) or len(messages) < 2:
            why = "is not a list of at least two messages"
        elif not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            and m["content"].strip()
            for m in messages
        ):
            why = "has a message that is not {role: text, content: non-blank text}"
        elif messages[-1]["role"] != "assistant":
            why = f"ends with a {messages[-1]['role']!r} message, not the assistant's response"
        if why:
            if not problems:
                first = why
            problems.append(i)
    if problems:
        raise DataError(
            f"{where}: column {column!r} must hold chat messages [{{role, content}}, ...] "
            f"ending with the assistant's response; {len(problems)} of {len(raw)} rows do not "
            f"({row_list(problems, ids)}; the first {first})"
        )


def _check_answers(raw: Any, spec: Any, where: str, ids: Any) -> None:
    """Every answer is ``{text: [...], answer_start: [...]}`` with
    ``context[start : start + len(text)] == text``."""
    column = spec.answers_column
    malformed, outside = [], []
    first_outside = ""
    for i, (answers, context) in enumerate(zip(raw[column], raw[spec.context_column], strict=True)):
        texts = answers.get("text") if isinstance(answers, dict) else None
        starts = answers.get("answer_start") if isinstance(answers, dict) else None
        if (
            not isinstance(texts, list)
            or not isinstance(starts, list)
            or len(texts) != len(starts)
            or not all(isinstance(t, str) and t for t in texts)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in starts)
        ):
            malformed.append(i)
            continue
        for text, start in zip(texts, starts, strict=True):
            inside = 0 <= start <= len(context) - len(text)
            if not inside or context[start : start + len(text)] != text:
                if not outside:
                    found = context[start : start + len(text)] if 0 <= start < len(context) else ""
                    first_outside = (
                        f"answer {text!r} at {start}: the context there reads {found!r}"
                        if found
                        else f"answer {text!r} at {start}: outside the context "
                        f"({len(context)} characters)"
                    )
                outside.append(i)
                break
    if malformed:
        raise DataError(
            f"{where}: column {column!r} must hold {{text: [non-empty strings], answer_start: "
            f"[integers]}} of equal lengths; {len(malformed)} of {len(raw)} questions do not "
            f"({row_list(malformed, ids)}; the first holds {raw[malformed[0]][column]!r})"
        )
    if outside:
        raise DataError(
            f"{where}: {len(outside)} of {len(raw)} questions have an answer that is not the "
            f"span of the context at its answer_start ({row_list(outside, ids)}; "
            f"{first_outside}): fix answer_start"
        )


# -- labels ------------------------------------------------------------------------------


@dataclass
class LabelMapping:
    """Cell value → class id: keys are the stripped string form of each value."""

    index: dict[str, int]
    num_labels: int
    names: list[str] | None
    known: str  # how messages describe the known labels

    def ids(self, values: list[Any], where: str, column: str) -> list[int]:
        keys = _label_keys(values, where, column)
        unknown = [i for i, k in enumerate(keys) if k not in self.index]
        if unknown:
            value = values[unknown[0]]
            raise DataError(
                f"{where}: column {column!r}: label {value!r} is not a known label in "
                f"{len(unknown)} of {len(values)} rows ({row_list(unknown)}); known labels: "
                f"{self.known}"
            )
        return [self.index[k] for k in keys]


def _label_keys(values: list[Any], where: str, column: str) -> list[str]:
    """Each label cell as its key: an int (or a whole float, as CSV readers give integer
    columns with gaps) as its decimal form, a string stripped; anything else is an error."""
    keys: list[str | None] = []
    for v in values:
        if isinstance(v, bool):
            keys.append(None)
        elif isinstance(v, int):
            keys.append(str(v))
        elif isinstance(v, float) and v.is_integer():
            keys.append(str(int(v)))
        elif isinstance(v, str) and v.strip():
            keys.append(v.strip())
        else:
            keys.append(None)
    missing = [
        i for i, v in enumerate(values) if v is None or (isinstance(v, str) and not v.strip())
    ]
    if missing:
        raise DataError(
            f"{where}: column {column!r} has no label in {len(missing)} of {len(values)} rows "
            f"({row_list(missing)}; rows count from 1, a header not counted)"
        )
    wrong = [i for i, k in enumerate(keys) if k is None]
    if wrong:
        first = values[wrong[0]]
        raise DataError(
            f"{where}: column {column!r}: labels must be integers or strings, but "
            f"{len(wrong)} rows hold other values ({row_list(wrong)}; the first is {first!r})"
        )
    return keys  # type: ignore[return-value]


def label_mapping(spec: Any, raw: Any, where: str) -> LabelMapping:
    """The class ids of the first split read (train, else validation).

    * ``data.labels`` given: a value's class id is its position in that list; an integer
      cell matches the integer or its decimal string in the list (``1`` and ``"1"`` are
      the same label);
    * else integer labels are the class ids themselves (``num_labels`` = max + 1; they must
      be ≥ 0), a hub ClassLabel column keeps its names, and string labels are numbered in
      sorted order of the distinct values; integers and strings may not be mixed."""
    column = spec.label_column
    given = getattr(spec, "labels", None)
    if given is not None:
        # distinct: DataSection refuses duplicates (1 and "1" included) with their location
        index = {str(label).strip(): i for i, label in enumerate(given)}
        names = [str(label).strip() for label in given]
        return LabelMapping(index, len(given), names, f"{', '.join(names)} (data.labels)")
    values = raw[column]
    keys = _label_keys(values, where, column)
    feature = raw.features.get(column)
    class_names = getattr(feature, "names", None)
    ints = [v for v in values if not isinstance(v, str)]
    if ints and len(ints) < len(values):
        first_str = next(v for v in values if isinstance(v, str))
        raise DataError(
            f"{where}: column {column!r} mixes integer labels ({ints[0]!r}) and string labels "
            f"({first_str!r}); give data.labels to name the classes in order"
        )
    if class_names:
        index = {str(i): i for i in range(len(class_names))}
        index.update({str(n): i for i, n in enumerate(class_names)})
        for k in keys:
            if k not in index:  # e.g. -1, the unlabelled rows of GLUE test splits
                break
        else:
            return LabelMapping(index, len(class_names), list(class_names), ", ".join(class_names))
    if ints:
        numbers = sorted({int(k) for k in keys})
        negative = [i for i, k in enumerate(keys) if int(k) < 0]
        if negative:
            raise DataError(
                f"{where}: column {column!r}: integer labels must be >= 0, got "
                f"{values[negative[0]]!r} in {len(negative)} rows ({row_list(negative)})"
            )
        count = numbers[-1] + 1
        if count < 2:
            raise DataError(
                f"{where}: column {column!r} holds only the label {numbers[0]}: a classifier "
                "needs at least two classes (give data.labels to name them all)"
            )
        index = {str(i): i for i in range(count)}
        return LabelMapping(index, count, None, f"the integers 0..{count - 1}")
    names = sorted(set(keys))
    if len(names) < 2:
        raise DataError(
            f"{where}: column {column!r} holds only the label {names[0]!r}: a classifier needs "
            "at least two classes (give data.labels to name them all)"
        )
    index = {n: i for i, n in enumerate(names)}
    return LabelMapping(index, len(names), names, f"{', '.join(names)} (those of data.train)")


# -- tokenising --------------------------------------------------------------------------


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


def _tokenise_classification(spec: Any, raw: Any, tokenizer: Any, ids: list[int]) -> Any:
    n = spec.max_length
    pair = spec.text_pair_column if spec.task == "pair_classification" else None

    def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
        texts = batch[spec.text_column]
        enc = tokenizer(texts, batch[pair] if pair else None, truncation=True, max_length=n)
        enc["labels"] = [ids[i] for i in indices]
        return dict(enc)

    return raw.map(encode, batched=True, with_indices=True, remove_columns=raw.column_names)


def _tokenise(spec: Any, raw: Any, tokenizer: Any, *, train: bool, where: str) -> tuple[Any, Any]:
    task = spec.task
    if task == "qa":
        return _tokenise_qa(spec, raw, tokenizer, train=train, where=where)
    if task == "causal_lm":
        return _tokenise_lm(spec, raw, tokenizer, where), None
    from .instruction import tokenise_instruction

    return tokenise_instruction(spec, raw, tokenizer, train=train, where=where)


def _tokenise_lm(spec: Any, raw: Any, tokenizer: Any, where: str) -> Any:
    import datasets

    from ..models.loading import quiet_transformers

    text = "\n".join(t for t in raw[spec.text_column] if t is not None)
    with quiet_transformers():  # the whole text is longer than model_max_length, on purpose
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = spec.max_length
    blocks = [ids[i : i + n] for i in range(0, len(ids) - n + 1, n)]
    if not blocks:
        raise DataError(
            f"{where}: the text has {len(ids)} tokens, fewer than one block of {n} "
            "(data.max_length)"
        )
    return datasets.Dataset.from_dict(
        {"input_ids": blocks, "attention_mask": [[1] * n] * len(blocks), "labels": blocks}
    )


def qa_windows(max_length: int, specials: int) -> tuple[int, int]:
    """``(question tokens at most, tokens shared by neighbouring windows)`` for QA inputs of
    ``max_length`` tokens with ``specials`` special tokens: a question keeps at most half
    the room, and windows overlap by a quarter of ``max_length`` (less if the context part
    is shorter)."""
    room = max_length - specials
    question = room // 2
    context = room - question
    return question, max(0, min(max_length // 4, context - 1))


def _tokenise_qa(
    spec: Any, raw: Any, tokenizer: Any, *, train: bool, where: str
) -> tuple[Any, Any]:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"{where}: qa needs a fast tokenizer (character offsets map answers to tokens); "
            f"{type(tokenizer).__name__} is not one"
        )
    n = spec.max_length
    max_question, stride = qa_windows(n, tokenizer.num_special_tokens_to_add(pair=True))
    if max_question < 1:
        raise DataError(f"data.max_length: {n} tokens leave no room for a question and context")

    def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
        questions = [q.strip() for q in batch[spec.question_column]]
        questions = _cut_questions(tokenizer, questions, max_question)
        enc = tokenizer(
            questions,
            batch[spec.context_column],
            truncation="only_second",
            max_length=n,
            stride=stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        starts, ends, keep, offsets, examples = [], [], [], [], []
        for w, example in enumerate(enc.pop("overflow_to_sample_mapping")):
            answers = batch[spec.answers_column][example]
            seq = enc.sequence_ids(w)
            offs = enc["offset_mapping"][w]
            ctx = [j for j, s in enumerate(seq) if s == 1]
            start_tok = end_tok = 0
            found = False
            if answers["text"] and ctx:
                a_start = answers["answer_start"][0]
                a_end = a_start + len(answers["text"][0])
                if offs[ctx[0]][0] <= a_start and offs[ctx[-1]][1] >= a_end:
                    start_tok = next(j for j in ctx if offs[j][1] > a_start)
                    end_tok = next(j for j in reversed(ctx) if offs[j][0] < a_end)
                    found = True
            starts.append(start_tok)
            ends.append(end_tok)
            keep.append(found or not train)
            offsets.append([list(o) if s == 1 else None for o, s in zip(offs, seq, strict=True)])
            examples.append(indices[example])
        enc["labels"] = [[s, e] for s, e in zip(starts, ends, strict=True)]
        enc["keep"] = keep
        enc["offsets"] = offsets
        enc["example"] = examples
        enc.pop("offset_mapping")
        return dict(enc)

    data = raw.map(encode, batched=True, with_indices=True, remove_columns=raw.column_names)
    if train:
        data = data.filter(lambda row: row["keep"])
        if len(data) == 0:
            raise DataError(f"{where}: no QA example has its answer inside max_length tokens")
        return data.remove_columns(["keep", "offsets", "example"]), None
    kept = {
        "offsets": data["offsets"],
        "example": data["example"],
        "context": raw[spec.context_column],
        "answers": [a["text"] for a in raw[spec.answers_column]],
    }
    if "id" in raw.column_names:
        kept["id"] = raw["id"]
    return data.remove_columns(["keep", "offsets", "example"]), kept


def _cut_questions(tokenizer: Any, questions: list[str], limit: int) -> list[str]:
    """Questions longer than ``limit`` tokens are cut after a token, so that they tokenise
    to at most ``limit`` tokens (cutting inside a word can re-tokenise into more pieces)."""
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for question, offs in zip(questions, enc["offset_mapping"], strict=True):
        keep = limit
        while len(offs) > limit and keep > 0:
            cut = question[: offs[keep - 1][1]]
            if len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= limit:
                question = cut
                break
            keep -= 1
        out.append(question)
    return out
