"""Exit codes are a contract: ``makd --help``, the README and docs/running.md list the same
codes as :data:`makd_registry.errors.EXIT_CODE_MEANINGS`, and each class has its code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from makd_registry.cli import build_parser, main
from makd_registry.errors import EXIT_CODE_MEANINGS, ExitCode, exit_code_summary

ROOT = Path(__file__).resolve().parents[1]


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_every_exit_code_has_a_meaning():
    assert set(EXIT_CODE_MEANINGS) == set(ExitCode)


def test_help_lists_every_code():
    text = _flat(build_parser().format_help())
    assert _flat(exit_code_summary()) in text
    for code in (4, 5, 6, 130):
        assert f"{code} " in text


def test_the_readme_lists_the_same_codes():
    readme = _flat((ROOT / "README.md").read_text(encoding="utf-8"))
    assert f"Exit codes: {_flat(exit_code_summary())}." in readme


def test_running_md_lists_the_same_codes():
    text = (ROOT / "docs" / "running.md").read_text(encoding="utf-8")
    section = text.split("## Exit codes", 1)[1]
    listed = dict(re.findall(r"^\* `(\d+)` (.+)$", section, flags=re.M))
    assert {int(k): v for k, v in listed.items()} == {
        int(c): t for c, t in EXIT_CODE_MEANINGS.items()
    }


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
