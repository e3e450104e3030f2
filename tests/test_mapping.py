"""Layer mappings: each strategy's pairs, its errors, and invariants over random depths."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from makd_registry.mapping import (
    EveryKMapping,
    ExplicitMapping,
    IdentityMapping,
    LastMapping,
    LayerMapping,
    MappingError,
    UniformMapping,
)

ADAPTER = TypeAdapter(LayerMapping)


def test_uniform_is_tinybert_mapping():
    assert UniformMapping().resolve(4, 12) == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert UniformMapping().resolve(2, 6) == [(0, 2), (1, 5)]
    assert UniformMapping().resolve(3, 3) == [(0, 0), (1, 1), (2, 2)]


def test_uniform_with_uneven_depths_rounds_up():
    assert UniformMapping().resolve(4, 6) == [(0, 1), (1, 2), (2, 4), (3, 5)]


def test_last_identity_every_k():
    assert LastMapping().resolve(2, 6) == [(1, 5)]
    assert IdentityMapping().resolve(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert EveryKMapping(k=2).resolve(3, 6) == [(0, 1), (1, 3), (2, 5)]
    assert EveryKMapping(k=2, start=0).resolve(3, 6) == [(0, 0), (1, 2), (2, 4)]


def test_unknown_depths_resolve_to_nothing_but_explicit_pairs_survive():
    assert UniformMapping().resolve(None, 6) == []
    assert IdentityMapping().resolve(2, None) == []
    assert ExplicitMapping(pairs=[(0, 3)]).resolve(None, None) == [(0, 3)]


@pytest.mark.parametrize(
    "mapping, depths, message, where",
    [
        (UniformMapping(), (6, 4), "no deeper than the teacher", ()),
        (IdentityMapping(), (2, 4), "equal depths", ()),
        (EveryKMapping(k=3), (3, 6), "maps student layer 2 to teacher layer 8", ("k",)),
        (
            ExplicitMapping(pairs=[(0, 1), (2, 1)]),
            (2, 4),
            "student layer 2 does not exist",
            ("pairs", 1, 0),
        ),
        (
            ExplicitMapping(pairs=[(0, 4)]),
            (2, 4),
            "teacher layer 4 does not exist",
            ("pairs", 0, 1),
        ),
    ],
)
def test_mapping_errors_name_the_problem_and_where(mapping, depths, message, where):
    with pytest.raises(MappingError) as info:
        mapping.resolve(*depths)
    assert message in str(info.value)
    assert info.value.where == where


def test_shorthands_parse_to_the_same_models():
    assert ADAPTER.validate_python("uniform") == UniformMapping()
    assert ADAPTER.validate_python({"type": "last"}) == LastMapping()
    assert ADAPTER.validate_python([[0, 1], [1, 3]]) == ExplicitMapping(pairs=[(0, 1), (1, 3)])
    assert ADAPTER.validate_python({"type": "every_k", "k": 2}) == EveryKMapping(k=2)


@pytest.mark.parametrize(
    "value, loc, text",
    [
        ("every_k", (), "needs options"),
        ({"type": "explicit"}, ("pairs",), "Field required"),
        ([[0, -1]], (0, 1), "greater than or equal to 0"),
        ([], (), "at least 1 item"),
        ([[0, 1, 2]], (0,), "at most 2 items"),
        (3, (), "a layer mapping is a name"),
        ({"k": 2}, (), "needs 'type'"),
        ({"type": "every_k", "k": 0}, ("k",), "greater than or equal to 1"),
    ],
)
def test_invalid_mappings_are_located(value, loc, text):
    with pytest.raises(ValidationError) as info:
        ADAPTER.validate_python(value)
    errors = info.value.errors()
    assert errors[0]["loc"] == loc
    assert text in errors[0]["msg"]


depths = st.tuples(st.integers(1, 48), st.integers(1, 48))


@given(depths)
def test_uniform_pairs_are_in_range_monotone_and_end_at_the_last_layer(d):
    student, teacher = d
    if student > teacher:
        with pytest.raises(MappingError):
            UniformMapping().resolve(student, teacher)
        return
    pairs = UniformMapping().resolve(student, teacher)
    assert [s for s, _ in pairs] == list(range(student))
    targets = [t for _, t in pairs]
    assert all(0 <= t < teacher for t in targets)
    assert targets == sorted(set(targets))  # strictly increasing: no teacher layer reused
    assert targets[-1] == teacher - 1


@given(depths, st.integers(1, 6), st.one_of(st.none(), st.integers(0, 5)))
def test_every_k_is_either_valid_or_a_located_error(d, k, start):
    student, teacher = d
    mapping = EveryKMapping(k=k, start=start)
    try:
        pairs = mapping.resolve(student, teacher)
    except MappingError as exc:
        assert exc.where == ("k",)
        return
    assert len(pairs) == student
    assert all(0 <= t < teacher for _, t in pairs)
    assert all(b[1] - a[1] == k for a, b in zip(pairs, pairs[1:], strict=False))
