"""Finding how many layers the teacher and student have, without loading any weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: config keys that hold the number of transformer layers, by model family
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


class DepthError(ValueError):
    """A model reference that cannot be used; ``key`` is the sub-path to blame."""

    def __init__(self, message: str, key: tuple[str | int, ...] = ()):
        super().__init__(message)
        self.key = key


def depth_from_config(config: dict[str, Any]) -> int | None:
    for key in LAYER_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise DepthError(f"'{key}' must be at least 1, not {value}", (key,))
            return value
    return None


def is_path_like(ref: str) -> bool:
    """Whether ``ref`` must be a local path (a hub id is ``name`` or ``owner/name``)."""
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref


#: file extensions that make a data reference a local file rather than a hub dataset name
DATA_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".txt", ".raw", ".parquet")


def is_local_data(ref: str) -> bool:
    """Whether a data reference names a local file (else it is a hub dataset name)."""
    return is_path_like(ref) or ref.lower().endswith(DATA_SUFFIXES)


PACKAGE_PREFIX = "pkg:"


def package_model_dir(name: str) -> Path:
    """The model directory an installed Python package carries (``pkg:<module>``): what its
    ``get_model_path()`` returns, else the package's own directory."""
    import importlib
    import importlib.util

    if not name.isidentifier():
        raise DepthError(f"'{PACKAGE_PREFIX}{name}' must name an importable module")
    if importlib.util.find_spec(name) is None:
        raise DepthError(
            f"the package module '{name}' is not installed (pip install {name.replace('_', '-')})"
        )
    module = importlib.import_module(name)
    getter = getattr(module, "get_model_path", None)
    path = Path(getter()) if callable(getter) else Path(module.__file__).parent
    if not path.is_dir():
        raise DepthError(f"the package '{name}' has no model directory ({path})")
    return path


def local_model_dir(ref: str, base: Path) -> Path | None:
    """The local directory ``ref`` names (relative to ``base``, or ``pkg:<module>`` for a
    model shipped in a Python package), or None for a hub id."""
    if ref.startswith(PACKAGE_PREFIX):
        return package_model_dir(ref[len(PACKAGE_PREFIX) :])
    candidate = (base / Path(ref).expanduser()).resolve()
    if candidate.exists():
        if not candidate.is_dir():
            raise DepthError(f"model path {candidate} is a file; give the model directory")
        return candidate
    if is_path_like(ref):
        raise DepthError(f"model directory {candidate} does not exist")
    return None


def config_from_model(ref: str, base: Path) -> dict[str, Any] | None:
    """The ``config.json`` of the local model at ``ref``, or None for a hub id."""
    directory = local_model_dir(ref, base)
    if directory is None:
        return None
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise DepthError(
            f"{directory} has no config.json: it is not a transformers model directory"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DepthError(f"cannot read {config_file}: {exc}") from None
    if not isinstance(config, dict):
        raise DepthError(f"{config_file} does not hold a JSON object")
    return config


def depth_from_model(ref: str, base: Path) -> int | None:
    """Layers of the model at ``ref``: read from its config.json when it is local."""
    config = config_from_model(ref, base)
    if config is None:
        return None
    try:
        return depth_from_config(config)
    except DepthError as exc:
        raise DepthError(f"{local_model_dir(ref, base)}/config.json: {exc}") from None
