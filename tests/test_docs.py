"""Every ```python block in README.md and docs/*.md runs (```python no-run blocks do not).

Blocks of one file run in order in one fresh interpreter, so later blocks may use what
earlier ones defined -- the way a reader follows the text.

The documents that point at the code are checked too: every test they cite exists,
every requirement of docs/spec.md cites one, and docs/errors.md has an entry for every
exception class of the package.
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


# ---------------------------------------------- the behaviour specification (docs/spec.md)

SPEC = ROOT / "docs" / "spec.md"
#: A requirement: a list item starting with its bold id (struck through when withdrawn).
REQUIREMENT = re.compile(r"^- (~~)?\*\*(S-[A-Z]+-[1-9]\d*)\*\*(~~)? ")
#: What test_every_test_a_document_cites_exists checks: a test cited with its file.
CITED_TEST = re.compile(r"`tests/[\w/]+\.py::\w+`")


def requirements() -> list[tuple[str, bool, str]]:
    """``(id, withdrawn, text)`` of every requirement in docs/spec.md; its text is its
    first line and the indented lines that continue it."""
    found: list[tuple[str, bool, str]] = []
    current: list[str] | None = None
    for line in SPEC.read_text(encoding="utf-8").splitlines():
        match = REQUIREMENT.match(line)
        if match:
            current = [line]
            found.append((match.group(2), match.group(1) is not None, ""))
        elif current is not None and line.startswith("  ") and line.strip():
            current.append(line)
        else:
            current = None
        if current is not None:
            found[-1] = (found[-1][0], found[-1][1], "\n".join(current))
    return found


def test_every_requirement_of_the_spec_cites_a_test() -> None:
    """Each requirement names the tests that prove it (test_every_test_a_document_cites_exists
    checks that they exist); a behaviour no test proves belongs under "Not yet proven"."""
    found = requirements()
    assert len(found) >= 50, found
    uncited = [rid for rid, gone, text in found if not gone and not CITED_TEST.search(text)]
    assert uncited == []
    # A line that looks like a requirement but does not parse as one would escape the check.
    text = SPEC.read_text(encoding="utf-8")
    malformed = [
        line
        for line in text.splitlines()
        if re.match(r"^- (~~)?\*\*S-", line) and not REQUIREMENT.match(line)
    ]
    assert malformed == []


def test_requirement_ids_are_unique() -> None:
    ids = [rid for rid, _, _ in requirements()]
    assert sorted(rid for rid in set(ids) if ids.count(rid) > 1) == []


# ----------------------------------------------------- the error catalogue (docs/errors.md)

ERRORS = ROOT / "docs" / "errors.md"


def catalogued() -> list[str]:
    """The names under the ``###`` headings of docs/errors.md."""
    return re.findall(r"^### (.+)$", ERRORS.read_text(encoding="utf-8"), re.MULTILINE)


def exceptions_defined_in(module: object) -> dict[str, type[BaseException]]:
    return {
        name: value
        for name, value in vars(module).items()
        if isinstance(value, type)
        and issubclass(value, BaseException)
        and value.__module__ == getattr(module, "__name__", None)
    }


def polydatum_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of the polydatum package."""
    import importlib
    import pkgutil

    import polydatum

    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(polydatum.__path__, "polydatum."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue  # importing it runs the program
        found.update(exceptions_defined_in(importlib.import_module(info.name)))
    return found


def test_every_exception_of_polydatum_errors_is_catalogued() -> None:
    import polydatum.errors

    defined = exceptions_defined_in(polydatum.errors)
    assert len(defined) >= 20, defined
    assert sorted(set(defined) - set(catalogued())) == []


def test_every_exception_class_of_the_package_is_catalogued() -> None:
    assert sorted(set(polydatum_exceptions()) - set(catalogued())) == []


def test_every_error_catalogue_entry_names_a_polydatum_exception_once() -> None:
    headings = catalogued()
    assert sorted(h for h in set(headings) if headings.count(h) > 1) == []
    assert sorted(set(headings) - set(polydatum_exceptions())) == []


def test_the_readme_links_the_spec_and_the_error_catalogue() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    further = text.split("\nFurther chapters:", 1)[1].split("\n\n", 1)[0]
    assert "](docs/spec.md)" in further
    assert "](docs/errors.md)" in further
