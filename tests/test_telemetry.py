"""The telemetry contract (DESIGN.md §4): exact span trees, metrics and log events."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace

from polydatum import DataManager, Service
from polydatum.context import DataAccessContext
from polydatum.telemetry import DURATION_BUCKETS, is_secret_key, redact_meta
from polydatum.testing import SpanRecord, TelemetryCapture


class Boom(Exception):
    pass


BOOM = f"{__name__}.Boom"  # the error.type of Boom


class Profile(Service):
    def get(self, uid: int) -> str:
        return f"{self._ctx.db}:{uid}"

    def fail(self) -> None:
        raise Boom("no such profile")


class Users(Service):
    def show(self, uid: int) -> str:
        assert self._dal is not None
        return self._dal.users.profile.get(uid)


def auth(ctx: DataAccessContext) -> Iterator[None]:
    yield


def timing(ctx: DataAccessContext) -> Iterator[None]:
    yield


def db(ctx: DataAccessContext) -> Iterator[str]:
    yield "db"


def cache(ctx: DataAccessContext) -> Iterator[str]:
    yield "cache"
    raise ConnectionResetError("cache went away")


def build(cap: TelemetryCapture, **kwargs: Any) -> DataManager:
    dm = cap.data_manager(**kwargs)
    dm.register_services(users=Users().register_services(profile=Profile()))
    dm.register_context_middleware(auth, timing)
    dm.register_resources(db=db, cache=cache)
    return dm


def test_exact_span_tree_of_a_successful_context(polydatum_telemetry: TelemetryCapture) -> None:
    dm = build(polydatum_telemetry)
    tracer = polydatum_telemetry.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("HTTP GET /users/{id}"), dm.dal() as dal:
        assert dal.users.show(7) == "db:7"

    assert polydatum_telemetry.tree() == [
        (
            "HTTP GET /users/{id}",
            [
                (
                    "polydatum.context",
                    [
                        ("polydatum.middleware.setup auth", []),
                        ("polydatum.middleware.setup timing", []),
                        (
                            "users.show",
                            [("users.profile.get", [("polydatum.resource.setup db", [])])],
                        ),
                        ("polydatum.middleware.teardown timing", []),
                        ("polydatum.middleware.teardown auth", []),
                        ("polydatum.resource.teardown db", []),
                    ],
                )
            ],
        )
    ]
    spans = {s.name: s for s in polydatum_telemetry.spans()}
    context_id = spans["polydatum.context"].attributes["polydatum.context.id"]
    assert spans["polydatum.context"] == SpanRecord(
        "polydatum.context",
        "HTTP GET /users/{id}",
        "UNSET",
        {"polydatum.context.id": context_id},
    )
    assert spans["polydatum.middleware.setup timing"] == SpanRecord(
        "polydatum.middleware.setup timing",
        "polydatum.context",
        "UNSET",
        {"polydatum.middleware.name": "timing", "polydatum.middleware.position": 1},
    )
    assert spans["polydatum.middleware.teardown auth"] == SpanRecord(
        "polydatum.middleware.teardown auth",
        "polydatum.context",
        "UNSET",
        {
            "polydatum.middleware.name": "auth",
            "polydatum.middleware.position": 0,
            "polydatum.outcome": "ok",
        },
    )
    assert spans["users.profile.get"] == SpanRecord(
        "users.profile.get",
        "users.show",
        "UNSET",
        {
            "polydatum.service.path": "users.profile.get",
            "code.function.name": f"{__name__}.Profile.get",
        },
    )
    assert spans["polydatum.resource.setup db"].attributes == {"polydatum.resource.name": "db"}
    assert spans["polydatum.resource.teardown db"].attributes == {
        "polydatum.resource.name": "db",
        "polydatum.outcome": "ok",
    }
    # Every span is INTERNAL and ended; the trace is one trace.
    raw = polydatum_telemetry.finished_spans()
    assert {s.kind for s in raw if s.name != "HTTP GET /users/{id}"} == {trace.SpanKind.INTERNAL}
    assert len({s.context.trace_id for s in raw}) == 1


def test_suppressed_teardown_error_recorded_four_ways(
    polydatum_telemetry: TelemetryCapture,
) -> None:
    dm = build(polydatum_telemetry)
    with dm.context() as ctx:
        ctx.cache
    ((kind, _, _),) = ctx.get_resource_exit_errors()  # 1. exit errors
    assert kind is ConnectionResetError

    teardown = polydatum_telemetry.span("polydatum.resource.teardown cache")  # 2. span
    assert teardown == SpanRecord(
        "polydatum.resource.teardown cache",
        "polydatum.context",
        "ERROR",
        {
            "polydatum.resource.name": "cache",
            "polydatum.outcome": "raised",
            "error.type": "ConnectionResetError",
        },
        ("exception",),
    )
    (raw,) = [
        s
        for s in polydatum_telemetry.finished_spans()
        if s.name == "polydatum.resource.teardown cache"
    ]
    assert raw.status.description == "cache went away"  # the message alone (error.type apart)
    assert raw.events[0].attributes is not None
    assert raw.events[0].attributes["exception.message"] == "cache went away"
    context_span = polydatum_telemetry.span("polydatum.context")
    assert context_span.status == "UNSET"
    assert context_span.attributes["polydatum.teardown_errors"] == 1

    (warning,) = [e for e in polydatum_telemetry.logs if e["log_level"] == "warning"]  # 3. log
    assert warning["event"] == "polydatum.resource.teardown_error_suppressed"
    assert warning["resource"] == "cache"
    assert warning["error_type"] == "ConnectionResetError"
    # The traceback as bounded text, never the exception object (a renderer could loop
    # on its cause chain or print its frames' local variables).
    assert "exc_info" not in warning
    assert warning["exception"].startswith("Traceback (most recent call last):")
    assert warning["exception"].endswith("ConnectionResetError: cache went away\n")
    assert warning["context_id"] == ctx.id

    (point,) = polydatum_telemetry.metrics("polydatum.resource.teardown.errors")  # 4. counter
    assert point.attributes == {
        "polydatum.resource.name": "cache",
        "error.type": "ConnectionResetError",
    }
    assert point.value == 1


def test_failed_service_call_and_context(polydatum_telemetry: TelemetryCapture) -> None:
    dm = build(polydatum_telemetry)
    with pytest.raises(Boom), dm.dal() as dal:
        dal.users.profile.fail()
    spans = {s.name: s for s in polydatum_telemetry.spans()}
    assert spans["users.profile.fail"].status == "ERROR"
    assert spans["users.profile.fail"].attributes["error.type"] == BOOM
    assert spans["users.profile.fail"].events == ("exception",)
    # The middleware let it pass: not their failure.
    assert spans["polydatum.middleware.teardown auth"] == SpanRecord(
        "polydatum.middleware.teardown auth",
        "polydatum.context",
        "UNSET",
        {
            "polydatum.middleware.name": "auth",
            "polydatum.middleware.position": 0,
            "polydatum.outcome": "propagated",
            "polydatum.exception.seen": BOOM,
        },
    )
    assert spans["polydatum.context"].status == "ERROR"
    assert spans["polydatum.context"].attributes["error.type"] == BOOM
    # Recorded once, on the call it came out of (OpenTelemetry's convention).
    assert spans["polydatum.context"].events == ()
    (duration,) = polydatum_telemetry.metrics("polydatum.context.duration")
    assert duration.attributes == {"error.type": BOOM}


def test_suppressing_middleware_is_marked(polydatum_telemetry: TelemetryCapture) -> None:
    dm = polydatum_telemetry.data_manager()

    def forgiving(ctx: DataAccessContext) -> Iterator[None]:
        try:
            yield
        except Boom:
            pass

    dm.register_context_middleware(forgiving)
    with dm.context():
        raise Boom("forgiven")
    spans = {s.name: s for s in polydatum_telemetry.spans()}
    assert spans["polydatum.middleware.teardown forgiving"].attributes["polydatum.outcome"] == (
        "suppressed"
    )
    assert spans["polydatum.context"].status == "UNSET"
    assert spans["polydatum.context"].attributes["polydatum.suppressed_error.type"] == (BOOM)


def test_failing_middleware_setup_tree(polydatum_telemetry: TelemetryCapture) -> None:
    dm = polydatum_telemetry.data_manager()

    def broken(ctx: DataAccessContext) -> Iterator[None]:
        raise Boom("setup")
        yield

    dm.register_context_middleware(auth, broken, timing)
    with pytest.raises(Boom), dm.context():
        pass
    assert polydatum_telemetry.tree() == [
        (
            "polydatum.context",
            [
                ("polydatum.middleware.setup auth", []),
                ("polydatum.middleware.setup broken", []),
                ("polydatum.middleware.teardown auth", []),
            ],
        )
    ]
    assert polydatum_telemetry.span("polydatum.middleware.setup broken").status == "ERROR"


def test_metrics_of_a_context(polydatum_telemetry: TelemetryCapture) -> None:
    dm = build(polydatum_telemetry)
    for _ in range(3):
        with dm.dal() as dal:
            dal.users.show(1)
    by_name: dict[str, list[Any]] = {}
    for point in polydatum_telemetry.metrics():
        by_name.setdefault(point.name, []).append(point)
    assert sorted(by_name) == [
        "polydatum.context.active",
        "polydatum.context.duration",
        "polydatum.middleware.duration",
        "polydatum.resource.duration",
        "polydatum.service.duration",
    ]
    assert [(p.attributes, p.value) for p in by_name["polydatum.context.active"]] == [({}, 0)]
    assert sorted(
        (p.attributes["polydatum.middleware.name"], p.attributes["polydatum.phase"], p.value)
        for p in by_name["polydatum.middleware.duration"]
    ) == [
        ("auth", "setup", 3),
        ("auth", "teardown", 3),
        ("timing", "setup", 3),
        ("timing", "teardown", 3),
    ]
    assert sorted(
        (p.attributes["polydatum.service.path"], p.value)
        for p in by_name["polydatum.service.duration"]
    ) == [("users.profile.get", 3), ("users.show", 3)]
    for points in by_name.values():
        for p in points:
            if p.bucket_bounds:
                assert p.bucket_bounds == DURATION_BUCKETS
                assert "error.type" not in p.attributes


def test_context_active_counts_open_contexts_of_every_data_manager_on_the_provider(
    polydatum_telemetry: TelemetryCapture,
) -> None:
    first, second = build(polydatum_telemetry), build(polydatum_telemetry)
    other = DataManager()  # records nowhere: never counted

    def active() -> list[tuple[dict[str, Any], float]]:
        return [
            (p.attributes, p.value) for p in polydatum_telemetry.metrics("polydatum.context.active")
        ]

    assert active() == []  # instruments are created with the first context
    with first.context(), other.context():
        assert active() == [({}, 1)]
        with second.context(), first.context():
            assert active() == [({}, 3)]
        assert active() == [({}, 1)]
    assert active() == [({}, 0)]


def test_log_events_and_canonical_line(polydatum_telemetry: TelemetryCapture) -> None:
    dm = build(polydatum_telemetry, meta_attributes=["user", "api_key"])
    with dm.context({"user": "bob", "api_key": "s3cr3t", "email": "bob@example.com"}) as ctx:
        ctx.dal.users.show(2)
        ctx.cache
    events = [
        (e["event"], e.get("name") or e.get("path") or e.get("resource"))
        for e in polydatum_telemetry.logs
    ]
    assert events == [
        ("polydatum.context.enter", None),
        ("polydatum.middleware.setup", "auth"),
        ("polydatum.middleware.setup", "timing"),
        ("polydatum.resource.setup", "db"),
        ("polydatum.service.call", "users.profile.get"),
        ("polydatum.service.call", "users.show"),
        ("polydatum.resource.setup", "cache"),
        ("polydatum.middleware.teardown", "timing"),
        ("polydatum.middleware.teardown", "auth"),
        ("polydatum.resource.teardown", "cache"),
        ("polydatum.resource.teardown_error_suppressed", "cache"),
        ("polydatum.resource.teardown", "db"),
        ("polydatum.context", None),
    ]
    context_span = polydatum_telemetry.span("polydatum.context")
    trace_id = f"{context_span.trace_id:032x}"
    for event in polydatum_telemetry.logs:
        assert event["context_id"] == ctx.id
        assert event["trace_id"] == trace_id
    canonical = polydatum_telemetry.logs[-1]
    assert canonical["log_level"] == "info"
    assert canonical["outcome"] == "ok"
    assert canonical["resources"] == ["db", "cache"]
    assert canonical["service_calls"] == 2
    assert canonical["teardown_errors"] == [
        {"resource": "cache", "error_type": "ConnectionResetError"}
    ]
    assert [m["name"] for m in canonical["middleware"]] == ["auth", "timing"]
    assert all(set(m) == {"name", "setup_ms", "teardown_ms"} for m in canonical["middleware"])
    assert canonical["duration_ms"] > 0
    assert canonical["meta"] == {"user": "bob", "api_key": "[REDACTED]"}
    assert "bob@example.com" not in repr(polydatum_telemetry.logs)
    assert context_span.attributes == {
        "polydatum.context.id": ctx.id,
        "polydatum.meta.user": "bob",
        "polydatum.meta.api_key": "[REDACTED]",
        "polydatum.teardown_errors": 1,
    }


def test_meta_redaction_rules() -> None:
    for key in ("password", "X-Api-Key", "auth_token", "Cookie", "SESSION_ID", "clientSecret"):
        assert is_secret_key(key), key
    for key in ("user", "request_id", "route", "tenant"):
        assert not is_secret_key(key), key
    assert redact_meta(
        {"user": {"name": "bob", "password": "x", "tokens": ["a"]}, "n": 3, "absent": None},
        ["user", "n", "absent", "missing"],
    ) == {
        "polydatum.meta.user": '{"name": "bob", "password": "[REDACTED]", "tokens": "[REDACTED]"}',
        "polydatum.meta.n": 3,
    }


def test_generators_opening_spans_do_not_corrupt_current_span(
    polydatum_telemetry: TelemetryCapture,
) -> None:
    tracer = polydatum_telemetry.tracer_provider.get_tracer("user-code")
    dm = polydatum_telemetry.data_manager()

    def leaky_mw(ctx: DataAccessContext) -> Iterator[None]:
        # Opens a span and keeps it current across the yield: a classic mistake.
        with tracer.start_as_current_span("mw-own-span"):
            yield

    def leaky_res(ctx: DataAccessContext) -> Iterator[str]:
        with tracer.start_as_current_span("res-own-span"):
            yield "r"

    dm.register_context_middleware(leaky_mw)
    dm.register_resources(res=leaky_res)
    with tracer.start_as_current_span("request") as request_span:
        with dm.context() as ctx:
            ctx.res
            current = trace.get_current_span()
            assert getattr(current, "name", None) == "polydatum.context"
            with tracer.start_as_current_span("in-block"):
                pass
        assert trace.get_current_span() is request_span
    tree = polydatum_telemetry.tree()
    assert tree == [
        (
            "request",
            [
                (
                    "polydatum.context",
                    [
                        ("polydatum.middleware.setup leaky_mw", [("mw-own-span", [])]),
                        ("polydatum.resource.setup res", [("res-own-span", [])]),
                        ("in-block", []),
                        ("polydatum.middleware.teardown leaky_mw", []),
                        ("polydatum.resource.teardown res", []),
                    ],
                )
            ],
        )
    ]


def test_no_sdk_means_no_work_and_no_output() -> None:
    """With opentelemetry-api alone and structlog unconfigured, a context prints nothing."""
    script = textwrap.dedent(
        """
        from polydatum import DataManager, Service
        from polydatum import telemetry

        class S(Service):
            def ping(self):
                return "pong"

        def db(ctx):
            yield 1

        def flaky(ctx):
            yield 2
            raise OSError("flaky close")

        dm = DataManager()
        dm.register_services(s=S())
        dm.register_resources(db=db, flaky=flaky)
        with dm.context() as ctx:
            assert dm.telemetry.start(ctx) is None
            assert ctx._telemetry is None
            assert ctx.dal.s.ping() == "pong"
            ctx.db
        print("quiet-ok")
        with dm.context() as ctx:
            ctx.flaky  # a library does not print: nothing is shown...
        print("unconfigured-ok")
        import logging, sys
        logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(name)s %(message)s")
        with dm.context() as ctx:
            ctx.flaky  # ...until the application's logging configuration says where
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    lines = out.stdout.splitlines()
    assert lines[:2] == ["quiet-ok", "unconfigured-ok"]
    assert out.stderr == ""
    # With logging configured, the suppressed error reaches the stdlib logger "polydatum"
    # as one key=value line with the bounded traceback as text.
    assert lines[2].startswith(
        "WARNING polydatum event='polydatum.resource.teardown_error_suppressed' context_id="
    )
    assert "resource='flaky' error_type='OSError' exception='Traceback" in lines[2]
    assert "OSError: flaky close" in out.stdout
    assert "polydatum.context" not in out.stdout


def test_global_providers_are_picked_up_when_set_later() -> None:
    script = textwrap.dedent(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from polydatum import DataManager

        dm = DataManager()
        with dm.context():
            pass
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        with dm.context():
            pass
        print([s.name for s in exporter.get_finished_spans()])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "['polydatum.context']"


def test_disabled_by_environment() -> None:
    script = textwrap.dedent(
        """
        from polydatum import DataManager, telemetry
        from polydatum.testing import TelemetryCapture
        cap = TelemetryCapture()
        dm = cap.data_manager()
        with dm.context():
            pass
        print(telemetry.is_enabled(), len(cap.finished_spans()))
        telemetry.enable()
        with dm.context():
            pass
        print(telemetry.is_enabled(), len(cap.finished_spans()))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "flask, polydatum", "PATH": ""},
    )
    assert out.stdout.splitlines() == ["False 0", "True 1"]


def test_canonical_line_follows_structlog_reconfiguration() -> None:
    """The assembled ``polydatum`` logger is reused until structlog is configured anew."""
    import io
    import json
    import logging

    import structlog

    from polydatum.telemetry import configure_logging

    first, second = io.StringIO(), io.StringIO()
    dm = DataManager()
    try:
        configure_logging(json_output=True, level=logging.INFO, stream=first)
        with dm.context():
            pass
        with dm.context():
            pass
        configure_logging(json_output=True, level=logging.INFO, stream=second)
        with dm.context():
            pass
        configure_logging(json_output=True, level=logging.WARNING, stream=second)
        with dm.context():
            pass
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in first.getvalue().splitlines()]
    assert [(e["event"], e["level"], e["outcome"]) for e in lines] == [
        ("polydatum.context", "info", "ok"),
        ("polydatum.context", "info", "ok"),
    ]
    assert lines[0]["context_id"] != lines[1]["context_id"]
    later = [json.loads(line) for line in second.getvalue().splitlines()]
    assert [e["event"] for e in later] == ["polydatum.context"]  # WARNING: no line


def test_idle_contexts_start_recording_when_structlog_lets_info_through() -> None:
    """The idle decision remembers the wrapper class that filters INFO out, no more:
    quiet, then INFO, then quiet again gives exactly one canonical line."""
    import io
    import json
    import logging

    import structlog

    from polydatum.telemetry import configure_logging

    out = io.StringIO()
    dm = DataManager()
    try:
        configure_logging(json_output=True, level=logging.WARNING, stream=out)
        for _ in range(2):  # the second context takes the remembered, call-free decision
            with dm.context() as ctx:
                assert ctx._telemetry is None
        configure_logging(json_output=True, level=logging.INFO, stream=out)
        with dm.context() as ctx:
            assert ctx._telemetry is not None
            recorded_id = ctx.id
        configure_logging(json_output=True, level=logging.WARNING, stream=out)
        with dm.context() as ctx:
            assert ctx._telemetry is None
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["event"], e["level"], e["context_id"]) for e in lines] == [
        ("polydatum.context", "info", recorded_id)
    ]


def test_step_metrics_off_leaves_out_the_phase_histograms_only(
    polydatum_telemetry: TelemetryCapture,
) -> None:
    def failing(ctx: Any) -> Iterator[str]:
        yield "handle"
        raise Boom("teardown")

    dm = build(polydatum_telemetry, step_metrics=False)
    dm.register_resources(failing=failing)
    with dm.dal() as dal:
        dal.users.show(1)
        dm.require_active_context().failing
    assert sorted({p.name for p in polydatum_telemetry.metrics()}) == [
        "polydatum.context.active",
        "polydatum.context.duration",
        "polydatum.resource.teardown.errors",
        "polydatum.service.duration",
    ]
    # Spans and the canonical line are unchanged: every phase is still there.
    assert [n for n in polydatum_telemetry.names() if ".setup " in n or ".teardown " in n] == [
        "polydatum.middleware.setup auth",
        "polydatum.middleware.setup timing",
        "polydatum.resource.setup db",
        "polydatum.resource.setup failing",
        "polydatum.middleware.teardown timing",
        "polydatum.middleware.teardown auth",
        "polydatum.resource.teardown failing",
        "polydatum.resource.teardown db",
    ]
    (line,) = [e for e in polydatum_telemetry.logs if e["event"] == "polydatum.context"]
    assert [(m["name"], sorted(m)) for m in line["middleware"]] == [
        ("auth", ["name", "setup_ms", "teardown_ms"]),
        ("timing", ["name", "setup_ms", "teardown_ms"]),
    ]


def test_each_duration_sample_is_recorded_in_its_own_span(
    polydatum_telemetry: TelemetryCapture,
) -> None:
    """An exemplar (the SDK's default trace-based filter keeps one per sample taken in a
    sampled span) links each histogram point to the span of that very step, so a slow
    bucket in a dashboard opens the middleware phase, resource setup or call that was slow."""
    dm = build(polydatum_telemetry)
    tracer = polydatum_telemetry.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("HTTP GET /users/{id}"), dm.dal() as dal:
        dal.users.show(7)
    span_names = {s.span_id: s.name for s in polydatum_telemetry.spans()}
    linked = sorted(
        (p.name, dict(p.attributes).get("polydatum.phase", ""), [span_names[i] for i in ids])
        for p in polydatum_telemetry.metrics()
        if (ids := p.exemplar_span_ids) or p.bucket_bounds
    )
    assert linked == [
        ("polydatum.context.duration", "", ["polydatum.context"]),
        ("polydatum.middleware.duration", "setup", ["polydatum.middleware.setup auth"]),
        ("polydatum.middleware.duration", "setup", ["polydatum.middleware.setup timing"]),
        ("polydatum.middleware.duration", "teardown", ["polydatum.middleware.teardown auth"]),
        ("polydatum.middleware.duration", "teardown", ["polydatum.middleware.teardown timing"]),
        ("polydatum.resource.duration", "setup", ["polydatum.resource.setup db"]),
        ("polydatum.resource.duration", "teardown", ["polydatum.resource.teardown db"]),
        ("polydatum.service.duration", "", ["users.profile.get"]),
        ("polydatum.service.duration", "", ["users.show"]),
    ]
