"""Requirements beyond features, and the providers that serve them.

Some aspects need more than features captured in the forward pass: targets the teacher
generates once before training (SeqKD), pseudo-labels, teacher outputs read from files,
samples of the student regenerated as it trains. An aspect declares such needs with
:meth:`makd_registry.Aspect.needs`, as :class:`Requirement` objects (a ``kind`` and its
options); a :class:`Provider` registered for that kind through the
``makd_register_providers`` hook serves them. The engine knows neither the kinds nor the
aspects: it asks each provider to check its requirements while planning the run (nothing
written yet), to provide them before training, and, for a provider that implements
:meth:`Provider.transform_batch`, to transform every training micro-batch before the
forward (e.g. on-policy distillation replacing responses by the student's own samples).

This module imports no torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .aspect import Aspect


@dataclass(frozen=True)
class Requirement:
    """Something an aspect needs served before (or while) it trains: ``kind`` names the
    provider, ``options`` (JSON-able) say what exactly."""

    kind: str
    options: dict[str, Any] = field(default_factory=dict, hash=False)  # eq compares it

    def key(self) -> str:
        """The options as canonical JSON (equal options, equal keys)."""
        return json.dumps(self.options, sort_keys=True, default=str)


@dataclass(frozen=True)
class Need:
    """A requirement together with the objective node that declared it."""

    node: Aspect
    requirement: Requirement


def collect_needs(root: Aspect) -> dict[str, list[Need]]:
    """Every node's requirements, by kind, in tree order."""
    out: dict[str, list[Need]] = {}
    for node in root.walk():
        for requirement in node.needs():
            out.setdefault(requirement.kind, []).append(Need(node, requirement))
    return out


@dataclass
class PlanContext:
    """What a provider may look at while the run is planned (nothing is written yet)."""

    #: the objective file's validated sections (teacher, student, data, training)
    spec: Any
    #: the directory relative paths in the file are resolved against
    base_dir: Path
    #: whether the file has a teacher section
    has_teacher: bool


@dataclass
class ProviderContext:
    """What a provider gets to serve its requirements, before training starts."""

    spec: Any
    base_dir: Path
    #: the teacher (eval mode, no gradients needed), or None
    teacher: Any
    #: the tokenised task data; a provider may add columns to (or replace) ``data.train``
    data: Any
    tokenizer: Any
    device: Any
    #: a context manager: the run's precision for forwards
    autocast: Callable[[], Any]
    #: whether forwards run in bf16 (part of what generated targets depend on)
    bf16: bool
    #: makd's cache directory (``$MAKD_CACHE_DIR``)
    cache_root: Path
    #: a stable id of the teacher's weights (for cache keys)
    teacher_id: str
    #: print a line to the run's console (main process only)
    say: Callable[[str], None]
    #: ``random_stream(purpose)``: a context manager running the block on the run's random
    #: stream of that purpose (derived from the seed and the purpose alone)
    random_stream: Callable[[str], Any]
    #: whether this is the main process, and a barrier across processes
    main: bool = True
    barrier: Callable[[], None] = lambda: None


@dataclass
class BatchContext:
    """What :meth:`Provider.transform_batch` gets with each training micro-batch."""

    #: the model being trained (in training mode; a provider that runs it must restore
    #: the mode, and must not let gradients flow)
    student: Any
    #: the optimisation step about to be taken (0-based), and the micro-batch within it
    step: int
    micro: int
    #: the training rows of this micro-batch (this process's share), by row index
    indices: list[int]
    #: ``seed_for(purpose)``: a 63-bit seed derived from the run's seed and ``purpose``
    #: alone; randomness drawn per row from e.g. ``f"mykind:{step}:{row}"`` is the same
    #: however the batch is split into processes, and after a resume
    seed_for: Callable[[str], int]
    device: Any
    #: a context manager: the run's precision for forwards
    autocast: Callable[[], Any]
    pad_id: int
    eos_id: int | None
    #: the training data (rows by index: ``data.train[i]``)
    data: Any


class Provider:
    """Serves the requirements of one ``kind``; register an instance through the
    ``makd_register_providers`` hook."""

    #: the requirement kind served
    kind: ClassVar[str] = ""

    def check(self, needs: list[Need], context: PlanContext) -> list[tuple[Aspect, str]]:
        """Problems with these requirements, each as ``(node, message)``; the run is refused
        with each message located at its node. Default: none."""
        return []

    def provide(self, needs: list[Need], context: ProviderContext) -> None:
        """Serve the requirements before training (e.g. add a column to the training data
        that a capture or an aspect reads)."""
        raise NotImplementedError(f"provider {self.kind!r} does not implement provide()")

    def transform_batch(
        self, needs: list[Need], batch: dict[str, Any], context: BatchContext
    ) -> dict[str, Any]:
        """Optional: the micro-batch the step trains on instead of ``batch`` (padded
        tensors: ``input_ids``, ``attention_mask``, ``labels``, ``loss_mask``, ...; keep
        ``index``), called before the teacher's and the student's forwards of every
        training micro-batch. Providers that do not override it are not called."""
        return batch

    @property
    def transforms_batches(self) -> bool:
        """Whether this provider overrides :meth:`transform_batch`."""
        return type(self).transform_batch is not Provider.transform_batch


def disagreements(needs: list[Need], message: str) -> list[tuple[Aspect, str]]:
    """``[(node, message)]`` for the first need whose options differ from the first one's:
    for providers that serve one set of options per objective."""
    first = needs[0].requirement.key()
    for need in needs[1:]:
        if need.requirement.key() != first:
            return [(need.node, message)]
    return []


def check_provider(provider: Any) -> None:
    """Raise ``TypeError`` explaining what is wrong with an object offered as a provider."""
    if isinstance(provider, type):
        raise TypeError(f"register an instance of {provider.__qualname__}, not the class")
    if not isinstance(provider, Provider):
        raise TypeError(f"{provider!r} is not a makd_registry.providers.Provider")
    if not isinstance(provider.kind, str) or not provider.kind:
        raise TypeError(f"provider {type(provider).__qualname__} has no 'kind'")
    if type(provider).provide is Provider.provide:
        raise TypeError(f"provider {provider.kind!r} does not implement provide()")
