"""The spans dashboard (dashboards/polydatum-spans.json) against what the collector makes.

No OpenTelemetry collector runs here, so the dashboard is checked in three steps:

1. Every series and label its queries use is one that the ``spanmetrics`` connector and
   the collector's Prometheus exporter produce with instrumentation/collector/
   otel-collector.yaml: the names are derived from that YAML (remove a dimension there
   and this fails), by the connector's and the exporter's rules cited at
   :func:`spanmetrics`.
2. The span names and attribute values the queries filter on are the ones polydatum
   emits: a real DataManager records into :class:`polydatum.testing.TelemetryCapture`,
   its spans are turned into the label sets the connector would give them, and each
   selector of the dashboard matches exactly the spans it is meant to; on those spans
   the dashboard's counting queries count what the overview's count from polydatum's
   own metrics.
3. The queries evaluate (``promtool test rules``) to exact values on input series shaped
   like the connector's output.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import test_telemetry as telemetry_app
import yaml
from conftest import require_binary
from test_telemetry import BOOM, Boom, Users, auth, cache, db, timing

from polydatum import DataManager
from polydatum.testing import TelemetryCapture

ROOT = Path(__file__).resolve().parent.parent
COLLECTOR = ROOT / "instrumentation" / "collector" / "otel-collector.yaml"
SPANS_DASHBOARD = ROOT / "dashboards" / "polydatum-spans.json"


@pytest.fixture(scope="module")
def build() -> ModuleType:
    path = ROOT / "dashboards" / "build.py"
    spec = importlib.util.spec_from_file_location("polydatum_dashboards_spans", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(SPANS_DASHBOARD.read_text(encoding="utf-8"))
    return data


def targets(model: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """``(panel title, refId, PromQL, legend)`` of every Prometheus target."""
    return [
        (panel["title"], t["refId"], t["expr"], t.get("legendFormat", ""))
        for panel in model["panels"]
        for t in panel.get("targets", [])
        if "expr" in t
    ]


# ------------------------------------------- 1. what the collector config produces

# How the collector turns the config into Prometheus series. Relied on, in
# open-telemetry/opentelemetry-collector-contrib (docker-compose.yml runs its
# otel/opentelemetry-collector-contrib image):
# - connector/spanmetricsconnector/connector.go: the metrics are "<namespace>.calls",
#   "<namespace>.duration" (unit: histogram.unit; default ms) and, with events.enabled,
#   "<namespace>.events" (buildMetrics, buildMetricName: namespace + "." + name); every
#   data point has service.name, span.name, span.kind and status.code (buildAttributes,
#   unless exclude_dimensions names them), then each configured dimension the span has,
#   else its resource has, else its default: a dimension with none of them is left out,
#   not set empty (getDimensionValue); the events metric also has events.dimensions,
#   looked up in the event's attributes. Scope name "spanmetricsconnector"; the metrics'
#   resource is the spans' resource.
# - connector/spanmetricsconnector/internal/metrics/metrics.go: calls and events are
#   monotonic sums (SetIsMonotonic(true)), duration an explicit-bucket histogram.
# - internal/coreinternal/traceutil/traceutil.go: span.kind is "SPAN_KIND_INTERNAL", ...,
#   status.code "STATUS_CODE_UNSET" / "STATUS_CODE_OK" / "STATUS_CODE_ERROR".
# - pkg/translator/prometheus/normalize_name.go (the Prometheus exporter's metric names,
#   suffixes on by default): runs of non-alphanumerics become "_", the unit "s" appends
#   "seconds" ("ms": "milliseconds"), a monotonic sum appends "total"; normalize_label.go:
#   every non-alphanumeric of a label name becomes "_".
# - exporter/prometheusexporter/collector.go: a histogram is _bucket (with le), _sum and
#   _count; besides the data point's attributes every series has otel_scope_name and
#   otel_scope_version, job (service.namespace/service.name) and instance
#   (service.instance.id) when the resource has them (utils.go); the resource's other
#   attributes only with resource_to_telemetry_conversion.
DEFAULT_DIMENSIONS = ("service.name", "span.name", "span.kind", "status.code")
EXPORTER_LABELS = frozenset({"otel_scope_name", "otel_scope_version", "job", "instance"})
UNIT_SUFFIXES = {"s": "seconds", "ms": "milliseconds"}
#: Nanoseconds per unit of a Go duration.
GO_DURATION_UNITS = {"ns": 1, "us": 10**3, "µs": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9}


def prometheus_name(name: str) -> str:
    return "_".join(t for t in re.split(r"[^A-Za-z0-9]+", name) if t)


def prometheus_label(name: str) -> str:
    label = re.sub(r"[^A-Za-z0-9]", "_", name)
    assert not label[0].isdigit(), name  # would get a "key_" prefix
    return label


def in_unit(duration: str, unit: str) -> float:
    """A Go duration of the config ("100us", "2.5ms", "1s") in ``unit``, computed as the
    connector does (durationsToUnits: nanoseconds / nanoseconds per unit)."""
    match = re.fullmatch(r"([0-9.]+)(ns|us|µs|ms|s|m)", duration)
    assert match, duration
    nanoseconds = Decimal(match[1]) * GO_DURATION_UNITS[match[2]]
    assert nanoseconds == int(nanoseconds), duration
    return int(nanoseconds) / GO_DURATION_UNITS[unit]


@dataclass(frozen=True)
class Spanmetrics:
    """The Prometheus series the collector config makes of spans."""

    calls: str
    duration: str  # the histogram, without _bucket / _sum / _count
    events: str | None
    dimensions: tuple[str, ...]  # span attributes, as configured
    event_dimensions: tuple[str, ...]
    labels: frozenset[str]  # of calls and duration (besides le)
    event_labels: frozenset[str]
    buckets: tuple[float, ...]  # upper bounds, in the histogram's unit
    flush_interval: str

    def series(self) -> dict[str, frozenset[str]]:
        """Every series name and the labels its series may have."""
        out = {
            self.calls: self.labels,
            f"{self.duration}_bucket": self.labels | {"le"},
            f"{self.duration}_sum": self.labels,
            f"{self.duration}_count": self.labels,
        }
        if self.events is not None:
            out[self.events] = self.event_labels
        return out


def spanmetrics(config: Mapping[str, Any]) -> Spanmetrics:
    connector = config["connectors"]["spanmetrics"]
    exporter = config["exporters"]["prometheus"]
    # What this derivation assumes of the exporter: no namespace prefix, suffixes on,
    # resource attributes not copied into labels.
    assert "namespace" not in exporter
    assert exporter.get("add_metric_suffixes", True) is True
    assert exporter["resource_to_telemetry_conversion"] == {"enabled": False}
    assert "exponential" not in connector["histogram"]  # buckets, not native histograms
    namespace = prometheus_name(connector.get("namespace", "traces.span.metrics"))
    unit = connector["histogram"].get("unit", "ms")
    excluded = set(connector.get("exclude_dimensions", []))
    dimensions = tuple(d["name"] for d in connector.get("dimensions", []))
    base = [d for d in DEFAULT_DIMENSIONS if d not in excluded]
    labels = frozenset(prometheus_label(d) for d in (*base, *dimensions)) | EXPORTER_LABELS
    events = connector.get("events", {})
    event_dimensions = tuple(d["name"] for d in events.get("dimensions", []))
    return Spanmetrics(
        calls=f"{namespace}_calls_total",
        duration=f"{namespace}_duration_{UNIT_SUFFIXES[unit]}",
        events=f"{namespace}_events_total" if events.get("enabled") else None,
        dimensions=dimensions,
        event_dimensions=event_dimensions,
        labels=labels,
        event_labels=labels | {prometheus_label(d) for d in event_dimensions},
        buckets=tuple(in_unit(b, unit) for b in connector["histogram"]["explicit"]["buckets"]),
        flush_interval=connector["metrics_flush_interval"],
    )


@pytest.fixture(scope="module")
def produced() -> Spanmetrics:
    return spanmetrics(yaml.safe_load(COLLECTOR.read_text(encoding="utf-8")))


@dataclass(frozen=True)
class SpanShape:
    """What the connector reads of a span."""

    name: str
    attributes: Mapping[str, Any]
    status: str = "UNSET"  # UNSET / OK / ERROR
    kind: str = "INTERNAL"
    events: tuple[Mapping[str, Any], ...] = ()
    resource: Mapping[str, Any] = field(default_factory=lambda: {"service.name": "shop"})


def as_string(value: Any) -> str:
    """A pdata value's AsString() for the attribute types polydatum records."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def connector_labels(
    span: SpanShape, produced: Spanmetrics, event: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """The labels of the series the connector (and the exporter) put ``span`` in; with
    ``event``, of the events series of that event of the span."""
    resource = span.resource
    common = {
        "service_name": as_string(resource["service.name"]),
        "span_name": span.name,
        "span_kind": f"SPAN_KIND_{span.kind}",
        "status_code": f"STATUS_CODE_{span.status}",
    }
    labels = {k: v for k, v in common.items() if k in produced.labels}  # exclude_dimensions
    dimensions = produced.dimensions
    fallback: Mapping[str, Any] = resource
    if event is not None:
        dimensions += produced.event_dimensions
        fallback = {**resource, **event}
    for name in dimensions:
        if name in span.attributes:
            labels[prometheus_label(name)] = as_string(span.attributes[name])
        elif name in fallback:
            labels[prometheus_label(name)] = as_string(fallback[name])
    labels["otel_scope_name"] = "spanmetricsconnector"  # otel_scope_version: "", no label
    job = as_string(resource["service.name"])
    if "service.namespace" in resource:
        job = f"{resource['service.namespace']}/{job}"
    labels["job"] = job
    if "service.instance.id" in resource:
        labels["instance"] = as_string(resource["service.instance.id"])
    return {k: v for k, v in labels.items() if v != ""}  # Prometheus has no empty labels


def test_what_the_collector_config_produces(produced: Spanmetrics) -> None:
    config = yaml.safe_load(COLLECTOR.read_text(encoding="utf-8"))
    pipelines = config["service"]["pipelines"]
    # Spans reach the connector, and its metrics reach the Prometheus exporter.
    assert any("spanmetrics" in p["exporters"] for p in pipelines.values())
    assert any(
        "spanmetrics" in p["receivers"] and "prometheus" in p["exporters"]
        for p in pipelines.values()
    )
    assert produced.series() == {
        "traces_span_metrics_calls_total": produced.labels,
        "traces_span_metrics_duration_seconds_bucket": produced.labels | {"le"},
        "traces_span_metrics_duration_seconds_sum": produced.labels,
        "traces_span_metrics_duration_seconds_count": produced.labels,
        "traces_span_metrics_events_total": produced.labels | {"exception_type"},
    }
    assert produced.labels == {
        "service_name",
        "span_name",
        "span_kind",
        "status_code",
        "polydatum_middleware_name",
        "polydatum_resource_name",
        "polydatum_service_path",
        "polydatum_outcome",
        "polydatum_exception_seen",
        "error_type",
        "otel_scope_name",
        "otel_scope_version",
        "job",
        "instance",
    }
    assert produced.buckets == (
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
        0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    )  # fmt: skip
    assert produced.flush_interval == "15s"


def test_the_spans_dashboard_steps_at_the_flush_interval(
    build: ModuleType, model: dict[str, Any], produced: Spanmetrics
) -> None:
    """The connector's series change once per flush: a query steps at least that far,
    so that Grafana's $__rate_interval (4 x the min step) spans four flushes."""
    assert build.SPANS.min_interval == produced.flush_interval
    intervals = {
        t["interval"] for p in model["panels"] for t in p.get("targets", []) if "expr" in t
    }
    assert intervals == {produced.flush_interval}


# ------------------------------------------------------------ reading the queries

SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")
MATCHER = re.compile(r'\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
BY = re.compile(r"\bby \(([^)]*)\)")
# label_replace(v, "dst", "replacement", "src", "regex"): its last four arguments.
LABEL_REPLACE = re.compile(
    r'label_replace\(.*?, "(\w+)", "[^"]*", "(\w+)", "((?:[^"\\]|\\.)*)"\)', re.S
)
LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")

Matcher = tuple[str, str, str]


def unquote(text: str) -> str:
    """The value of a PromQL double-quoted string's content."""
    value: str = json.loads(f'"{text}"')
    return value


def selectors(expr: str) -> list[tuple[str, tuple[Matcher, ...]]]:
    """Every ``metric{matchers}`` of ``expr``."""
    out = []
    for metric, body in SELECTOR.findall(expr):
        found = MATCHER.findall(body)
        assert ",".join(f'{n}{op}"{v}"' for n, op, v in found) == body, body  # all read
        out.append((metric, tuple((n, op, unquote(v)) for n, op, v in found)))
    return out


def matches(labels: Mapping[str, str], matchers: Sequence[Matcher]) -> bool:
    for name, op, value in matchers:
        actual = labels.get(name, "")  # a missing label matches as ""
        if op in ("=~", "!~"):
            found = re.fullmatch(value, actual) is not None
            if found != (op == "=~"):
                return False
        elif (actual == value) != (op == "="):
            return False
    return True


def test_spans_queries_use_only_series_and_labels_the_collector_produces(
    model: dict[str, Any], produced: Spanmetrics
) -> None:
    series = produced.series()
    queries = targets(model)
    assert len(queries) == 23
    used_series: set[str] = set()
    used_labels: set[str] = set()
    for title, ref, expr, legend in queries:
        where = f"{title} / {ref}: {expr}"
        found = selectors(expr)
        assert found, where
        available: set[str] = set()
        for metric, matchers in found:
            assert metric in series, where
            available |= series[metric]
            used_series.add(metric)
            for name, _, _ in matchers:
                assert name in series[metric], (name, where)
                used_labels.add(name)
        created = set()
        for dst, src, _ in LABEL_REPLACE.findall(expr):
            assert src in available, (src, where)
            used_labels.add(src)
            created.add(dst)
        for group in BY.findall(expr):
            for name in (n.strip() for n in group.split(",")):
                assert name in available | created, (name, where)
                if name not in created:
                    used_labels.add(name)
        for name in LEGEND.findall(legend):
            assert name in available | created, (name, where)
    (variable,) = [v for v in model["templating"]["list"] if v["type"] == "query"]
    match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"])
    assert match, variable["query"]
    ((metric, matchers),) = selectors(match[1])
    assert metric in series and {n for n, _, _ in matchers} | {match[2]} <= series[metric]
    # What the dashboard reads, exactly (le: histogram_quantile's buckets).
    assert used_series == {
        "traces_span_metrics_calls_total",
        "traces_span_metrics_duration_seconds_bucket",
    }
    assert used_labels == {
        "service_name",
        "span_name",
        "error_type",
        "polydatum_service_path",
        "polydatum_middleware_name",
        "polydatum_resource_name",
        "le",
    }


# ------------------------------------------------- 2. the spans polydatum emits


class Profile(telemetry_app.Profile):
    """tests/test_telemetry.py's profile service, plus a call that reads the resource
    whose teardown fails (a suppressed teardown error for the dashboard to count)."""

    def cached(self) -> str:
        return str(self._ctx.cache)


@dataclass(frozen=True)
class Recorded:
    spans: list[SpanShape]
    #: polydatum's metric points as Prometheus series: (name, labels, value).
    metrics: list[tuple[str, dict[str, str], float]]


#: The Prometheus names of polydatum's instruments (tests/test_prometheus.py checks them
#: against the real exporter): counted series only.
SDK_COUNTS = {
    "polydatum.context.duration": "polydatum_context_duration_seconds_count",
    "polydatum.middleware.duration": "polydatum_middleware_duration_seconds_count",
    "polydatum.resource.duration": "polydatum_resource_duration_seconds_count",
    "polydatum.service.duration": "polydatum_service_duration_seconds_count",
    "polydatum.resource.teardown.errors": "polydatum_resource_teardown_errors_total",
}


@pytest.fixture(scope="module")
def recorded() -> Recorded:
    """Three good contexts, one whose service call fails, one whose cache teardown
    fails (suppressed): every kind of span the dashboard reads, and failures of each."""
    with TelemetryCapture() as cap:
        dm: DataManager = cap.data_manager()
        dm.register_services(users=Users().register_services(profile=Profile()))
        dm.register_context_middleware(auth, timing)
        dm.register_resources(db=db, cache=cache)
        for uid in range(3):
            with dm.dal() as dal:
                assert dal.users.show(uid) == f"db:{uid}"
        with pytest.raises(Boom), dm.dal() as dal:
            dal.users.profile.fail()
        with dm.dal() as dal:
            assert dal.users.profile.cached() == "cache"
        spans = [
            SpanShape(
                name=s.name,
                attributes=dict(s.attributes or {}),
                status=s.status.status_code.name,
                kind=s.kind.name,
                events=tuple(dict(e.attributes or {}) for e in s.events),
                resource=dict(s.resource.attributes),
            )
            for s in cap.finished_spans()
        ]
        metrics = [
            (
                SDK_COUNTS[p.name],
                {prometheus_label(k): as_string(v) for k, v in p.attributes.items()},
                p.value,
            )
            for p in cap.metrics()
            if p.name in SDK_COUNTS
        ]
    return Recorded(spans, metrics)


def test_every_selector_matches_the_spans_it_means(
    model: dict[str, Any], produced: Spanmetrics, recorded: Recorded
) -> None:
    """Each selector of the dashboard, on the series the connector makes of polydatum's
    real spans: exactly these span names (and how many spans) match."""
    calls = [connector_labels(s, produced) for s in recorded.spans]
    assert Counter(c["span_name"] for c in calls) == {
        "polydatum.context": 5,
        "polydatum.middleware.setup auth": 5,
        "polydatum.middleware.setup timing": 5,
        "polydatum.middleware.teardown timing": 5,
        "polydatum.middleware.teardown auth": 5,
        "polydatum.resource.setup db": 3,
        "polydatum.resource.teardown db": 3,
        "polydatum.resource.setup cache": 1,
        "polydatum.resource.teardown cache": 1,
        "users.show": 3,
        "users.profile.get": 3,
        "users.profile.fail": 1,
        "users.profile.cached": 1,
    }
    matched: dict[str, Counter[str]] = {}
    for _, _, expr, _ in targets(model):
        for _, matchers in selectors(expr):
            key = ",".join(f"{n}{op}{v}" for n, op, v in matchers if n != "service_name")
            concrete = [(n, op, ".*" if v == "$service" else v) for n, op, v in matchers]
            matched[key] = Counter(c["span_name"] for c in calls if matches(c, concrete))
    mw = r"span_name=~polydatum\.middleware\."
    res = r"span_name=~polydatum\.resource\."
    services = {"users.show": 3, "users.profile.get": 3, "users.profile.fail": 1}
    assert matched == {
        "span_name=polydatum.context": {"polydatum.context": 5},
        "span_name=polydatum.context,error_type!=": {"polydatum.context": 1},
        "polydatum_service_path!=": {**services, "users.profile.cached": 1},
        "polydatum_service_path!=,error_type!=": {"users.profile.fail": 1},
        mw + "setup .+": {
            "polydatum.middleware.setup auth": 5,
            "polydatum.middleware.setup timing": 5,
        },
        mw + "teardown .+": {
            "polydatum.middleware.teardown auth": 5,
            "polydatum.middleware.teardown timing": 5,
        },
        mw + "(setup|teardown) .+": {
            "polydatum.middleware.setup auth": 5,
            "polydatum.middleware.setup timing": 5,
            "polydatum.middleware.teardown auth": 5,
            "polydatum.middleware.teardown timing": 5,
        },
        res + "setup .+": {"polydatum.resource.setup db": 3, "polydatum.resource.setup cache": 1},
        res + "teardown .+": {
            "polydatum.resource.teardown db": 3,
            "polydatum.resource.teardown cache": 1,
        },
        res + "(setup|teardown) .+": {
            "polydatum.resource.setup db": 3,
            "polydatum.resource.setup cache": 1,
            "polydatum.resource.teardown db": 3,
            "polydatum.resource.teardown cache": 1,
        },
        res + "teardown .+,error_type!=": {"polydatum.resource.teardown cache": 1},
    }
    # The failures those selectors find carry the error.type polydatum recorded.
    failed = {(c["span_name"], c["error_type"]) for c in calls if "error_type" in c}
    assert failed == {
        ("polydatum.context", BOOM),
        ("users.profile.fail", BOOM),
        ("polydatum.resource.teardown cache", "ConnectionResetError"),
    }
    # label_replace reads each step's phase out of its span name.
    phases = set()
    for _, _, expr, _ in targets(model):
        for dst, src, regex in LABEL_REPLACE.findall(expr):
            if dst == "polydatum_phase":
                for c in calls:
                    if found := re.fullmatch(unquote(regex), c[src]):
                        phases.add((c["span_name"], found[1]))
    assert phases == {
        ("polydatum.middleware.setup auth", "setup"),
        ("polydatum.middleware.setup timing", "setup"),
        ("polydatum.middleware.teardown auth", "teardown"),
        ("polydatum.middleware.teardown timing", "teardown"),
        ("polydatum.resource.setup db", "setup"),
        ("polydatum.resource.setup cache", "setup"),
        ("polydatum.resource.teardown db", "teardown"),
        ("polydatum.resource.teardown cache", "teardown"),
    }


def totals(
    series: Sequence[tuple[str, Mapping[str, str], float]], selector: str, by: Sequence[str]
) -> dict[tuple[str, ...], float]:
    """``sum by (by) (selector)`` over ``(name, labels, value)`` series."""
    ((metric, matchers),) = selectors(selector)
    concrete = [(n, op, ".*" if v.startswith("$") else v) for n, op, v in matchers]
    out: defaultdict[tuple[str, ...], float] = defaultdict(float)
    for name, labels, value in series:
        if name == metric and matches(labels, concrete):
            out[tuple(labels.get(b, "") for b in by)] += value
    return dict(out)


def test_spans_queries_count_what_the_sdk_queries_count(
    build: ModuleType, produced: Spanmetrics, recorded: Recorded
) -> None:
    """The same workload, counted by each dashboard's series: the overview's from
    polydatum's metrics, the spans dashboard's from the connector's series of its spans."""
    span_series = [(produced.calls, connector_labels(s, produced), 1.0) for s in recorded.spans]
    sdk, spans = build.SDK, build.SPANS
    cases: list[tuple[str, str, tuple[str, ...], dict[tuple[str, ...], float]]] = [
        (
            sdk.series("context", "count"),
            spans.series("context", "count"),
            ("error_type",),
            {("",): 4, (BOOM,): 1},
        ),
        (
            sdk.series("service", "count"),
            spans.series("service", "count"),
            ("polydatum_service_path", "error_type"),
            {
                ("users.show", ""): 3,
                ("users.profile.get", ""): 3,
                ("users.profile.fail", BOOM): 1,
                ("users.profile.cached", ""): 1,
            },
        ),
        (
            sdk.teardown_errors(),
            spans.teardown_errors(),
            ("polydatum_resource_name", "error_type"),
            {("cache", "ConnectionResetError"): 1},
        ),
    ]
    for phase in ("setup", "teardown"):
        cases.append(
            (
                sdk.series("middleware", "count", phase=phase),
                spans.series("middleware", "count", phase=phase),
                ("polydatum_middleware_name", "error_type"),
                {("auth", ""): 5, ("timing", ""): 5},
            )
        )
        cases.append(
            (
                sdk.series("resource", "count", phase=phase),
                spans.series("resource", "count", phase=phase),
                ("polydatum_resource_name", "error_type"),
                (
                    {("db", ""): 3, ("cache", ""): 1}
                    if phase == "setup"
                    else {("db", ""): 3, ("cache", "ConnectionResetError"): 1}
                ),
            )
        )
    for sdk_selector, spans_selector, by, expected in cases:
        assert totals(recorded.metrics, sdk_selector, by) == expected, sdk_selector
        assert totals(span_series, spans_selector, by) == expected, spans_selector


# --------------------------------------------- 3. the queries, evaluated by promtool


@dataclass(frozen=True)
class Group:
    """``per_flush`` spans of one shape per connector flush, all in the bucket ``le``."""

    span: SpanShape
    per_flush: int
    le: float


def ctx(per_flush: int, le: float, **attributes: str) -> Group:
    status = "ERROR" if "error.type" in attributes else "UNSET"
    return Group(SpanShape("polydatum.context", attributes, status), per_flush, le)


def step(kind: str, phase: str, name: str, per_flush: int, le: float, **attributes: str) -> Group:
    attributes = {f"polydatum.{kind}.name": name, **attributes}
    if phase == "teardown":
        attributes.setdefault("polydatum.outcome", "ok")
    status = "ERROR" if "error.type" in attributes else "UNSET"
    events: tuple[Mapping[str, Any], ...] = ()
    if status == "ERROR":
        events = ({"exception.type": attributes["error.type"]},)
    span = SpanShape(f"polydatum.{kind}.{phase} {name}", attributes, status, events=events)
    return Group(span, per_flush, le)


def call(path: str, per_flush: int, le: float, **attributes: str) -> Group:
    status = "ERROR" if "error.type" in attributes else "UNSET"
    events: tuple[Mapping[str, Any], ...] = ()
    if status == "ERROR":
        events = ({"exception.type": attributes["error.type"]},)
    span = SpanShape(path, {"polydatum.service.path": path, **attributes}, status, events=events)
    return Group(span, per_flush, le)


NOT_FOUND = "shop.NotFound"
PROPAGATED = {"polydatum.outcome": "propagated", "polydatum.exception.seen": NOT_FOUND}
FAILED_TEARDOWN = {"polydatum.outcome": "raised", "error.type": "ConnectionResetError"}
# Per 15 s flush, in service "shop": 15 contexts (3 fail with shop.NotFound), each
# through auth and timing; users.get 15 times (3 fail), users.list 3 times; db in
# every context, cache in 6 of them, whose teardown fails 3 times.
SHOP = [
    ctx(6, 0.01),
    ctx(6, 0.025),
    ctx(3, 0.1, **{"error.type": NOT_FOUND}),
    call("users.get", 12, 0.0025),
    call("users.get", 3, 0.05, **{"error.type": NOT_FOUND}),
    call("users.list", 3, 0.025),
    step("middleware", "setup", "auth", 15, 0.01),
    step("middleware", "setup", "timing", 15, 0.0005),
    step("middleware", "teardown", "timing", 12, 0.0005),
    step("middleware", "teardown", "timing", 3, 0.0005, **PROPAGATED),
    step("middleware", "teardown", "auth", 12, 0.001),
    step("middleware", "teardown", "auth", 3, 0.001, **PROPAGATED),
    step("resource", "setup", "db", 15, 0.005),
    step("resource", "setup", "cache", 6, 0.0005),
    step("resource", "teardown", "cache", 3, 0.001),
    step("resource", "teardown", "cache", 3, 0.001, **FAILED_TEARDOWN),
    step("resource", "teardown", "db", 12, 0.025),
    step("resource", "teardown", "db", 3, 0.025, **PROPAGATED),
]
# Another service, slower and failing: the $service filter must keep it out.
BILLING = [
    Group(replace(g.span, resource={"service.name": "billing"}), g.per_flush, g.le)
    for g in [
        ctx(30, 0.5, **{"error.type": "billing.Down"}),
        call("users.get", 30, 0.5, **{"error.type": "billing.Down"}),
        step("middleware", "setup", "auth", 30, 0.5),
        step("resource", "setup", "db", 30, 0.5),
        step(
            "resource", "teardown", "cache", 30, 0.5,
            **{"polydatum.outcome": "raised", "error.type": "billing.Down"},
        ),
    ]
]  # fmt: skip

#: What Grafana substitutes: $__rate_interval is 4 x the min step (the flush interval),
#: the range is 5 minutes, the service variable is "shop".
VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", '"$service"': '"shop"'}

#: Every query of the spans dashboard at 10m: (panel title, refId) -> samples.
#: Rates are spans per flush / 15 s; quantiles interpolate linearly in the bucket.
EXPECTED: dict[tuple[str, str], list[tuple[dict[str, str], float]]] = {
    ("Contexts / s", "A"): [({}, 1.0)],
    # 0.8/s up to 25 ms, 1/s up to 100 ms: p99 is 95 % into (50 ms, 100 ms].
    ("Context p99", "A"): [({}, 0.0975)],
    ("Error ratio", "A"): [({}, 0.2)],
    ("Suppressed teardown errors / s", "A"): [({}, 0.2)],
    ("Contexts / s by outcome", "A"): [
        ({"outcome": "ok"}, 0.8),
        ({"error_type": NOT_FOUND}, 0.2),
    ],
    ("Context duration p50 / p95 / p99", "A"): [({}, 0.01375)],
    ("Context duration p50 / p95 / p99", "B"): [({}, 0.0875)],
    ("Context duration p50 / p95 / p99", "C"): [({}, 0.0975)],
    ("p95 latency by method", "A"): [
        ({"polydatum_service_path": "users.get"}, 0.04375),
        ({"polydatum_service_path": "users.list"}, 0.02425),
    ],
    ("Errors / s by method and error.type", "A"): [
        ({"polydatum_service_path": "users.get", "error_type": NOT_FOUND}, 0.2),
    ],
    ("Service methods: calls, p50, p99, errors", "calls"): [
        ({"polydatum_service_path": "users.get"}, 1.0),
        ({"polydatum_service_path": "users.list"}, 0.2),
    ],
    ("Service methods: calls, p50, p99, errors", "p50"): [
        ({"polydatum_service_path": "users.get"}, 0.0019375),
        ({"polydatum_service_path": "users.list"}, 0.0175),
    ],
    ("Service methods: calls, p50, p99, errors", "p99"): [
        ({"polydatum_service_path": "users.get"}, 0.04875),
        ({"polydatum_service_path": "users.list"}, 0.02485),
    ],
    ("Service methods: calls, p50, p99, errors", "errors"): [
        ({"polydatum_service_path": "users.get"}, 60.0),
    ],
    ("Middleware setup p95", "A"): [
        ({"polydatum_middleware_name": "auth"}, 0.00975),
        ({"polydatum_middleware_name": "timing"}, 0.0004875),
    ],
    ("Middleware teardown p95", "A"): [
        ({"polydatum_middleware_name": "auth"}, 0.000975),
        ({"polydatum_middleware_name": "timing"}, 0.0004875),
    ],
    ("p99 by middleware phase", "A"): [
        ({"polydatum_middleware_name": "auth", "polydatum_phase": "setup"}, 0.00995),
        ({"polydatum_middleware_name": "auth", "polydatum_phase": "teardown"}, 0.000995),
        ({"polydatum_middleware_name": "timing", "polydatum_phase": "setup"}, 0.0004975),
        ({"polydatum_middleware_name": "timing", "polydatum_phase": "teardown"}, 0.0004975),
    ],
    ("p99 by resource phase", "A"): [
        ({"polydatum_resource_name": "db", "polydatum_phase": "setup"}, 0.004975),
        ({"polydatum_resource_name": "db", "polydatum_phase": "teardown"}, 0.02485),
        ({"polydatum_resource_name": "cache", "polydatum_phase": "setup"}, 0.0004975),
        ({"polydatum_resource_name": "cache", "polydatum_phase": "teardown"}, 0.000995),
    ],
    ("Resource setup p95", "A"): [
        ({"polydatum_resource_name": "db"}, 0.004875),
        ({"polydatum_resource_name": "cache"}, 0.0004875),
    ],
    ("Lazy creations per context", "A"): [
        ({"polydatum_resource_name": "db"}, 1.0),
        ({"polydatum_resource_name": "cache"}, 0.4),
    ],
    ("Resource teardown p95", "A"): [
        ({"polydatum_resource_name": "db"}, 0.02425),
        ({"polydatum_resource_name": "cache"}, 0.000975),
    ],
    ("Teardown errors / s by resource and error.type", "A"): [
        ({"polydatum_resource_name": "cache", "error_type": "ConnectionResetError"}, 0.2),
    ],
    ("Teardown errors in range", "A"): [
        ({"polydatum_resource_name": "cache", "error_type": "ConnectionResetError"}, 60.0),
    ],
}


def series_text(name: str, labels: Mapping[str, str]) -> str:
    body = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items()))
    return f"{name}{{{body}}}"


def input_series(groups: Sequence[Group], produced: Spanmetrics, flushes: int) -> list[Any]:
    """The connector's series for ``groups``: cumulative, one sample per flush."""
    counts: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
    sums: defaultdict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
    for group in groups:
        labels = connector_labels(group.span, produced)
        key = tuple(sorted(labels.items()))
        counts[produced.calls, key] += group.per_flush
        counts[f"{produced.duration}_count", key] += group.per_flush
        sums[f"{produced.duration}_sum", key] += group.per_flush * group.le
        assert group.le in produced.buckets
        for le in (*produced.buckets, float("inf")):
            # The exporter writes bounds as Go's shortest %g ("0.0001", "1", "+Inf").
            bound = "+Inf" if le == float("inf") else format(le, "g")
            bucket = tuple(sorted({**labels, "le": bound}.items()))
            counts[f"{produced.duration}_bucket", bucket] += group.per_flush * (group.le <= le)
        for event in group.span.events:
            assert produced.events is not None
            event_labels = connector_labels(group.span, produced, event)
            counts[produced.events, tuple(sorted(event_labels.items()))] += group.per_flush
    out = []
    for (name, key), per_flush in sorted({**counts, **sums}.items()):
        out.append({"series": series_text(name, dict(key)), "values": f"0+{per_flush}x{flushes}"})
    return out


def concrete(expr: str) -> str:
    for variable, value in VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr.replace('"$1"', ""), expr
    return expr


@pytest.mark.prometheus
def test_spans_queries_evaluate_to_exact_values(
    model: dict[str, Any], produced: Spanmetrics, tmp_path: Path
) -> None:
    """Every PromQL query of the spans dashboard, run by ``promtool test rules``, gives
    exactly the values worked out by hand in EXPECTED.

    The input series are shaped like the spanmetrics connector's output through the
    collector's Prometheus exporter (names, labels and buckets derived from
    otel-collector.yaml as in test 1, label values as polydatum names its spans), one
    sample per 15 s flush; they are written here, not produced by a collector: no
    collector binary runs in these tests.
    """
    promtool = require_binary("promtool")
    assert produced.flush_interval == "15s"
    queries = {(title, ref): expr for title, ref, expr, _ in targets(model)}
    assert sorted(queries) == sorted(EXPECTED)
    flushes = 60  # 15 minutes
    tests = [
        {
            "expr": concrete(queries[key]),
            "eval_time": "10m",
            "exp_samples": [
                {"labels": series_text("", labels), "value": value} for labels, value in samples
            ],
        }
        for key, samples in EXPECTED.items()
    ]
    spec = {
        "rule_files": [],
        "evaluation_interval": produced.flush_interval,
        "tests": [
            {
                "interval": produced.flush_interval,
                "input_series": input_series(SHOP + BILLING, produced, flushes),
                "promql_expr_test": tests,
            }
        ],
    }
    path = tmp_path / "spanmetrics.test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    done = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("SUCCESS")
