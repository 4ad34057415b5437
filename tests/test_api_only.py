"""polydatum works with its two runtime dependencies alone (no OpenTelemetry SDK).

Builds a fresh virtualenv holding only ``opentelemetry-api``, ``structlog`` and
polydatum itself, and runs a small application in it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

APP = textwrap.dedent(
    """
    import importlib.util
    assert importlib.util.find_spec("opentelemetry.sdk") is None, "SDK must not be installed"
    assert importlib.util.find_spec("sqlalchemy") is None

    from polydatum import DataManager, Service

    class Books(Service):
        def get(self, book_id):
            return (self._ctx.db, book_id)

    def db(ctx):
        yield "db"

    def flaky(ctx):
        yield "flaky"
        raise OSError("close failed")

    def mw(ctx):
        yield

    dm = DataManager(meta_attributes=["user"])
    dm.register_services(books=Books())
    dm.register_resources(db=db, flaky=flaky)
    dm.register_context_middleware(mw)
    dm.validate()
    with dm.dal({"user": "ann"}) as dal:
        assert dal.books.get(1) == ("db", 1)
    with dm.context() as ctx:
        ctx.flaky
    assert [type(e) for _, e, _ in ctx.get_resource_exit_errors()] == [OSError]
    import logging, sys
    logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(name)s %(message)s")
    with dm.context() as ctx:
        ctx.flaky
    print("api-only-ok")
    """
)


def test_runs_with_api_and_structlog_only(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    # The declared runtime dependencies, resolved as pip would for a user.
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "opentelemetry-api>=1.27", "structlog>=23.1"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    result = subprocess.run(
        [str(python), "-c", APP], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "api-only-ok"
    # The suppressed teardown error goes to the stdlib logger "polydatum": shown once
    # the application configures logging (the first context's, before that, is not).
    assert result.stdout.count("polydatum.resource.teardown_error_suppressed") == 1
    assert result.stderr == ""
    assert "OSError: close failed" in result.stdout


def test_runtime_dependencies_are_declared_minimal() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # Capped: polydatum/compat.py reads their private names (tests/test_otel_compat.py).
    # typing_extensions (the typed DAL's TypeVar default) is required by
    # opentelemetry-api already: declaring it adds nothing to an install.
    assert project["dependencies"] == [
        "opentelemetry-api>=1.27,<2",
        "structlog>=23.1,<27",
        "typing_extensions>=4.12",
    ]
    assert sys.version_info >= (3, 11)


def test_development_tools_are_dependency_groups_not_extras() -> None:
    """Extras are features a user installs (``polydatum[sql]``); the test suite's and the
    dashboard builder's tools are PEP 735 dependency groups, which .ci/run installs."""
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    assert extras == {
        "cli", "sdk", "sql", "postgres", "sql-tracing", "asgi", "fastapi", "flask",
        "celery", "all",
    }  # fmt: skip
    groups = pyproject["dependency-groups"]
    assert set(groups) == {"bench", "dashboards", "test"}
    assert {"include-group": "dashboards"} in groups["test"]
    assert "-e '.[all]' --group test" in (ROOT / ".ci" / "run").read_text()
