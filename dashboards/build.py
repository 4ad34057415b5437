"""Build polydatum's Grafana dashboard as code and write the JSON Grafana provisions.

    pip install 'polydatum[dashboards]'
    python dashboards/build.py            # rewrites dashboards/polydatum-overview.json
    python dashboards/build.py --check    # exit 1 when the committed JSON is stale

The dashboard reads top to bottom, from "is it healthy" to "which middleware,
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

Metric and label names are the ones the OpenTelemetry Prometheus exporter (and the
collector's Prometheus exporter) produce for polydatum's instruments: units become
``_seconds``, counters ``_total``, dots in attribute names become underscores
(``polydatum.middleware.name`` -> ``polydatum_middleware_name``). Datasources are
``$datasource`` / ``$tempo`` variables, so file provisioning works as is.
"""

from __future__ import annotations

import argparse
import json
import sys
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
OUTPUT = HERE / "polydatum-overview.json"
UID = "polydatum-overview"

PROM = DataSourceRef(type_val="prometheus", uid="${datasource}")
TEMPO = DataSourceRef(type_val="tempo", uid="${tempo}")

SEL = 'job=~"$job"'
RATE = "$__rate_interval"

CTX = "polydatum_context_duration_seconds"
MW = "polydatum_middleware_duration_seconds"
RES = "polydatum_resource_duration_seconds"
SVC = "polydatum_service_duration_seconds"
TEARDOWN_ERRORS = "polydatum_resource_teardown_errors_total"
ACTIVE = "polydatum_context_active"


# ------------------------------------------------------------------------ helpers


def q(expr: str, legend: str = "", ref: str = "A", *, instant: bool = False) -> Any:
    query = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(PROM)
    if legend:
        query = query.legend_format(legend)
    if instant:
        from grafana_foundation_sdk.models.prometheus import PromQueryFormat

        query = query.instant().format(PromQueryFormat.TABLE)
    else:
        query = query.range()
    return query


def quantile(phi: float, metric: str, by: str = "", extra: str = "") -> str:
    labels = f"le, {by}" if by else "le"
    sel = f"{SEL},{extra}" if extra else SEL
    return f"histogram_quantile({phi}, sum by ({labels}) (rate({metric}_bucket{{{sel}}}[{RATE}])))"


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


def big(title: str, description: str, unit: str, expr: str, steps: Any, width: int = 4) -> Any:
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
        .with_target(q(expr))
    )


def ranked(title: str, description: str, unit: str, expr: str, legend: str) -> Any:
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
        .with_target(q(expr, legend))
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


def build() -> Any:
    """The dashboard model (grafana-foundation-sdk ``Dashboard``)."""
    ok_or_error = (
        f"label_replace(sum by (error_type) (rate({CTX}_count{{{SEL}}}[{RATE}])), "
        '"outcome", "ok", "error_type", "")'
    )
    error_ratio = (
        f'(sum(rate({CTX}_count{{{SEL},error_type!=""}}[{RATE}])) or vector(0))'
        f" / sum(rate({CTX}_count{{{SEL}}}[{RATE}]))"
    )
    contexts_per_s = f"sum(rate({CTX}_count{{{SEL}}}[{RATE}]))"

    method_table = (
        table.Panel()
        .title("Service methods: calls, p50, p99, errors")
        .description("One row per DAL path over the selected range; sort by a column.")
        .datasource(PROM)
        .span(24)
        .height(8)
        .with_target(
            q(
                f"sum by (polydatum_service_path) (rate({SVC}_count{{{SEL}}}[$__range]))",
                ref="calls",
                instant=True,
            )
        )
        .with_target(
            q(
                "histogram_quantile(0.5, sum by (le, polydatum_service_path) "
                f"(rate({SVC}_bucket{{{SEL}}}[$__range])))",
                ref="p50",
                instant=True,
            )
        )
        .with_target(
            q(
                "histogram_quantile(0.99, sum by (le, polydatum_service_path) "
                f"(rate({SVC}_bucket{{{SEL}}}[$__range])))",
                ref="p99",
                instant=True,
            )
        )
        .with_target(
            q(
                "sum by (polydatum_service_path) "
                f'(increase({SVC}_count{{{SEL},error_type!=""}}[$__range]))',
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

    builder = (
        dashboard.Dashboard("polydatum — data layer")
        .uid(UID)
        .description(
            "polydatum contexts, middleware, resources and service methods: from "
            "'is it healthy' (top) to 'which step is the problem' (bottom)."
        )
        .tags(["polydatum", "opentelemetry"])
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
            dashboard.QueryVariable("job")
            .label("Job")
            .datasource(PROM)
            .query(f"label_values({CTX}_count, job)")
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
                "Contexts / s",
                "Request contexts finished per second (every outcome).",
                "reqps",
                contexts_per_s,
                thresholds((None, "blue")),
            )
        )
        .with_panel(
            big(
                "Context p99",
                "99th percentile of context duration: enter to the end of teardown.",
                "s",
                quantile(0.99, CTX),
                thresholds((None, "green"), (0.25, "yellow"), (1.0, "red")),
            )
        )
        .with_panel(
            big(
                "Error ratio",
                "Share of contexts that raised out of the `with` block.",
                "percentunit",
                error_ratio,
                thresholds((None, "green"), (0.01, "yellow"), (0.05, "red")),
            )
        )
        .with_panel(
            big(
                "Suppressed teardown errors / s",
                "Resource teardown errors polydatum suppressed (and recorded).",
                "short",
                f"sum(rate({TEARDOWN_ERRORS}{{{SEL}}}[{RATE}])) or vector(0)",
                thresholds((None, "green"), (0.001, "yellow"), (0.1, "red")),
            )
        )
        .with_panel(
            big(
                "Active contexts",
                "Contexts entered and not yet exited (a leak grows without bound).",
                "short",
                f"sum({ACTIVE}{{{SEL}}})",
                thresholds((None, "green"), (100, "yellow"), (1000, "red")),
                width=8,
            )
        )
        .with_panel(
            graph(
                "Contexts / s by outcome",
                "ok, or the error.type raised out of the context.",
                "reqps",
                q(ok_or_error, "{{outcome}}{{error_type}}"),
            )
        )
        .with_panel(
            graph(
                "Context duration p50 / p95 / p99",
                "Percentiles of the whole context, from histogram buckets (0.1 ms to 10 s).",
                "s",
                q(quantile(0.5, CTX), "p50", "A"),
                q(quantile(0.95, CTX), "p95", "B"),
                q(quantile(0.99, CTX), "p99", "C"),
            )
        )
        # -- 2. service methods ---------------------------------------------------------
        .with_row(dashboard.Row("Service methods"))
        .with_panel(
            graph(
                "p95 latency by method",
                "Each DAL path (service.method); nested calls include their children.",
                "s",
                q(quantile(0.95, SVC, "polydatum_service_path"), "{{polydatum_service_path}}"),
            )
        )
        .with_panel(
            graph(
                "Errors / s by method and error.type",
                "Service calls that raised, by DAL path and exception type.",
                "short",
                q(
                    "sum by (polydatum_service_path, error_type) "
                    f'(rate({SVC}_count{{{SEL},error_type!=""}}[{RATE}]))',
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
                    quantile(0.95, MW, "polydatum_middleware_name", 'polydatum_phase="setup"'),
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
                    quantile(0.95, MW, "polydatum_middleware_name", 'polydatum_phase="teardown"'),
                    "{{polydatum_middleware_name}}",
                ),
            )
        )
        .with_panel(
            ranked(
                "p99 by middleware phase",
                "The slow middleware phase is the longest bar.",
                "s",
                quantile(0.99, MW, "polydatum_middleware_name, polydatum_phase"),
                "{{polydatum_middleware_name}} {{polydatum_phase}}",
            )
        )
        .with_panel(
            ranked(
                "p99 by resource phase",
                "Lazy setup and teardown of each resource.",
                "s",
                quantile(0.99, RES, "polydatum_resource_name, polydatum_phase"),
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
                    quantile(0.95, RES, "polydatum_resource_name", 'polydatum_phase="setup"'),
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
                    "sum by (polydatum_resource_name) "
                    f'(rate({RES}_count{{{SEL},polydatum_phase="setup"}}[{RATE}]))'
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
                    quantile(0.95, RES, "polydatum_resource_name", 'polydatum_phase="teardown"'),
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
                    "sum by (polydatum_resource_name, error_type) "
                    f"(rate({TEARDOWN_ERRORS}{{{SEL}}}[{RATE}]))",
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
                    "sum by (polydatum_resource_name, error_type) "
                    f"(increase({TEARDOWN_ERRORS}{{{SEL}}}[$__range]))",
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


def render() -> str:
    """The dashboard JSON, exactly as committed (stable key order, trailing newline)."""
    payload = json.loads(json.dumps(build(), cls=JSONEncoder))
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
    parser.add_argument("--check", action="store_true", help="fail when the JSON is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT.name} is stale: run python dashboards/build.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
