"""Build polydatum's Grafana dashboards as code and write the JSON Grafana provisions.

    pip install --group dashboards    # from a checkout (pip >= 25.1)
    python dashboards/build.py            # rewrites every dashboards/*.json it builds
    python dashboards/build.py --check    # exit 1 when a committed JSON is stale

A dashboard reads top to bottom, from "is it healthy" to "which middleware,
resource or method is the problem":

1. Health: context rate, p99 duration, error ratio, suppressed teardown errors,
   active contexts; rate by outcome and p50/p95/p99 over time.
2. Service methods: p95 latency and errors per DAL path, and a table ranking them.
3. Context middleware: setup and teardown p95 per middleware (the slow or misordered
   one stands out), and p99 of every middleware phase side by side.
4. Resources: lazy setup p95, how many contexts create each resource, teardown p95.
5. Suppressed teardown errors by resource and ``error.type``.
6. Traces (Tempo, TraceQL): the slowest contexts, contexts with suppressed teardown
   errors, failed contexts.

Every panel is written once, in :func:`build`; where its numbers come from is a
:class:`Source`, the parameter of :func:`build`:

* :data:`SDK` (``polydatum-overview.json``): polydatum's own instruments. Metric and
  label names are the ones the OpenTelemetry Prometheus exporter (and the collector's
  Prometheus exporter) produce for them: units become ``_seconds``, counters
  ``_total``, dots in attribute names become underscores
  (``polydatum.middleware.name`` -> ``polydatum_middleware_name``).
* :data:`SPANS` (``polydatum-spans.json``): the same panels from the series the
  collector's ``spanmetrics`` connector derives from the spans
  (instrumentation/collector/otel-collector.yaml), exported by the collector's
  Prometheus exporter: ``traces_span_metrics_calls_total`` and
  ``traces_span_metrics_duration_seconds_*`` per ``span_name`` with polydatum's span
  attributes as labels; the phase is read from the span name
  (``polydatum.middleware.setup auth``). It has no "Active contexts": a span is exported
  when it ends, so no series counts the contexts still open.

Datasources are ``$datasource`` / ``$tempo`` variables, so file provisioning works as is.
"""

from __future__ import annotations

import argparse
import json
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import bargauge, dashboard, prometheus, stat, table, tempo
from grafana_foundation_sdk.builders import timeseries as ts
from grafana_foundation_sdk.builders.common import ReduceDataOptions, VizLegendOptions
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    LegendDisplayMode,
    LegendPlacement,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DashboardLinkType,
    DataSourceRef,
    DataTransformerConfig,
    ThresholdsMode,
    VariableOption,
    VariableRefresh,
)
from grafana_foundation_sdk.models.dashboard import (
    Threshold as ThresholdStep,
)

HERE = Path(__file__).resolve().parent

PROM = DataSourceRef(type_val="prometheus", uid="${datasource}")
TEMPO = DataSourceRef(type_val="tempo", uid="${tempo}")

RATE = "$__rate_interval"

#: The step kinds a panel asks a source about.
KINDS = ("context", "middleware", "resource", "service")


# ------------------------------------------------------------------------ sources


class Source(ABC):
    """Where a dashboard's numbers come from: the series behind each kind of step.

    ``series(kind, "bucket" | "count", phase=..., errors=...)`` is the selector of a
    histogram's buckets or of the counter of finished steps of that kind (``kind`` is
    ``context``, ``middleware``, ``resource`` or ``service``), limited to one phase
    (``setup`` / ``teardown``) or to failed steps (``error_type!=""``).
    ``with_phase(kind, expr)`` is ``expr`` (an instant vector of such series) with a
    ``polydatum_phase`` label; ``teardown_errors()`` selects the counter of suppressed
    resource teardown errors; ``active()`` the gauge of open contexts, or ``None``
    when the source has none.
    """

    #: File name (in dashboards/), uid, title and tags of the dashboard.
    output: str
    uid: str
    title: str
    tags: tuple[str, ...]
    #: What the dashboard's description adds about the source.
    about: str
    #: The matcher every series is selected with (the dashboard's filter variable).
    selector: str
    #: The filter variable: name, label, the ``label_values`` query of its values.
    variable: tuple[str, str, str]
    #: The "Min step" of every query (``None``: the datasource's scrape interval).
    min_interval: str | None = None
    #: What "Suppressed teardown errors" counts, for the panels' descriptions.
    teardown_errors_what: str

    @abstractmethod
    def series(
        self, kind: str, suffix: str, *, phase: str | None = None, errors: bool = False
    ) -> str:
        """See the class docstring."""

    @abstractmethod
    def with_phase(self, kind: str, expr: str) -> str:
        """See the class docstring."""

    @abstractmethod
    def teardown_errors(self) -> str:
        """See the class docstring."""

    @abstractmethod
    def active(self) -> str | None:
        """See the class docstring."""


class SdkMetrics(Source):
    """polydatum's own instruments (``polydatum.context.duration``, ...): recorded in
    the process, exported by the OpenTelemetry Prometheus exporter or through OTLP and
    the collector's Prometheus exporter."""

    output = "polydatum-overview.json"
    uid = "polydatum-overview"
    title = "polydatum — data layer"
    tags = ("polydatum", "opentelemetry")
    about = (
        " From polydatum's own metrics; without the phase histograms "
        "(DataManager(step_metrics=False)) or metrics, see the spans dashboard."
    )
    selector = 'job=~"$job"'
    variable = ("job", "Job", "label_values(polydatum_context_duration_seconds_count, job)")
    teardown_errors_what = "Resource teardown errors polydatum suppressed (and recorded)."

    HISTOGRAMS = {
        "context": "polydatum_context_duration_seconds",
        "middleware": "polydatum_middleware_duration_seconds",
        "resource": "polydatum_resource_duration_seconds",
        "service": "polydatum_service_duration_seconds",
    }
    TEARDOWN_ERRORS = "polydatum_resource_teardown_errors_total"
    ACTIVE = "polydatum_context_active"

    def series(
        self, kind: str, suffix: str, *, phase: str | None = None, errors: bool = False
    ) -> str:
        matchers = [self.selector]
        if phase is not None:
            matchers.append(f'polydatum_phase="{phase}"')
        if errors:
            matchers.append('error_type!=""')
        return f"{self.HISTOGRAMS[kind]}_{suffix}{{{','.join(matchers)}}}"

    def with_phase(self, kind: str, expr: str) -> str:
        return expr  # the phase histograms carry polydatum_phase

    def teardown_errors(self) -> str:
        return f"{self.TEARDOWN_ERRORS}{{{self.selector}}}"

    def active(self) -> str | None:
        return f"{self.ACTIVE}{{{self.selector}}}"


def span_names(kind: str, phase: str | None = None) -> str:
    """The regex (a PromQL string's content) of the span names of one kind of step:
    polydatum names them ``polydatum.<kind>.<phase> <name>``."""
    return rf"polydatum\\.{kind}\\.{phase or '(setup|teardown)'} .+"


class SpanMetrics(Source):
    """The collector's ``spanmetrics`` connector: a call counter and a duration
    histogram per span name, kind, status and configured dimension (polydatum's span
    attributes), exported by the collector's Prometheus exporter. Nothing is recorded
    in the process; every span has to reach the collector."""

    output = "polydatum-spans.json"
    uid = "polydatum-spans"
    title = "polydatum — data layer (from spans)"
    tags = ("polydatum", "opentelemetry", "spanmetrics")
    about = (
        " From the spans, through the collector's spanmetrics connector: "
        "exact only when every span is exported (no head sampling)."
    )
    selector = 'service_name=~"$service"'
    variable = (
        "service",
        "Service",
        'label_values(traces_span_metrics_calls_total{span_name="polydatum.context"}, '
        "service_name)",
    )
    #: The connector's metrics_flush_interval: its series change once per flush, so
    #: every query steps at least that far and $__rate_interval spans four flushes.
    min_interval = "15s"
    teardown_errors_what = (
        "Resource teardowns that raised (their span has error.type); polydatum "
        "suppressed those errors."
    )

    CALLS = "traces_span_metrics_calls_total"
    DURATION = "traces_span_metrics_duration_seconds"

    def series(
        self, kind: str, suffix: str, *, phase: str | None = None, errors: bool = False
    ) -> str:
        name = f"{self.DURATION}_bucket" if suffix == "bucket" else self.CALLS
        if kind == "context":
            matchers = [self.selector, 'span_name="polydatum.context"']
        elif kind == "service":  # its span is named after the path, which it carries
            matchers = [self.selector, 'polydatum_service_path!=""']
        else:
            matchers = [self.selector, f'span_name=~"{span_names(kind, phase)}"']
        if errors:
            matchers.append('error_type!=""')
        return f"{name}{{{','.join(matchers)}}}"

    def with_phase(self, kind: str, expr: str) -> str:
        return f'label_replace({expr}, "polydatum_phase", "$1", "span_name", "{span_names(kind)}")'

    def teardown_errors(self) -> str:
        # A resource teardown that raised is one polydatum suppressed (a CommitError
        # aside, which ends the context instead).
        return self.series("resource", "count", phase="teardown", errors=True)

    def active(self) -> str | None:
        return None


SDK = SdkMetrics()
SPANS = SpanMetrics()
SOURCES: tuple[Source, ...] = (SDK, SPANS)


# ------------------------------------------------------------------------ helpers


def q(src: Source, expr: str, legend: str = "", ref: str = "A", *, instant: bool = False) -> Any:
    query = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(PROM)
    if legend:
        query = query.legend_format(legend)
    if src.min_interval is not None:
        query = query.interval(src.min_interval)
    if instant:
        from grafana_foundation_sdk.models.prometheus import PromQueryFormat

        query = query.instant().format(PromQueryFormat.TABLE)
    else:
        query = query.range()
    return query


def quantile(
    src: Source,
    phi: float,
    kind: str,
    by: str = "",
    *,
    phase: str | None = None,
    window: str = RATE,
) -> str:
    """``histogram_quantile`` of one kind of step, per ``by`` (comma-separated labels)."""
    labels = f"le, {by}" if by else "le"
    rate = f"rate({src.series(kind, 'bucket', phase=phase)}[{window}])"
    if "polydatum_phase" in by:
        rate = src.with_phase(kind, rate)
    return f"histogram_quantile({phi}, sum by ({labels}) ({rate}))"


def thresholds(*steps: tuple[float | None, str]) -> Any:
    builder = dashboard.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE)
    return builder.steps([ThresholdStep(value=v, color=c) for v, c in steps])


def legend_table(*calcs: str) -> Any:
    return (
        VizLegendOptions()
        .display_mode(LegendDisplayMode.TABLE)
        .placement(LegendPlacement.RIGHT)
        .show_legend(True)
        .calcs(list(calcs))
    )


def graph(title: str, description: str, unit: str, *queries: Any, width: int = 12) -> Any:
    panel = (
        ts.Panel()
        .title(title)
        .description(description)
        .datasource(PROM)
        .unit(unit)
        .span(width)
        .height(8)
        .line_width(1)
        .fill_opacity(8)
        .legend(legend_table("mean", "max", "lastNotNull"))
    )
    for query in queries:
        panel = panel.with_target(query)
    return panel


def big(
    src: Source, title: str, description: str, unit: str, expr: str, steps: Any, width: int
) -> Any:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(PROM)
        .unit(unit)
        .span(width)
        .height(4)
        .graph_mode(BigValueGraphMode.AREA)
        .color_mode(BigValueColorMode.BACKGROUND)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]))
        .thresholds(steps)
        .with_target(q(src, expr))
    )


def ranked(src: Source, title: str, description: str, unit: str, expr: str, legend: str) -> Any:
    """A horizontal bar gauge of an instant query: the largest value stands out."""
    return (
        bargauge.Panel()
        .title(title)
        .description(description)
        .datasource(PROM)
        .unit(unit)
        .span(12)
        .height(8)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]))
        .thresholds(thresholds((None, "green"), (0.01, "yellow"), (0.1, "red")))
        .with_target(q(src, expr, legend))
    )


def traces(title: str, description: str, traceql: str, width: int = 8) -> Any:
    query = (
        tempo.TempoQuery()
        .ref_id("A")
        .datasource(TEMPO)
        .query_type("traceql")
        .query(traceql)
        .limit(20)
    )
    return (
        table.Panel()
        .title(title)
        .description(description)
        .datasource(TEMPO)
        .span(width)
        .height(9)
        .with_target(query)
    )


# ---------------------------------------------------------------------- dashboard


def build(src: Source = SDK) -> Any:
    """The dashboard model (grafana-foundation-sdk ``Dashboard``) of one source."""
    contexts = src.series("context", "count")
    ok_or_error = (
        f"label_replace(sum by (error_type) (rate({contexts}[{RATE}])), "
        '"outcome", "ok", "error_type", "")'
    )
    error_ratio = (
        f"(sum(rate({src.series('context', 'count', errors=True)}[{RATE}])) or vector(0))"
        f" / sum(rate({contexts}[{RATE}]))"
    )
    contexts_per_s = f"sum(rate({contexts}[{RATE}]))"
    calls = src.series("service", "count")
    failed_calls = src.series("service", "count", errors=True)
    teardown_errors = src.teardown_errors()
    active = src.active()
    # The health stats fill the row: four or five of them, as the source has.
    stat_width = 4 if active is not None else 6

    method_table = (
        table.Panel()
        .title("Service methods: calls, p50, p99, errors")
        .description("One row per DAL path over the selected range; sort by a column.")
        .datasource(PROM)
        .span(24)
        .height(8)
        .with_target(
            q(
                src,
                f"sum by (polydatum_service_path) (rate({calls}[$__range]))",
                ref="calls",
                instant=True,
            )
        )
        .with_target(
            q(
                src,
                quantile(src, 0.5, "service", "polydatum_service_path", window="$__range"),
                ref="p50",
                instant=True,
            )
        )
        .with_target(
            q(
                src,
                quantile(src, 0.99, "service", "polydatum_service_path", window="$__range"),
                ref="p99",
                instant=True,
            )
        )
        .with_target(
            q(
                src,
                f"sum by (polydatum_service_path) (increase({failed_calls}[$__range]))",
                ref="errors",
                instant=True,
            )
        )
        .with_transformation(DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True},
                    "renameByName": {
                        "polydatum_service_path": "method",
                        "Value #calls": "calls/s",
                        "Value #p50": "p50 (s)",
                        "Value #p99": "p99 (s)",
                        "Value #errors": "errors in range",
                    },
                },
            )
        )
    )

    name, label, values = src.variable
    builder = (
        dashboard.Dashboard(src.title)
        .uid(src.uid)
        .description(
            "polydatum contexts, middleware, resources and service methods: from "
            "'is it healthy' (top) to 'which step is the problem' (bottom)." + src.about
        )
        .tags(list(src.tags))
        .links(
            [
                dashboard.DashboardLink(other.title)
                .type(DashboardLinkType.LINK)
                .url(f"/d/{other.uid}")
                .keep_time(True)
                for other in SOURCES
                if other is not src
            ]
        )
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .with_variable(
            dashboard.DatasourceVariable("datasource")
            .label("Prometheus")
            .type("prometheus")
            .current(VariableOption(selected=True, text="Prometheus", value="prometheus"))
        )
        .with_variable(
            dashboard.DatasourceVariable("tempo")
            .label("Tempo")
            .type("tempo")
            .current(VariableOption(selected=True, text="Tempo", value="tempo"))
        )
        .with_variable(
            dashboard.QueryVariable(name)
            .label(label)
            .datasource(PROM)
            .query(values)
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .include_all(True)
            .all_value(".*")
            .multi(True)
            .current(VariableOption(selected=True, text="All", value="$__all"))
        )
        .with_variable(
            dashboard.CustomVariable("slow")
            .label("Slow context")
            .values("10ms,25ms,100ms,250ms,1s")
            .current(VariableOption(selected=True, text="25ms", value="25ms"))
        )
        # -- 1. is it healthy ---------------------------------------------------------
        .with_row(dashboard.Row("Is it healthy?"))
        .with_panel(
            big(
                src,
                "Contexts / s",
                "Request contexts finished per second (every outcome).",
                "reqps",
                contexts_per_s,
                thresholds((None, "blue")),
                stat_width,
            )
        )
        .with_panel(
            big(
                src,
                "Context p99",
                "99th percentile of context duration: enter to the end of teardown.",
                "s",
                quantile(src, 0.99, "context"),
                thresholds((None, "green"), (0.25, "yellow"), (1.0, "red")),
                stat_width,
            )
        )
        .with_panel(
            big(
                src,
                "Error ratio",
                "Share of contexts that raised out of the `with` block.",
                "percentunit",
                error_ratio,
                thresholds((None, "green"), (0.01, "yellow"), (0.05, "red")),
                stat_width,
            )
        )
        .with_panel(
            big(
                src,
                "Suppressed teardown errors / s",
                src.teardown_errors_what,
                "short",
                f"sum(rate({teardown_errors}[{RATE}])) or vector(0)",
                thresholds((None, "green"), (0.001, "yellow"), (0.1, "red")),
                stat_width,
            )
        )
    )
    if active is not None:
        builder = builder.with_panel(
            big(
                src,
                "Active contexts",
                "Contexts entered and not yet exited (a leak grows without bound).",
                "short",
                f"sum({active})",
                thresholds((None, "green"), (100, "yellow"), (1000, "red")),
                8,
            )
        )
    builder = (
        builder.with_panel(
            graph(
                "Contexts / s by outcome",
                "ok, or the error.type raised out of the context.",
                "reqps",
                q(src, ok_or_error, "{{outcome}}{{error_type}}"),
            )
        )
        .with_panel(
            graph(
                "Context duration p50 / p95 / p99",
                "Percentiles of the whole context, from histogram buckets (0.1 ms to 10 s).",
                "s",
                q(src, quantile(src, 0.5, "context"), "p50", "A"),
                q(src, quantile(src, 0.95, "context"), "p95", "B"),
                q(src, quantile(src, 0.99, "context"), "p99", "C"),
            )
        )
        # -- 2. service methods ---------------------------------------------------------
        .with_row(dashboard.Row("Service methods"))
        .with_panel(
            graph(
                "p95 latency by method",
                "Each DAL path (service.method); nested calls include their children.",
                "s",
                q(
                    src,
                    quantile(src, 0.95, "service", "polydatum_service_path"),
                    "{{polydatum_service_path}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Errors / s by method and error.type",
                "Service calls that raised, by DAL path and exception type.",
                "short",
                q(
                    src,
                    f"sum by (polydatum_service_path, error_type) (rate({failed_calls}[{RATE}]))",
                    "{{polydatum_service_path}} {{error_type}}",
                ),
            )
        )
        .with_panel(method_table)
        # -- 3. context middleware ------------------------------------------------------
        .with_row(dashboard.Row("Context middleware"))
        .with_panel(
            graph(
                "Middleware setup p95",
                "Setup runs in registration order before the context is active.",
                "s",
                q(
                    src,
                    quantile(src, 0.95, "middleware", "polydatum_middleware_name", phase="setup"),
                    "{{polydatum_middleware_name}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Middleware teardown p95",
                "Teardown runs in reverse order, before resources are torn down.",
                "s",
                q(
                    src,
                    quantile(
                        src, 0.95, "middleware", "polydatum_middleware_name", phase="teardown"
                    ),
                    "{{polydatum_middleware_name}}",
                ),
            )
        )
        .with_panel(
            ranked(
                src,
                "p99 by middleware phase",
                "The slow middleware phase is the longest bar.",
                "s",
                quantile(src, 0.99, "middleware", "polydatum_middleware_name, polydatum_phase"),
                "{{polydatum_middleware_name}} {{polydatum_phase}}",
            )
        )
        .with_panel(
            ranked(
                src,
                "p99 by resource phase",
                "Lazy setup and teardown of each resource.",
                "s",
                quantile(src, 0.99, "resource", "polydatum_resource_name, polydatum_phase"),
                "{{polydatum_resource_name}} {{polydatum_phase}}",
            )
        )
        # -- 4. resources ---------------------------------------------------------------
        .with_row(dashboard.Row("Resources"))
        .with_panel(
            graph(
                "Resource setup p95",
                "Resources are set up lazily, on first use inside a context.",
                "s",
                q(
                    src,
                    quantile(src, 0.95, "resource", "polydatum_resource_name", phase="setup"),
                    "{{polydatum_resource_name}}",
                ),
                width=8,
            )
        )
        .with_panel(
            graph(
                "Lazy creations per context",
                "Share of contexts that created each resource (1 = every context).",
                "percentunit",
                q(
                    src,
                    "sum by (polydatum_resource_name) "
                    f"(rate({src.series('resource', 'count', phase='setup')}[{RATE}]))"
                    f" / scalar({contexts_per_s})",
                    "{{polydatum_resource_name}}",
                ),
                width=8,
            )
        )
        .with_panel(
            graph(
                "Resource teardown p95",
                "Teardown commits/rolls back and closes; most recently created first.",
                "s",
                q(
                    src,
                    quantile(src, 0.95, "resource", "polydatum_resource_name", phase="teardown"),
                    "{{polydatum_resource_name}}",
                ),
                width=8,
            )
        )
        # -- 5. suppressed teardown errors -------------------------------------------
        .with_row(dashboard.Row("Suppressed teardown errors"))
        .with_panel(
            graph(
                "Teardown errors / s by resource and error.type",
                "Errors a resource raised while tearing down: suppressed so that every "
                "other resource still tears down, and recorded here.",
                "short",
                q(
                    src,
                    "sum by (polydatum_resource_name, error_type) "
                    f"(rate({teardown_errors}[{RATE}]))",
                    "{{polydatum_resource_name}} {{error_type}}",
                ),
                width=16,
            )
        )
        .with_panel(
            table.Panel()
            .title("Teardown errors in range")
            .description("Total per resource and error.type over the selected range.")
            .datasource(PROM)
            .span(8)
            .height(8)
            .with_target(
                q(
                    src,
                    "sum by (polydatum_resource_name, error_type) "
                    f"(increase({teardown_errors}[$__range]))",
                    instant=True,
                )
            )
            .with_transformation(
                DataTransformerConfig(
                    id_val="organize",
                    options={
                        "excludeByName": {"Time": True},
                        "renameByName": {
                            "polydatum_resource_name": "resource",
                            "error_type": "error.type",
                            "Value": "errors",
                        },
                    },
                )
            )
        )
        # -- 6. traces ------------------------------------------------------------------
        .with_row(dashboard.Row("Traces (Tempo)"))
        .with_panel(
            traces(
                "Slowest contexts (over $slow)",
                "Context spans longer than the 'Slow context' variable; open one for its "
                "waterfall.",
                '{ name = "polydatum.context" && duration > $slow }',
            )
        )
        .with_panel(
            traces(
                "Contexts with suppressed teardown errors",
                "The context span carries polydatum.teardown_errors (a count).",
                '{ name = "polydatum.context" && span.polydatum.teardown_errors > 0 }',
            )
        )
        .with_panel(
            traces(
                "Failed contexts",
                "Contexts whose exception left the `with` block.",
                '{ name = "polydatum.context" && status = error }',
            )
        )
    )
    return builder.build()


def render(src: Source = SDK) -> str:
    """The dashboard JSON, exactly as committed (stable key order, trailing newline)."""
    payload = json.loads(json.dumps(build(src), cls=JSONEncoder))
    # Stable, unique panel ids (the builder leaves them unset, rows at 0): Grafana
    # links to a panel by id (viewPanel=3), so they must not change between builds.
    for number, panel in enumerate(payload["panels"], start=1):
        panel["id"] = number
    return json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def prometheus_queries(model: dict[str, Any]) -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` for every Prometheus target of a dashboard JSON model."""
    out = []
    for panel in model.get("panels", []):
        for target in panel.get("targets", []) or []:
            if "expr" in target:
                out.append((panel["title"], target["expr"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when a JSON is stale")
    args = parser.parse_args(argv)
    stale = []
    for src in SOURCES:
        output = HERE / src.output
        text = render(src)
        if args.check:
            if not output.exists() or output.read_text(encoding="utf-8") != text:
                stale.append(output.name)
            continue
        output.write_text(text, encoding="utf-8")
        print(f"wrote {output}")
    for name in stale:
        print(f"{name} is stale: run python dashboards/build.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
