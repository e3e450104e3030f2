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
