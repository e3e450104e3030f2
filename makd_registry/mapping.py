"""Teacher→student layer mappings.

A mapping turns the layer counts of the student (``L_S``) and the teacher (``L_T``) into
``(student_layer, teacher_layer)`` pairs, 0-based. In an objective file it is written
under ``layers:`` of a layer-wise aspect (or of a ``sum``, whose layer-wise terms inherit
it)::

    layers: uniform                         # TinyBERT: student l ↔ teacher (l+1)·L_T/L_S − 1
    layers: last                            # the last student layer ↔ the last teacher layer
    layers: identity                        # l ↔ l (same depth: factorized students)
    layers: {type: every_k, k: 2}           # student l ↔ teacher start + l·k (start = k−1)
    layers: [[0, 1], [1, 5]]                # explicit [student, teacher] pairs
    layers: {type: explicit, pairs: [[0, 1], [1, 5]]}

Every mapping is checked against the real depths as soon as they are known.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationInfo,
    WithJsonSchema,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

from .strict import StrictModel, raise_at, suggest

LayerPair = tuple[int, int]


class MappingError(ValueError):
    """A mapping that cannot be applied to the given depths; ``where`` is a sub-path."""

    def __init__(self, message: str, where: tuple[str | int, ...] = ()):
        super().__init__(message)
        self.where = where


def _unique_pairs(pairs: list[LayerPair]) -> list[LayerPair]:
    seen: set[LayerPair] = set()
    for i, p in enumerate(pairs):
        if p in seen:
            raise_at(
                (i,),
                "duplicate_pair",
                "layer pair [{s}, {t}] is listed twice",
                list(p),
                s=p[0],
                t=p[1],
            )
        seen.add(p)
    return pairs


#: ``[[student, teacher], ...]``: at least one pair of non-negative layer indices, no repeats.
Pairs = Annotated[
    list[tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]]],
    Field(min_length=1),
    AfterValidator(_unique_pairs),
]
_PAIRS = TypeAdapter(Pairs)


class _Mapping(StrictModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: ClassVar[str]

    def resolve(self, student_layers: int | None, teacher_layers: int | None) -> list[LayerPair]:
        """The pairs for these depths, or ``[]`` when a needed depth is unknown."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.kind


class ExplicitMapping(_Mapping):
    """Explicit ``[student, teacher]`` layer pairs."""

    kind: ClassVar[str] = "explicit"
    type: Literal["explicit"] = "explicit"
    pairs: Pairs

    def resolve(self, student_layers: int | None, teacher_layers: int | None) -> list[LayerPair]:
        for i, (s, t) in enumerate(self.pairs):
            if student_layers is not None and s >= student_layers:
                raise MappingError(
                    f"student layer {s} does not exist: the student has {student_layers} "
                    f"layers (0..{student_layers - 1})",
                    ("pairs", i, 0),
                )
            if teacher_layers is not None and t >= teacher_layers:
                raise MappingError(
                    f"teacher layer {t} does not exist: the teacher has {teacher_layers} "
                    f"layers (0..{teacher_layers - 1})",
                    ("pairs", i, 1),
                )
        return [tuple(p) for p in self.pairs]

    def describe(self) -> str:
        return "explicit " + " ".join(f"{s}→{t}" for s, t in self.pairs)


class UniformMapping(_Mapping):
    """TinyBERT's uniform strategy: student layer l ↔ teacher layer ⌈(l+1)·L_T/L_S⌉ − 1."""

    kind: ClassVar[str] = "uniform"
    type: Literal["uniform"] = "uniform"

    def resolve(self, student_layers: int | None, teacher_layers: int | None) -> list[LayerPair]:
        if student_layers is None or teacher_layers is None:
            return []
        if student_layers > teacher_layers:
            raise MappingError(
                f"uniform needs a student no deeper than the teacher, got {student_layers} "
                f"student layers for {teacher_layers} teacher layers"
            )
        return [
            (s, -(-(s + 1) * teacher_layers // student_layers) - 1) for s in range(student_layers)
        ]


class LastMapping(_Mapping):
    """MiniLM: the last student layer ↔ the last teacher layer."""

    kind: ClassVar[str] = "last"
    type: Literal["last"] = "last"

    def resolve(self, student_layers: int | None, teacher_layers: int | None) -> list[LayerPair]:
        if student_layers is None or teacher_layers is None:
            return []
        return [(student_layers - 1, teacher_layers - 1)]


class EveryKMapping(_Mapping):
    """Student layer l ↔ teacher layer ``start + l·k`` (``start`` defaults to k−1)."""

    kind: ClassVar[str] = "every_k"
    type: Literal["every_k"] = "every_k"
    k: int = Field(ge=1)
    start: int | None = Field(default=None, ge=0)

    def resolve(self, student_layers: int | None, teacher_layers: int | None) -> list[LayerPair]:
        if student_layers is None:
            return []
        start = self.k - 1 if self.start is None else self.start
        pairs = [(s, start + s * self.k) for s in range(student_layers)]
        if teacher_layers is not None and pairs[-1][1] >= teacher_layers:
            raise MappingError(
                f"every_k with k={self.k}, start={start} maps student layer "
                f"{student_layers - 1} to teacher layer {pairs[-1][1]}, but the teacher has "
                f"{teacher_layers} layers (0..{teacher_layers - 1})",
                ("k",),
            )
        return pairs

    def describe(self) -> str:
        return f"every_k k={self.k}" + ("" if self.start is None else f" start={self.start}")


class IdentityMapping(_Mapping):
    """Layer l ↔ layer l; student and teacher must have the same depth."""

    kind: ClassVar[str] = "identity"
    type: Literal["identity"] = "identity"

    def resolve(self, student_layers: int | None, teacher_layers: int | None) -> list[LayerPair]:
        if student_layers is None or teacher_layers is None:
            return []
        if student_layers != teacher_layers:
            raise MappingError(
                f"identity needs equal depths, but the student has {student_layers} layers "
                f"and the teacher {teacher_layers}"
            )
        return [(i, i) for i in range(student_layers)]


MAPPING_TYPES: dict[str, type[_Mapping]] = {
    m.kind: m
    for m in (ExplicitMapping, UniformMapping, LastMapping, EveryKMapping, IdentityMapping)
}


def _validate_mapping(value: Any, handler: Any, info: ValidationInfo) -> _Mapping:
    if isinstance(value, _Mapping):
        return value
    if isinstance(value, str):
        cls = MAPPING_TYPES.get(value)
        if cls is None:
            raise PydanticCustomError(
                "unknown_mapping",
                "unknown layer mapping '{name}'{hint} (known: {known})",
                {
                    "name": value,
                    "hint": suggest(value, list(MAPPING_TYPES)),
                    "known": ", ".join(MAPPING_TYPES),
                },
            )
        if cls is ExplicitMapping or cls is EveryKMapping:
            raise PydanticCustomError(
                "mapping_needs_options",
                "layer mapping '{name}' needs options: write it as a mapping with 'type: {name}'",
                {"name": value},
            )
        return cls()
    if isinstance(value, list):
        return ExplicitMapping(pairs=_PAIRS.validate_python(value))
    if isinstance(value, dict):
        kind = value.get("type")
        if kind is None:
            raise_at(
                (),
                "missing_mapping_type",
                "a layer mapping needs 'type' (one of: {known})",
                value,
                known=", ".join(MAPPING_TYPES),
            )
        cls = MAPPING_TYPES.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise_at(
                ("type",),
                "unknown_mapping",
                "unknown layer mapping '{name}'{hint} (known: {known})",
                kind,
                name=str(kind),
                hint=suggest(str(kind), list(MAPPING_TYPES)),
                known=", ".join(MAPPING_TYPES),
            )
        return cls.model_validate(value, context=info.context)
    raise PydanticCustomError(
        "mapping_type",
        "a layer mapping is a name ({known}), a list of [student, teacher] pairs, "
        "or a mapping with 'type'",
        {"known": ", ".join(MAPPING_TYPES)},
    )


def _mapping_json_schema() -> dict[str, Any]:
    named = [k for k, m in MAPPING_TYPES.items() if m not in (ExplicitMapping, EveryKMapping)]
    pair = {
        "type": "array",
        "items": {"type": "integer", "minimum": 0},
        "minItems": 2,
        "maxItems": 2,
    }
    return {
        "description": "Teacher→student layer mapping.",
        "anyOf": [
            {"type": "string", "enum": named},
            {"type": "array", "items": pair, "minItems": 1},
            *(m.model_json_schema() for m in MAPPING_TYPES.values()),
        ],
    }


#: The annotated type of a ``layers:`` field (a mapping object after validation).
LayerMapping = Annotated[
    Any,
    WrapValidator(_validate_mapping),
    WithJsonSchema(_mapping_json_schema()),
]

__all__ = [
    "MAPPING_TYPES",
    "EveryKMapping",
    "ExplicitMapping",
    "IdentityMapping",
    "LastMapping",
    "LayerMapping",
    "LayerPair",
    "MappingError",
    "UniformMapping",
]
