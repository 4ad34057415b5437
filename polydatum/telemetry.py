"""polydatum's telemetry: spans, metrics and structlog events for every lifecycle step.

The lifecycle (:mod:`polydatum.lifecycle`) tells this module *that* a step started or
finished; this module decides what to record. It depends on ``opentelemetry-api``
and ``structlog`` only and never configures either globally.

Cost model. When nothing records -- no tracer or meter provider set (explicitly or
globally) and structlog not configured, or configured to filter out INFO -- a context
gets no :class:`ContextTelemetry` at all and the lifecycle skips every call here
(the OpenTelemetry no-op path costs microseconds per span; skipping it costs a
``None`` check). ``record_exception`` (a formatted traceback) is only called on
failures.

What a user who never configured structlog sees: nothing for successful contexts,
and one WARNING with the traceback for each suppressed resource teardown error
(structlog's default prints to stdout). Debug events per step and the INFO
canonical line appear once the application configures structlog (see
:func:`configure_logging`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import structlog
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.metrics import Observation
from opentelemetry.trace import SpanKind, Status, StatusCode

# What the per-context and per-step paths read of OpenTelemetry and structlog, cheaply:
# attach/detach a context, a context holding a span, whether a global provider was set,
# structlog's live configuration. polydatum.compat reads their private state for it.
from polydatum.compat import attach as _attach
from polydatum.compat import detach as _detach
from polydatum.compat import global_meter_provider_set as _global_meter_provider_set
from polydatum.compat import global_providers_unset as _global_providers_unset
from polydatum.compat import global_tracer_provider_set as _global_tracer_provider_set
from polydatum.compat import instrumentation_suppressed as _instrumentation_suppressed
from polydatum.compat import set_span_in_context as _in_context
from polydatum.compat import structlog_config as _STRUCTLOG_CONFIG
from polydatum.lifecycle import (
    PROPAGATED,
    ContextObserver,
    ObservedContext,
    ObserverFactory,
    Outcome,
    add_exit_reporter,
    open_lifecycles,
)
from polydatum.redaction import truncate
from polydatum.version import __version__

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context.context import Context as OtelContext
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span, TracerProvider


__all__ = [
    "DURATION_BUCKETS",
    "SCHEMA_URL",
    "ContextTelemetry",
    "FollowingTracerProvider",
    "Telemetry",
    "configure_logging",
    "current_span",
    "disable",
    "disabled_by_environment",
    "enable",
    "end_span",
    "error_type",
    "is_enabled",
    "limit_export_warnings",
    "redact_meta",
    "setup_local_sdk",
    "start_span",
]

INSTRUMENTATION_NAME = "polydatum"
LOGGER_NAME = "polydatum"
#: The semantic-conventions version the attribute names follow (``db.system.name``,
#: ``db.namespace``, ``code.function.name``, ``error.type``, ``server.*``: all stable
#: there), carried by polydatum's tracer and meter so a backend can translate them.
SCHEMA_URL = "https://opentelemetry.io/schemas/1.37.0"

#: Histogram bucket advice, in seconds: 0.1 ms to 10 s, so sub-millisecond phases resolve.
DURATION_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

#: The environment variable that turns instrumentations off (a comma-separated list of
#: names; ``*`` names them all), as ``opentelemetry-instrument`` reads it.
DISABLED_INSTRUMENTATIONS_VAR = "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"

# The switch, as OpenTelemetry's instrumentors have it. ``PolydatumInstrumentor().
# instrument()`` calls enable(), ``uninstrument()`` disable():
#
# * _ENABLED: whether DataManagers created without providers of their own record (to
#   the providers given to enable(), else the global ones). A DataManager given
#   ``tracer_provider=`` / ``meter_provider=`` was instrumented explicitly by the
#   application, like an app passed to a contrib ``instrument_app()``: disable() leaves
#   it (and only the providers it was given) recording.
# * _DISABLED_BY_ENVIRONMENT: whether OTEL_PYTHON_DISABLED_INSTRUMENTATIONS names
#   polydatum. ``None`` until read: once per process, when the first context of any
#   DataManager opens (or is_enabled() / disabled_by_environment() asks), not at import,
#   so that a variable set after ``import polydatum`` but before the first context
#   counts. While it says so, no DataManager records, explicit providers or not (it is
#   the operator's switch). enable() in code overrides it, as contrib's instrument()
#   does (the variable only keeps ``opentelemetry-instrument`` from calling it).
_ENABLED = True
_DISABLED_BY_ENVIRONMENT: bool | None = None


#: Providers for DataManagers created without their own (set by :func:`enable`);
#: ``None`` means "the global provider".
_DEFAULT_TRACER_PROVIDER: Any = None
_DEFAULT_METER_PROVIDER: Any = None


def disabled_by_environment() -> bool:
    """Whether ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` turns polydatum off: it names
    ``polydatum`` (or ``*``) and :func:`enable` was not called. The variable is read
    once per process, the first time this is asked (the first context asks)."""
    global _DISABLED_BY_ENVIRONMENT
    disabled = _DISABLED_BY_ENVIRONMENT
    if disabled is None:
        names = {s.strip() for s in os.environ.get(DISABLED_INSTRUMENTATIONS_VAR, "").split(",")}
        disabled = _DISABLED_BY_ENVIRONMENT = bool(names & {INSTRUMENTATION_NAME, "*"})
    return disabled


def enable(tracer_provider: Any = None, meter_provider: Any = None) -> None:
    """Turn polydatum's telemetry on for every DataManager (``instrument()`` calls it).

    DataManagers created without providers of their own record to ``tracer_provider`` /
    ``meter_provider`` when given, else to the global providers (looked up per context).
    Overrides ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS``, as code that calls a contrib
    instrumentor's ``instrument()`` does.
    """
    global _ENABLED, _DISABLED_BY_ENVIRONMENT, _DEFAULT_TRACER_PROVIDER, _DEFAULT_METER_PROVIDER
    _ENABLED = True
    _DISABLED_BY_ENVIRONMENT = False
    _DEFAULT_TRACER_PROVIDER = tracer_provider
    _DEFAULT_METER_PROVIDER = meter_provider


def disable() -> None:
    """Turn polydatum's telemetry off for DataManagers on the default providers
    (``uninstrument()`` calls it).

    Forgets the providers given to :func:`enable`. A DataManager created with its own
    ``tracer_provider`` / ``meter_provider`` keeps recording to that provider: the
    application chose it, as it chooses to instrument an app explicitly with a contrib
    instrumentor's ``instrument_app()``, which ``uninstrument()`` leaves alone.
    """
    global _ENABLED, _DEFAULT_TRACER_PROVIDER, _DEFAULT_METER_PROVIDER
    _ENABLED = False
    _DEFAULT_TRACER_PROVIDER = None
    _DEFAULT_METER_PROVIDER = None


def is_enabled() -> bool:
    """Whether DataManagers on the default providers record: not after :func:`disable`,
    nor while :func:`disabled_by_environment`."""
    return _ENABLED and not disabled_by_environment()


def error_type(error: BaseException) -> str:
    """The ``error.type`` of an exception: its qualified class name (builtins unqualified)."""
    cls = type(error)
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


#: The longest exception message polydatum records (span status descriptions, the
#: ``exception.message`` event attribute, log fields) and the longest stack trace
#: (``exception.stacktrace``); longer text ends in :func:`truncate`'s marker. An
#: application's exception can carry megabytes (a payload in the message); recording it
#: whole would multiply it into every span, event and log line.
MESSAGE_LIMIT = 1024
STACKTRACE_LIMIT = 16384


def exception_message(error: BaseException) -> str:
    """``str(error)``, bounded by :data:`MESSAGE_LIMIT`; never raises.

    An application's exception may have a ``__str__`` that raises (one that formats
    ``None`` is enough): recording it must not replace the application's exception with
    the recorder's own, nor stop the teardown that records it.
    """
    try:
        text = str(error)
    except Exception:
        return f"<unprintable {type(error).__name__}>"
    return truncate(text, MESSAGE_LIMIT)


def exception_stacktrace(error: BaseException) -> str:
    """The formatted traceback of ``error`` with its cause and context chain (cycles are
    cut by :mod:`traceback`), bounded by :data:`STACKTRACE_LIMIT`; never raises."""
    try:
        text = "".join(traceback.format_exception(error))
    except Exception:
        return f"<no stack trace: formatting a {type(error).__name__} failed>"
    return truncate(text, STACKTRACE_LIMIT)


def fail_span(span: Any, error: BaseException, record: bool = True) -> None:
    """Mark ``span`` as failed by ``error`` the OpenTelemetry way: ERROR status whose
    description is the bounded message, ``error.type``, and (``record``) one
    ``exception`` event with the same attributes as the SDK's ``record_exception``
    (built here, since the SDK's formats the exception unguarded and unbounded).

    An exception is recorded once, on the span of the step it came out of; the spans it
    propagates through are failed with ``record=False``.
    """
    kind = error_type(error)
    message = exception_message(error)
    span.set_status(Status(StatusCode.ERROR, message))
    span.set_attribute("error.type", kind)
    if not record:
        return
    span.add_event(
        "exception",
        {
            "exception.type": kind,
            "exception.message": message,
            "exception.stacktrace": exception_stacktrace(error),
            "exception.escaped": "False",
        },
    )


# --------------------------------------------------------------------------- meta

# What of Meta is recorded (allow-listed keys, secrets redacted) is polydatum.redaction's
# business; these names stay importable from here.
from polydatum.redaction import REDACTED as REDACTED  # noqa: E402
from polydatum.redaction import is_secret_key as is_secret_key  # noqa: E402
from polydatum.redaction import redact_meta  # noqa: E402

# ------------------------------------------------------------------------ logging


_LEVEL_CACHE: dict[tuple[Any, int], bool] = {}
#: The structlog wrapper class last found to filter INFO out (a filtering bound logger,
#: whose level is fixed in the class): while it is configured, a context that has no
#: provider to record to is idle, decided without a call (Telemetry.start).
_INFO_FILTERED_BY: Any = object()


def _level_enabled(level: int) -> bool:
    """Whether the application's structlog configuration would emit ``level`` for polydatum.

    Unconfigured structlog prints everything; polydatum then only emits warnings.
    Checked once per context; the answer for a filtering wrapper class is cached
    (structlog's own filtering loggers fix their level in the class).
    """
    config = _STRUCTLOG_CONFIG
    if not config.is_configured:
        return level >= logging.WARNING
    wrapper = config.default_wrapper_class
    key = (wrapper, level)
    cached = _LEVEL_CACHE.get(key)
    if cached is not None:
        return cached
    if isinstance(wrapper, type) and issubclass(wrapper, structlog.stdlib.BoundLogger):
        # The stdlib logger's level can change at any time: ask it every time.
        return logging.getLogger(LOGGER_NAME).isEnabledFor(level)
    probe = getattr(wrapper, "is_enabled_for", None)
    answer = True
    if probe is not None:
        try:
            answer = bool(probe(None, level))
        except Exception:
            answer = True
    if len(_LEVEL_CACHE) < 256:
        _LEVEL_CACHE[key] = answer
    if level == logging.INFO and not answer:
        global _INFO_FILTERED_BY
        _INFO_FILTERED_BY = wrapper
    return answer


logging.getLogger(LOGGER_NAME).addHandler(logging.NullHandler())
_internal_log = logging.getLogger("polydatum.telemetry")
_reported: set[str] = set()


def _report_loss(what: str, error: BaseException) -> None:
    """Say -- once per process and kind of failure -- that telemetry was lost.

    Telemetry must never hurt the application: a span processor or a structlog
    processor that raises loses that record, and the loss goes to the stdlib logger
    ``polydatum.telemetry`` once (not once per span or event).
    """
    if what in _reported:
        return
    _reported.add(what)
    with contextlib.suppress(Exception):
        _internal_log.warning(
            "polydatum telemetry lost: %s raised %s: %s; the application is unaffected "
            "and further failures of this kind are not logged",
            what,
            type(error).__name__,
            exception_message(error),
        )


class _SafeLog:
    """A bound structlog logger whose calls never raise into the application."""

    __slots__ = ("_log",)

    def __init__(self, log: Any) -> None:
        self._log = log

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if self._log is None:  # the logger itself could not be made
            return
        try:
            getattr(self._log, level)(event, **fields)
        except Exception as error:
            _report_loss("a structlog log call", error)

    def debug(self, event: str, **fields: Any) -> None:
        self._emit("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, fields)


#: ``(configuration key, logger)``: the assembled ``polydatum`` logger (see :func:`_base_logger`).
_BASE_LOGGER: tuple[Any, Any] = ((), None)


def _base_logger() -> Any:
    """structlog's ``polydatum`` logger, assembled once per structlog configuration.

    ``structlog.get_logger(...).bind()`` assembles a new logger (factory call,
    processor chain, context) every time; a context logs at least once, so the
    assembled logger is kept until the configuration changes. ``structlog.configure``
    and ``reset_defaults`` replace the objects the key is made of, so a new
    configuration (or ``structlog.testing.capture_logs``) is picked up at once.
    """
    config = _STRUCTLOG_CONFIG
    global _BASE_LOGGER
    key = (
        config.is_configured,
        config.logger_factory,
        config.default_processors,
        config.default_wrapper_class,
        config.default_context_class,
    )
    cached_key, logger = _BASE_LOGGER
    if cached_key != key:
        if config.is_configured:
            logger = structlog.get_logger(LOGGER_NAME).bind()
        else:
            logger = _stdlib_logger()
        _BASE_LOGGER = (key, logger)
    return logger


def _stdlib_logger() -> Any:
    """polydatum's logger while the application has not configured structlog.

    A library does not print: its events go to the stdlib logger ``polydatum`` (which
    has a ``NullHandler``, the library convention), rendered as one ``key=value`` line,
    and the application's logging configuration decides what is shown and where.
    structlog's default console renderer is never used (it prints to stdout, renders
    local variables of tracebacks and, with rich, can loop on a cyclic cause chain).
    """
    return structlog.wrap_logger(
        logging.getLogger(LOGGER_NAME),
        processors=[structlog.processors.KeyValueRenderer(key_order=["event"])],
        wrapper_class=structlog.stdlib.BoundLogger,
    ).bind()


def _logger(**bound: Any) -> _SafeLog:
    try:
        return _SafeLog(_base_logger().bind(**bound))
    except Exception as error:
        _report_loss("a structlog logger", error)
        return _SafeLog(None)


_INTERNAL = SpanKind.INTERNAL


def end_span(span: Span) -> None:
    """``span.end()``; a raising span processor loses the span, never the request."""
    try:
        span.end()
    except Exception as error:
        _report_loss("ending a span (a span processor's on_end?)", error)


def start_span(tracer: Any, name: str, attributes: Mapping[str, Any]) -> Span | None:
    """An INTERNAL span under the current one, or ``None`` when starting it raised (a
    span processor's ``on_start``): the span is lost, never the work it would record."""
    try:
        span: Span = tracer.start_span(name, None, _INTERNAL, attributes)
    except Exception as error:
        _report_loss("starting a span (a span processor's on_start?)", error)
        return None
    return span


def current_span(span: Span | None) -> contextlib.AbstractContextManager[Any]:
    """``span`` made the current span for a ``with`` block (nothing when ``None``), so
    that the spans the block's code starts (a statement's CLIENT span) nest under it.
    The span is neither ended nor failed here: its owner does that."""
    if span is None:
        return contextlib.nullcontext()
    return trace.use_span(span, end_on_exit=False, record_exception=False,
                          set_status_on_exception=False)  # fmt: skip


def configure_logging(
    *, json_output: bool = True, level: int = logging.INFO, stream: Any = None
) -> None:
    """Configure structlog for production: JSON lines with trace correlation.

    A helper the *application* calls (polydatum never configures logging itself).
    Each event gets ``timestamp``, ``level`` and, when a span is current, ``trace_id``
    and ``span_id`` (polydatum's own events carry the context's ids already).
    """
    import sys

    def add_trace_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        span_ctx = trace.get_current_span().get_span_context()
        if span_ctx.is_valid and "trace_id" not in event:
            event["trace_id"] = format(span_ctx.trace_id, "032x")
            event["span_id"] = format(span_ctx.span_id, "016x")
        return event

    renderer: Any = (
        structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            add_trace_ids,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=True,
    )


#: The loggers through which the OpenTelemetry SDK and OTLP exporters report lost data.
EXPORT_LOGGERS: tuple[str, ...] = (
    "opentelemetry.sdk._shared_internal",
    "opentelemetry.sdk.trace.export",
    "opentelemetry.sdk.metrics._internal.export",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http._log_exporter",
)


class OncePerMessage(logging.Filter):
    """A logging filter passing the first record of each message template only.

    ``counts`` tells how often each ``(logger, template)`` occurred (the repeats
    were dropped). An unreachable collector then costs one warning per kind of
    failure ("Failed to export spans batch code: %s...") instead of one per batch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        _FILTERS.add(self)

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        with self._lock:
            seen = self.counts.get(key, 0)
            self.counts[key] = seen + 1
        return seen == 0


#: Every :class:`OncePerMessage` of this process, for :func:`_new_filter_locks_after_fork`.
_FILTERS: weakref.WeakSet[OncePerMessage] = weakref.WeakSet()


def _new_filter_locks_after_fork() -> None:
    # The forked child has only the thread that forked: a lock that another thread
    # (an exporter's, logging a failure) held at the fork would never be released
    # there, and the child's first export warning would hang in the filter.
    for once in list(_FILTERS):
        once._lock = threading.Lock()


os.register_at_fork(after_in_child=_new_filter_locks_after_fork)

_export_filter: OncePerMessage | None = None


def limit_export_warnings() -> OncePerMessage:
    """Log each kind of telemetry export failure once per process (idempotent).

    Installs one :class:`OncePerMessage` filter on the SDK's and OTLP exporters'
    loggers (:data:`EXPORT_LOGGERS`) and returns it. :func:`setup_local_sdk` calls it;
    call it yourself when you configure the SDK by hand.
    """
    global _export_filter
    if _export_filter is None:
        _export_filter = OncePerMessage()
        for name in EXPORT_LOGGERS:
            logging.getLogger(name).addFilter(_export_filter)
    return _export_filter


#: The ``service.name`` of :func:`setup_local_sdk` when neither the code nor the
#: environment (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``) names the service.
DEFAULT_SERVICE_NAME = "polydatum-app"

#: The environment variables that configure where OTLP exporters send (the exporters
#: read them, with the headers, timeouts and certificates that go with them).
OTLP_ENDPOINT_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
)


def setup_local_sdk(
    *,
    service_name: str | None = None,
    otlp_endpoint: str | None = None,
    span_exporter: Any = None,
    metric_readers: Sequence[Any] = (),
    set_global: bool = True,
) -> tuple[TracerProvider, MeterProvider]:
    """Create an OpenTelemetry SDK tracer and meter provider for local use.

    Needs the ``sdk`` extra. The OpenTelemetry environment is honoured, never
    overridden: the service is ``service_name`` when given, else what
    ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` say, else
    ``polydatum-app``. Traces and metrics go over OTLP/HTTP to ``otlp_endpoint``
    (a base URL, ``http://host:4318``) when given, else, when an
    ``OTEL_EXPORTER_OTLP_*ENDPOINT`` variable is set, to where the exporters read
    from the environment (with its headers). With ``span_exporter`` spans also go there
    (batched). Sets the global providers unless ``set_global`` is false. Returns both.
    """
    try:
        from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "setup_local_sdk needs the OpenTelemetry SDK: pip install 'polydatum[sdk]'"
        ) from error

    limit_export_warnings()
    resource = Resource.create({} if service_name is None else {"service.name": service_name})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": DEFAULT_SERVICE_NAME}))
    tracer_provider = SdkTracerProvider(resource=resource)
    readers = list(metric_readers)
    from_environment = any(os.environ.get(name) for name in OTLP_ENDPOINT_VARIABLES)
    if otlp_endpoint or from_environment:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        if otlp_endpoint:  # the exporters take a signal's own URL
            base = otlp_endpoint.rstrip("/")
            spans, metrics = (
                OTLPSpanExporter(endpoint=f"{base}/v1/traces"),
                OTLPMetricExporter(endpoint=f"{base}/v1/metrics"),
            )
        else:
            spans, metrics = OTLPSpanExporter(), OTLPMetricExporter()
        tracer_provider.add_span_processor(BatchSpanProcessor(spans))
        readers.append(PeriodicExportingMetricReader(metrics))
    if span_exporter is not None:
        tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    meter_provider = SdkMeterProvider(resource=resource, metric_readers=readers)
    if set_global:
        trace.set_tracer_provider(tracer_provider)
        otel_metrics.set_meter_provider(meter_provider)
    return tracer_provider, meter_provider


# ---------------------------------------------------------------------- providers


#: Meter providers that already have the ``polydatum.context.active`` observer (weakly:
#: an id could be reused by a later provider).
_ACTIVE_OBSERVED: weakref.WeakSet[Any] = weakref.WeakSet()


def _observe_active(provider: Any) -> Any:
    """The callback of ``polydatum.context.active`` for one meter provider.

    It counts the contexts open right now whose telemetry records to ``provider``,
    at collection time only: an up-down counter ``add()`` at every enter and exit
    would cost two SDK calls per context for a value read once per export.
    """

    def observe(_options: Any) -> Iterable[Observation]:
        count = 0
        for lifecycle in open_lifecycles():
            telemetry = lifecycle.observer
            if isinstance(telemetry, ContextTelemetry):
                instruments = telemetry.instruments
                if instruments is not None and instruments.provider is provider:
                    count += 1
        return [Observation(count)]

    return observe


class _Instruments:
    """polydatum's metric instruments on one meter."""

    __slots__ = (
        "context_duration",
        "middleware_duration",
        "provider",
        "resource_duration",
        "service_duration",
        "teardown_errors",
    )

    def __init__(self, provider: MeterProvider) -> None:
        self.provider = provider
        meter = provider.get_meter(INSTRUMENTATION_NAME, __version__, schema_url=SCHEMA_URL)
        buckets = list(DURATION_BUCKETS)
        self.context_duration = meter.create_histogram(
            "polydatum.context.duration", unit="s",
            description="Duration of a polydatum context, from enter to the end of teardown.",
            explicit_bucket_boundaries_advisory=buckets,
        )  # fmt: skip
        self.middleware_duration = meter.create_histogram(
            "polydatum.middleware.duration", unit="s",
            description="Duration of one context-middleware phase (setup or teardown).",
            explicit_bucket_boundaries_advisory=buckets,
        )  # fmt: skip
        self.resource_duration = meter.create_histogram(
            "polydatum.resource.duration", unit="s",
            description="Duration of one resource phase (lazy setup or teardown).",
            explicit_bucket_boundaries_advisory=buckets,
        )  # fmt: skip
        self.service_duration = meter.create_histogram(
            "polydatum.service.duration", unit="s",
            description="Duration of one service method call through the DAL.",
            explicit_bucket_boundaries_advisory=buckets,
        )  # fmt: skip
        self.teardown_errors = meter.create_counter(
            "polydatum.resource.teardown.errors", unit="{error}",
            description="Errors raised by resources while tearing down (suppressed and recorded).",
        )  # fmt: skip
        try:  # one observer per provider, however many DataManagers share it
            observed = provider in _ACTIVE_OBSERVED
            _ACTIVE_OBSERVED.add(provider)
        except TypeError:  # a provider that cannot be weakly referenced
            observed = False
        if not observed:
            meter.create_observable_up_down_counter(
                "polydatum.context.active", callbacks=[_observe_active(provider)],
                unit="{context}", description="Contexts currently entered and not yet exited.",
            )  # fmt: skip


class _Plan:
    """What is the same for every run of one step: span name and attributes, metric labels.

    Built once per (kind, phase, name, position) and DataManager; every span and
    histogram sample of that step shares these dicts (the SDK copies what it keeps).
    """

    __slots__ = (
        "kind",
        "metric_attrs",
        "name",
        "phase",
        "position",
        "source",
        "span_attrs",
        "span_name",
    )

    def __init__(
        self,
        kind: str,
        phase: str,
        name: str,
        position: int,
        source: Mapping[str, Any] | None,
    ) -> None:
        self.kind = kind
        self.phase = phase
        self.name = name
        self.position = position
        self.source = source  # the resource's telemetry_attributes the plan was built from
        span_attrs: dict[str, Any]
        if kind == "middleware":
            self.span_name = f"polydatum.middleware.{phase} {name}"
            span_attrs = {
                "polydatum.middleware.name": name,
                "polydatum.middleware.position": position,
            }
        elif kind == "resource":
            self.span_name = f"polydatum.resource.{phase} {name}"
            span_attrs = {"polydatum.resource.name": name}
            if source:
                span_attrs.update(source)
        else:  # a service call: ``name`` is the path, ``phase`` the function's qualified
            # name (part of the cache key only), ``source`` the code attributes
            self.span_name = name
            span_attrs = {"polydatum.service.path": name, **(source or {})}
        if phase == "teardown":
            # The usual outcome, set at start (cheaper than a set_attribute at the
            # end); a teardown that ends otherwise overwrites it.
            span_attrs["polydatum.outcome"] = "ok"
        self.span_attrs = span_attrs
        if kind == "service":
            self.metric_attrs: dict[str, Any] = {"polydatum.service.path": name}
        else:
            self.metric_attrs = {f"polydatum.{kind}.name": name, "polydatum.phase": phase}


class FollowingTracerProvider(trace.TracerProvider):
    """A tracer provider whose tracers record to the provider ``current()`` returns when
    each span starts (``None``: no span), rather than to one fixed when the tracer was
    made. An instrumentation configured once at startup (a SQLAlchemy engine tracer)
    then follows a DataManager's providers as they change."""

    def __init__(self, current: Callable[[], Any]) -> None:
        self._current = current

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Any = None,
    ) -> trace.Tracer:
        scope = (instrumenting_module_name, instrumenting_library_version, schema_url, attributes)
        return _FollowingTracer(self._current, scope)


class _FollowingTracer(trace.Tracer):
    """:class:`FollowingTracerProvider`'s tracer: each span from the current provider's
    tracer of the same instrumentation scope (made once per provider)."""

    def __init__(self, current: Callable[[], Any], scope: tuple[Any, ...]) -> None:
        self._current = current
        self._scope = scope
        self._made_for: tuple[Any, trace.Tracer] | None = None

    def _tracer_now(self) -> trace.Tracer:
        provider = self._current()
        if provider is None:
            return _NO_OP_TRACER
        made = self._made_for
        if made is None or made[0] is not provider:
            made = self._made_for = (provider, provider.get_tracer(*self._scope))
        return made[1]

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return self._tracer_now().start_span(*args, **kwargs)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._tracer_now().start_as_current_span(*args, **kwargs)


_NO_OP_TRACER = trace.NoOpTracer()


class Telemetry:
    """Where one DataManager's telemetry goes, and whether anything records right now.

    ``tracer_provider`` / ``meter_provider`` default to the global providers,
    looked up per context so that an SDK configured after the DataManager was
    created is picked up. ``meta_attributes`` is the allow-list of Meta keys that
    may be recorded on the context span and the canonical log line.
    ``step_metrics=False`` leaves out the per-phase histograms
    (``polydatum.middleware.duration``, ``polydatum.resource.duration``).
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        meta_attributes: Iterable[str] = (),
        step_metrics: bool = True,
    ) -> None:
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.meta_attributes = tuple(meta_attributes)
        self.step_metrics = step_metrics
        self._tracer_for: Any = None
        self._tracer: Any = None
        self._instruments_for: Any = None
        self._instruments: _Instruments | None = None
        self._plans: dict[tuple[str, str, str, int], _Plan] = {}

    def plan(
        self,
        kind: str,
        phase: str,
        name: str,
        position: int = 0,
        source: Mapping[str, Any] | None = None,
    ) -> _Plan:
        """The :class:`_Plan` of one step (cached; bounded for hostile names)."""
        key = (kind, phase, name, position)
        plan = self._plans.get(key)
        if plan is None or plan.source is not source:
            plan = _Plan(kind, phase, name, position, source)
            if len(self._plans) < 10_000:
                self._plans[key] = plan
        return plan

    def call_plan(self, path: str, function: str) -> _Plan:
        """The :class:`_Plan` of calls to the service method ``path`` (``function`` is its
        qualified name; it is part of the key since re-registration may change it)."""
        return self.plan("service", function, path, 0, {"code.function.name": function})

    def current_tracer_provider(self) -> Any:
        """The tracer provider this DataManager's spans go to now: its own, else the one
        given to :func:`enable` (``PolydatumInstrumentor().instrument(tracer_provider=)``),
        else the global one; ``None`` when no span would record (after :func:`disable`, no
        global provider, a no-op provider)."""
        provider = self.tracer_provider or _DEFAULT_TRACER_PROVIDER
        if provider is None:
            if not _ENABLED or not _global_tracer_provider_set():
                return None  # disable()d, or no global provider
            provider = trace.get_tracer_provider()
        if isinstance(provider, trace.NoOpTracerProvider):
            return None
        return provider

    def current_meter_provider(self) -> Any:
        """The meter provider this DataManager's instruments are made on now: its own,
        else the one given to :func:`enable`; ``None`` means the global one."""
        return self.meter_provider or _DEFAULT_METER_PROVIDER

    def following_tracer_provider(self) -> FollowingTracerProvider:
        """A tracer provider for another instrumentation's spans inside this
        DataManager's contexts (the SQL statements of ``configure_sql(...,
        trace_statements=True)``): at every span it asks :meth:`current_tracer_provider`,
        so those spans go where polydatum's go, also when ``instrument()`` or
        ``uninstrument()`` runs after the configuration."""
        return FollowingTracerProvider(self.current_tracer_provider)

    def tracer(self) -> Any:
        """The tracer to use now, or ``None`` when tracing would record nothing."""
        provider = self.current_tracer_provider()
        if provider is None:
            return None
        if provider is not self._tracer_for:
            self._tracer = provider.get_tracer(
                INSTRUMENTATION_NAME, __version__, schema_url=SCHEMA_URL
            )
            self._tracer_for = provider
        return self._tracer

    def instruments(self) -> _Instruments | None:
        """The metric instruments to use now, or ``None`` when metrics would record nothing."""
        provider = self.meter_provider or _DEFAULT_METER_PROVIDER
        if provider is None:
            if not _ENABLED or not _global_meter_provider_set():
                return None  # disable()d, or no global provider
            provider = otel_metrics.get_meter_provider()
        if isinstance(provider, otel_metrics.NoOpMeterProvider):
            return None
        if provider is not self._instruments_for:
            self._instruments = _Instruments(provider)
            self._instruments_for = provider
        return self._instruments

    def start(self, ctx: ObservedContext) -> ContextTelemetry | None:
        """Begin recording one context, or ``None`` when nothing would record."""
        if not _ENABLED and self.tracer_provider is None and self.meter_provider is None:
            return None  # disable()d, and no provider of its own
        if _DISABLED_BY_ENVIRONMENT is not False and disabled_by_environment():
            return None
        provider: Any = self.tracer_provider
        if provider is not None and provider is self._tracer_for:
            tracer = self._tracer  # an explicit provider, its tracer made before
        elif (
            provider is None
            and self.meter_provider is None
            and _DEFAULT_TRACER_PROVIDER is None
            and _DEFAULT_METER_PROVIDER is None
            and _global_providers_unset()
            and (
                # structlog unconfigured (polydatum then logs warnings only), or still
                # configured with the class known to filter INFO out
                not (config := _STRUCTLOG_CONFIG).is_configured
                or config.default_wrapper_class is _INFO_FILTERED_BY
                or not _level_enabled(logging.INFO)
            )
        ):
            return None  # the idle path: no provider anywhere, INFO filtered out
        else:
            tracer = self.tracer()
        if _instrumentation_suppressed():
            return None  # inside suppress_instrumentation(), as exporters do their I/O
        provider = self.meter_provider
        if provider is not None and provider is self._instruments_for:
            instruments = self._instruments
        else:
            instruments = self.instruments()
        info = _level_enabled(logging.INFO)
        if tracer is None and instruments is None and not info:
            return None
        return ContextTelemetry(self, ctx, tracer, instruments, info)

    def record_unobserved_teardown_error(
        self, ctx: ObservedContext, resource: str, error: BaseException
    ) -> None:
        """Log a suppressed teardown error of a context that records nothing else."""
        _logger(context_id=ctx.id).warning(
            "polydatum.resource.teardown_error_suppressed",
            resource=resource,
            error_type=error_type(error),
            exception=exception_stacktrace(error),
        )


def _nothing() -> None:
    """The ``enter`` of a step without a span."""


class _Step:
    """One lifecycle step being recorded: its plan, span (if tracing) and start time.

    ``enter()`` makes the step's span current; the lifecycle calls it inside the
    generator's own ``contextvars.Context``. That context belongs to the generator
    and runs nothing between its steps, so the value is simply overwritten by the
    next step: nothing leaks into the caller and there is no token to reset. It is
    a ``functools.partial`` of the context variable's ``set`` (no Python frame).
    ``otel_ctx`` (the OpenTelemetry context holding the step's span) is also what the
    step's histogram sample is recorded in, so that an exemplar the SDK keeps for it
    points at this step's span rather than at whatever span is current at the end.
    """

    __slots__ = ("enter", "otel_ctx", "plan", "span", "t0", "token")

    def __init__(self, plan: _Plan, span: Span | None, otel_ctx: Any, t0: float) -> None:
        self.plan = plan
        self.span = span
        self.otel_ctx = otel_ctx
        self.enter: Any = _nothing if otel_ctx is None else partial(_attach, otel_ctx)
        self.token: Any = None
        self.t0 = t0


_PHASE_OUTCOMES = {
    Outcome.YIELDED: "ok",
    Outcome.RETURNED: "ok",
    Outcome.SUPPRESSED: "suppressed",
    Outcome.PROPAGATED: "propagated",
    Outcome.RAISED: "raised",
}


class ContextTelemetry:
    """The telemetry of one context: its span, step records and the canonical log line.

    Made by :meth:`Telemetry.start` when the context is entered; the context span
    starts (and becomes current) right away.
    """

    __slots__ = (
        "clock",
        "ctx",
        "debug",
        "finished",
        "info",
        "instruments",
        "log",
        "middleware",
        "parent_ctx",
        "recorded",
        "resources",
        "service_calls",
        "span",
        "step_instruments",
        "t0",
        "teardown_errors",
        "telemetry",
        "token",
        "tracer",
    )

    def __init__(
        self,
        telemetry: Telemetry,
        ctx: ObservedContext,
        tracer: Any,
        instruments: _Instruments | None,
        info: bool,
    ) -> None:
        self.telemetry = telemetry
        self.ctx = ctx
        self.tracer = tracer
        self.instruments = instruments
        # The middleware and resource phase histograms (off: DataManager(step_metrics=False)).
        self.step_instruments = instruments if telemetry.step_metrics else None
        self.info = info
        self.debug = info and _level_enabled(logging.DEBUG)
        self.span: Span | None = None
        self.parent_ctx: Any = None
        self.token: Token[OtelContext] | None = None
        self.middleware: dict[int, dict[str, Any]] = {}
        self.resources: list[str] = []
        self.service_calls = 0
        self.teardown_errors: list[dict[str, str]] = []
        # The exceptions given an ``exception`` event: as one propagates out of the
        # enclosing calls and the context, their spans get ERROR and ``error.type`` only.
        self.recorded: list[BaseException] = []
        self.log: Any = None
        # Step durations feed metrics and log lines only: spans time themselves.
        self.clock: Any = time.perf_counter if instruments is not None or info else float
        self.t0 = 0.0
        self.finished = False

    def fail(self, span: Any, error: BaseException) -> None:
        """Fail ``span`` by ``error``, recording the exception if no span recorded it."""
        recorded = self.recorded
        first = all(error is not seen for seen in recorded)
        fail_span(span, error, record=first)
        if first:
            recorded.append(error)

    def begin(self) -> None:
        """Open the context span (a child of the current span) and make it current."""
        self.t0 = time.perf_counter()
        tracer = self.tracer
        if tracer is not None:
            telemetry = self.telemetry
            ctx = self.ctx
            attrs: dict[str, Any] = {"polydatum.context.id": ctx.id}
            if telemetry.meta_attributes:
                attrs.update(redact_meta(ctx.meta, telemetry.meta_attributes))
            try:
                self.span = span = tracer.start_span("polydatum.context", None, _INTERNAL, attrs)
            except Exception as error:
                _report_loss("starting a span (a span processor's on_start?)", error)
            else:
                self.parent_ctx = _in_context(span)
                self.token = _attach(self.parent_ctx)
        if self.debug:
            self._log().debug("polydatum.context.enter")

    # -- context ---------------------------------------------------------------

    def abandon(self) -> None:
        """End the context span of a context still open at interpreter exit (ERROR)."""
        span = self.span
        if span is None:
            return
        with contextlib.suppress(Exception):
            span.set_status(Status(StatusCode.ERROR, "context still open at interpreter exit"))
            span.set_attribute("polydatum.abandoned", True)
        end_span(span)
        self.span = None

    def _ids(self) -> dict[str, Any]:
        """The ids every polydatum log event of this context carries."""
        ids: dict[str, Any] = {"context_id": self.ctx.id}
        if self.span is not None:
            sc = self.span.get_span_context()
            ids["trace_id"] = format(sc.trace_id, "032x")
            ids["span_id"] = format(sc.span_id, "016x")
        return ids

    def _log(self) -> Any:
        if self.log is None:
            self.log = _logger(**self._ids())
        return self.log

    def finish(self, error: BaseException | None, suppressed: BaseException | None) -> None:
        """Close the context span, record its duration and emit the canonical log line.

        Once only: after an interruption the lifecycle calls it again, and the span is
        ended and the caller's context restored even if this is interrupted itself.
        """
        if self.finished:
            return
        self.finished = True
        duration = time.perf_counter() - self.t0
        span = self.span
        try:
            if span is not None:
                if self.teardown_errors:
                    span.set_attribute("polydatum.teardown_errors", len(self.teardown_errors))
                if error is not None:
                    self.fail(span, error)
                elif suppressed is not None:
                    span.set_attribute("polydatum.suppressed_error.type", error_type(suppressed))
        finally:
            if span is not None:
                try:
                    span.end()
                except Exception as failure:
                    _report_loss("ending a span (a span processor's on_end?)", failure)
                finally:
                    token, self.token = self.token, None
                    if token is not None:
                        with contextlib.suppress(Exception):  # entered in another thread/task
                            _detach(token)
        instruments = self.instruments
        if instruments is not None:
            # In the context span's own context: an exemplar points at that span.
            if error is None:
                instruments.context_duration.record(duration, None, self.parent_ctx)
            else:
                instruments.context_duration.record(
                    duration, {"error.type": error_type(error)}, self.parent_ctx
                )
        if self.info:
            self._canonical_line(error, suppressed, duration)

    def _canonical_line(
        self, error: BaseException | None, suppressed: BaseException | None, duration: float
    ) -> None:
        """The one INFO event that summarises the context (the "canonical log line")."""
        fields = self._ids() if self.log is None else {}
        fields["outcome"] = "error" if error is not None else "ok"
        fields["duration_ms"] = round(duration * 1000, 3)
        middleware = self.middleware
        fields["middleware"] = [middleware[k] for k in sorted(middleware)]
        fields["resources"] = self.resources
        fields["service_calls"] = self.service_calls
        fields["teardown_errors"] = self.teardown_errors
        if error is not None:
            fields["error_type"] = error_type(error)
        if suppressed is not None:
            fields["suppressed_error_type"] = error_type(suppressed)
        if self.telemetry.meta_attributes:
            fields["meta"] = {
                k.removeprefix("polydatum.meta."): v
                for k, v in redact_meta(self.ctx.meta, self.telemetry.meta_attributes).items()
            }
        try:  # no bound logger needed for one line: the ids go in as fields
            logger = self.log._log if self.log is not None else _base_logger()
            if logger is not None:
                logger.info("polydatum.context", **fields)
        except Exception as failure:
            _report_loss("a structlog log call", failure)

    # -- lifecycle steps ------------------------------------------------------------

    def step_started(
        self,
        kind: str,
        phase: str,
        name: str,
        position: int,
        attributes: Mapping[str, Any] | None = None,
    ) -> _Step:
        """Start recording a middleware or resource phase; returns the scope to enter."""
        if kind != "middleware":
            position = 0  # a resource's position is not part of its telemetry
        plan = self.telemetry._plans.get((kind, phase, name, position))
        if plan is None or plan.source is not attributes:
            plan = self.telemetry.plan(kind, phase, name, position, attributes)
        tracer = self.tracer
        if tracer is None:
            return _Step(plan, None, None, self.clock())
        # Middleware phases and teardowns nest under the context span; a lazy
        # resource's setup under whatever is current (the service call that needed it).
        parent = None if kind == "resource" and phase == "setup" else self.parent_ctx
        try:
            span = tracer.start_span(plan.span_name, parent, _INTERNAL, plan.span_attrs)
        except Exception as error:
            _report_loss("starting a span (a span processor's on_start?)", error)
            return _Step(plan, None, None, self.clock())
        return _Step(plan, span, _in_context(span, parent), self.clock())

    def step_finished(
        self,
        step: _Step,
        outcome: Outcome,
        error: BaseException | None,
        seen: BaseException | None,
    ) -> None:
        """Finish a phase: ``error`` is what the step raised, ``seen`` what was thrown in."""
        duration = self.clock() - step.t0
        plan = step.plan
        # A step fails when it *originated* an exception; one that only let the
        # context's exception through is marked "propagated", not ERROR.
        failed = error is not None and outcome is not PROPAGATED
        span = step.span
        if span is not None:
            if plan.phase == "teardown":
                # A second yield at teardown is a failure of the step, not "ok".
                label = "raised" if failed else _PHASE_OUTCOMES[outcome]
                if label != "ok":
                    span.set_attribute("polydatum.outcome", label)
                if seen is not None:
                    span.set_attribute("polydatum.exception.seen", error_type(seen))
            if failed:
                self.fail(span, error)  # type: ignore[arg-type]
            try:
                span.end()
            except Exception as failure:
                _report_loss("ending a span (a span processor's on_end?)", failure)
        kind = plan.kind
        instruments = self.step_instruments
        if instruments is not None:
            attrs = plan.metric_attrs
            if failed:
                attrs = {**attrs, "error.type": error_type(error)}  # type: ignore[arg-type]
            histogram = (
                instruments.middleware_duration
                if kind == "middleware"
                else instruments.resource_duration
            )
            histogram.record(duration, attrs, step.otel_ctx)
        if not self.info:
            return  # the rest feeds the log lines only
        if kind == "middleware":
            entry = self.middleware.get(plan.position)
            if entry is None:
                entry = self.middleware[plan.position] = {"name": plan.name}
            entry[f"{plan.phase}_ms"] = round(duration * 1000, 3)
        elif plan.phase == "setup" and not failed:
            self.resources.append(plan.name)
        if self.debug:
            self._log().debug(
                f"polydatum.{kind}.{plan.phase}",
                name=plan.name,
                duration_ms=round(duration * 1000, 3),
                outcome=_PHASE_OUTCOMES[outcome],
                **({"error_type": error_type(error)} if failed else {}),  # type: ignore[arg-type]
            )

    def teardown_error(self, resource: str, error: BaseException) -> None:
        """Record a suppressed resource teardown error: counter, warning log, summary."""
        etype = error_type(error)
        self.teardown_errors.append({"resource": resource, "error_type": etype})
        if self.instruments is not None:
            self.instruments.teardown_errors.add(
                1, {"polydatum.resource.name": resource, "error.type": etype}
            )
        self._log().warning(
            "polydatum.resource.teardown_error_suppressed",
            resource=resource,
            error_type=etype,
            exception=exception_stacktrace(error),
        )

    # -- service calls -------------------------------------------------------------

    def call_started(self, path: str, function: str) -> _Step:
        """Start a service call span and make it current (nested calls nest)."""
        self.service_calls += 1
        telemetry = self.telemetry
        plan = telemetry._plans.get(("service", function, path, 0))
        if plan is None:
            plan = telemetry.call_plan(path, function)
        tracer = self.tracer
        if tracer is None:
            return _Step(plan, None, None, self.clock())
        try:
            span = tracer.start_span(path, None, _INTERNAL, plan.span_attrs)
        except Exception as error:
            _report_loss("starting a span (a span processor's on_start?)", error)
            return _Step(plan, None, None, self.clock())
        step = _Step(plan, span, None, self.clock())
        # Runs in the caller's context (a service call is no generator): reset at the end.
        step.otel_ctx = otel_ctx = _in_context(span)
        step.token = _attach(otel_ctx)
        return step

    def call_finished(self, step: _Step, error: BaseException | None) -> None:
        """End a service call span; record its duration."""
        duration = self.clock() - step.t0
        span = step.span
        if span is not None:
            if step.token is not None:
                _detach(step.token)
                step.token = None
            if error is not None:
                self.fail(span, error)
            try:
                span.end()
            except Exception as failure:
                _report_loss("ending a span (a span processor's on_end?)", failure)
        path = step.plan.name
        if self.instruments is not None:
            attrs = step.plan.metric_attrs
            if error is not None:
                attrs = {**attrs, "error.type": error_type(error)}
            self.instruments.service_duration.record(duration, attrs, step.otel_ctx)
        if self.debug:
            self._log().debug(
                "polydatum.service.call",
                path=path,
                duration_ms=round(duration * 1000, 3),
                **({"error_type": error_type(error)} if error is not None else {}),
            )


def span_context_of(observer: ContextObserver | None) -> Any:
    """The OpenTelemetry context in which the context span of ``observer`` is current
    (``None`` when it records no span): for integrations that run code of the request
    outside the ``with`` block's own task or thread."""
    return observer.parent_ctx if isinstance(observer, ContextTelemetry) else None


def _report_open_at_exit(still_open: list[Any]) -> None:
    """At interpreter exit: end the spans of contexts still open, and say so once."""
    for lifecycle in still_open:
        observer = lifecycle.observer
        if observer is not None:
            observer.abandon()
    _logger().warning(
        "polydatum.context.open_at_exit",
        count=len(still_open),
        context_ids=sorted(lifecycle.id for lifecycle in still_open),
        states=sorted(lifecycle.state.value for lifecycle in still_open),
        detail="these contexts were never exited: their resources were not torn down",
    )


add_exit_reporter(_report_open_at_exit)

if TYPE_CHECKING:  # mypy checks that the telemetry implements the lifecycle's protocols

    def _implements(
        factory: Telemetry, observer: ContextTelemetry
    ) -> tuple[ObserverFactory, ContextObserver]:
        return factory, observer
