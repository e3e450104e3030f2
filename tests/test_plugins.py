"""The plugin system: built-ins, extra plugins, entry points, failures and conflicts."""

from __future__ import annotations

import sys
import textwrap
from types import SimpleNamespace

import pytest

from makd_registry import Aspect, LayerwiseConfig, PluginError, hookimpl
from makd_registry.cli import main
from makd_registry.plugins import BUILTIN_PLUGINS, make_plugin_manager, make_registry
from makd_registry.testing import plugin_for, registry_with


class Alpha(Aspect):
    """Alpha test aspect."""

    name = "alpha"

    class Config(LayerwiseConfig):
        pass

    def loss(self, features):
        return features.zero()


class AlphaImpostor(Alpha):
    """Another class claiming the name 'alpha'."""


def test_builtins_register_through_the_hook():
    pm = make_plugin_manager(entrypoints=False)
    names = {pm.get_name(p) for p in pm.get_plugins()}
    assert set(BUILTIN_PLUGINS) <= names
    registry = make_registry(pm)
    assert {"sum", "stages"} <= set(registry.names())
    entry = registry.entries["sum"]
    assert entry.plugin.builtin and entry.plugin.distribution == "makd"


def test_each_call_builds_a_fresh_manager():
    first = make_plugin_manager([plugin_for(Alpha)], entrypoints=False)
    second = make_plugin_manager(entrypoints=False)
    assert first is not second
    assert "alpha" in make_registry(first)
    assert "alpha" not in make_registry(second)


def test_extra_plugin_registers_aspects():
    registry = registry_with(Alpha)
    assert registry.get("alpha") is Alpha
    assert registry.entries["alpha"].plugin.name == "test-plugin"


def test_duplicate_name_is_an_error_naming_both_plugins():
    pm = make_plugin_manager(
        [plugin_for(Alpha, name="first-plugin"), plugin_for(AlphaImpostor, name="second-plugin")],
        entrypoints=False,
    )
    with pytest.raises(PluginError) as info:
        make_registry(pm)
    message = str(info.value)
    assert "'alpha'" in message
    assert "first-plugin" in message and "second-plugin" in message
    assert "Alpha" in message and "AlphaImpostor" in message


def test_duplicate_of_a_builtin_name_is_reported_not_overwritten():
    class FakeSum(Alpha):
        """Pretends to be sum."""

        name = "sum"

    pm = make_plugin_manager([plugin_for(FakeSum, name="hijacker")], entrypoints=False)
    registry = make_registry(pm, strict=False)
    assert registry.get("sum").__module__ == "makd_plugins.combinators"
    assert [f.stage for f in registry.failures] == ["conflict"]
    assert "hijacker" in registry.failures[0].error
    assert "makd_plugins.combinators" in registry.failures[0].error


def test_registration_hook_that_raises_is_isolated_and_rolled_back():
    @hookimpl
    def makd_register_aspects(register):
        register(Alpha)
        raise RuntimeError("boom in registration")

    broken = SimpleNamespace(__name__="broken", makd_register_aspects=makd_register_aspects)
    registry = make_registry(make_plugin_manager([broken], entrypoints=False))
    assert "alpha" not in registry  # partial registrations are rolled back
    assert "sum" in registry  # the others still register
    (failure,) = registry.failures
    assert failure.plugin == "broken" and failure.stage == "register"
    assert "boom in registration" in failure.error


@pytest.mark.parametrize(
    "bad, expected",
    [
        (int, "is not a subclass of makd_registry.Aspect"),
        (type("NoName", (Aspect,), {"loss": lambda self, f: 0}), "has no 'name'"),
        (type("Caps", (Aspect,), {"name": "Bad-Name", "loss": lambda s, f: 0}), "lower_snake_case"),
        (type("NoLoss", (Aspect,), {"name": "no_loss"}), "does not implement loss()"),
        (
            type(
                "BadConfig", (Aspect,), {"name": "bad_cfg", "Config": dict, "loss": lambda s, f: 0}
            ),
            "Config must subclass",
        ),
    ],
)
def test_invalid_aspect_classes_are_rejected_with_a_reason(bad, expected):
    registry = make_registry(
        make_plugin_manager([plugin_for(bad, name="sloppy")], entrypoints=False)
    )
    (failure,) = registry.failures
    assert failure.plugin == "sloppy"
    assert expected in failure.error


def test_misspelled_hook_is_reported():
    @hookimpl
    def makd_register_aspect(register):  # missing the final 's'
        register(Alpha)

    typo = SimpleNamespace(__name__="typo", makd_register_aspect=makd_register_aspect)
    pm = make_plugin_manager([typo], entrypoints=False)
    (failure,) = pm.failures
    assert failure.plugin == "typo"
    assert "unknown hook(s) makd_register_aspect" in failure.error
    assert "makd_register_aspects" in failure.error


# -- entry points ------------------------------------------------------------------------


def test_example_plugin_is_found_through_its_entry_point():
    registry = make_registry(make_plugin_manager())
    entry = registry.entries["hidden_cosine"]
    assert entry.plugin.name == "cosine"
    assert entry.plugin.distribution == "makd-cosine"
    assert not entry.plugin.builtin


def test_env_var_blocks_external_plugins(monkeypatch):
    monkeypatch.setenv("MAKD_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry = make_registry(make_plugin_manager())
    assert "hidden_cosine" not in registry
    assert "sum" in registry  # built-ins stay


def test_env_var_disables_named_plugins(monkeypatch):
    monkeypatch.setenv("MAKD_DISABLED_PLUGINS", "makd-cosine")
    assert "hidden_cosine" not in make_registry(make_plugin_manager())
    monkeypatch.setenv("MAKD_DISABLED_PLUGINS", "other, cosine")
    assert "hidden_cosine" not in make_registry(make_plugin_manager())


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """Put a fake distribution with entry points on sys.path: fake_dist(name, module_source)."""

    def make(name: str, source: str) -> None:
        module = name.replace("-", "_")
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        info = tmp_path / f"{module}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
        (info / "entry_points.txt").write_text(f"[makd]\n{name} = {module}\n")

    monkeypatch.syspath_prepend(str(tmp_path))
    yield make
    for mod in [m for m in sys.modules if m.startswith("fake_")]:
        del sys.modules[mod]


def test_plugin_that_raises_on_import_is_reported_and_does_not_break_cli(fake_dist, capsys):
    fake_dist("fake-broken", "raise ImportError('fake_broken needs a missing library')\n")
    registry = make_registry(make_plugin_manager())
    (failure,) = [f for f in registry.failures if f.plugin == "fake-broken"]
    assert failure.stage == "import" and failure.distribution == "fake-broken"
    assert "needs a missing library" in failure.error
    assert "hidden_cosine" in registry  # other entry points still load

    assert main(["aspects"]) == 0
    captured = capsys.readouterr()
    assert "sum" in captured.out and "hidden_cosine" in captured.out
    assert "plugin 'fake-broken' (from fake-broken) failed to import" in captured.err

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "validate" in capsys.readouterr().out


def test_entry_point_plugin_whose_registration_raises(fake_dist, capsys):
    fake_dist(
        "fake-raiser",
        """
        from makd_registry import hookimpl

        @hookimpl
        def makd_register_aspects(register):
            raise ValueError("cannot register today")
        """,
    )
    assert main(["plugins"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    failures = {f["name"]: f for f in report["failures"]}
    assert failures["fake-raiser"]["stage"] == "register"
    assert "cannot register today" in failures["fake-raiser"]["error"]
    assert {p["name"] for p in report["plugins"]} >= {"cosine", "makd_plugins.combinators"}


def test_objective_using_a_broken_plugins_aspect_exits_with_plugin_code(
    fake_dist, tmp_path, capsys
):
    fake_dist("fake-gone", "raise RuntimeError('gone')\n")
    objective = tmp_path / "o.yaml"
    objective.write_text("objective: {type: gone_aspect}\n")
    assert main(["validate", str(objective)]) == 3
    err = capsys.readouterr().err
    assert "unknown aspect type 'gone_aspect'" in err
    assert "plugins that failed to load: fake-gone" in err


def test_conflicting_entry_point_plugin_makes_validate_exit_3(fake_dist, tmp_path, capsys):
    fake_dist(
        "fake-clash",
        """
        from makd_registry import Aspect, hookimpl

        class Sum(Aspect):
            name = "sum"
            def loss(self, features):
                return 0

        @hookimpl
        def makd_register_aspects(register):
            register(Sum)
        """,
    )
    objective = tmp_path / "o.yaml"
    objective.write_text("objective: {type: hidden_cosine, layers: last}\n")
    assert main(["validate", str(objective)]) == 3
    err = capsys.readouterr().err
    assert "aspect 'sum' is registered twice" in err and "fake-clash" in err


def test_the_teachers_own_loss_is_the_aspect_registered_as_the_task_loss():
    """The engine finds it by role, not by name; two claimants are an error naming both."""
    from makd_registry import Aspect, AspectConfig, hookimpl

    assert make_registry(make_plugin_manager(entrypoints=False)).task_loss().name == "ce"

    class MyCE(Aspect):
        name = "my_ce"
        task_loss = True

        class Config(AspectConfig):
            pass

        def loss(self, features):
            return features.zero()

    class Plugin:
        @staticmethod
        @hookimpl
        def makd_register_aspects(register):
            register(MyCE)

    registry = make_registry(make_plugin_manager([Plugin], entrypoints=False))
    with pytest.raises(PluginError, match="exactly one.*'ce'.*'my_ce' \\(plugin 'Plugin'\\)"):
        registry.task_loss()


@pytest.mark.parametrize("command", ["validate", "explain", "student", "run"])
def test_each_command_loads_the_plugins_once(command, monkeypatch, tmp_path):
    """One plugin manager per command; every registry is built from it."""
    import makd_registry.plugins as plugins

    calls = []
    real = plugins.make_plugin_manager

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(plugins, "make_plugin_manager", counted)
    args = [command, "objectives/quickstart.yaml"]
    if command == "run":
        args += ["--dry-run", "--output", str(tmp_path / "run")]
    assert main(args) == 0
    assert len(calls) == 1


def test_aspects_cannot_change_the_features_they_are_given():
    import torch

    from makd_registry import Feature, FeatureSet

    features = FeatureSet(student_features={(Feature.LOGITS, None): torch.zeros(2, 3)})
    with pytest.raises(TypeError):
        features.student_features[(Feature.LOGITS, None)] = torch.ones(2, 3)
    with pytest.raises(TypeError):
        features.teacher_features[(Feature.GENERATED, None)] = torch.ones(2)


def test_a_failing_plugin_never_removes_what_another_plugin_registered():
    """Registering another plugin's class again is a conflict, not a takeover that the
    failing plugin's rollback would then delete."""
    from makd_registry.callbacks import Callback

    class Shared(Callback):
        name = "shared_callback"

    class First:
        @staticmethod
        @hookimpl
        def makd_register_callbacks(register):
            register(Shared)

    class Second:
        @staticmethod
        @hookimpl
        def makd_register_callbacks(register):
            register(Shared)
            raise RuntimeError("second fails after registering")

    registry = make_registry(make_plugin_manager([First, Second], entrypoints=False), strict=False)
    assert registry.callbacks["shared_callback"].plugin.name == "First"
    (failure,) = [f for f in registry.failures if f.plugin == "Second"]
    assert failure.stage == "conflict"
