"""opentelemetry-instrumentation-polydatum: built, installed, and run by opentelemetry-instrument.

The distribution in instrumentation/ is built with hatchling and installed into a
temporary directory (nothing outside it changes); the applications below run with
that directory on PYTHONPATH, as if ``pip install`` had put it in site-packages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from polydatum import DataManager, Service, telemetry
from polydatum.testing import TelemetryCapture
from polydatum.version import __version__ as POLYDATUM_VERSION

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "instrumentation" / "opentelemetry-instrumentation-polydatum"

APP = """
import json
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.instrumentation.polydatum import PolydatumInstrumentor
from polydatum import DataManager, Service, telemetry

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)


class Books(Service):
    def get(self, book_id):
        return book_id


dm = DataManager()
dm.register_services(books=Books())
with dm.dal() as dal:
    dal.books.get(1)
print(json.dumps({
    "enabled": telemetry.is_enabled(),
    "instrumented": PolydatumInstrumentor().is_instrumented_by_opentelemetry,
    "spans": sorted(s.name for s in exporter.get_finished_spans()),
}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
            "--no-build-isolation", "--no-index", "--target", str(target), str(DIST),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    shutil.rmtree(DIST / "build", ignore_errors=True)
    return target


@pytest.fixture
def on_path(installed: Path) -> Iterator[Any]:
    """The installed distribution importable in this process, then forgotten."""
    sys.path.insert(0, str(installed))
    try:
        from opentelemetry.instrumentation.polydatum import PolydatumInstrumentor

        yield PolydatumInstrumentor
    finally:
        instrumentor = sys.modules.get("opentelemetry.instrumentation.polydatum")
        if instrumentor is not None:
            instrumentor.PolydatumInstrumentor().uninstrument()
        telemetry.enable()
        sys.path.remove(str(installed))
        for name in [m for m in sys.modules if m.startswith("opentelemetry.instrumentation.poly")]:
            del sys.modules[name]


def run_app(installed: Path, tmp_path: Path, *, wrapper: bool, **env: str) -> dict[str, Any]:
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    command = [sys.executable, "app.py"]
    if wrapper:
        command = [str(Path(sys.executable).parent / "opentelemetry-instrument"), *command]
    environment = {**os.environ, "PYTHONPATH": str(installed), **env}
    environment.pop("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", None)
    environment.update(env)
    done = subprocess.run(
        command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_entry_point_and_metadata(installed: Path) -> None:
    (dist,) = metadata.distributions(path=[str(installed)])
    assert dist.metadata["Name"] == "opentelemetry-instrumentation-polydatum"
    assert dist.version == POLYDATUM_VERSION
    (entry,) = [e for e in dist.entry_points if e.group == "opentelemetry_instrumentor"]
    assert (entry.name, entry.value) == (
        "polydatum",
        "opentelemetry.instrumentation.polydatum:PolydatumInstrumentor",
    )
    assert dist.requires == [
        "opentelemetry-api>=1.20",
        "opentelemetry-instrumentation>=0.41b0",
        f"polydatum>={POLYDATUM_VERSION}; extra == 'instruments'",
    ]


def test_opentelemetry_instrument_turns_polydatum_on(installed: Path, tmp_path: Path) -> None:
    assert run_app(installed, tmp_path, wrapper=True) == {
        "enabled": True,
        "instrumented": True,
        "spans": ["books.get", "polydatum.context"],
    }


def test_disabled_instrumentations_turns_it_off(installed: Path, tmp_path: Path) -> None:
    result = run_app(
        installed, tmp_path, wrapper=True, OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="flask,polydatum"
    )
    assert result == {"enabled": False, "instrumented": False, "spans": []}


class Books(Service):
    def get(self, book_id: int) -> int:
        return book_id


def test_instrument_and_uninstrument_in_process(on_path: Any) -> None:
    instrumentor = on_path()
    assert list(instrumentor.instrumentation_dependencies()) == [
        f"polydatum >= {POLYDATUM_VERSION}"
    ]
    from opentelemetry.instrumentation.dependencies import get_dependency_conflicts

    assert get_dependency_conflicts(instrumentor.instrumentation_dependencies()) is None
    with TelemetryCapture() as cap:
        dm = cap.data_manager()
        dm.register_services(books=Books())
        instrumentor.instrument()
        assert telemetry.is_enabled()
        with dm.dal() as dal:
            dal.books.get(1)
        instrumentor.uninstrument()
        assert not telemetry.is_enabled()
        with dm.dal() as dal:
            dal.books.get(2)
        assert cap.tree() == [("polydatum.context", [("books.get", [])])]


def test_instrument_with_providers(on_path: Any) -> None:
    """instrument(tracer_provider=...) serves DataManagers created without their own."""
    with TelemetryCapture() as cap, TelemetryCapture() as own:
        plain = DataManager()
        plain.register_services(books=Books())
        explicit = own.data_manager()
        explicit.register_services(books=Books())
        instrumentor = on_path()
        instrumentor.instrument(
            tracer_provider=cap.tracer_provider, meter_provider=cap.meter_provider
        )
        try:
            with plain.dal() as dal:
                dal.books.get(1)
            with explicit.dal() as dal:
                dal.books.get(2)
        finally:
            instrumentor.uninstrument()
        with plain.dal() as dal:
            dal.books.get(3)
        assert cap.tree() == [("polydatum.context", [("books.get", [])])]
        assert own.tree() == [("polydatum.context", [("books.get", [])])]
        (point,) = cap.metrics("polydatum.service.duration")
        assert point.attributes == {"polydatum.service.path": "books.get"}


def test_the_instrumentation_follows_polydatums_version() -> None:
    """polydatum/version.py is the one source: the instrumentation distribution's
    version and the polydatum it requires are written to match it, checked here (a
    release bumps all three, or this fails)."""
    import tomllib

    package = DIST / "src" / "opentelemetry" / "instrumentation" / "polydatum"
    scope: dict[str, Any] = {}
    exec((package / "version.py").read_text(), scope)
    assert scope["__version__"] == POLYDATUM_VERSION
    scope = {}
    exec((package / "package.py").read_text(), scope)
    assert scope["_instruments"] == (f"polydatum >= {POLYDATUM_VERSION}",)
    project = tomllib.loads((DIST / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["instruments"] == [f"polydatum>={POLYDATUM_VERSION}"]
