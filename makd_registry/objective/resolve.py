"""From an objective file to a resolved tree of aspect instances, or located diagnostics.

Three passes, each reporting every problem it finds as ``file:line:col: path: message``:

1. YAML → plain data (safe loader, duplicate keys rejected), see :mod:`.source`;
2. plain data → validated models (pydantic; each node's ``type`` looked up in the
   registry), see :mod:`.sections`;
3. models → aspects: depths of teacher and student, layer mappings resolved and checked,
   sibling names unique, ``stages`` only at the root.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..aspect import (
    UNKNOWN_WITH_FAILED_PLUGINS,
    Aspect,
    AspectConfig,
    ChildNode,
    LayerwiseConfig,
)
from ..errors import Diagnostic, ExitCode, ObjectiveError, PluginError
from ..features import FeatureRequest
from ..mapping import LayerPair, MappingError
from ..registry import AspectRegistry
from ..weighting import effective_weights
from .build import SOURCE_PATH, build_objective
from .depths import (
    DepthError,
    config_from_model,
    depth_from_config,
    depth_from_model,
    is_local_data,
    local_model_dir,
)
from .sections import ObjectiveFile
from .source import Path as YPath
from .source import SourceMap, load_yaml, read_objective_text

#: pydantic error types that blame a key rather than its value
_KEY_ERRORS = {"unknown_key", "extra_forbidden", "key_type"}


@dataclass
class ResolvedObjective:
    """A valid objective file: its models, its depths and its tree of aspects."""

    file: str
    spec: ObjectiveFile
    root: Aspect
    teacher_layers: int | None
    student_layers: int | None
    source: SourceMap
    base_dir: Path
    warnings: list[Diagnostic] = field(default_factory=list)

    def requires(self) -> list[FeatureRequest]:
        return self.root.requires()

    def dump(self) -> dict[str, Any]:
        """The validated file as plain data, with every default filled in."""
        return self.spec.model_dump(mode="json")


def load_objective(
    path: str | Path,
    registry: AspectRegistry,
    *,
    architectures: Any = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> ResolvedObjective:
    """Read, validate and resolve the objective file at ``path``.

    With an ``architectures`` registry, models whose ``model_type`` is known at validation
    time (inline configs, local directories) must have an architecture adapter."""
    path = Path(path)
    text = read_objective_text(path)
    return resolve_text(
        text,
        str(path),
        registry,
        base_dir=path.resolve().parent,
        architectures=architectures,
        overrides=overrides,
    )


def resolve_text(
    text: str,
    file: str,
    registry: AspectRegistry,
    *,
    base_dir: Path | None = None,
    architectures: Any = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> ResolvedObjective:
    """Validate and resolve objective-file ``text``; ``file`` is the name used in messages.
    ``overrides`` are ``KEY=VALUE`` settings applied before validation (``--set``)."""
    data, smap = load_yaml(text, file)
    if overrides:
        from .overrides import apply_overrides

        data = apply_overrides(data, list(overrides), smap)
    return resolve_data(
        data, smap, registry, base_dir=base_dir or Path.cwd(), architectures=architectures
    )


def resolve_data(
    data: Any,
    smap: SourceMap,
    registry: AspectRegistry,
    *,
    base_dir: Path,
    architectures: Any = None,
) -> ResolvedObjective:
    if not isinstance(data, dict):
        raise ObjectiveError(
            [smap.diagnostic((), "an objective file is a mapping with an 'objective' key")]
        )
    try:
        spec = ObjectiveFile.model_validate(data, context={"registry": registry})
    except ValidationError as exc:
        raise ObjectiveError(pydantic_diagnostics(exc, smap)) from None
    return _Resolver(spec, smap, registry, base_dir, architectures).run()


def pydantic_diagnostics(
    exc: ValidationError, smap: SourceMap, prefix: YPath = ()
) -> list[Diagnostic]:
    """Turn pydantic errors into located diagnostics (one per distinct path and message)."""
    out: dict[tuple[YPath, str], Diagnostic] = {}
    for err in exc.errors(include_url=False):
        path = (*prefix, *err["loc"])
        kind = err["type"]
        message = err["msg"]
        if kind == "missing":
            message = f"missing required key '{path[-1]}'"
            diag = smap.diagnostic(path, message, at=path[:-1])
        else:
            if kind in {"extra_forbidden"}:
                message = f"unknown key '{path[-1]}'"
            elif kind not in _KEY_ERRORS and "input" in err:
                got = _short(err["input"])
                if got and not (isinstance(err["input"], str) and got in message):
                    message += f" (got {got})"
            diag = smap.diagnostic(path, message, key=kind in _KEY_ERRORS)
            if kind == UNKNOWN_WITH_FAILED_PLUGINS:
                diag = dataclasses.replace(diag, code=ExitCode.PLUGIN)
        out.setdefault((path, message), diag)
    return list(out.values())


def _short(value: Any) -> str:
    if isinstance(value, (dict, list)) or value is None:
        return ""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _fmt(path: YPath) -> str:
    from .source import format_path

    return format_path(path)


class _Resolver:
    def __init__(
        self,
        spec: ObjectiveFile,
        smap: SourceMap,
        registry: AspectRegistry,
        base_dir: Path,
        architectures: Any = None,
    ) -> None:
        self.architectures = architectures
        self.spec = spec
        self.smap = smap
        self.registry = registry
        self.base_dir = base_dir
        self.diags: list[Diagnostic] = []

    def error(
        self, path: YPath, message: str, *, key: bool = False, code: ExitCode | None = None
    ) -> None:
        diag = self.smap.diagnostic(path, message, key=key)
        if code is not None:
            diag = dataclasses.replace(diag, code=code)
        self.diags.append(diag)

    def run(self) -> ResolvedObjective:
        teacher_layers = self._teacher_depth()
        student_layers = self._student_depth(teacher_layers)
        if self.architectures is not None:
            for section in ("teacher", "student"):
                self._check_architecture(section)
        for section in ("teacher", "student"):
            self._check_tokenizer(section)
        self.depths = (student_layers, teacher_layers)
        self._check_data_files()
        root = self._build(self.spec.objective, ("objective",), None, "", is_root=True)
        if self.diags:
            raise ObjectiveError(self.diags)
        self._check_weights(root)
        if self.diags:
            raise ObjectiveError(self.diags)
        if self.architectures is not None:
            self._check_models(root)
            if self.diags:
                raise ObjectiveError(self.diags)
        return ResolvedObjective(
            file=self.smap.file,
            spec=self.spec,
            root=root,  # type: ignore[arg-type]
            teacher_layers=teacher_layers,
            student_layers=student_layers,
            source=self.smap,
            base_dir=self.base_dir,
        )

    # -- depths ------------------------------------------------------------------------

    def _artifact_only(self, section: str) -> str | None:
        """The teacher artifact of a teacher given by ``cache`` alone (its config is the
        artifact's ``config.json``), else None."""
        spec = getattr(self.spec, section)
        cache = getattr(spec, "cache", None) if spec is not None else None
        if cache is None or spec.model is not None or spec.config is not None:
            return None
        return cache

    def _artifact_config(self, section: str) -> dict[str, Any] | None:
        from .artifact import artifact_config

        try:
            return artifact_config(self._artifact_only(section) or "", self.base_dir)
        except DepthError as exc:
            self.error((section, "cache"), str(exc), code=ExitCode.MODEL)
            return None

    def _depth(self, section: str) -> int | None:
        spec = getattr(self.spec, section)
        if spec is None:
            return None
        if self._artifact_only(section) is not None:
            config = self._artifact_config(section)
            try:
                return depth_from_config(config) if config is not None else None
            except DepthError as exc:
                self.error((section, "cache"), f"its {section} config: {exc}", code=ExitCode.MODEL)
                return None
        try:
            if spec.config is not None:
                return depth_from_config(spec.config)
            if spec.model is not None:
                return depth_from_model(spec.model, self.base_dir)
        except DepthError as exc:
            if spec.config is not None:  # the inline config itself is wrong
                self.error((section, "config", *exc.key), str(exc))
            else:  # the model it names cannot be used
                self.error((section, "model"), str(exc), code=ExitCode.MODEL)
        return None

    def _check_architecture(self, section: str) -> None:
        spec = getattr(self.spec, section)
        if spec is None:
            return
        where: YPath
        if self._artifact_only(section) is not None:
            from .artifact import artifact_config

            try:
                config = artifact_config(spec.cache, self.base_dir)
            except DepthError:
                return  # reported with the depth
            model_type, where = config.get("model_type"), (section, "cache")
        elif spec.config is not None:
            model_type, where = spec.config.get("model_type"), (section, "config", "model_type")
            if model_type is None:
                self.error((section, "config"), "an inline config needs 'model_type'")
                return
        elif spec.model is not None:
            try:
                config = config_from_model(spec.model, self.base_dir)
            except DepthError:
                return  # reported with the depth
            if config is None:
                return  # a hub id: checked when the model is loaded
            model_type, where = config.get("model_type"), (section, "model")
        else:
            return
        if not isinstance(model_type, str) or self.architectures.get(model_type) is None:
            self.error(where, self.architectures.unknown_message(model_type))

    def _check_tokenizer(self, section: str) -> None:
        """A local tokenizer directory must exist (a hub id is checked when loaded)."""
        spec = getattr(self.spec, section)
        ref = getattr(spec, "tokenizer", None) if spec is not None else None
        if ref is None:
            return
        try:
            local_model_dir(ref, self.base_dir)
        except DepthError as exc:
            self.error((section, "tokenizer"), str(exc), code=ExitCode.MODEL)

    def _teacher_depth(self) -> int | None:
        return self._depth("teacher")

    def _student_depth(self, teacher_layers: int | None) -> int | None:
        student = self.spec.student
        if student is not None and student.factorize is not None:
            self._check_factorized_layers(student, teacher_layers)
        if student is not None and student.factorize is not None and student.model is None:
            if student.teacher_layers is None:
                return teacher_layers  # a factorized copy of the teacher
        if student is None or student.teacher_layers is None:
            return self._depth("student")
        seen: set[int] = set()
        for i, layer in enumerate(student.teacher_layers):
            where = ("student", "teacher_layers", i)
            if layer < 0 or (teacher_layers is not None and layer >= teacher_layers):
                bound = f" (0..{teacher_layers - 1})" if teacher_layers is not None else ""
                self.error(where, f"teacher layer {layer} does not exist{bound}")
            elif layer in seen:
                self.error(where, f"teacher layer {layer} is selected twice")
            seen.add(layer)
        return len(student.teacher_layers)

    def _check_factorized_layers(self, student: Any, teacher_layers: int | None) -> None:
        layers = student.factorize.layers
        if layers is None:
            return
        if student.teacher_layers is not None:
            depth: int | None = len(student.teacher_layers)
        elif student.model is not None:
            depth = self._depth("student")
        else:
            depth = teacher_layers
        for i, layer in enumerate(layers):
            if layer < 0 or (depth is not None and layer >= depth):
                bound = f" (0..{depth - 1})" if depth is not None else ""
                self.error(
                    ("student", "factorize", "layers", i),
                    f"student layer {layer} does not exist{bound}",
                )

    def _check_data_files(self) -> None:
        data = self.spec.data
        if data is None:
            return
        for key in ("train", "validation"):
            ref = getattr(data, key)
            if ref is None or not is_local_data(ref):
                continue
            path = (self.base_dir / Path(ref).expanduser()).resolve()
            if path.is_dir():
                self.error(
                    ("data", key), f"{path} is a directory, not a data file", code=ExitCode.DATA
                )
            elif not path.is_file():
                self.error(("data", key), f"data file {path} does not exist", code=ExitCode.DATA)

    # -- the models' shapes ------------------------------------------------------------

    def _model_config(self, section: str, teacher_config: Any) -> Any:
        """The transformers config of ``section``'s model when it can be known without a
        download (inline, local directory, or derived from the teacher's), else None."""
        import copy

        from ..models.loading import ConfigError, config_from_dict

        spec = getattr(self.spec, section)
        if spec is None:
            return None
        if spec.config is not None:
            try:
                return config_from_dict(spec.config, f"{section}.config")
            except ConfigError as exc:
                if exc.key is not None and exc.key in spec.config:
                    self.error((section, "config", exc.key), str(exc), key=True)
                else:
                    self.error((section, "config"), str(exc))
                return None
        if self._artifact_only(section) is not None:
            from .artifact import artifact_config, artifact_dir

            try:
                artifact_config(spec.cache, self.base_dir)
            except DepthError:
                return None  # reported with the depth
            import transformers

            try:
                return transformers.AutoConfig.from_pretrained(
                    artifact_dir(spec.cache, self.base_dir)
                )
            except Exception as exc:  # transformers raises many kinds on a bad config.json
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                self.error(
                    (section, "cache"), f"cannot read its config: {first}", code=ExitCode.MODEL
                )
                return None
        if section == "student" and spec.model is None:  # built from the teacher
            if teacher_config is None:
                return None
            config = copy.deepcopy(teacher_config)
            if spec.teacher_layers is not None:
                n = getattr(config, "num_hidden_layers", None)
                config.num_hidden_layers = len(spec.teacher_layers)
                types = getattr(config, "layer_types", None)
                if isinstance(types, list) and isinstance(n, int) and len(types) == n:
                    config.layer_types = [types[i] for i in spec.teacher_layers if i < n]
            return config
        if spec.model is None:
            return None
        try:
            if config_from_model(spec.model, self.base_dir) is None:
                return None  # a hub id: known when it is loaded
        except DepthError:
            return None  # reported with the depth
        import transformers

        from ..models.loading import resolve_model_ref

        try:
            return transformers.AutoConfig.from_pretrained(
                resolve_model_ref(spec.model, self.base_dir)
            )
        except Exception as exc:  # transformers raises many kinds on a bad config.json
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.diags.append(
                dataclasses.replace(
                    self.smap.diagnostic(
                        (section, "model"), f"cannot read the model's config: {first}"
                    ),
                    code=ExitCode.MODEL,
                )
            )
            return None

    def _check_models(self, root: Aspect) -> None:
        """Checks that need the models' shapes: the inline configs' keys, the sequence
        length against the position embeddings, and every aspect's ``build`` (on the meta
        device: alignment widths, heads, ranks)."""
        import copy

        teacher = self._model_config("teacher", None)
        student = self._model_config("student", teacher)
        infos = {}
        for section, config in (("teacher", teacher), ("student", student)):
            if config is None:
                continue
            adapter = self.architectures.get(getattr(config, "model_type", None))
            if adapter is None:
                continue  # reported by _check_architecture
            try:
                infos[section] = adapter.model_info(config)
            except Exception:
                continue  # reported when the model is built
            limit = getattr(config, "max_position_embeddings", None)
            data = self.spec.data
            if data is not None and isinstance(limit, int) and data.max_length > limit:
                self.error(
                    ("data", "max_length"),
                    f"max_length {data.max_length} exceeds the {section}'s "
                    f"max_position_embeddings ({limit})",
                )
        if self.diags or "student" not in infos:
            return
        if self.spec.teacher is not None and "teacher" not in infos:
            return  # a hub teacher: checked by makd run
        probe = copy.deepcopy(root)
        try:
            build_objective(
                probe,
                infos.get("teacher", infos["student"]),
                infos["student"],
                self.smap,
                meta=True,
            )
        except ObjectiveError as exc:
            self.diags.extend(exc.diagnostics)

    # -- the tree ----------------------------------------------------------------------

    def _build(
        self,
        config: AspectConfig,
        path: YPath,
        inherited: tuple[Any, YPath] | None,
        parent_qual: str,
        *,
        is_root: bool = False,
        qual_name: str | None = None,
    ) -> Aspect | None:
        cls = self.registry.get(config.type)
        assert cls is not None  # validated in pass 2
        name = qual_name or config.name or config.type
        qual = f"{parent_qual}/{name}" if parent_qual else name
        children: list[Aspect] = []
        pairs: list[LayerPair] = []
        own = getattr(config, "layers", None)
        mapping = (own, (*path, "layers")) if own is not None else inherited

        if cls.is_combinator:
            if cls.root_only and not is_root:
                self.error((*path, "type"), f"'{cls.name}' can only be the root of the objective")
            steps = (self.spec.training.steps if self.spec.training else None) or 1000
            for where, message in cls.schedule_errors(config, steps):
                self.error((*path, *where), message)
            nodes = cls.child_nodes(config)
            self._check_sibling_names(nodes, path, name)
            for node in nodes:
                child = self._build(
                    node.config,
                    (*path, *node.where),
                    mapping if node.inherits_layers else None,
                    qual,
                    qual_name=node.name,
                )
                if child is not None:
                    children.append(child)
        elif isinstance(config, LayerwiseConfig):
            if mapping is None:
                self.error(
                    (*path, "type"),
                    f"'{config.type}' compares layers and needs a layer mapping: set 'layers:' "
                    "here or on an enclosing sum",
                )
                return None
            mapping_obj, mapping_path = mapping
            try:
                pairs = mapping_obj.resolve(*self.depths)
            except MappingError as exc:
                where = exc.where
                if where[:1] == ("pairs",) and (*mapping_path, "pairs") not in self.smap.values:
                    where = where[1:]  # written as the shorthand list of pairs
                via = "" if own is not None else f" (inherited by {_fmt(path)})"
                self.error((*mapping_path, *where), f"{exc}{via}")
                return None
        try:
            aspect = cls(config, pairs=pairs, children=children, path=qual)
            setattr(aspect, SOURCE_PATH, path)
            aspect.requires()
        except (ValueError, TypeError) as exc:
            self.error(path, f"'{config.type}' rejects this configuration: {exc}")
            return None
        except Exception as exc:  # a bug in the plugin, not in the file
            raise PluginError(
                f"aspect '{cls.name}' failed while building {_fmt(path)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return aspect

    def _check_weights(self, root: Aspect) -> None:
        """Something must be trained: an objective (each stage of a staged one) whose every
        term has effective weight 0 is an error, not a run that trains nothing."""
        factors = effective_weights(root)
        groups = root.stage_nodes()
        for group in groups:
            leaves = [n for n in group.walk() if not n.children]
            if leaves and all(factors[leaf.path] == 0 for leaf in leaves):
                self.error(
                    getattr(group, SOURCE_PATH, ("objective",)),
                    f"every term of '{group.path}' has an effective weight of 0 (the product "
                    "of the weights down to it): nothing would be trained",
                )

    def _check_sibling_names(self, nodes: list[ChildNode], path: YPath, parent: str) -> None:
        """Children's names must be unique: they are the keys of the logged terms."""
        first: dict[str, tuple] = {}
        for node in nodes:
            config = node.config
            name = node.name or config.name or config.type
            if name in first:
                key = "name" if (node.name or config.name) else "type"
                where = node.where if node.name else (*node.where, key)
                hint = "" if (node.name or config.name) else "; give each a distinct 'name'"
                self.error(
                    (*path, *where),
                    f"duplicate name '{name}' among the terms of '{parent}' (also "
                    f"{_fmt(first[name])}){hint}",
                )
            else:
                first[name] = node.where
