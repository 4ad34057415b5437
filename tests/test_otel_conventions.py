"""OpenTelemetry conventions polydatum follows as an instrumentation library:
``suppress_instrumentation()`` silences it, and its tracer and meter carry a schema URL
whose semantic conventions define every attribute name it relies on."""

from __future__ import annotations

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
