"""Every file in bad_objectives/ states on its first line the one diagnostic it must produce.

``# expect: LINE:COL: PATH: MESSAGE`` — the CLI must print exactly one diagnostic, at that
line, column and path, whose message starts with MESSAGE, and exit with code 2, or with the
code a second line ``# exit: N`` gives (5 for a model that cannot be used, 6 for data).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from makd_registry.cli import main

BAD = Path(__file__).parent / "bad_objectives"
FILES = sorted(BAD.glob("*.yaml"))
EXPECT = re.compile(r"^# expect: (\d+):(\d+): (\S+): (.+)$")
EXIT = re.compile(r"^# exit: (\d+)$")


def test_there_are_at_least_twenty_bad_files():
    assert len(FILES) >= 20


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_bad_file_reports_one_located_error(path, capsys):
    head = path.read_text(encoding="utf-8").splitlines()
    match = EXPECT.match(head[0])
    assert match, f"{path.name} lacks its '# expect:' line"
    line, col, where, message = match.groups()
    exit_line = EXIT.match(head[1]) if len(head) > 1 else None
    expected = int(exit_line.group(1)) if exit_line else 2

    code = main(["validate", str(path)])
    captured = capsys.readouterr()

    assert code == expected, captured.err
    assert captured.out == ""
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    prefix = f"{path}:{line}:{col}: {where}: "
    assert lines[0].startswith(prefix), f"\nexpected prefix {prefix}\ngot {lines[0]}"
    assert lines[0][len(prefix) :].startswith(message), lines[0]
