"""The aspect contract: what every loss component, built-in or third-party, provides.

An *aspect* is one term of a distillation objective. It is a class with

* ``name`` — the unique ``type:`` users write in objective files;
* ``Config`` — a pydantic model (subclass of :class:`AspectConfig`, unknown keys rejected,
  bounded fields) holding its options; ``LayerwiseConfig`` adds the ``layers:`` mapping;
* :meth:`Aspect.requires` — the features it needs, from which side, at which layers;
* :meth:`Aspect.loss` — the loss from those captured features, a scalar fp32 tensor;
* optionally :meth:`Aspect.build` / :meth:`Aspect.modules` — trainable modules (alignment
  maps) that the engine optimises and checkpoints with the student.

The engine builds one instance per node of the objective tree, with the node's validated
config and its resolved ``(student_layer, teacher_layer)`` pairs. Combinators are aspects
too (``is_combinator = True``): they hold child aspects and combine their losses. The tree
protocol below is all that the resolver, the trainer and ``makd explain`` know of them, so a
third-party combinator works like a built-in one:

* :meth:`Aspect.child_nodes` — which child configs a node's config declares, where they sit
  in the file, and whether they inherit the enclosing layer mapping;
* ``root_only`` — the combinator may only be the objective's root;
* :meth:`Aspect.stage_nodes` / :meth:`Aspect.active_stage` — the sub-objectives trained one
  after another and which one is active at a step (the root's are what the trainer uses);
* :meth:`Aspect.schedule_errors` — what is wrong with the node's step schedule for a run of
  ``training.steps`` steps (e.g. a stage that would never start).

Weights are applied in one place only, :mod:`makd_registry.weighting`.

The base classes import no torch; aspects import it inside their methods.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import Field, ValidationInfo, WithJsonSchema, WrapValidator

from .features import FeatureRequest, FeatureSet, ModelInfo
from .mapping import LayerMapping, LayerPair
from .strict import StrictModel, raise_at, suggest

if TYPE_CHECKING:
    import torch

    from .providers import Requirement

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.\-]*$"

#: error type of an unknown aspect type while some plugin failed to load: the file may be
#: right and a broken plugin the cause (a plugin failure, exit code 3)
UNKNOWN_WITH_FAILED_PLUGINS = "unknown_aspect_plugin_failed"


class AspectConfig(StrictModel):
    """Options every objective node has: its ``type``, ``name`` and ``weight``.

    Subclass it (usually as a nested ``Config`` class of the aspect) and add bounded
    fields: ``temperature: float = Field(1.0, gt=0)``.
    """

    type: str = Field(description="The aspect this node uses (see `makd aspects`).")
    name: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        description="Name shown in logs; defaults to the type. Unique among siblings.",
    )
    weight: float = Field(
        default=1.0, ge=0, allow_inf_nan=False, description="Non-negative weight of this term."
    )


class LayerwiseConfig(AspectConfig):
    """Config of an aspect that compares mapped layer pairs; adds ``layers:``."""

    layers: LayerMapping | None = Field(
        default=None,
        description=(
            "Teacher→student layer mapping: uniform | last | identity | "
            "{type: every_k, k} | [[student, teacher], ...]. Inherited from the enclosing "
            "sum when omitted."
        ),
    )


@dataclass(frozen=True)
class ChildNode:
    """One child objective node declared by a combinator's config."""

    #: where the child's config sits, relative to the parent's (``("terms", 2)``)
    where: tuple[str | int, ...]
    config: AspectConfig
    #: the child's name in the tree; None: its config's ``name`` or ``type``
    name: str | None = None
    #: whether the child inherits the enclosing ``layers:`` mapping
    inherits_layers: bool = True


class Aspect:
    """Base class of aspects. See the module docstring for the contract."""

    #: unique name, the ``type:`` in objective files
    name: ClassVar[str] = ""
    #: the pydantic model of this aspect's options
    Config: ClassVar[type[AspectConfig]] = AspectConfig
    #: True for combinators, whose config has child nodes
    is_combinator: ClassVar[bool] = False
    #: True for a combinator that may only be the objective's root
    root_only: ClassVar[bool] = False
    #: True for the task loss (hard-label CE): a teacher that makd trains itself trains on
    #: it alone; exactly one registered aspect should say so
    task_loss: ClassVar[bool] = False

    # -- the tree protocol (combinators) -----------------------------------------------

    @classmethod
    def child_nodes(cls, config: AspectConfig) -> list[ChildNode]:
        """The child nodes ``config`` declares. The default finds every field that holds
        an objective node or a list of them (``terms: list[AspectNode]``); override it for
        children nested deeper (``stages[i].objective``)."""
        out: list[ChildNode] = []
        for field_name in type(config).model_fields:
            value = getattr(config, field_name)
            if isinstance(value, AspectConfig):
                out.append(ChildNode((field_name,), value))
            elif isinstance(value, list):
                out.extend(
                    ChildNode((field_name, i), item)
                    for i, item in enumerate(value)
                    if isinstance(item, AspectConfig)
                )
        return out

    @classmethod
    def schedule_errors(cls, config: AspectConfig, steps: int) -> list[tuple[tuple, str]]:
        """``(where, message)`` for each problem of this node's step schedule in a run of
        ``steps`` optimisation steps (``where`` relative to the node). Default: none."""
        return []

    def stage_nodes(self) -> tuple[Aspect, ...]:
        """The sub-objectives trained one after another; a plain node is its own only
        stage. The trainer builds one capture plan (and teacher cache) per stage."""
        return (self,)

    def active_stage(self, step: int) -> int:
        """The index into :meth:`stage_nodes` of the stage trained at ``step`` (0-based)."""
        return 0

    def explain_info(self) -> dict[str, Any]:
        """Extra facts ``makd explain`` shows for this node (e.g. each stage's steps)."""
        return {}

    def __init__(
        self,
        config: AspectConfig,
        *,
        pairs: Sequence[LayerPair] = (),
        children: Sequence[Aspect] = (),
        path: str = "",
    ) -> None:
        self.config = config
        self.pairs: tuple[LayerPair, ...] = tuple(pairs)
        self.children: tuple[Aspect, ...] = tuple(children)
        #: the qualified name of this node in the tree (``makd/layerwise/attention_kl``)
        self.path = path or self.display_name

    # -- class-level facts -------------------------------------------------------------

    @classmethod
    def layerwise(cls) -> bool:
        """Whether this aspect compares layer pairs (takes a ``layers:`` mapping)."""
        return issubclass(cls.Config, LayerwiseConfig)

    @classmethod
    def summary(cls) -> str:
        """The first line of the class docstring."""
        doc = inspect.getdoc(cls) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    # -- instance ----------------------------------------------------------------------

    @property
    def display_name(self) -> str:
        return self.config.name or self.name

    @property
    def weight(self) -> float:
        return self.config.weight

    def requires(self) -> list[FeatureRequest]:
        """The features this node needs; combinators return their children's union."""
        out: list[FeatureRequest] = []
        for child in self.children:
            out.extend(child.requires())
        return sorted(set(out))

    def needs(self) -> list[Requirement]:
        """What this node needs beyond captured features (generated targets, pseudo-labels,
        …), served by the provider registered for each requirement's kind (see
        :mod:`makd_registry.providers`). Only the node's own: the engine walks the tree."""
        return []

    def build(self, teacher: ModelInfo, student: ModelInfo) -> None:
        """Create trainable modules once the model shapes are known (default: none)."""
        for child in self.children:
            child.build(teacher, student)

    def modules(self) -> dict[str, torch.nn.Module]:
        """Trainable modules by a stable name, optimised and checkpointed with the student."""
        out: dict[str, Any] = {}
        for child in self.children:
            for key, module in child.modules().items():
                out[f"{child.display_name}.{key}"] = module
        return out

    def loss(self, features: FeatureSet) -> torch.Tensor:
        """The unweighted loss of this node for one batch, a scalar fp32 tensor."""
        raise NotImplementedError(f"aspect {self.name!r} does not implement loss()")

    def walk(self) -> Iterator[Aspect]:
        """This node and its descendants, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path!r}>"


def check_aspect_class(cls: Any) -> None:
    """Raise ``TypeError`` explaining what is wrong with a class offered as an aspect."""
    if not (isinstance(cls, type) and issubclass(cls, Aspect)):
        raise TypeError(f"{cls!r} is not a subclass of makd_registry.Aspect")
    if not isinstance(cls.name, str) or not cls.name:
        raise TypeError(f"aspect class {cls.__qualname__} has no 'name'")
    import re

    if not re.match(r"^[a-z][a-z0-9_]*$", cls.name):
        raise TypeError(f"aspect name {cls.name!r} of {cls.__qualname__} must be lower_snake_case")
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, AspectConfig)):
        raise TypeError(f"aspect {cls.name!r}: Config must subclass makd_registry.AspectConfig")
    if not cls.is_combinator and cls.loss is Aspect.loss:
        raise TypeError(f"aspect {cls.name!r} ({cls.__qualname__}) does not implement loss()")


def _validate_node(value: Any, handler: Any, info: ValidationInfo) -> AspectConfig:
    """Validate one objective node: look its ``type`` up in the registry from the context."""
    if isinstance(value, AspectConfig):
        return value
    if not isinstance(value, dict):
        raise_at((), "node_type", "an objective node must be a mapping with a 'type' key", value)
    registry = (info.context or {}).get("registry")
    if registry is None:
        raise RuntimeError("objective nodes need a registry in the validation context")
    kind = value.get("type")
    if kind is None:
        raise_at(
            (),
            "missing_type",
            "missing 'type' (registered aspects: {known})",
            value,
            known=", ".join(registry.names()),
        )
    if not isinstance(kind, str):
        raise_at(("type",), "type_type", "'type' must be an aspect name (a string)", kind)
    cls = registry.get(kind)
    if cls is None:
        failed = registry.failed_plugins()
        note = f"; plugins that failed to load: {', '.join(failed)}" if failed else ""
        raise_at(
            ("type",),
            UNKNOWN_WITH_FAILED_PLUGINS if failed else "unknown_aspect",
            "unknown aspect type '{kind}'{hint} (registered: {known}){note}",
            kind,
            kind=kind,
            hint=suggest(kind, registry.names()),
            known=", ".join(registry.names()),
            note=note,
        )
    return cls.Config.model_validate(value, context=info.context)


#: JSON Schema marker replaced by a reference to the node definition in ``makd schema``.
NODE_SCHEMA_MARKER = {"x-makd-node": True}

#: The annotated type of a field holding a child objective node (as in ``sum.terms``).
AspectNode = Annotated[Any, WrapValidator(_validate_node), WithJsonSchema(NODE_SCHEMA_MARKER)]
