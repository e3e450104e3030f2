"""Safe YAML loading that remembers where every key and value came from.

PyYAML's safe loader composes the document into nodes with marks; we build plain Python
data from those nodes ourselves, so that we can reject duplicate keys (PyYAML silently keeps
the last one) and record the 1-based line/column of each path for error messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import Diagnostic, ObjectiveError

Path = tuple[str | int, ...]


def format_path(path: Path) -> str:
    """``("objective", "terms", 1, "weight")`` → ``objective.terms[1].weight``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


@dataclass
class SourceMap:
    """Positions of the values and keys of a loaded document, by path."""

    file: str
    values: dict[Path, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def locate(self, path: Path, *, key: bool = False) -> tuple[int, int]:
        """Line and column for ``path``; the nearest enclosing node when it is absent."""
        if key and path in self.keys:
            return self.keys[path]
        probe = tuple(path)
        while probe:
            if probe in self.values:
                return self.values[probe]
            probe = probe[:-1]
        return self.values.get((), (1, 1))

    def diagnostic(self, path: Path, message: str, *, key: bool = False) -> Diagnostic:
        line, col = self.locate(path, key=key)
        return Diagnostic(line, col, format_path(path), message, self.file)


class _Loader(yaml.SafeLoader):
    """The safe loader; we only use it to compose nodes and construct scalars."""


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def read_objective_text(path: Path | Any) -> str:
    """The text of the objective file at ``path``; :class:`ObjectiveError` when it cannot
    be read."""
    from pathlib import Path as FilePath

    path = FilePath(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ObjectiveError([Diagnostic(1, 1, "<file>", "no such file", str(path))]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ObjectiveError(
            [Diagnostic(1, 1, "<file>", f"cannot read: {exc}", str(path))]
        ) from None


def load_yaml(text: str, file: str) -> tuple[Any, SourceMap]:
    """Parse ``text`` into plain data and a :class:`SourceMap`; raise :class:`ObjectiveError`."""
    smap = SourceMap(file)
    loader = _Loader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            raise ObjectiveError([_syntax_diagnostic(exc, file)]) from None
        except yaml.YAMLError as exc:
            raise ObjectiveError([Diagnostic(1, 1, "<yaml>", str(exc), file)]) from None
        if root is None:
            raise ObjectiveError([Diagnostic(1, 1, "<root>", "the file is empty", file)])
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


class _Builder:
    def __init__(self, loader: _Loader, smap: SourceMap) -> None:
        self.loader = loader
        self.smap = smap
        self.active: set[int] = set()

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.smap.values[path] = _mark(node)
        if id(node) in self.active:
            raise ObjectiveError([self.smap.diagnostic(path, "recursive YAML alias")])
        if isinstance(node, yaml.ScalarNode):
            try:
                return self.loader.construct_object(node, deep=True)
            except yaml.constructor.ConstructorError as exc:
                raise ObjectiveError([self.smap.diagnostic(path, str(exc.problem))]) from None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(child, (*path, i)) for i, child in enumerate(node.value)]
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
        finally:
            self.active.discard(id(node))
        raise ObjectiveError([self.smap.diagnostic(path, f"unsupported YAML node {node.tag}")])

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, Any]:
        own = {id(k) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"}
        try:
            self.loader.flatten_mapping(node)  # resolves '<<' merge keys (merged pairs first)
        except yaml.constructor.ConstructorError as exc:
            raise ObjectiveError([self.smap.diagnostic(path, str(exc.problem))]) from None
        out: dict[Any, Any] = {}
        written: set[Any] = set()  # keys written in this mapping itself, not merged in
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise ObjectiveError(
                    [self._at(key_node, path, "keys must be plain scalars, not collections")]
                )
            key = self.loader.construct_object(key_node)
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                key = str(key_node.value)
            child = (*path, key)
            is_own = id(key_node) in own
            if key in written and is_own:
                first_line, _ = self.smap.keys[child]
                raise ObjectiveError(
                    [
                        self._at(
                            key_node,
                            child,
                            f"duplicate key '{key}' (first defined on line {first_line})",
                        )
                    ]
                )
            if is_own:
                written.add(key)
            self.smap.keys[child] = _mark(key_node)  # an own key overrides a merged one
            out[key] = self.build(value_node, child)
        return out

    def _at(self, node: yaml.Node, path: Path, message: str) -> Diagnostic:
        line, col = _mark(node)
        return Diagnostic(line, col, format_path(path), message, self.smap.file)
