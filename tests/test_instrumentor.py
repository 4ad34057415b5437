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
        dm = DataManager()  # on the default providers: those instrument() is given
        dm.register_services(books=Books())
        instrumentor.instrument(
            tracer_provider=cap.tracer_provider, meter_provider=cap.meter_provider
        )
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


def run_script(installed: Path, tmp_path: Path, script: str, **env: str) -> Any:
    """Run ``script`` with the distribution importable; its last stdout line, as JSON."""
    (tmp_path / "script.py").write_text(textwrap.dedent(script))
    environment = {**os.environ, "PYTHONPATH": str(installed)}
    environment.pop("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", None)
    environment.update(env)
    done = subprocess.run(
        [sys.executable, "script.py"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


# Providers that record in memory, and a DataManager whose contexts say which step ran
# them (the ``step`` Meta key, recorded on the context span).
SCRIPT_PRELUDE = """
import json, os
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from polydatum import DataManager, Service, telemetry


class Sink:
    def __init__(self):
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def steps(self):
        return [s.attributes["polydatum.meta.step"] for s in self.exporter.get_finished_spans()
                if s.name == "polydatum.context"]

    def contexts_measured(self):
        data = self.reader.get_metrics_data()
        return sum(p.count for rm in (data.resource_metrics if data else [])
                   for sm in rm.scope_metrics for m in sm.metrics
                   if m.name == "polydatum.context.duration" for p in m.data.data_points)


class Books(Service):
    def get(self, book_id):
        return book_id


def app(**providers):
    dm = DataManager(meta_attributes=["step"], **providers)
    dm.register_services(books=Books())
    return dm


def run(dm, step):
    with dm.dal({"step": step}) as dal:
        dal.books.get(1)
"""


def test_instrument_without_providers_records_to_the_global_providers(
    installed: Path, tmp_path: Path
) -> None:
    """``instrument()`` without providers: DataManagers without their own record to the
    global providers, also after an ``instrument(tracer_provider=...)`` was undone."""
    script = (
        SCRIPT_PRELUDE
        + """
from opentelemetry.instrumentation.polydatum import PolydatumInstrumentor

world, given = Sink(), Sink()
trace.set_tracer_provider(world.tracer_provider)
metrics.set_meter_provider(world.meter_provider)
dm = app()
instrumentor = PolydatumInstrumentor()
instrumentor.instrument(tracer_provider=given.tracer_provider,
                        meter_provider=given.meter_provider)
run(dm, "given")
instrumentor.uninstrument()
run(dm, "uninstrumented")
instrumentor.instrument()
run(dm, "global")
print(json.dumps({
    "global": [world.steps(), world.contexts_measured()],
    "given": [given.steps(), given.contexts_measured()],
}))
"""
    )
    assert run_script(installed, tmp_path, script) == {
        "global": [["global"], 1],
        "given": [["given"], 1],
    }


def test_uninstrument_leaves_explicitly_given_providers_recording(on_path: Any) -> None:
    """``uninstrument()`` turns off what ``instrument()`` turned on: DataManagers on the
    default providers. A provider a DataManager was given is the application's choice and
    keeps recording (as an app instrumented with a contrib ``instrument_app()`` stays
    instrumented): ``own`` receives its spans and metrics before and after; ``half`` (its
    own tracer provider, the default meter provider) keeps its spans only."""
    with TelemetryCapture() as default, TelemetryCapture() as own:
        plain = DataManager(meta_attributes=["step"])
        explicit = own.data_manager(meta_attributes=["step"])
        half = DataManager(tracer_provider=own.tracer_provider, meta_attributes=["step"])
        for dm in (plain, explicit, half):
            dm.register_services(books=Books())

        def run(dm: DataManager, step: str) -> None:
            with dm.dal({"step": step}) as dal:
                dal.books.get(1)

        instrumentor = on_path()
        instrumentor.instrument(
            tracer_provider=default.tracer_provider, meter_provider=default.meter_provider
        )
        run(plain, "plain on")
        run(explicit, "explicit on")
        run(half, "half on")
        instrumentor.uninstrument()
        assert not telemetry.is_enabled()
        run(plain, "plain off")
        run(explicit, "explicit off")
        run(half, "half off")

        def steps(cap: TelemetryCapture) -> list[str]:
            return [
                str(s.attributes["polydatum.meta.step"])
                for s in cap.spans()
                if s.name == "polydatum.context"
            ]

        assert steps(default) == ["plain on"]
        assert steps(own) == ["explicit on", "half on", "explicit off", "half off"]
        assert default.metric("polydatum.context.duration").value == 2  # plain on, half on
        assert own.metric("polydatum.context.duration").value == 2  # explicit on and off


def test_disabled_instrumentations_is_read_at_the_first_context(
    installed: Path, tmp_path: Path
) -> None:
    """The variable is read once, when the first context opens (not at import): set after
    ``import polydatum`` it counts; changed later it does not; while it names polydatum
    no DataManager records, one with its own providers included; ``instrument()`` in code
    overrides it."""
    script = (
        SCRIPT_PRELUDE
        + """
from opentelemetry.instrumentation.polydatum import PolydatumInstrumentor

sink = Sink()
trace.set_tracer_provider(sink.tracer_provider)
own = Sink()
plain, explicit = app(), app(tracer_provider=own.tracer_provider)
os.environ["OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"] = os.environ.pop("LATER")
run(plain, "set after import")
run(explicit, "explicit, set after import")
del os.environ["OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"]
run(plain, "unset later")
before = telemetry.is_enabled()
PolydatumInstrumentor().instrument()
run(plain, "instrumented")
run(explicit, "explicit, instrumented")
print(json.dumps({"global": sink.steps(), "own": own.steps(),
                  "enabled": [before, telemetry.is_enabled()]}))
"""
    )
    for value in ("flask, polydatum", "*"):
        assert run_script(installed, tmp_path, script, LATER=value) == {
            "global": ["instrumented"],
            "own": ["explicit, instrumented"],
            "enabled": [False, True],
        }, value
    assert run_script(installed, tmp_path, script, LATER="flask") == {
        "global": ["set after import", "unset later", "instrumented"],
        "own": ["explicit, set after import", "explicit, instrumented"],
        "enabled": [True, True],
    }
