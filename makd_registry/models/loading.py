"""Building and loading transformers models for a task, with clear errors.

``task`` is the data section's task; :data:`TASK_HEADS` maps it to a task head, and the
head to a transformers Auto class. Models come from an inline config (random weights), a
local directory, or a hub id (the hub path stays in the code; tests use local paths).
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ExitCode, MakdError
from .adapter import HEAD_CLASSES, ArchitectureAdapter, ArchitectureError
from .registry import ArchitectureRegistry

#: data-section task → task head
TASK_HEADS: dict[str, str] = {
    "classification": "sequence_classification",
    "pair_classification": "sequence_classification",
    "qa": "question_answering",
    "causal_lm": "causal_lm",
    "instruction": "causal_lm",
    "masked_lm": "masked_lm",
}

#: config keys transformers accepts on every config (not fields of the model's own class)
_COMMON_CONFIG_KEYS = {"model_type", "num_labels", "id2label", "label2id", "attn_implementation"}


class ModelError(MakdError):
    """A model, tokenizer or student could not be loaded, built or saved."""

    exit_code = ExitCode.MODEL


class ConfigError(ModelError):
    """An inline model config that transformers cannot use; ``key`` is the offending key
    (None when the config as a whole is wrong). It is a mistake in the objective file."""

    exit_code = ExitCode.INVALID_INPUT

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and info/warning logs for the block: makd
    reports what matters itself (a newly initialised head, parameter counts)."""
    from transformers.utils import logging as tf_logging

    bars = tf_logging.is_progress_bar_enabled()
    level = tf_logging.get_verbosity()
    tf_logging.disable_progress_bar()
    tf_logging.set_verbosity_error()
    try:
        yield
    finally:
        tf_logging.set_verbosity(level)
        if bars:
            tf_logging.enable_progress_bar()


def head_for_task(task: str) -> str:
    try:
        return TASK_HEADS[task]
    except KeyError:
        raise ModelError(f"unknown task {task!r}; known: {', '.join(TASK_HEADS)}") from None


def auto_class(head: str) -> Any:
    import transformers

    return getattr(transformers, HEAD_CLASSES[head])


def _check_head(adapter: ArchitectureAdapter, head: str, what: str) -> None:
    if head not in adapter.heads:
        raise ArchitectureError(
            f"{what}: {adapter.name} models have no {head.replace('_', '-')} head in makd; "
            f"supported heads: {', '.join(sorted(adapter.heads))}"
        )


def config_from_dict(values: dict[str, Any], what: str) -> Any:
    """A transformers config from an inline mapping with ``model_type``; unknown keys are
    errors naming the closest known key."""
    import transformers

    values = dict(values)
    model_type = values.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ConfigError(
            "an inline config needs 'model_type' (e.g. bert, gpt2, llama)", "model_type"
        )
    try:
        config_cls = transformers.AutoConfig.for_model(model_type).__class__
    except (ValueError, KeyError):
        raise ConfigError(f"transformers has no model_type {model_type!r}", "model_type") from None
    known = set(config_cls().to_dict()) | set(getattr(config_cls, "attribute_map", {}))
    known |= _COMMON_CONFIG_KEYS
    for key in values:
        if not isinstance(key, str) or key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"'{key}' is not a {model_type} config key{hint}", str(key))
    try:
        return transformers.AutoConfig.for_model(model_type, **values)
    except Exception as exc:  # transformers validates values with many exception types
        raise ConfigError(f"invalid {model_type} config: {_first_line(exc)}") from None


def build_from_config(
    config: Any,
    head: str,
    registry: ArchitectureRegistry,
    *,
    what: str = "model",
    attn_implementation: str | None = None,
) -> Any:
    """A randomly initialised model with ``head`` for ``config`` (a config or a dict)."""
    if isinstance(config, dict):
        try:
            config = config_from_dict(config, what)
        except ConfigError as exc:
            raise ConfigError(f"{what}: {exc}", exc.key) from None
    adapter = registry.for_config(config)
    _check_head(adapter, head, what)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        return auto_class(head).from_config(config, **kwargs)
    except Exception as exc:  # libraries raise many kinds on malformed files
        raise ModelError(f"{what}: cannot build a {head} model from its config: {exc}") from None


def build_on_meta(
    directory: Path,
    head: str,
    registry: ArchitectureRegistry,
    *,
    what: str = "model",
) -> Any:
    """The model whose ``config.json`` lies in ``directory``, with ``head``, built on the
    ``meta`` device: its structure, config and shapes, with no weights in memory (a
    teacher read from an artifact, whose outputs are stored)."""
    import torch
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(directory))
    except Exception as exc:  # libraries raise many kinds on malformed files
        raise ModelError(
            f"{what}: cannot read the config in {directory}: {_first_line(exc)}"
        ) from None
    adapter = registry.for_config(config)
    _check_head(adapter, head, what)
    try:
        with torch.device("meta"), quiet_transformers():
            return auto_class(head).from_config(config)
    except Exception as exc:  # libraries raise many kinds on malformed files
        raise ModelError(f"{what}: cannot build a {head} model from its config: {exc}") from None


def resolve_model_ref(ref: str, base_dir: Path) -> str:
    """A local directory (made absolute against ``base_dir``) or a hub id, as given."""
    from ..objective.depths import DepthError, local_model_dir

    try:
        directory = local_model_dir(ref, base_dir)
    except DepthError as exc:
        raise ModelError(str(exc)) from None
    return str(directory) if directory is not None else ref


def load_pretrained(
    ref: str,
    head: str,
    registry: ArchitectureRegistry,
    *,
    base_dir: Path | None = None,
    what: str = "model",
    attn_implementation: str | None = None,
    num_labels: int | None = None,
) -> Any:
    """Load ``ref`` (a local directory or a hub id) with a ``head``.

    A checkpoint without that head (e.g. a bare ``BertModel``) gets a freshly initialised
    head; ``num_labels`` sets its size for classification.
    """
    import transformers

    source = resolve_model_ref(ref, base_dir or Path.cwd())
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except Exception as exc:  # libraries raise many kinds on malformed files
        raise ModelError(
            f"{what}: cannot read the config of {source!r}: {_first_line(exc)}"
        ) from None
    adapter = registry.for_config(config)
    _check_head(adapter, head, what)
    kwargs: dict[str, Any] = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if num_labels is not None and head == "sequence_classification":
        kwargs["num_labels"] = num_labels
    try:
        with quiet_transformers():  # "newly initialized head" is expected here
            return auto_class(head).from_pretrained(source, **kwargs)
    except Exception as exc:  # libraries raise many kinds on malformed files
        raise ModelError(f"{what}: cannot load {source!r}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
