"""OpenTelemetry conventions polydatum follows as an instrumentation library:
``suppress_instrumentation()`` silences it, and its tracer and meter carry a schema URL
whose semantic conventions define every attribute name it relies on."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.semconv.attributes import (
    code_attributes,
    db_attributes,
    error_attributes,
    server_attributes,
)
from opentelemetry.semconv.schemas import Schemas

from polydatum import DataManager, Service
from polydatum.compat import PLAIN_SUPPRESSION_KEY, find_suppression_keys, suppression_keys
from polydatum.telemetry import INSTRUMENTATION_NAME, SCHEMA_URL
from polydatum.testing import TelemetryCapture


class Books(Service):
    def title(self, book_id: int) -> str:
        return f"book {book_id}"


def shelf(ctx: Any) -> Iterator[str]:
    yield "shelf"
    raise OSError("shelf would not close")


def served(cap: TelemetryCapture) -> str:
    dm = cap.data_manager()
    dm.register_services(books=Books())
    dm.register_resources(shelf=shelf)
    with dm.context() as ctx:
        assert ctx.shelf == "shelf"
        title: str = ctx.dal.books.title(7)
    return title


def test_suppress_instrumentation_silences_spans_metrics_and_the_info_line() -> None:
    with TelemetryCapture() as cap:
        with suppress_instrumentation():
            assert served(cap) == "book 7"
        assert cap.names() == []
        assert cap.metrics() == []
        # a suppressed teardown error is still never lost: its warning is logged
        assert [(e["event"], e["resource"], e["error_type"]) for e in cap.events()] == [
            ("polydatum.resource.teardown_error_suppressed", "shelf", "OSError")
        ]
        cap.clear()
        assert served(cap) == "book 7"  # outside it, everything records again
        assert cap.names() == [
            "polydatum.context",
            "polydatum.resource.setup shelf",
            "books.title",
            "polydatum.resource.teardown shelf",
        ]
        assert cap.metric("polydatum.context.duration").value == 1


def test_the_api_key_alone_suppresses() -> None:
    """An instrumentation that sets only the API's key (not the plain name) is heard."""
    (api_key, plain) = suppression_keys
    assert plain == PLAIN_SUPPRESSION_KEY and api_key != plain
    with TelemetryCapture() as cap:
        token = otel_context.attach(otel_context.set_value(api_key, True))
        try:
            served(cap)
        finally:
            otel_context.detach(token)
        assert cap.names() == []


@pytest.mark.parametrize(
    ("holder", "keys"),
    [
        (SimpleNamespace(_SUPPRESS_INSTRUMENTATION_KEY="k-1"), ("k-1", "suppress_instrumentation")),
        (SimpleNamespace(), ("suppress_instrumentation",)),
        (SimpleNamespace(_SUPPRESS_INSTRUMENTATION_KEY=object()), ("suppress_instrumentation",)),
        (
            SimpleNamespace(_SUPPRESS_INSTRUMENTATION_KEY="suppress_instrumentation"),
            ("suppress_instrumentation",),
        ),
    ],
)
def test_suppression_keys_found_or_fallen_back(holder: object, keys: tuple[str, ...]) -> None:
    assert find_suppression_keys(holder) == keys


def test_tracer_and_meter_carry_the_schema_url() -> None:
    with TelemetryCapture() as cap:
        served(cap)
        scopes = {
            (s.instrumentation_scope.name, s.instrumentation_scope.schema_url)
            for s in cap.finished_spans()
        }
        assert scopes == {(INSTRUMENTATION_NAME, SCHEMA_URL)}
        data = cap.metric_reader.get_metrics_data()
        assert data is not None
        meter_scopes = {
            (sm.scope.name, sm.schema_url or sm.scope.schema_url)
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
        }
        assert meter_scopes == {(INSTRUMENTATION_NAME, SCHEMA_URL)}


def test_the_schema_url_is_a_published_version_defining_the_attribute_names() -> None:
    assert SCHEMA_URL in {schema.value for schema in Schemas}
    # the stable attribute names polydatum sets (not the incubating/deprecated ones)
    assert code_attributes.CODE_FUNCTION_NAME == "code.function.name"
    assert db_attributes.DB_SYSTEM_NAME == "db.system.name"
    assert db_attributes.DB_NAMESPACE == "db.namespace"
    assert error_attributes.ERROR_TYPE == "error.type"
    assert server_attributes.SERVER_ADDRESS == "server.address"
    assert server_attributes.SERVER_PORT == "server.port"


# ------------------------------------------------- setup_local_sdk and the environment

OTEL_VARIABLES = (
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_HEADERS",
)


@pytest.fixture
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("environment", "argument", "expected"),
    [
        ({}, None, "polydatum-app"),
        ({"OTEL_SERVICE_NAME": "shop"}, None, "shop"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=shelf,team=books"}, None, "shelf"),
        ({"OTEL_SERVICE_NAME": "shop"}, "from-code", "from-code"),
    ],
)
def test_setup_local_sdk_honours_the_service_name_of_the_environment(
    clean_otel_env: pytest.MonkeyPatch,
    environment: dict[str, str],
    argument: str | None,
    expected: str,
) -> None:
    from polydatum.telemetry import setup_local_sdk

    for name, value in environment.items():
        clean_otel_env.setenv(name, value)
    tracer_provider, meter_provider = setup_local_sdk(service_name=argument, set_global=False)
    try:
        assert tracer_provider.resource.attributes["service.name"] == expected
    finally:
        tracer_provider.shutdown()
        meter_provider.shutdown()


def test_setup_local_sdk_exports_where_the_environment_says(
    clean_otel_env: pytest.MonkeyPatch,
) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from polydatum.telemetry import setup_local_sdk

    received: list[tuple[str, str | None]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append((self.path, self.headers.get("x-team")))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    clean_otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    clean_otel_env.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-team=books")
    tracer_provider, meter_provider = setup_local_sdk(set_global=False)
    try:
        dm = DataManager(tracer_provider=tracer_provider, meter_provider=meter_provider)
        dm.register_services(books=Books())
        with dm.dal() as dal:
            dal.books.title(1)
        assert tracer_provider.force_flush()
        assert meter_provider.force_flush()
    finally:
        tracer_provider.shutdown()
        meter_provider.shutdown()
        server.shutdown()
    assert ("/v1/traces", "books") in received
    assert ("/v1/metrics", "books") in received


# ----------------------------------------------------------- metric names and units

#: Every metric polydatum emits on its own meter: (instrument kind, unit). Why its own
#: ``polydatum.*`` names rather than the semantic conventions' nearest metrics:
#:
#: * ``db.client.operation.duration`` (histogram, ``s``) is one database operation, a
#:   round trip. ``polydatum.service.duration`` times a DAL method, which runs any number
#:   of statements (or none: a cache hit); ``polydatum.resource.duration`` times a lazy
#:   resource setup or teardown (making a session takes no connection; teardown commits
#:   and closes). The per-statement duration is the statement instrumentation's to emit.
#: * ``db.client.connection.*`` (count, create_time, wait_time, use_time) describe a
#:   pool's connections: a resource is not a connection (``polydatum.context.active``
#:   counts open contexts); the pool's connections are contrib's
#:   (``db.client.connections.usage``, below).
#: * ``http.server.request.duration`` is an HTTP request; ``polydatum.context.duration``
#:   is a context, which may be a request, a Celery task or a script.
#: * ``polydatum.resource.teardown.errors`` counts suppressed teardown errors, which no
#:   convention describes.
POLYDATUM_METRICS = {
    "polydatum.context.active": ("updowncounter", "{context}"),
    "polydatum.context.duration": ("histogram", "s"),
    "polydatum.middleware.duration": ("histogram", "s"),
    "polydatum.resource.duration": ("histogram", "s"),
    "polydatum.resource.teardown.errors": ("counter", "{error}"),
    "polydatum.service.duration": ("histogram", "s"),
}

#: UCUM units as the semantic conventions use them: seconds for durations, a count as
#: an annotation in braces (``{error}``), ``1`` for ratios, ``By`` for bytes.
UCUM_UNIT = re.compile(r"^(s|1|By|\{[a-z][a-z_.]*\})$")


def semconv_metrics() -> dict[str, tuple[str | None, str | None]]:
    """Every metric name the installed opentelemetry-semantic-conventions defines, stable
    and incubating, with the instrument kind and unit its definition states (``None``
    for a deprecated name that only says what replaced it)."""
    import opentelemetry.semconv._incubating.metrics as incubating
    import opentelemetry.semconv.metrics as stable
    from opentelemetry.semconv.metrics import MetricInstruments

    names = [f"{stable.__name__}.db_metrics", f"{stable.__name__}.http_metrics"]
    names += [f"{incubating.__name__}.{m.name}" for m in pkgutil.iter_modules(incubating.__path__)]
    modules = [stable, *map(importlib.import_module, names)]
    found: dict[str, tuple[str | None, str | None]] = {}
    for module in modules:
        body = ast.parse(inspect.getsource(module)).body
        for statement, following in zip(body, [*body[1:], None], strict=True):
            if not isinstance(statement, ast.AnnAssign | ast.Assign):
                continue
            value = statement.value
            if not (isinstance(value, ast.Constant) and isinstance(value.value, str)):
                continue
            doc = ""
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                doc = str(following.value.value)
            fields = dict(
                line.split(": ", 1)
                for line in doc.splitlines()
                if line.startswith(("Instrument: ", "Unit: "))
            )
            known = found.get(value.value, (None, None))
            found[value.value] = (
                fields.get("Instrument") or known[0],
                fields.get("Unit") or known[1],
            )
    for name, value in vars(MetricInstruments).items():
        if not name.startswith("_") and isinstance(value, str):
            found.setdefault(value, (None, None))
    return found


def emitted_metrics(cap: TelemetryCapture) -> dict[str, tuple[str, str, str]]:
    """What the capture's meter provider collected: name -> (scope, kind, unit)."""
    from opentelemetry.sdk.metrics.export import Gauge, Histogram, Sum

    data = cap.metric_reader.get_metrics_data()
    assert data is not None
    emitted: dict[str, tuple[str, str, str]] = {}
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if isinstance(metric.data, Histogram):
                    kind = "histogram"
                elif isinstance(metric.data, Sum):
                    kind = "counter" if metric.data.is_monotonic else "updowncounter"
                else:
                    assert isinstance(metric.data, Gauge), metric
                    kind = "gauge"
                emitted[metric.name] = (scope_metrics.scope.name, kind, metric.unit or "")
    return emitted


def test_metric_names_units_and_kinds_follow_the_semantic_conventions() -> None:
    """Every metric polydatum emits is a ``polydatum.*`` name the semantic conventions do
    not define (no squatting, and the conventions have no ``polydatum`` namespace), of
    the documented kind, in a UCUM unit; a semconv name polydatum emitted would have to
    match its definition's kind and unit."""
    defined = semconv_metrics()
    assert defined["db.client.operation.duration"] == ("histogram", "s")  # read right
    assert defined["db.client.connection.count"] == ("updowncounter", "{connection}")

    def middleware(ctx: Any) -> Iterator[None]:
        yield

    with TelemetryCapture() as cap:
        dm = cap.data_manager()
        dm.register_context_middleware(middleware)
        dm.register_services(books=Books())
        dm.register_resources(shelf=shelf)
        with dm.context() as ctx:
            assert ctx.shelf == "shelf"
            ctx.dal.books.title(7)
        emitted = emitted_metrics(cap)
    ours = {name: (kind, unit) for name, (scope, kind, unit) in emitted.items()}
    assert {scope for scope, _, _ in emitted.values()} == {INSTRUMENTATION_NAME}
    assert ours == POLYDATUM_METRICS
    assert not [name for name in defined if name.startswith("polydatum.")]
    for name, (kind, unit) in ours.items():
        assert UCUM_UNIT.match(unit), f"{name}: {unit!r} is not a UCUM unit"
        if name.startswith("polydatum."):
            assert name not in defined, f"{name} squats a semantic-conventions name"
        else:
            assert defined.get(name) == (kind, unit), f"{name} differs from its definition"


def test_statement_tracing_creates_contribs_connection_metric_as_contrib_does(
    tmp_path: Any,
) -> None:
    """The one metric polydatum's statement tracing adds is contrib's, not polydatum's:
    on contrib's scope, named and united exactly as contrib's own instrumentor makes it,
    so that engines traced by polydatum and by contrib feed one instrument. (The name is
    one the conventions deprecated, for ``db.client.connection.count`` in
    ``{connection}``: contrib's to change.)"""
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    from sqlalchemy import create_engine, text

    from polydatum.sql import SQLResource, trace_sql_statements

    with TelemetryCapture() as ours, TelemetryCapture() as contribs:
        resource = SQLResource(f"sqlite:///{tmp_path / 'ours.db'}")
        engine = create_engine(f"sqlite:///{tmp_path / 'contrib.db'}")
        instrumentor = SQLAlchemyInstrumentor()
        instrumentor.instrument(
            engine=engine, meter_provider=contribs.meter_provider, skip_dep_check=True
        )
        try:
            assert trace_sql_statements(resource.engine, meter_provider=ours.meter_provider)
            for e in (resource.engine, engine):
                with e.connect() as connection:
                    connection.execute(text("SELECT 1"))
        finally:
            instrumentor.uninstrument()
            resource.dispose()
            engine.dispose()
        expected = {
            "db.client.connections.usage": (
                "opentelemetry.instrumentation.sqlalchemy", "updowncounter", "connections",
            )
        }  # fmt: skip
        assert emitted_metrics(contribs) == expected
        assert emitted_metrics(ours) == expected
    assert semconv_metrics()["db.client.connections.usage"] == (None, None)  # deprecated
