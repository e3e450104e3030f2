"""The layering rules of docs/architecture.md, checked on the source (every import
statement, at any depth, function-level imports included) and in fresh interpreters."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "makd_registry"

#: the command layer: it may use the engine
COMMANDS = {"cli.py", "explain.py", "schema_export.py", "student_report.py"}
#: what aspects, providers and adapters may import from makd (docs/plugins.md)
PUBLIC = {
    "makd_registry",
    "makd_registry.aspect",
    "makd_registry.callbacks",
    "makd_registry.features",
    "makd_registry.generation",
    "makd_registry.losses",
    "makd_registry.lowrank",
    "makd_registry.mapping",
    "makd_registry.models",
    "makd_registry.providers",
    "makd_registry.strict",
    "makd_registry.testing",
    "makd_registry.weighting",
}


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = package.split(".")
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
    return out


def _package_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] != "__init__" else ".".join(parts[:-1])


def core_files() -> list[Path]:
    return [
        p
        for p in sorted(PACKAGE.rglob("*.py"))
        if "engine" not in p.relative_to(PACKAGE).parts[:1]
        and not (p.parent == PACKAGE and p.name in COMMANDS)
    ]


@pytest.mark.parametrize("path", core_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_core_imports_no_engine_cli_or_built_in_module(path):
    bad = {
        m
        for m in imported_modules(path, _package_of(path))
        if m.startswith(("makd_registry.engine", "makd_registry.cli", "makd_plugins"))
    }
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def plugin_files() -> list[Path]:
    files = sorted((ROOT / "plugins").glob("*.py"))
    files += sorted(p for p in (ROOT / "examples").glob("*/*/*.py") if "tests" not in p.parts)
    return files


@pytest.mark.parametrize("path", plugin_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_aspects_import_only_the_public_api(path):
    used = {m for m in imported_modules(path, "makd_plugins") if m.startswith("makd_registry")}
    bad = {m for m in used if m not in PUBLIC}
    assert not bad, f"{path.relative_to(ROOT)} imports makd internals {sorted(bad)}"


def _fresh(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_validating_an_objective_imports_no_torch():
    """The objective language (YAML, schema, tree, mappings) and every plugin's registration
    run without torch; model checks (configs, the meta-device build) need transformers and
    run only when the file names models."""
    code = """
import sys
from makd_registry import make_plugin_manager, make_registry
from makd_registry.objective.resolve import resolve_text
registry = make_registry(make_plugin_manager())
text = '''
objective:
  type: stages
  stages:
    - name: one
      steps: 10
      objective: {type: sum, layers: [[0, 1]], terms: [{type: attention_kl}, {type: hidden_mse}]}
    - name: two
      objective: {type: logits_kd, temperature: 2}
'''
resolved = resolve_text(text, 'inline.yaml', registry)
print(len(list(resolved.root.walk())), 'torch' in sys.modules, 'transformers' in sys.modules)
"""
    assert _fresh(code) == "5 False False"
