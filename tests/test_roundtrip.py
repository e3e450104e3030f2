"""Hypothesis-generated objective trees: validate → dump → validate gives the same tree."""

from __future__ import annotations

import math

import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import Field

from makd_registry import Aspect, Feature, FeatureRequest, LayerwiseConfig
from makd_registry.aspect import AspectConfig
from makd_registry.explain import explain_dict
from makd_registry.testing import registry_with, resolve


class LayerLeaf(Aspect):
    """Layer-wise test aspect."""

    name = "layer_leaf"

    class Config(LayerwiseConfig):
        temperature: float = Field(1.0, gt=0, le=100)
        flag: bool = False

    def requires(self):
        return [FeatureRequest("student", Feature.HIDDEN, s) for s, _ in self.pairs]

    def loss(self, features):
        return features.zero()


class ModelLeaf(Aspect):
    """Model-wise test aspect."""

    name = "model_leaf"

    class Config(AspectConfig):
        alpha: float = Field(0.5, ge=0, le=1)

    def requires(self):
        return [FeatureRequest("teacher", Feature.LOGITS)]

    def loss(self, features):
        return features.zero()


REGISTRY = registry_with(LayerLeaf, ModelLeaf)

weights = st.one_of(st.just(1.0), st.floats(0, 10, allow_nan=False, allow_infinity=False))
names = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True)


@st.composite
def mappings(draw, student, teacher):
    options = ["last", "uniform", "explicit"] + (["identity"] if student == teacher else [])
    kind = draw(st.sampled_from(options))
    if kind == "explicit":
        pairs = draw(
            st.lists(
                st.tuples(st.integers(0, student - 1), st.integers(0, teacher - 1)),
                min_size=1,
                max_size=4,
                unique=True,
            )
        )
        return draw(
            st.sampled_from(
                [[list(p) for p in pairs], {"type": "explicit", "pairs": [list(p) for p in pairs]}]
            )
        )
    return draw(st.sampled_from([kind, {"type": kind}]))


@st.composite
def nodes(draw, student, teacher, depth, has_mapping):
    """A node dict; layer-wise leaves only where a mapping is in scope or given."""
    kinds = ["model_leaf", "layer_leaf"] + (["sum"] if depth < 3 else [])
    kind = draw(st.sampled_from(kinds))
    node: dict = {"type": kind}
    if draw(st.booleans()):
        node["weight"] = draw(weights)
    if kind == "model_leaf":
        if draw(st.booleans()):
            node["alpha"] = draw(st.floats(0, 1))
        return node
    if kind == "layer_leaf":
        if not has_mapping or draw(st.booleans()):
            node["layers"] = draw(mappings(student, teacher))
        if draw(st.booleans()):
            node["temperature"] = draw(st.floats(0.1, 100))
        if draw(st.booleans()):
            node["flag"] = draw(st.booleans())
        return node
    give_mapping = draw(st.booleans())
    if give_mapping:
        node["layers"] = draw(mappings(student, teacher))
    count = draw(st.integers(1, 3))
    term_names = draw(st.lists(names, min_size=count, max_size=count, unique=True))
    terms = []
    for name in term_names:
        child = draw(nodes(student, teacher, depth + 1, has_mapping or give_mapping))
        child["name"] = name
        terms.append(child)
    node["terms"] = terms
    return node


@st.composite
def objective_files(draw):
    teacher = draw(st.integers(1, 12))
    student = draw(st.integers(1, teacher))
    root = draw(nodes(student, teacher, 0, False))
    if draw(st.integers(0, 3)) == 0:
        count = draw(st.integers(1, 3))
        stage_names = draw(st.lists(names, min_size=count, max_size=count, unique=True))
        stages = []
        for i, name in enumerate(stage_names):
            stage = {"name": name, "objective": draw(nodes(student, teacher, 1, False))}
            if i < count - 1 or draw(st.booleans()):
                stage["steps"] = draw(st.integers(1, 10_000))
            stages.append(stage)
        root = {"type": "stages", "stages": stages}
    out = {
        "teacher": {"config": {"model_type": "bert", "num_hidden_layers": teacher}},
        "student": {"config": {"model_type": "bert", "num_hidden_layers": student}},
        "objective": root,
    }
    if root["type"] == "stages":  # every stage must start before training ends
        out["training"] = {"steps": sum(s.get("steps", 0) for s in root["stages"]) + 1}
    # something must be trained: a non-zero effective weight in the objective (each stage)
    groups = [s["objective"] for s in root["stages"]] if root["type"] == "stages" else [root]
    assume(all(any(w > 0 for w in _leaf_weights(g)) for g in groups))
    return out


def _leaf_weights(node: dict, parent: float = 1.0) -> list[float]:
    own = parent * node.get("weight", 1.0)
    if node["type"] == "sum":
        return [w for t in node["terms"] for w in _leaf_weights(t, own)]
    if node["type"] == "stages":
        return [w for s in node["stages"] for w in _leaf_weights(s["objective"], own)]
    return [own]


def _explained_leaves(node: dict) -> list[float]:
    if "children" in node:
        return [w for c in node["children"] for w in _explained_leaves(c)]
    return [node["effective_weight"]]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objective_files())
def test_validate_dump_validate_is_stable(data):
    first = resolve(yaml.safe_dump(data, sort_keys=False), REGISTRY)
    dumped = first.dump()
    second = resolve(yaml.safe_dump(dumped, sort_keys=False), REGISTRY)

    assert second.spec == first.spec
    assert second.dump() == dumped
    assert explain_dict(second) == explain_dict(first)

    # the resolved tree is the generated one: same leaves, same effective weights
    expected = _leaf_weights(data["objective"])
    explained = _explained_leaves(explain_dict(first)["objective"])
    assert len(expected) == len(explained)
    assert all(
        math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
        for a, b in zip(expected, explained, strict=True)
    )
