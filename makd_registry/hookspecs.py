"""The hooks a makd plugin can implement.

A plugin is any module or object with functions marked by :data:`makd_registry.hookimpl`
whose names match the specifications below. Third-party plugins are found through the
``makd`` entry-point group::

    [project.entry-points.makd]
    cosine = "makd_cosine"

Built-in aspects (``makd_plugins.*``) implement exactly the same hooks.

Every hook here is documented; ``tests/test_hookspecs.py`` fails if one is not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .aspect import Aspect
    from .callbacks import Callback
    from .models.adapter import ArchitectureAdapter
    from .providers import Provider

PROJECT_NAME = "makd"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)


@hookspec
def makd_register_aspects(register: Callable[[type[Aspect]], None]) -> None:
    """Register aspect classes: call ``register(AspectClass)`` once for each.

    An aspect class subclasses :class:`makd_registry.Aspect`, carries a unique ``name``
    (the ``type:`` users write in objective files) and a pydantic ``Config`` model.
    ``register`` validates the class at once and raises :class:`makd_registry.PluginError`
    if it is malformed; two plugins registering the same name is an error that names both.

    Keep the module that implements this hook cheap to import: import torch inside the
    aspect's methods (or from a submodule they import), not at module level, so that
    ``makd --help`` and ``makd aspects`` stay fast.

    Example::

        from makd_registry import hookimpl

        @hookimpl
        def makd_register_aspects(register):
            register(HiddenCosine)
    """


@hookspec
def makd_register_architectures(register: Callable[[type[ArchitectureAdapter]], None]) -> None:
    """Register architecture adapters: call ``register(AdapterClass)`` once for each.

    An adapter class subclasses :class:`makd_registry.models.ArchitectureAdapter` and tells
    makd where the layers, the attention projections, the feed-forward parts and the final
    norm of one model family are (``model_types`` lists the ``config.model_type`` values it
    handles). makd captures features and builds factorized or layer-selected students only
    for models with an adapter. Two plugins claiming the same ``model_type`` is an error
    that names both.

    Example::

        from makd_registry import hookimpl
        from makd_registry.models import ArchitectureAdapter, LayerLayout

        class MyModelAdapter(ArchitectureAdapter):
            name = "mymodel"
            model_types = ("mymodel",)
            layers_path = "layers"
            layout = LayerLayout(attention="attn", q="attn.q", k="attn.k", v="attn.v",
                                 o="attn.out", ffn_in="mlp.fc1", ffn_act="mlp.act",
                                 ffn_out="mlp.fc2")
            heads = frozenset({"causal_lm"})

        @hookimpl
        def makd_register_architectures(register):
            register(MyModelAdapter)

    See ``docs/adapters.md`` for the whole contract.
    """


@hookspec
def makd_register_providers(register: Callable[[Provider], None]) -> None:
    """Register requirement providers: call ``register(provider)`` with an instance of a
    :class:`makd_registry.providers.Provider` subclass, once for each.

    An aspect that needs more than captured features returns
    :class:`~makd_registry.providers.Requirement` objects from ``needs()``; the provider
    whose ``kind`` matches checks them while the run is planned (``check``, problems
    located at the nodes that asked) and serves them before training (``provide``, e.g. a
    column added to the training data). Two plugins providing one kind is an error that
    names both. The built-in ``teacher_targets`` provider runs SeqKD's generation pass.

    Example::

        from makd_registry import hookimpl
        from makd_registry.providers import Provider

        class PseudoLabels(Provider):
            kind = "pseudo_labels"

            def provide(self, needs, context):
                ...  # label context.data.train with context.teacher

        @hookimpl
        def makd_register_providers(register):
            register(PseudoLabels())
    """


@hookspec
def makd_register_callbacks(register: Callable[[type[Callback]], None]) -> None:
    """Register training-loop callbacks: call ``register(CallbackClass)`` once for each.

    A callback class subclasses :class:`makd_registry.callbacks.Callback`, has a unique
    ``name`` (the ``type:`` users write under ``training.callbacks``), a ``Config`` (a
    :class:`~makd_registry.callbacks.CallbackConfig` subclass: its options, validated with
    located errors) and ``roles`` (the loops it joins: ``student``, ``teacher``). It
    overrides the lifecycle hooks it needs (``on_run_start``, ``on_step_begin``,
    ``on_step_end``, ``on_evaluate``, ``on_checkpoint``, ``on_step_complete``,
    ``on_run_end``) and steers the loop through ``control`` (``should_evaluate``,
    ``should_checkpoint``, ``stop(reason)``, ``interrupt(reason)``). The built-in progress
    bar, metrics log, evaluation and checkpoint schedules, finite-loss guard, stop
    requests and fault injection are callbacks of the same kind.

    Example::

        from makd_registry import hookimpl

        @hookimpl
        def makd_register_callbacks(register):
            register(EarlyStopping)
    """
