"""Requirements beyond features: aspects declare them, providers registered through
``makd_register_providers`` check and serve them; the engine knows neither by name."""

from __future__ import annotations

import pytest
import torch
from test_engine import write_objective

from makd_registry import Aspect, AspectConfig, Feature, FeatureRequest, hookimpl
from makd_registry.cli import main
from makd_registry.errors import PluginConflictError
from makd_registry.plugins import make_plugin_manager, make_registry
from makd_registry.providers import Provider, Requirement

CALLS: list[tuple[str, object]] = []


class ConstantCE(Aspect):
    """CE of the student on labels a provider wrote into the data."""

    name = "constant_ce"

    class Config(AspectConfig):
        label: int = 1

    def requires(self):
        return [
            FeatureRequest("teacher", Feature.GENERATED),
            FeatureRequest("student", Feature.LOGITS),
        ]

    def needs(self):
        return [Requirement("constant_labels", {"label": self.config.label})]

    def loss(self, features):
        from makd_registry import losses

        return losses.cross_entropy(
            features.student(Feature.LOGITS), features.teacher(Feature.GENERATED)
        )


class ConstantLabels(Provider):
    kind = "constant_labels"

    def check(self, needs, context):
        CALLS.append(("check", [n.requirement.options for n in needs]))
        bad = [n for n in needs if n.requirement.options["label"] > 1]
        return [(n.node, "only labels 0 and 1 exist here") for n in bad]

    def provide(self, needs, context):
        CALLS.append(("provide", len(context.data.train)))
        label = needs[0].requirement.options["label"]
        context.data.train = context.data.train.add_column(
            "generated", [label] * len(context.data.train)
        )


class Plugin:
    @staticmethod
    @hookimpl
    def makd_register_aspects(register):
        register(ConstantCE)

    @staticmethod
    @hookimpl
    def makd_register_providers(register):
        register(ConstantLabels())


class Rival:
    @staticmethod
    @hookimpl
    def makd_register_providers(register):
        register(ConstantLabels())


class Broken:
    @staticmethod
    @hookimpl
    def makd_register_providers(register):
        register(ConstantLabels)  # the class, not an instance


@pytest.fixture
def with_plugin(monkeypatch):
    import makd_registry.plugins as plugins

    real = plugins.make_plugin_manager
    monkeypatch.setattr(
        plugins, "make_plugin_manager", lambda *a, **k: real([Plugin], entrypoints=False)
    )
    CALLS.clear()


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MAKD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "makd-cache"))


def test_providers_register_through_the_hook_and_conflicts_name_both():
    registry = make_registry(make_plugin_manager([Plugin], entrypoints=False))
    assert isinstance(registry.provider("constant_labels"), ConstantLabels)
    assert registry.provider("teacher_targets") is not None  # the built-in (SeqKD)
    with pytest.raises(PluginConflictError, match="provided twice.*Plugin.*Rival"):
        make_registry(make_plugin_manager([Plugin, Rival], entrypoints=False))
    registry = make_registry(make_plugin_manager([Broken], entrypoints=False), strict=False)
    (failure,) = [f for f in registry.failures if f.plugin == "Broken"]
    assert "an instance" in failure.error and "constant_labels" not in registry.providers


def test_a_third_party_provider_is_checked_while_planning_and_serves_before_training(
    tmp_path, with_plugin, capsys
):
    path = write_objective(tmp_path, steps=2, objective="  {type: constant_ce, label: 1}")
    assert main(["run", str(path), "--output", str(tmp_path / "run")]) == 0
    assert CALLS == [("check", [{"label": 1}]), ("provide", 96)]


def test_a_provider_refusal_is_located_at_the_node_and_nothing_is_written(
    tmp_path, with_plugin, capsys
):
    objective = "  type: sum\n  terms:\n    - {type: ce}\n    - {type: constant_ce, label: 7}\n"
    path = write_objective(tmp_path, objective=objective)
    assert main(["run", str(path), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "objective.terms[1]" in err and "only labels 0 and 1 exist here" in err
    assert not (tmp_path / "run").exists()
    assert CALLS == [("check", [{"label": 7}])]


def test_a_requirement_no_plugin_provides_is_refused(tmp_path, monkeypatch, capsys):
    import makd_registry.plugins as plugins

    class AspectOnly:
        @staticmethod
        @hookimpl
        def makd_register_aspects(register):
            register(ConstantCE)

    real = plugins.make_plugin_manager
    monkeypatch.setattr(
        plugins, "make_plugin_manager", lambda *a, **k: real([AspectOnly], entrypoints=False)
    )
    path = write_objective(tmp_path, objective="  {type: constant_ce}")
    assert main(["run", str(path), "--output", str(tmp_path / "run")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "'constant_ce' needs 'constant_labels', which no installed plugin provides" in err


def test_the_generated_column_reaches_the_aspect_as_the_generated_feature(
    tmp_path, with_plugin, monkeypatch
):
    seen = []
    real = ConstantCE.loss

    def spy(self, features):
        seen.append(features.teacher(Feature.GENERATED).clone())
        return real(self, features)

    monkeypatch.setattr(ConstantCE, "loss", spy)
    path = write_objective(tmp_path, steps=1, objective="  {type: constant_ce, label: 0}")
    assert main(["run", str(path), "--output", str(tmp_path / "run")]) == 0
    assert seen and all(torch.equal(x, torch.zeros_like(x)) for x in seen)
