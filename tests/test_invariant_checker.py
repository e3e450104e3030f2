"""check_aspect_invariants must catch broken aspects (otherwise its passes mean nothing)."""

from __future__ import annotations

import pytest

from makd_registry import Aspect, Feature, FeatureRequest, LayerwiseConfig, ModelInfo
from makd_registry.testing import check_aspect_invariants, registry_with, resolve

INFO = ModelInfo(num_layers=2, hidden_size=8, num_heads=2, num_labels=3, vocab_size=7)


class _Hidden(Aspect):
    name = "broken_base"

    class Config(LayerwiseConfig):
        pass

    def requires(self):
        return [
            FeatureRequest(side, Feature.HIDDEN, layer)
            for s, t in self.pairs
            for side, layer in (("student", s), ("teacher", t))
        ]

    def pair(self, features):
        ((s, t),) = self.pairs
        return features.student(Feature.HIDDEN, s).float(), features.teacher(
            Feature.HIDDEN, t
        ).float()


class IgnoresPadding(_Hidden):
    """Averages over padded tokens too."""

    name = "ignores_padding"

    def loss(self, features):
        s, t = self.pair(features)
        return ((s - t) ** 2).mean()


class Negative(_Hidden):
    """Negative squared error."""

    name = "negative"

    def loss(self, features):
        s, t = self.pair(features)
        mask = features.attention_mask.bool()
        return -((s - t) ** 2)[mask].mean()


class NotZeroWhenEqual(_Hidden):
    """Squared error plus a constant."""

    name = "not_zero"

    def loss(self, features):
        s, t = self.pair(features)
        mask = features.attention_mask.bool()
        return ((s - t) ** 2)[mask].mean() + 0.1


class FirstRowOnly(_Hidden):
    """Depends on which example is first."""

    name = "first_row"

    def loss(self, features):
        s, t = self.pair(features)
        mask = features.attention_mask.bool()
        return ((s[0] - t[0]) ** 2)[mask[0]].mean()


class Overflows(_Hidden):
    """Exponentiates raw features."""

    name = "overflows"

    def loss(self, features):
        s, t = self.pair(features)
        mask = features.attention_mask.bool()
        return (s.exp() - t.exp()).abs()[mask].mean()


@pytest.mark.parametrize(
    "cls, message",
    [
        (IgnoresPadding, "padded content changed the loss"),
        (Negative, "loss is negative"),
        (NotZeroWhenEqual, "not 0, when student equals teacher"),
        (FirstRowOnly, "batch order changed the loss"),
        (Overflows, "not finite"),
    ],
)
def test_broken_aspects_are_caught(cls, message):
    aspect = resolve(
        "teacher: {config: {num_hidden_layers: 2}}\nstudent: {config: {num_hidden_layers: 2}}\n"
        f"objective: {{type: {cls.name}, layers: [[0, 1]]}}\n",
        registry_with(cls),
    ).root
    with pytest.raises(AssertionError, match=message):
        check_aspect_invariants(aspect, INFO, seed=3)
