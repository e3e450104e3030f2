"""Safe YAML loading that remembers where every key and value came from.

PyYAML's safe loader composes the document into nodes with marks; we build plain Python
data from those nodes ourselves, so that we can reject duplicate keys (PyYAML silently keeps
the last one), record the 1-based line/column of each path for error messages, and keep
what a small file can expand to bounded:

* the file is at most :data:`MAX_FILE_BYTES` long;
* collections nest at most :data:`MAX_DEPTH` levels deep;
* aliases and ``<<`` merge keys expand the document to at most :data:`MAX_NODES` values
  (every value the builder produces counts, each time an alias is re-expanded), so a
  "billion laughs" file fails at once instead of growing to gigabytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import Diagnostic, ObjectiveError

Path = tuple[str | int, ...]

#: the largest objective file read, in bytes (real ones are a few KiB)
MAX_FILE_BYTES = 1024 * 1024
#: the deepest nesting of collections (real objectives nest about ten levels)
MAX_DEPTH = 100
#: the most values a document may expand to through aliases and merge keys (the shipped
#: objectives have a few hundred)
MAX_NODES = 100_000

_MERGE_TAG = "tag:yaml.org,2002:merge"
_VALUE_TAG = "tag:yaml.org,2002:value"
_STR_TAG = "tag:yaml.org,2002:str"


def format_path(path: Path) -> str:
    """``("objective", "terms", 1, "weight")`` → ``objective.terms[1].weight``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


@dataclass(frozen=True)
class Override:
    """Where a ``--set KEY=VALUE`` came from: its 1-based position among the overrides
    (``index``), the 1-based column where VALUE starts, and the text as given."""

    index: int
    column: int
    text: str

    #: the pseudo file name of command-line overrides in messages
    FILE = "<--set>"


@dataclass
class SourceMap:
    """Positions of the values and keys of a loaded document, by path.

    ``overrides`` holds the paths that ``--set`` replaced: a problem at or below such a path
    is located at the override, not in the file."""

    file: str
    values: dict[Path, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path, tuple[int, int]] = field(default_factory=dict)
    overrides: dict[Path, Override] = field(default_factory=dict)

    def override_for(self, path: Path) -> Override | None:
        """The override that set ``path`` or an enclosing node (the innermost), if any."""
        if not self.overrides:
            return None
        probe = tuple(path)
        while True:
            found = self.overrides.get(probe)
            if found is not None:
                return found
            if not probe:
                return None
            probe = probe[:-1]

    def locate(self, path: Path, *, key: bool = False) -> tuple[int, int]:
        """Line and column for ``path``; the nearest enclosing node when it is absent. For
        a path set by an override: the override's index and the column of its value."""
        override = self.override_for(path)
        if override is not None:
            return override.index, override.column
        if key and path in self.keys:
            return self.keys[path]
        probe = tuple(path)
        while probe:
            if probe in self.values:
                return self.values[probe]
            probe = probe[:-1]
        return self.values.get((), (1, 1))

    def diagnostic(
        self, path: Path, message: str, *, key: bool = False, at: Path | None = None
    ) -> Diagnostic:
        """A diagnostic about ``path``, located at ``at`` (default: ``path`` itself)."""
        where = path if at is None else at
        override = self.override_for(where)
        if override is not None:
            return Diagnostic(
                override.index,
                override.column,
                format_path(path),
                f"{message} (from --set {override.text})",
                Override.FILE,
            )
        line, col = self.locate(where, key=key)
        return Diagnostic(line, col, format_path(path), message, self.file)

    def record_override(
        self, path: Path, override: Override, inner: SourceMap | None = None
    ) -> None:
        """Note that ``override`` replaced the value at ``path``: forget the file's
        positions below it, and know the paths of the new value (``inner``, the value's own
        map) so that checks for which keys were written see the override's."""
        path = tuple(path)
        n = len(path)
        for table in (self.values, self.keys, self.overrides):
            for stale in [p for p in table if p[:n] == path and len(p) > n]:
                del table[stale]
        self.overrides[path] = override
        position = (override.index, override.column)
        self.values[path] = position
        if inner is not None:
            for sub in inner.values:
                if sub:
                    self.values[(*path, *sub)] = position
            for sub in inner.keys:
                self.keys[(*path, *sub)] = position


class _TooDeep(Exception):
    def __init__(self, mark: Any) -> None:
        self.mark = mark


class _Loader(yaml.SafeLoader):
    """The safe loader; we only use it to compose nodes and construct scalars. It refuses
    to nest deeper than :data:`MAX_DEPTH` and remembers where each alias was written."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0
        #: (id(parent node), index or id(key node)) → the mark of the alias written there
        self.alias_marks: dict[tuple[int, int | None], Any] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            node = super().compose_node(parent, index)
            slot = index if isinstance(index, int) or index is None else id(index)
            self.alias_marks[(id(parent), slot)] = mark
            return node
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _TooDeep(self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _size(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB ({n:,} bytes)" if n >= 1024 * 1024 else f"{n:,} bytes"


def read_objective_text(path: Path | Any) -> str:
    """The text of the objective file at ``path``; :class:`ObjectiveError` when it cannot
    be read, is not a regular file, or is larger than :data:`MAX_FILE_BYTES`."""
    from pathlib import Path as FilePath

    path = FilePath(path)

    def fail(message: str) -> ObjectiveError:
        return ObjectiveError([Diagnostic(1, 1, "<file>", message, str(path))])

    too_big = f"the file is larger than the {_size(MAX_FILE_BYTES)} an objective file may have"
    try:
        if path.is_dir():
            raise fail("is a directory, not an objective file")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise fail(
                f"the file is {_size(size)}, more than the {_size(MAX_FILE_BYTES)} an "
                "objective file may have"
            )
        with path.open("rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)  # bounded even when stat lies (pipes)
    except FileNotFoundError:
        raise fail("no such file") from None
    except IsADirectoryError:
        raise fail("is a directory, not an objective file") from None
    except OSError as exc:
        raise fail(f"cannot read: {exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise fail(too_big)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"cannot read: {exc}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as read_text's newline mode


def load_yaml(text: str, file: str) -> tuple[Any, SourceMap]:
    """Parse ``text`` into plain data and a :class:`SourceMap`; raise :class:`ObjectiveError`."""
    data, smap = load_yaml_value(text, file)
    if data is None and () not in smap.values:
        raise ObjectiveError([Diagnostic(1, 1, "<root>", "the file is empty", file)])
    return data, smap


def load_yaml_value(text: str, file: str) -> tuple[Any, SourceMap]:
    """Like :func:`load_yaml`, with the same limits, but an empty document is ``None``
    (for a ``--set`` value)."""
    smap = SourceMap(file)
    if len(text) > MAX_FILE_BYTES:
        raise ObjectiveError(
            [
                Diagnostic(
                    1,
                    1,
                    "<file>",
                    f"the text is larger than the {_size(MAX_FILE_BYTES)} an objective "
                    "file may have",
                    file,
                )
            ]
        )
    loader = _Loader(text)
    try:
        try:
            root = loader.get_single_node()
        except _TooDeep as exc:
            line, col = exc.mark.line + 1, exc.mark.column + 1
            raise ObjectiveError(
                [
                    Diagnostic(
                        line,
                        col,
                        "<yaml>",
                        f"the document nests deeper than {MAX_DEPTH} levels",
                        file,
                    )
                ]
            ) from None
        except yaml.MarkedYAMLError as exc:
            raise ObjectiveError([_syntax_diagnostic(exc, file)]) from None
        except yaml.YAMLError as exc:
            raise ObjectiveError([Diagnostic(1, 1, "<yaml>", str(exc), file)]) from None
        if root is None:
            return None, smap
        data = _Builder(loader, smap).build(root, ())
    finally:
        loader.dispose()
    return data, smap


def _syntax_diagnostic(exc: yaml.MarkedYAMLError, file: str) -> Diagnostic:
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    problem = exc.problem or "invalid YAML"
    if "\t" in problem or "'\\t'" in problem:
        problem += " (YAML forbids tabs for indentation: use spaces)"
    context = ""
    cm = exc.context_mark
    if exc.context and cm is not None and (cm.line, cm.column) != (line - 1, col - 1):
        context = f" ({exc.context} at line {cm.line + 1}, column {cm.column + 1})"
    return Diagnostic(line, col, "<yaml>", f"syntax error: {problem}{context}", file)


#: one entry of a mapping after merging: key, key node, value node, and the mark of the
#: merge source it came from (None for a key written in the mapping itself)
_Entry = tuple[Any, yaml.Node, yaml.Node, Any]


class _Builder:
    """Plain data from composed nodes, counting every value it produces."""

    def __init__(self, loader: _Loader, smap: SourceMap) -> None:
        self.loader = loader
        self.smap = smap
        self.active: set[int] = set()
        self.count = 0
        #: (mark, path) of the aliases and merges being expanded, outermost first
        self.expanding: list[tuple[Any, Path]] = []
        #: a mapping node's entries with its merge keys resolved, by id(node)
        self.flat: dict[int, list[_Entry]] = {}
        self.flattening: set[int] = set()

    # -- limits ------------------------------------------------------------------------

    def _tick(self, n: int, path: Path, node: yaml.Node) -> None:
        self.count += n
        if self.count <= MAX_NODES:
            return
        if self.expanding:
            mark, where = self.expanding[0]
            line, col = mark.line + 1, mark.column + 1
            message = (
                f"the document expands to more than {MAX_NODES:,} values through "
                "aliases/merge keys (the limit of an objective file); this alias or merge "
                "crosses it"
            )
        else:
            (line, col), where = _mark(node), path
            message = f"the document has more than {MAX_NODES:,} values"
        raise ObjectiveError([Diagnostic(line, col, format_path(where), message, self.smap.file)])

    def _via(self, parent: yaml.Node, slot: int | yaml.Node) -> Any:
        key = slot if isinstance(slot, int) else id(slot)
        return self.loader.alias_marks.get((id(parent), key))

    # -- building ----------------------------------------------------------------------

    def build(self, node: yaml.Node, path: Path, via: Any = None) -> Any:
        """The value of ``node`` at ``path``; ``via`` is the mark of the alias (or merge)
        through which it is reached, if any."""
        if via is not None:
            self.expanding.append((via, path))
        try:
            return self._build(node, path)
        finally:
            if via is not None:
                self.expanding.pop()

    def _build(self, node: yaml.Node, path: Path) -> Any:
        self._tick(1, path, node)
        self.smap.values[path] = _mark(node)
        if id(node) in self.active:
            raise ObjectiveError([self.smap.diagnostic(path, "recursive YAML alias")])
        if len(path) > MAX_DEPTH:
            raise ObjectiveError(
                [
                    self.smap.diagnostic(
                        path, f"the document nests deeper than {MAX_DEPTH} levels (via aliases)"
                    )
                ]
            )
        if isinstance(node, yaml.ScalarNode):
            try:
                return self.loader.construct_object(node, deep=True)
            except yaml.constructor.ConstructorError as exc:
                raise ObjectiveError([self.smap.diagnostic(path, str(exc.problem))]) from None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [
                    self.build(child, (*path, i), self._via(node, i))
                    for i, child in enumerate(node.value)
                ]
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
        finally:
            self.active.discard(id(node))
        raise ObjectiveError([self.smap.diagnostic(path, f"unsupported YAML node {node.tag}")])

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key, key_node, value_node, origin in self._entries(node, path):
            child = (*path, key)
            self.smap.keys[child] = _mark(key_node)
            if origin is None:
                out[key] = self.build(value_node, child, self._via(node, key_node))
            else:  # a merged value: reached through the merge at ``origin``
                self.expanding.append((origin, child))
                try:
                    out[key] = self.build(value_node, child)
                finally:
                    self.expanding.pop()
        return out

    def _key(self, key_node: yaml.Node, path: Path) -> Any:
        if not isinstance(key_node, yaml.ScalarNode):
            raise ObjectiveError(
                [self._at(key_node, path, "keys must be plain scalars, not collections")]
            )
        if key_node.tag == _VALUE_TAG:  # a '=' key: a plain string, as PyYAML reads it
            key_node.tag = _STR_TAG
        try:
            key = self.loader.construct_object(key_node)
        except yaml.constructor.ConstructorError as exc:
            raise ObjectiveError([self._at(key_node, path, str(exc.problem))]) from None
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            key = str(key_node.value)
        return key

    def _entries(self, node: yaml.MappingNode, path: Path) -> list[_Entry]:
        """The entries of ``node`` with its ``<<`` merge keys resolved, as YAML's merge key
        type specifies: keys written in the mapping override merged ones, and of several
        merged mappings (``<<: [*a, *b]``) the earlier wins. Duplicate written keys are
        errors. Each mapping is flattened once; every merged entry counts to the limit."""
        cached = self.flat.get(id(node))
        if cached is not None:
            return cached
        if id(node) in self.flattening:
            raise ObjectiveError([self._at(node, path, "recursive YAML merge")])
        if len(self.flattening) > MAX_DEPTH:
            raise ObjectiveError(
                [self._at(node, path, f"merge keys nest deeper than {MAX_DEPTH} levels")]
            )
        self.flattening.add(id(node))
        try:
            own: dict[Any, _Entry] = {}
            merged: dict[Any, _Entry] = {}
            order: dict[Any, None] = {}  # merged keys first, as PyYAML orders them
            merge_seen: yaml.Node | None = None
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    if merge_seen is not None:
                        first_line = _mark(merge_seen)[0]
                        raise ObjectiveError(
                            [
                                self._at(
                                    key_node,
                                    (*path, "<<"),
                                    f"duplicate key '<<' (first defined on line {first_line})",
                                )
                            ]
                        )
                    merge_seen = key_node
                    sources = self._merge_sources(node, key_node, value_node, path)
                    flattened = [(self._entries(src, path), origin) for src, origin in sources]
                    for entries, origin in flattened:  # the earlier source wins ...
                        self._tick(len(entries), path, node)
                        for entry in entries:
                            merged.setdefault(entry[0], (*entry[:3], origin))
                    for entries, _ in reversed(flattened):  # ... in PyYAML's key order
                        order.update(dict.fromkeys(entry[0] for entry in entries))
                    continue
                key = self._key(key_node, path)
                if key in own:
                    first_line = _mark(own[key][1])[0]
                    raise ObjectiveError(
                        [
                            self._at(
                                key_node,
                                (*path, key),
                                f"duplicate key '{key}' (first defined on line {first_line})",
                            )
                        ]
                    )
                own[key] = (key, key_node, value_node, None)
            order.update(dict.fromkeys(own))
            entries = [own[k] if k in own else merged[k] for k in order]
        finally:
            self.flattening.discard(id(node))
        self.flat[id(node)] = entries
        return entries

    def _merge_sources(
        self, node: yaml.MappingNode, key_node: yaml.Node, value: yaml.Node, path: Path
    ) -> list[tuple[yaml.MappingNode, Any]]:
        """The mappings a ``<<`` key merges, in order, each with the mark to blame."""
        where = (*path, "<<")
        if isinstance(value, yaml.MappingNode):
            return [(value, self._via(node, key_node) or value.start_mark)]
        if isinstance(value, yaml.SequenceNode):
            out = []
            for i, item in enumerate(value.value):
                if not isinstance(item, yaml.MappingNode):
                    raise ObjectiveError(
                        [
                            self._at(
                                item, where, f"expected a mapping for merging, but found {item.id}"
                            )
                        ]
                    )
                out.append((item, self._via(value, i) or item.start_mark))
            return out
        raise ObjectiveError(
            [
                self._at(
                    value,
                    where,
                    f"expected a mapping or list of mappings for merging, but found {value.id}",
                )
            ]
        )

    def _at(self, node: yaml.Node, path: Path, message: str) -> Diagnostic:
        line, col = _mark(node)
        return Diagnostic(line, col, format_path(path), message, self.smap.file)
