"""Test helpers: capture polydatum's spans, metrics and log events in memory.

Used by the pytest plugin (:mod:`polydatum.pytest_plugin`) and usable on their own::

    with TelemetryCapture() as cap:
        dm = DataManager(tracer_provider=cap.tracer_provider,
                         meter_provider=cap.meter_provider)
        with dm.dal() as dal:
            dal.users.get(1)
    assert cap.tree() == [("polydatum.context", [("users.get", [])])]

Spans become :class:`SpanRecord` (plain, comparable), metrics become
:class:`MetricPoint`, log events are the dicts structlog would have rendered.
Needs the ``sdk`` extra (``opentelemetry-sdk``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from polydatum.registry import DataManager

try:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        HistogramDataPoint,
        InMemoryMetricReader,
        NumberDataPoint,
    )
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "polydatum.testing needs the OpenTelemetry SDK: pip install 'polydatum[sdk]'"
    ) from error

__all__ = [
    "MetricPoint",
    "SpanRecord",
    "TelemetryCapture",
    "assert_resources_torn_down",
    "override",
]


@dataclass(frozen=True)
class SpanRecord:
    """A finished span reduced to what tests compare."""

    name: str
    parent: str | None
    status: str  # "UNSET" or "ERROR" (polydatum never sets OK)
    attributes: Mapping[str, Any] = field(default_factory=dict)
    events: tuple[str, ...] = ()
    span_id: int = field(default=0, compare=False, repr=False)
    parent_id: int | None = field(default=None, compare=False, repr=False)
    trace_id: int = field(default=0, compare=False, repr=False)
    start: int = field(default=0, compare=False, repr=False)
    end: int = field(default=0, compare=False, repr=False)


@dataclass(frozen=True)
class MetricPoint:
    """One data point: for histograms ``value`` is the count, ``sum`` the total.

    ``exemplar_span_ids`` are the span ids of the exemplars the SDK kept for the point
    (with its default trace-based filter: samples recorded while a sampled span was
    current), in the order the SDK reports them.
    """

    name: str
    attributes: Mapping[str, Any]
    value: float
    sum: float | None = None
    bucket_bounds: tuple[float, ...] = ()
    exemplar_span_ids: tuple[int, ...] = ()


def _records(spans: list[ReadableSpan]) -> list[SpanRecord]:
    by_id = {s.context.span_id: s for s in spans if s.context is not None}
    out = []
    for s in sorted(spans, key=lambda s: s.start_time or 0):
        parent_id = s.parent.span_id if s.parent is not None else None
        parent = by_id.get(parent_id) if parent_id is not None else None
        out.append(
            SpanRecord(
                name=s.name,
                parent=parent.name if parent is not None else None,
                status=s.status.status_code.name,
                attributes=dict(s.attributes or {}),
                events=tuple(e.name for e in s.events),
                span_id=s.context.span_id if s.context is not None else 0,
                parent_id=parent_id,
                trace_id=s.context.trace_id if s.context is not None else 0,
                start=s.start_time or 0,
                end=s.end_time or 0,
            )
        )
    return out


class TelemetryCapture:
    """An isolated tracer provider, meter provider and structlog capture.

    Pass ``tracer_provider`` / ``meter_provider`` to the DataManager under test;
    the global providers are never touched. Use as a context manager (log capture
    is active inside it).
    """

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.metric_reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.metric_reader])
        self.logs: list[dict[str, Any]] = []
        self._capture: Any = None
        self._was_configured = False

    def __enter__(self) -> TelemetryCapture:
        # structlog's capture_logs() restores the processors with configure(), which
        # leaves structlog "configured" even when it was not: every later context of
        # the test run would then log at INFO (and so record). Put that back too.
        self._was_configured = structlog.is_configured()
        self._capture = structlog.testing.capture_logs()
        self.logs = self._capture.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._capture is not None:
            self._capture.__exit__(exc_type, exc, tb)
            self._capture = None
            if not self._was_configured:
                structlog.reset_defaults()
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()

    def data_manager(self, **kwargs: Any) -> DataManager:
        """A DataManager wired to this capture's providers."""
        from polydatum.registry import DataManager

        return DataManager(
            tracer_provider=self.tracer_provider, meter_provider=self.meter_provider, **kwargs
        )

    # -- spans -----------------------------------------------------------------------

    def finished_spans(self) -> list[ReadableSpan]:
        """The raw SDK spans, in the order they ended."""
        return list(self.exporter.get_finished_spans())

    def spans(self) -> list[SpanRecord]:
        """Every finished span as a :class:`SpanRecord`, in start order."""
        return _records(self.finished_spans())

    def span(self, name: str) -> SpanRecord:
        """The one span called ``name`` (``AssertionError`` if there is not exactly one)."""
        found = [s for s in self.spans() if s.name == name]
        assert len(found) == 1, f"expected one span {name!r}, found {len(found)}: {self.names()}"
        return found[0]

    def names(self) -> list[str]:
        """Span names in start order."""
        return [s.name for s in self.spans()]

    def tree(self) -> list[tuple[str, list[Any]]]:
        """The span forest as nested ``(name, [children...])`` tuples, children in start order."""
        records = self.spans()
        ids = {r.span_id for r in records}
        children: dict[int | None, list[SpanRecord]] = {}
        for r in records:
            key = r.parent_id if r.parent_id in ids else None
            children.setdefault(key, []).append(r)

        def build(parent: int | None) -> list[tuple[str, list[Any]]]:
            return [(r.name, build(r.span_id)) for r in children.get(parent, [])]

        return build(None)

    def clear(self) -> None:
        """Forget captured spans and logs (metrics are cumulative)."""
        self.exporter.clear()
        self.logs.clear()

    # -- metrics ---------------------------------------------------------------------

    def metrics(self, name: str | None = None) -> list[MetricPoint]:
        """Current cumulative metric points (optionally of one instrument)."""
        data = self.metric_reader.get_metrics_data()
        points: list[MetricPoint] = []
        if data is None:
            return points
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if name is not None and metric.name != name:
                        continue
                    for p in metric.data.data_points:
                        attrs = dict(p.attributes or {})
                        if isinstance(p, HistogramDataPoint):
                            bounds = tuple(p.explicit_bounds)
                            exemplars = tuple(
                                e.span_id for e in (getattr(p, "exemplars", None) or ())
                            )
                            points.append(
                                MetricPoint(metric.name, attrs, p.count, p.sum, bounds, exemplars)
                            )
                        elif isinstance(p, NumberDataPoint):
                            points.append(MetricPoint(metric.name, attrs, float(p.value)))
        return points

    def metric(self, name: str, **attributes: Any) -> MetricPoint:
        """The one point of instrument ``name`` whose attributes include ``attributes``.

        ``AssertionError`` (listing what there is) unless exactly one point matches.
        """
        points = self.metrics(name)
        found = [p for p in points if all(p.attributes.get(k) == v for k, v in attributes.items())]
        assert len(found) == 1, (
            f"expected one {name!r} point with {attributes}, found {len(found)} "
            f"among {[dict(p.attributes) for p in points]}"
        )
        return found[0]

    # -- logs ------------------------------------------------------------------------

    def events(self, prefix: str = "polydatum") -> list[dict[str, Any]]:
        """Captured log events whose name starts with ``prefix``."""
        return [e for e in self.logs if str(e.get("event", "")).startswith(prefix)]

    def event_names(self, level: str | None = None) -> list[str]:
        """Names of the captured polydatum events, in order (optionally of one level)."""
        return [e["event"] for e in self.events() if level is None or e.get("log_level") == level]


@contextmanager
def override(dm: DataManager, **replacements: Any) -> Iterator[DataManager]:
    """Replace services and/or resources of ``dm`` for the block, then restore them.

    Keys name a service or a resource (``override(dm, users=FakeUsers(), db=fake_db)``);
    a name that is neither raises ``KeyError`` so that typos do not pass silently.
    """
    saved_services: dict[str, Any] = {}
    saved_resources: dict[str, Any] = {}
    services = dm.get_dal().services
    for key in replacements:
        if key not in services and dm.get_resource(key) is None:
            raise KeyError(f"{key!r} is neither a registered service nor a resource")
    try:
        for key, value in replacements.items():
            if key in services:
                saved_services[key] = services[key]
                dm.replace_service(key, value)
            else:
                saved_resources[key] = dm.get_resource(key)
                dm.replace_resource(key, value)
        yield dm
    finally:
        for key, value in saved_services.items():
            dm.replace_service(key, value)
        for key, value in saved_resources.items():
            dm.replace_resource(key, value)


def assert_resources_torn_down(capture: TelemetryCapture) -> None:
    """Assert every resource set up (per the spans) was torn down exactly once.

    Compares ``polydatum.resource.setup X`` and ``... .teardown X`` spans per context.
    """
    contexts: dict[int, list[SpanRecord]] = {}
    records = capture.spans()
    by_id = {r.span_id: r for r in records}

    def context_of(r: SpanRecord) -> int:
        cur: SpanRecord | None = r
        while cur is not None and cur.name != "polydatum.context":
            cur = by_id.get(cur.parent_id) if cur.parent_id is not None else None
        return cur.span_id if cur is not None else 0

    for r in records:
        if r.name.startswith("polydatum.resource."):
            contexts.setdefault(context_of(r), []).append(r)
    problems = []
    for span_id, steps in contexts.items():
        set_up = [
            s.name.split(" ", 1)[1] for s in steps
            if s.name.startswith("polydatum.resource.setup ") and s.status != "ERROR"
        ]  # fmt: skip
        torn = [
            s.name.split(" ", 1)[1] for s in steps
            if s.name.startswith("polydatum.resource.teardown ")
        ]  # fmt: skip
        if sorted(set_up) != sorted(torn):
            problems.append(f"context {span_id:016x}: set up {set_up}, torn down {torn}")
    assert not problems, "resources not torn down exactly once:\n" + "\n".join(problems)
