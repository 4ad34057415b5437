"""The application-facing types, under both type checkers users run (issue 16, point 1).

tests/typing/dal_types.py holds the ``assert_type`` checks and the lines that must be
errors; here mypy (--strict, unused ignores are errors) and pyright (strict, unnecessary
ignores are errors, ``# type: ignore`` not honoured) must both accept it. A misspelt
method is then checked to give each checker's exact message, so that the expected
errors cannot pass by accident (an ignore that is never needed also fails).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TYPING = Path(__file__).resolve().parent / "typing"
CHECKED = TYPING / "dal_types.py"
BIN = Path(sys.executable).parent


def mypy(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "mypy"), "--strict", "--warn-unused-ignores", "--no-incremental",
         "--cache-dir", "/dev/null", *map(str, files)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def pyright(*files: Path) -> subprocess.CompletedProcess[str]:
    executable = BIN / "pyright"
    if not executable.exists():
        pytest.fail("pyright is not installed: it is in the test dependency group")
    if shutil.which("node") is None:
        pytest.fail("pyright needs Node.js on PATH (the machine's node)")
    return subprocess.run(
        [str(executable), "--pythonpath", sys.executable,
         "-p", str(TYPING / "pyrightconfig.json"), *map(str, files)],
        capture_output=True, text=True, timeout=300, check=False, cwd=TYPING,
    )  # fmt: skip


def test_mypy_accepts_the_typed_application() -> None:
    result = mypy(CHECKED)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "Success: no issues found in 1 source file"


def test_pyright_accepts_the_typed_application() -> None:
    result = pyright(CHECKED)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("0 errors, 0 warnings, 0 informations")


MISSPELT = """
from typing import Protocol

from polydatum import DataManager, Service


class Notes(Service):
    def get(self, note_id: int) -> str:
        return str(note_id)


class AppServices(Protocol):
    @property
    def notes(self) -> Notes: ...


dm: DataManager[AppServices] = DataManager()


def read() -> str:
    with dm.dal() as dal:
        dal.notes.gett(1)
    return "read"
"""


def test_a_misspelt_method_is_an_error_for_both_checkers() -> None:
    source = TYPING / "_misspelt_generated.py"  # beside the pyright configuration
    source.write_text(MISSPELT)
    try:
        checked = mypy(source)
        typed = pyright(source)
    finally:
        source.unlink()
    assert checked.returncode == 1
    assert [line.split("typing/")[-1] for line in checked.stdout.splitlines()] == [
        '_misspelt_generated.py:22: error: "Notes" has no attribute "gett"; maybe "get"?  '
        "[attr-defined]",
        "Found 1 error in 1 file (checked 1 source file)",
    ]
    assert typed.returncode == 1
    errors = [line.strip() for line in typed.stdout.splitlines() if " - error: " in line]
    assert errors == [
        f'{source}:22:9 - error: Type of "gett" is unknown (reportUnknownMemberType)',
        f'{source}:22:19 - error: Cannot access attribute "gett" for class "Notes"',
    ]
