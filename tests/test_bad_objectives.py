"""Every file in bad_objectives/ states on its first line the one diagnostic it must produce.

``# expect: LINE:COL: PATH: MESSAGE`` — the CLI must print exactly one diagnostic, at that
line, column and path, whose message starts with MESSAGE, and exit with code 2.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from makd_registry.cli import main

BAD = Path(__file__).parent / "bad_objectives"
FILES = sorted(BAD.glob("*.yaml"))
EXPECT = re.compile(r"^# expect: (\d+):(\d+): (\S+): (.+)$")


def test_there_are_at_least_twenty_bad_files():
    assert len(FILES) >= 20


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_bad_file_reports_one_located_error(path, capsys):
    match = EXPECT.match(path.read_text(encoding="utf-8").splitlines()[0])
    assert match, f"{path.name} lacks its '# expect:' line"
    line, col, where, message = match.groups()

    code = main(["validate", str(path)])
    captured = capsys.readouterr()

    assert code == 2, captured.err
    assert captured.out == ""
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    prefix = f"{path}:{line}:{col}: {where}: "
    assert lines[0].startswith(prefix), f"\nexpected prefix {prefix}\ngot {lines[0]}"
    assert lines[0][len(prefix) :].startswith(message), lines[0]
