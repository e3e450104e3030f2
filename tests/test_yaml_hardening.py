"""Objective files cannot make makd hang or exhaust memory: alias and merge-key bombs, deep
nesting and oversized files are refused quickly with a located message (exit 2)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from makd_registry.cli import main
from makd_registry.errors import ObjectiveError
from makd_registry.objective.source import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    MAX_NODES,
    load_yaml,
    read_objective_text,
)

ROOT = Path(__file__).resolve().parents[1]


def billion_laughs(levels: int = 9) -> str:
    """``a: &a [x × 9]``, then each level a list of nine aliases of the one before."""
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    names = "abcdefghijklmnop"
    for prev, name in zip(names, names[1:levels], strict=False):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def merge_bomb(levels: int = 10) -> str:
    """Each level merges the previous mapping nine times (9**levels pairs when merged
    pairs are concatenated without deduplication, as PyYAML's flatten_mapping does)."""
    lines = ["l0: &l0 {" + ", ".join(f"k{i}: {i}" for i in range(9)) + "}"]
    for n in range(1, levels + 1):
        lines.append(f"l{n}: &l{n} {{<<: [" + ", ".join([f"*l{n - 1}"] * 9) + "]}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module", autouse=True)
def _warm() -> None:
    """Import the plugins and the engine once, so that the timings below measure the file."""
    import makd_registry.engine.run  # noqa: F401
    from makd_registry.plugins import make_registry

    make_registry()


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, float]:
    start = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - start
    return code, capsys.readouterr().err, elapsed


@pytest.mark.parametrize("command", [["validate"], ["run", "--dry-run"]])
def test_billion_laughs_fails_fast_in_validate_and_run(tmp_path, capsys, command):
    path = tmp_path / "laughs.yaml"
    path.write_text(billion_laughs(), encoding="utf-8")
    argv = [command[0], str(path), *command[1:]]
    code, err, elapsed = run_cli(argv, capsys)
    assert code == 2, err
    assert elapsed < 1.0, f"took {elapsed:.2f} s"
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    # located at an alias written in the file, naming the limit
    assert lines[0].startswith(f"{path}:"), err
    line = int(lines[0][len(f"{path}:") :].split(":")[0])
    assert "*" in billion_laughs().splitlines()[line - 1]
    assert f"expands to more than {MAX_NODES:,} values through aliases/merge keys" in err


def test_the_expansion_limit_is_far_above_the_shipped_objectives():
    for objective in sorted((ROOT / "objectives").glob("*.yaml")):
        assert os.path.getsize(objective) < MAX_FILE_BYTES // 50
        _, smap = load_yaml(read_objective_text(objective), str(objective))
        assert len(smap.values) < MAX_NODES // 100, objective
    # ... and a file just under it still loads: 9**5 leaves, about 66,000 values
    data, _ = load_yaml(billion_laughs(5), "fine.yaml")
    assert len(data["e"]) == 9 and data["e"][8][8][8][8] == ["x"] * 9


def test_merge_bomb_is_flattened_once_and_stays_small(tmp_path, capsys):
    start = time.perf_counter()
    data, _ = load_yaml(merge_bomb(), "merge.yaml")
    assert time.perf_counter() - start < 1.0
    assert data["l10"] == {f"k{i}": i for i in range(9)}

    path = tmp_path / "merge.yaml"
    path.write_text(merge_bomb() + "objective: {type: sum, terms: [{type: ce}]}\n")
    code, err, elapsed = run_cli(["validate", str(path)], capsys)
    assert code == 2, err
    assert elapsed < 1.0, f"took {elapsed:.2f} s"
    assert "Traceback" not in err
    assert f"{path}:1:1: l0: unknown key 'l0'" in err  # an ordinary error about the file


def test_expansion_through_a_merge_key_is_located_at_the_merge():
    # the definitions a..e expand to about 75,000 values; merging *e once more crosses
    # the limit at the merge (line 7), not somewhere inside the anchors
    text = billion_laughs(5) + "m:\n  <<: {x: *e}\n  y: 1\n"
    with pytest.raises(ObjectiveError) as info:
        load_yaml(text, "m.yaml")
    (diag,) = info.value.diagnostics
    assert (diag.line, diag.file) == (7, "m.yaml")
    assert diag.path == "m.x"
    assert "aliases/merge keys" in diag.message


def test_merge_keys_keep_yaml_semantics_and_positions():
    text = (
        "x: &x {a: 1, b: 2}\n"
        "y: &y {b: 3, c: 4}\n"
        "v: &v {<<: *y, b: 7}\n"
        "z:\n"
        "  <<: [*x, *y]\n"
        "  c: 5\n"
        "u: {<<: [*v, *x]}\n"
    )
    data, smap = load_yaml(text, "m.yaml")
    assert data["z"] == {"a": 1, "b": 2, "c": 5}  # earlier source wins, own key wins
    assert data["v"] == {"b": 7, "c": 4}
    assert data["u"] == {"a": 1, "b": 7, "c": 4}  # v's own b overrides y's, and v beats x
    assert smap.values[("z", "a")] == (1, 11)  # merged values keep their written position
    assert smap.keys[("z", "c")] == (6, 3)
    assert smap.values[("u", "b")] == (3, 19)
    # as before: a key written twice in one mapping, and an alias inside its own anchor
    for bad, message in [("a: {x: 1, x: 2}", "duplicate key 'x'"), ("a: &a [*a]", "recursive")]:
        with pytest.raises(ObjectiveError, match=message):
            load_yaml(bad, "bad.yaml")


@pytest.mark.parametrize(
    "text, where, message",
    [
        ("b: &b {x: 1}\na: {<<: *b, <<: *b}\n", (2, 13), "duplicate key '<<'"),
        ("a: {<<: 3}\n", (1, 9), "expected a mapping or list of mappings for merging"),
        ("a: {<<: [3]}\n", (1, 10), "expected a mapping for merging"),
        ("a: &a {<<: *a, b: 1}\n", (1, 4), "recursive YAML merge"),
    ],
)
def test_bad_merges_and_aliases_are_located_errors(text, where, message):
    with pytest.raises(ObjectiveError) as info:
        load_yaml(text, "bad.yaml")
    (diag,) = info.value.diagnostics
    assert (diag.line, diag.column) == where
    assert message in diag.message


def test_deep_nesting_is_refused_without_recursion_error(tmp_path, capsys):
    path = tmp_path / "deep.yaml"
    path.write_text("objective: " + "[" * 10_000 + "\n", encoding="utf-8")
    code, err, elapsed = run_cli(["validate", str(path)], capsys)
    assert code == 2, err
    assert "Traceback" not in err and "RecursionError" not in err
    assert f"{path}:1:" in err
    assert f"nests deeper than {MAX_DEPTH} levels" in err
    assert elapsed < 2.0


def test_nesting_through_aliases_is_bounded_too():
    half = MAX_DEPTH * 2 // 3
    text = "a: &a " + "[" * half + "1" + "]" * half + "\n"
    text += "b: " + "[" * half + "*a" + "]" * half + "\n"
    with pytest.raises(ObjectiveError) as info:
        load_yaml(text, "deep.yaml")
    assert f"nests deeper than {MAX_DEPTH} levels" in str(info.value)


def test_a_file_over_the_size_limit_is_refused_at_1_1(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    path.write_text("# padding\n" * (MAX_FILE_BYTES // 10 + 1), encoding="utf-8")
    size = path.stat().st_size
    assert size > MAX_FILE_BYTES
    code, err, _ = run_cli(["validate", str(path)], capsys)
    assert code == 2, err
    assert err.startswith(f"{path}:1:1: <file>: the file is ")
    assert f"{size:,} bytes" in err and "1.0 MiB" in err

    # exactly at the limit is read, with newlines as Path.read_text gives them
    path.write_bytes(b"a: 1\r\n" + b"#" * (MAX_FILE_BYTES - 7) + b"\n")
    assert path.stat().st_size == MAX_FILE_BYTES
    assert read_objective_text(path).startswith("a: 1\n#")


def test_the_size_limit_applies_before_the_file_is_read(tmp_path):
    path = tmp_path / "huge.yaml"
    with path.open("wb") as handle:  # sparse: no disk space, but 256 MiB to read
        handle.truncate(256 * 1024 * 1024)
    start = time.perf_counter()
    with pytest.raises(ObjectiveError) as info:
        read_objective_text(path)
    assert time.perf_counter() - start < 0.5
    (diag,) = info.value.diagnostics
    assert (diag.line, diag.column, diag.path) == (1, 1, "<file>")
    assert "256.0 MiB" in diag.message and "1.0 MiB" in diag.message


def test_a_directory_and_a_missing_file_get_their_own_messages(tmp_path, capsys):
    code, err, _ = run_cli(["validate", str(tmp_path)], capsys)
    assert code == 2
    assert err.strip() == f"{tmp_path}:1:1: <file>: is a directory, not an objective file"
    missing = tmp_path / "missing.yaml"
    code, err, _ = run_cli(["validate", str(missing)], capsys)
    assert code == 2
    assert err.strip() == f"{missing}:1:1: <file>: no such file"
