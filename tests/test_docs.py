"""Every ```python block in README.md and docs/*.md runs (```python no-run blocks do not).

Blocks of one file run in order in one fresh interpreter, so later blocks may use what
earlier ones defined -- the way a reader follows the text.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


# Documents with something to run (docs/guarantees.md, a table of tests, has none).
DOCS = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if python_blocks(p)]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_doc_examples_run(path: Path, tmp_path: Path) -> None:
    blocks = python_blocks(path)
    script = "\n\n".join(
        f"# --- block {i + 1} of {path.name}\n{block}" for i, block in enumerate(blocks)
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{path.name} examples failed:\n{result.stdout}\n{result.stderr}"


def test_the_documents_with_examples() -> None:
    assert [p.relative_to(ROOT).as_posix() for p in DOCS] == [
        "README.md",
        "docs/backends.md",
        "docs/integrations.md",
        "docs/observability.md",
    ]


def test_readme_starts_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = text.split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
    assert first_block == [
        "python3 -m venv .venv && .venv/bin/pip install -q -e '.[all]' && .venv/bin/polydatum demo",
        "bash .ci/run",
    ]


def test_every_test_a_document_cites_exists() -> None:
    """``tests/x.py::test_name`` in the docs (and ``::test_other`` after it, same file)
    name test functions that exist, so a renamed or removed test cannot leave a
    guarantee pointing at nothing."""
    cited: list[tuple[str, str]] = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        for cell in re.findall(r"`(tests/[\w/]+\.py)?::(\w+)`", text):
            file = cell[0] or (cited[-1][0] if cited else "")
            cited.append((file, cell[1]))
    assert len(cited) >= 20, cited  # the guarantees table alone cites more
    missing = [
        f"{file}::{name}"
        for file, name in cited
        if not re.search(
            rf"^(async )?def {name}\(", (ROOT / file).read_text(encoding="utf-8"), re.MULTILINE
        )
    ]
    assert missing == []
