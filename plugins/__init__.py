"""makd's built-in aspects, registered through the same hook as third-party plugins.

Installed as the package ``makd_plugins``; each module implements
``makd_register_aspects`` and is listed in ``makd_registry.plugins.BUILTIN_PLUGINS``.
"""
