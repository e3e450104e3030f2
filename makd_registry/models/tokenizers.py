"""Tokenizers: loading them, and checking that teacher and student read the same ids.

makd feeds one tokenized batch to both models, and logit-level aspects (``logits_kd``,
``seqkd``) compare distributions over the vocabulary, so the two vocabularies must be the
same token for token. :func:`check_vocabularies` says exactly how they differ, before any
training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .loading import ModelError, resolve_model_ref


class VocabularyError(ModelError):
    """Teacher and student tokenizers or vocabularies disagree."""


def load_tokenizer(ref: str, *, base_dir: Path | None = None, what: str = "tokenizer") -> Any:
    """``AutoTokenizer`` from a local directory or a hub id."""
    import transformers

    source = resolve_model_ref(ref, base_dir or Path.cwd())
    try:
        return transformers.AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # libraries raise many kinds on malformed files
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{what}: cannot load a tokenizer from {source!r}: {text}") from None


def describe(tokenizer: Any, name: str) -> str:
    source = getattr(tokenizer, "name_or_path", "") or "?"
    return f"{name} tokenizer {source!r} ({len(tokenizer)} tokens, {type(tokenizer).__name__})"


def vocabulary_difference(teacher: Any, student: Any, limit: int = 3) -> list[str]:
    """Up to ``limit`` examples of tokens whose ids differ (empty when the vocabularies
    are identical, special tokens included): tokens with two different ids first, then
    tokens missing from one side."""
    vt, vs = teacher.get_vocab(), student.get_vocab()
    moved, missing, extra = [], [], []
    for token, tid in sorted(vt.items(), key=lambda kv: kv[1]):
        sid = vs.get(token)
        if sid is None:
            missing.append(f"{token!r} ({tid}) is missing from the student's vocabulary")
        elif sid != tid:
            moved.append(
                f"{token!r} is {tid} in the teacher's vocabulary and {sid} in the student's"
            )
    for token, sid in sorted(vs.items(), key=lambda kv: kv[1]):
        if token not in vt:
            extra.append(f"{token!r} ({sid}) is only in the student's vocabulary")
    return (moved + missing + extra)[:limit]


def check_vocabularies(
    teacher_tokenizer: Any,
    student_tokenizer: Any,
    *,
    teacher_vocab_size: int | None = None,
    student_vocab_size: int | None = None,
    logit_aspects: list[str] | None = None,
) -> None:
    """Raise :class:`VocabularyError` naming both vocabularies when they differ.

    Checked: the two tokenizers map every token to the same id; each model's embedding
    table covers its tokenizer; and, when ``logit_aspects`` names aspects that compare
    vocabulary distributions, the two models' output vocabularies have the same size.
    """
    problems: list[str] = []
    if teacher_tokenizer is not None and student_tokenizer is not None:
        diff = vocabulary_difference(teacher_tokenizer, student_tokenizer)
        if diff:
            problems.append(
                f"{describe(teacher_tokenizer, 'the teacher')} and "
                f"{describe(student_tokenizer, 'the student')} differ: " + "; ".join(diff)
            )
    for name, tok, size in (
        ("teacher", teacher_tokenizer, teacher_vocab_size),
        ("student", student_tokenizer, student_vocab_size),
    ):
        if tok is not None and size is not None and len(tok) > size:
            problems.append(
                f"{describe(tok, 'the ' + name)} has more tokens than the {name}'s "
                f"embedding table ({size} rows)"
            )
    if (
        logit_aspects
        and teacher_vocab_size is not None
        and student_vocab_size is not None
        and teacher_vocab_size != student_vocab_size
    ):
        problems.append(
            f"{', '.join(logit_aspects)} compare output distributions over the vocabulary, "
            f"but the teacher's vocabulary has {teacher_vocab_size} entries and the "
            f"student's {student_vocab_size}"
        )
    if problems:
        hint = " Give the student the teacher's tokenizer (student.tokenizer) and vocab_size."
        raise VocabularyError("; ".join(problems) + "." + hint)
