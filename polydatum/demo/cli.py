"""``polydatum demo``: run the bookstore and show what polydatum recorded.

Prints, after a progress bar: the outcome of the requests, whether SQL statements were
traced (and if not, why: the ``sql-tracing`` extra missing, a version conflict, the
environment; and which attribute names their spans carry), a latency table (p50 /
p95 / p99 / max per middleware phase, resource phase and service method, in the
order the steps first ran), the suppressed teardown errors, and the waterfall of the
most instructive request. ``--json`` prints the same as one JSON document.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from polydatum.demo.runner import (
    DemoConfig,
    DemoError,
    DemoResult,
    StepStats,
    quiet_logging,
    run,
)
from polydatum.waterfall import contexts, emit, render, to_dict

__all__ = ["cmd_demo", "main", "register_cli", "summary_renderables", "to_json"]

_KIND_TITLE = {
    "context": "Context",
    "middleware": "Context middleware",
    "resource": "Resources",
    "service": "Service methods",
}


def _ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} µs"
    return f"{value:.2f} ms" if value < 100 else f"{value:.0f} ms"


def _ordered(steps: list[StepStats]) -> list[StepStats]:
    """Group by kind; middleware setups in order, then teardowns (reverse order)."""
    rank = {"context": 0, "middleware": 1, "resource": 2, "service": 3}
    phase_rank = {"setup": 0, "teardown": 1}

    def key(s: StepStats) -> tuple[int, int, int, str]:
        # Middleware and resources in the order they first ran; methods by DAL path.
        order = 0 if s.kind == "service" else s.order
        return rank.get(s.kind, 9), phase_rank.get(s.phase, 0), order, s.name

    return sorted(steps, key=key)


def summary_renderables(result: DemoResult) -> list[Any]:
    """The summary as rich renderables (table, errors, waterfall)."""
    from rich.table import Table
    from rich.text import Text

    items: list[Any] = []
    rate = result.requests / result.elapsed_s if result.elapsed_s > 0 else 0.0
    head = Text()
    head.append("polydatum demo", style="bold")
    head.append(f" · {result.requests} requests in {result.elapsed_s:.2f} s ({rate:.0f}/s)")
    head.append(f" · {result.database}", style="dim")
    if result.interrupted:
        head.append(" · interrupted", style="yellow")
    items.append(head)
    outcome = Text("outcomes: ")
    for i, (name, count) in enumerate(sorted(result.outcomes.items(), key=lambda kv: -kv[1])):
        if i:
            outcome.append(", ")
        outcome.append(
            f"{name.rsplit('.', 1)[-1]} {count}", style="green" if name == "ok" else "red"
        )
    items.append(outcome)
    if result.sql_statement_spans:
        items.append(Text(result.sql_statement_spans, style="dim"))
    if result.metrics_url:
        items.append(Text(f"metrics served at {result.metrics_url}", style="dim"))

    table = Table(title="Latency by step", title_justify="left", title_style="bold", box=None)
    table.add_column("step", no_wrap=True)
    table.add_column("phase", style="dim")
    for column in ("count", "p50", "p95", "p99", "max", "errors"):
        table.add_column(column, justify="right", no_wrap=True)
    previous_kind = None
    for stats in _ordered(result.steps):
        if stats.kind != previous_kind:
            if previous_kind is not None:
                table.add_section()
            table.add_row(Text(_KIND_TITLE.get(stats.kind, stats.kind), style="bold"))
            previous_kind = stats.kind
        s = stats.summary()
        p99_style = "bold yellow" if s["p99_ms"] >= 5 else ""
        table.add_row(
            f"  {stats.name}",
            stats.phase if stats.kind != "service" and stats.kind != "context" else "",
            str(s["count"]),
            _ms(s["p50_ms"]),
            _ms(s["p95_ms"]),
            Text(_ms(s["p99_ms"]), style=p99_style),
            _ms(s["max_ms"]),
            Text(str(s["errors"]), style="red" if s["errors"] else "dim"),
        )
    items.append(Text(""))
    items.append(table)

    items.append(Text(""))
    total_errors = sum(result.teardown_errors.values())
    if total_errors:
        items.append(
            Text(
                f"Suppressed teardown errors: {total_errors} "
                "(the with block still succeeded; each was logged, counted and traced)",
                style="bold yellow",
            )
        )
        for (resource, etype), count in sorted(result.teardown_errors.items()):
            items.append(Text(f"  ⚠ {resource}: {etype}: {count}", style="yellow"))
    else:
        items.append(Text("Suppressed teardown errors: none", style="bold green"))

    found = contexts(result.waterfall_spans)
    if found:
        step = found[0]
        items.append(Text(""))
        request = step.attributes.get("polydatum.meta.request_id", "")
        user = step.attributes.get("polydatum.meta.user", "anonymous")
        items.append(Text(f"Waterfall of {request} (user {user})", style="bold"))
        items.append(lambda width: render(step, width=width))
    return items


def to_json(result: DemoResult) -> dict[str, Any]:
    """The summary as JSON-ready data."""
    found = contexts(result.waterfall_spans)
    return {
        "requests": result.requests,
        "elapsed_s": round(result.elapsed_s, 3),
        "database": result.database,
        "outcomes": result.outcomes,
        "latency": [s.summary() for s in _ordered(result.steps)],
        "teardown_errors": [
            {"resource": r, "error_type": e, "count": c}
            for (r, e), c in sorted(result.teardown_errors.items())
        ],
        "waterfall": to_dict(found[0]) if found else None,
        "metrics_url": result.metrics_url,
        "sql_statement_spans": result.sql_statement_spans,
    }


def cmd_demo(args: argparse.Namespace) -> int:
    from polydatum.cli import CliError

    config = DemoConfig(
        requests=args.requests,
        database_url=args.database_url,
        otlp_endpoint=args.otlp_endpoint,
        prometheus_port=args.prometheus_port,
        prometheus_host=args.prometheus_host,
        duration=args.duration,
        rate=args.rate,
        seed=args.seed,
        cache_failure_rate=args.cache_failure_rate,
    )
    quiet_logging()
    progress_bar: Any = None
    task: Any = None
    if sys.stderr.isatty() and not args.json:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        progress_bar = Progress(
            TextColumn("[bold]requests"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(file=sys.stderr),
            transient=True,
        )
        task = progress_bar.add_task("requests", total=config.requests)

    def progress(done: int, total: int | None) -> None:
        if progress_bar is not None:
            progress_bar.update(task, completed=done, total=total)

    def announce(url: str) -> None:
        print(f"serving {url}; Ctrl-C to stop", file=sys.stderr, flush=True)

    try:
        if progress_bar is not None:
            with progress_bar:
                result = run(config, progress, announce=announce)
        else:
            result = run(config, progress, announce=announce)
    except DemoError as error:
        raise CliError(str(error)) from None
    if args.json:
        print(json.dumps(to_json(result), indent=2, ensure_ascii=False))
    else:
        emit(summary_renderables(result), width=args.width)
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``polydatum demo`` to the ``polydatum`` command (see :mod:`polydatum.cli`)."""
    p = subparsers.add_parser(
        "demo",
        help="run the example bookstore and show its telemetry",
        description="Run the bundled bookstore application (nested services, auth, "
        "transaction and timing middleware, a SQL database, the safe and a flaky cache) "
        "and print per-step latencies, suppressed teardown errors and one request's "
        "waterfall.",
    )
    p.add_argument("--requests", type=int, default=500, help="requests to run (default 500)")
    p.add_argument(
        "--database-url",
        default=None,
        help="SQLAlchemy URL (default: $POLYDATUM_DATABASE_URL or sqlite:///polydatum.db); "
        "e.g. postgresql+psycopg://user@host/db",
    )
    p.add_argument(
        "--otlp-endpoint",
        default=None,
        help="export traces and metrics over OTLP/HTTP, e.g. http://localhost:4318",
    )
    p.add_argument(
        "--prometheus-port",
        type=int,
        default=None,
        help="serve /metrics on this port and keep sending traffic until interrupted",
    )
    p.add_argument("--prometheus-host", default="127.0.0.1", help="address for /metrics")
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="with --prometheus-port: stop after this many seconds",
    )
    p.add_argument(
        "--rate", type=float, default=50.0, help="requests/s after --requests when serving"
    )
    p.add_argument("--seed", type=int, default=7, help="random seed (same seed, same run)")
    p.add_argument(
        "--cache-failure-rate",
        type=float,
        default=0.05,
        help="probability that the cache's teardown fails (default 0.05)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--width", type=int, default=None, help="output width in columns")
    p.set_defaults(func=cmd_demo)


def main(argv: list[str] | None = None) -> int:
    """``python -m polydatum.demo``: the same as ``polydatum demo``."""
    from polydatum.cli import main as cli_main

    return cli_main(["demo", *(argv if argv is not None else sys.argv[1:])])
