"""Where a teacher artifact (``teacher: {cache: DIR}``, written by ``makd teacher cache``)
lies, and the teacher config it holds: read without torch, for the resolver's depths and
shape checks (the artifact's contents are checked by ``makd run``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .depths import DepthError

#: the teacher's transformers config, stored in the artifact directory
CONFIG = "config.json"
#: written last, when every shard is complete
MANIFEST = "manifest.json"
#: the state of a build in progress (removed when the manifest is written)
BUILD = "build.json"
#: a copy of the teacher's tokenizer files
TOKENIZER = "tokenizer"


def artifact_dir(ref: str, base: Path) -> Path:
    """The artifact directory ``ref`` names (relative to the objective file's directory)."""
    return (base / Path(ref).expanduser()).resolve()


def artifact_config(ref: str, base: Path) -> dict[str, Any]:
    """The teacher's ``config.json`` in the artifact at ``ref``; a :class:`DepthError` saying
    what is wrong when there is none."""
    directory = artifact_dir(ref, base)
    if not directory.is_dir():
        what = "is a file" if directory.exists() else "does not exist"
        raise DepthError(
            f"teacher artifact {directory} {what}: build it with 'makd teacher cache "
            f"OBJECTIVE -o {ref}' from an objective that names the teacher's model or config"
        )
    path = directory / CONFIG
    if not path.is_file():
        raise DepthError(
            f"{directory} is not a teacher artifact: it has no {CONFIG} (build one with "
            "'makd teacher cache')"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DepthError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise DepthError(f"{path} does not hold a JSON object")
    return config
