"""Core overhead benchmark: this checkout vs polydatum 0.9.1 vs hand-written OpenTelemetry.

Run it from the repository root::

    .venv/bin/python benchmarks/bench_core.py            # full run, a table of ratios
    .venv/bin/python benchmarks/bench_core.py --json     # the same, as JSON on stdout
    .venv/bin/python benchmarks/bench_core.py --quick    # seconds; structure only, no verdict

What it measures, in one run (see benchmarks/README.md for the reasoning):

* **idle** -- no OpenTelemetry SDK configured, structlog filtering below WARNING:
  polydatum shape A and B each vs polydatum 0.9.1 doing the same work (target <= 0.6x).
* **tracing** -- an SDK ``TracerProvider`` with a ``BatchSpanProcessor`` and an
  exporter that drops: polydatum A vs the same six spans written by hand with
  ``tracer.start_as_current_span`` around the same work (target <= 1.0x).
* **everything** -- tracing as above, an SDK ``MeterProvider`` with an
  ``InMemoryMetricReader`` (one per contender), structlog JSON at INFO to /dev/null:
  polydatum A vs shape A written by hand with the same six spans, the same six metric
  samples (the same instruments, attributes and exemplar filter) and the same
  canonical INFO line (target <= 1.05x); and ``DataManager(step_metrics=False)`` vs
  the hand-written equivalent of what it then records (the six spans, the context and
  call samples, the same line; target <= 1.05x). ``everything_check`` verifies before
  timing that each pair records the same spans, metric points and log lines. Also
  reported, for information: both against the old reference (six spans and a 3-field
  INFO line, no metrics; the old target 1.3x).
* **memory** -- 100,000 sequential contexts (idle and everything on): no context
  object survives ``gc.collect()`` and less than 1 MB stays allocated (tracemalloc).

Method: machines are shared and noisy, so only ratios measured side by side mean
anything. Every condition runs ``--rounds`` rounds; in each round every contender
times one batch of requests, in an order that rotates from round to round. polydatum
0.9.1 has the same import name as this checkout, so it runs in its own virtualenv
(``.bench-venv-091``, created on first use: ``pip install polydatum==0.9.1`` plus
werkzeug and six) in a child process that runs a batch when the parent tells it to
(``_legacy_runner.py``), so that its batches interleave with ours. Reported: the
median and minimum per-request time of each contender, and for each comparison the
ratio of the medians (the verdict), the ratio of the minimums and the median of the
per-round ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import io
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

import _workloads  # noqa: E402
import structlog  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import (  # noqa: E402
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

import polydatum  # noqa: E402
from polydatum import DataManager, Service  # noqa: E402
from polydatum.telemetry import configure_logging  # noqa: E402

LEGACY_VERSION = "0.9.1"
#: What the 0.9.1 virtualenv gets. 0.9.1 imports werkzeug's LocalStack and six without
#: declaring them; werkzeug 2.3 is the line the benchmark pins (LocalStack works on
#: 2.3, 3.0 and 3.1 alike; pinning keeps the comparator stable between runs).
LEGACY_REQUIREMENTS = (f"polydatum=={LEGACY_VERSION}", "werkzeug>=2.3,<2.4", "six")
DEFAULT_VENV = ROOT / ".bench-venv-091"
PROBE = "import importlib.metadata as m; print(m.version('polydatum'))"
RUNNER = HERE / "_legacy_runner.py"

MEMORY_LIMIT_BYTES = 1024 * 1024
TARGETS = {"idle": 0.6, "tracing": 1.0, "everything": 1.05}
#: The everything-on target against the old reference (no metrics, a 3-field line).
OLD_EVERYTHING_TARGET = 1.3

#: polydatum A with ``DataManager(step_metrics=False)`` (the everything condition).
STEPS_OFF = _workloads.STEPS_OFF
REFERENCE_SPANS = _workloads.REFERENCE_SPANS
REFERENCE_EVERYTHING = _workloads.REFERENCE_EVERYTHING
REFERENCE_STEPS_OFF = _workloads.REFERENCE_STEPS_OFF
REFERENCE_OLD = _workloads.REFERENCE_OLD


# ------------------------------------------------------------------ the 0.9.1 child


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_legacy_venv(venv: Path) -> Path:
    """The Python of a virtualenv with polydatum 0.9.1, creating it when missing."""
    python = venv / "bin" / "python"
    if python.exists():
        probe = subprocess.run(
            [str(python), "-I", "-c", PROBE],
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0 and probe.stdout.strip() == LEGACY_VERSION:
            return python
        log(f"{venv} has no polydatum {LEGACY_VERSION} (got {probe.stdout.strip() or 'none'})")
    log(f"creating {venv} with {' '.join(LEGACY_REQUIREMENTS)} ...")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         *LEGACY_REQUIREMENTS],
        capture_output=True,
        text=True,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(
            f"could not install polydatum {LEGACY_VERSION} into {venv}:\n{result.stderr}\n"
            f"Check network access to the package index, or pass --legacy-python / --no-legacy."
        )
    return python


class LegacyProcess:
    """The child running ``_legacy_runner.py`` under another interpreter."""

    def __init__(self, python: str) -> None:
        self.python = python
        self.proc = subprocess.Popen(
            [python, "-I", str(RUNNER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.info: dict[str, Any] = json.loads(self.ask("hello"))

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the legacy runner ({self.python}) exited; see its stderr above")
        status, _, answer = line.rstrip("\n").partition(" ")
        if status != "ok":
            raise RuntimeError(f"the legacy runner failed on {command!r}: {answer}")
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(RuntimeError, OSError):
                self.ask("quit")
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------- hand-written OTel


def handwritten_a(tracer: Any, logger: Any = None) -> Callable[[], Any]:
    """Shape A without polydatum: the six spans by hand (``_workloads.handwritten_a``);
    with ``logger``, the old reference's 3-field INFO line."""
    return _workloads.handwritten_a(tracer, logger)


def reference_request(
    name: str, tracer_provider: Any, meter_provider: Any = None
) -> Callable[[], Any]:
    """The hand-written contender ``name`` (a ``_workloads.REFERENCE_*``) on these
    providers, logging through the structlog configuration in force."""
    tracer = tracer_provider.get_tracer("bench")
    if name == REFERENCE_SPANS:
        return _workloads.handwritten_a(tracer)
    if name == REFERENCE_OLD:
        return _workloads.handwritten_a(tracer, structlog.get_logger("app"))
    # Bound once, as polydatum keeps its assembled logger: no lazy proxy per line.
    logger = structlog.get_logger("app").bind()
    meter = meter_provider.get_meter("bench")
    if name == REFERENCE_EVERYTHING:
        return _workloads.handwritten_everything_a(tracer, meter, logger)
    if name == REFERENCE_STEPS_OFF:
        return _workloads.handwritten_everything_lean_a(tracer, meter, logger)
    raise ValueError(f"unknown reference {name!r}")


class DropExporter(SpanExporter):
    """A span exporter that drops everything (the cost of exporting is not ours)."""

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def tracer_provider() -> TracerProvider:
    """An SDK provider batching into :class:`DropExporter`.

    The queue is larger than the SDK's default 2048: on a busy machine the export
    thread can fall behind a tight loop, and a full queue makes the SDK log
    "Queue full, dropping Span." for every span -- a cost that would land on
    whichever contender happened to fill it.
    """
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DropExporter(), max_queue_size=1 << 16))
    return provider


def meter_provider() -> MeterProvider:
    """An SDK meter provider with an in-memory reader (collected only by the checks).

    The SDK's defaults otherwise, so the exemplar filter is its default one
    (``trace_based``, unless ``OTEL_METRICS_EXEMPLAR_FILTER`` says otherwise), the same
    for every contender built here.
    """
    return MeterProvider(metric_readers=[InMemoryMetricReader()])


def structlog_quiet() -> None:
    """structlog configured by the application to filter out everything below WARNING."""
    structlog.reset_defaults()
    structlog.configure(
        processors=[structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(open(os.devnull, "w")),  # noqa: SIM115
        cache_logger_on_first_use=True,
    )


def structlog_json_info() -> None:
    """The production configuration polydatum ships: JSON lines at INFO, to /dev/null."""
    structlog.reset_defaults()
    configure_logging(json_output=True, level=logging.INFO, stream=open(os.devnull, "w"))  # noqa: SIM115


def polydatum_request(shape: str, **dm_options: Any) -> tuple[DataManager, Callable[[], Any]]:
    dm = _workloads.build(shape, DataManager, Service, **dm_options)
    return dm, _workloads.request(shape, dm)


def span_shape(spans: Sequence[Any]) -> list[list[str | None]]:
    """``[name, parent name]`` of every span, sorted: comparable across trees."""
    by_id = {s.context.span_id: s.name for s in spans}
    return sorted([s.name, by_id.get(s.parent.span_id) if s.parent else None] for s in spans)


def check_same_spans() -> dict[str, Any]:
    """Verify that hand-written A records exactly the spans polydatum A records."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _, run = polydatum_request("A", tracer_provider=provider)
    run()
    ours = span_shape(exporter.get_finished_spans())
    exporter.clear()
    handwritten_a(provider.get_tracer("bench"))()
    theirs = span_shape(exporter.get_finished_spans())
    provider.shutdown()
    return {"polydatum": ours, "handwritten": theirs, "same": ours == theirs}


class RecordingMeterProvider:
    """A meter provider that remembers every instrument created through it.

    It hands out the SDK provider's meters wrapped in :class:`_RecordingMeter`, so the
    fairness check sees which instruments a contender creates (name, kind, unit,
    description, bucket advice), including those that never record a point.
    """

    def __init__(self, provider: MeterProvider) -> None:
        self.provider = provider
        self.created: list[list[Any]] = []

    def get_meter(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return _RecordingMeter(self.provider.get_meter(name, *args, **kwargs), self.created)


class _RecordingMeter:
    def __init__(self, meter: Any, created: list[list[Any]]) -> None:
        self._meter = meter
        self._created = created

    def __getattr__(self, attribute: str) -> Any:
        method = getattr(self._meter, attribute)
        if not attribute.startswith("create_"):
            return method
        signature = inspect.signature(method)

        def create(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            given = bound.arguments
            advice = given.get("explicit_bucket_boundaries_advisory")
            self._created.append(
                [
                    attribute.removeprefix("create_"),
                    given["name"],
                    given.get("unit", ""),
                    given.get("description", ""),
                    None if advice is None else list(advice),
                ]
            )
            return method(*args, **kwargs)

        return create


def _span_ids(span: Any) -> tuple[str, str]:
    return format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")


def _describe_spans(spans: Sequence[Any]) -> list[list[Any]]:
    """Each span as ``[name, parent name, kind, status, attributes]``, sorted; the
    context id (random) as its shape."""
    by_id = {s.context.span_id: s.name for s in spans}
    described = []
    for s in spans:
        attributes = dict(s.attributes or {})
        if "polydatum.context.id" in attributes:
            value = attributes["polydatum.context.id"]
            ok = isinstance(value, str) and len(value) == 16 and int(value, 16) >= 0
            attributes["polydatum.context.id"] = "<16 hex digits>" if ok else repr(value)
        described.append(
            [
                s.name,
                by_id.get(s.parent.span_id) if s.parent else None,
                s.kind.name,
                s.status.status_code.name,
                sorted(attributes.items()),
            ]
        )
    return sorted(described, key=json.dumps)


def _describe_metrics(data: Any, spans: Sequence[Any]) -> list[dict[str, Any]]:
    """Every metric collected: name, unit, description, kind; per point its attributes,
    count (histograms) or value (sums), bucket bounds, and the names of the spans its
    exemplars point at (where the exemplar filter looked)."""
    span_names = {s.context.span_id: s.name for s in spans}
    described = []
    for resource_metrics in data.resource_metrics if data is not None else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                points = []
                for point in metric.data.data_points:
                    entry: dict[str, Any] = {"attributes": sorted(point.attributes.items())}
                    if hasattr(point, "count"):
                        entry["count"] = point.count
                        entry["explicit_bounds"] = list(point.explicit_bounds)
                    else:
                        entry["value"] = point.value
                    entry["exemplar_spans"] = sorted(
                        {
                            span_names.get(e.span_id, "<not a span of this run>")
                            for e in point.exemplars
                        }
                    )
                    points.append(entry)
                described.append(
                    {
                        "name": metric.name,
                        "unit": metric.unit,
                        "description": metric.description,
                        "kind": type(metric.data).__name__,
                        "monotonic": getattr(metric.data, "is_monotonic", None),
                        "points": sorted(points, key=json.dumps),
                    }
                )
    return sorted(described, key=lambda m: m["name"])


def _describe_lines(text: str, spans: Sequence[Any]) -> list[dict[str, Any]]:
    """The JSON log lines, with what varies per run replaced by what it must be: the
    ids by whether they name a context span of this run (its ``polydatum.context.id``,
    trace and span id), each duration by its type, the timestamp by its format."""
    contexts = {
        (s.attributes["polydatum.context.id"], *_span_ids(s))
        for s in spans
        if s.name == "polydatum.context"
    }
    lines = []
    for raw in text.splitlines():
        line = json.loads(raw)
        ids = (line.pop("context_id", None), line.pop("trace_id", None), line.pop("span_id", None))
        line["ids"] = "a context span of this run" if ids in contexts else f"unknown: {ids}"
        if "duration_ms" in line:
            line["duration_ms"] = type(line["duration_ms"]).__name__
        for entry in line.get("middleware", []):
            for key in entry:
                if key.endswith("_ms"):
                    entry[key] = type(entry[key]).__name__
        stamp = line.get("timestamp")
        if isinstance(stamp, str) and stamp.endswith("Z"):
            datetime.fromisoformat(stamp[:-1])  # raises unless ISO 8601
            line["timestamp"] = "ISO 8601, UTC"
        lines.append(line)
    return lines


class _ActiveProbe(SpanProcessor):
    """Collects the metrics when a ``users.get`` span starts (in the middle of a
    request) and keeps the ``polydatum.context.active`` values it reads: the gauge
    must count the open context. It reads a reader of its own: a collection resets
    the reader's exemplar reservoirs, and the final collection must see them all."""

    def __init__(self, reader: InMemoryMetricReader) -> None:
        self.reader = reader
        self.seen: list[Any] = []

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if span.name != "users.get":
            return
        data = self.reader.get_metrics_data()
        for metric in _describe_metrics(data, ()):
            if metric["name"] == "polydatum.context.active":
                self.seen.append([p["value"] for p in metric["points"]])


def capture(make: Callable[[Any, Any], Callable[[], Any]], requests: int = 3) -> dict[str, Any]:
    """What ``requests`` requests of one contender record, on fresh providers: spans,
    instruments created, metric points (collected once at the end; the active-context
    gauge also in the middle of each request) and INFO lines (``configure_logging``'s
    JSON)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    reader = InMemoryMetricReader()
    probe = _ActiveProbe(InMemoryMetricReader())
    provider.add_span_processor(probe)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    meters = RecordingMeterProvider(MeterProvider(metric_readers=[reader, probe.reader]))
    stream = io.StringIO()
    structlog.reset_defaults()
    configure_logging(json_output=True, level=logging.INFO, stream=stream)
    try:
        run = make(provider, meters)
        expected = normalized(_workloads.EXPECTED["A"])
        for _ in range(requests):
            if normalized(run()) != expected:
                raise SystemExit("shape A returned something unexpected")
        spans = exporter.get_finished_spans()
        return {
            "spans": _describe_spans(spans),
            "instruments": sorted(meters.created, key=json.dumps),
            "metric_points": _describe_metrics(reader.get_metrics_data(), spans),
            "active_during_request": probe.seen,
            "log_lines": _describe_lines(stream.getvalue(), spans),
        }
    finally:
        provider.shutdown()
        meters.provider.shutdown()
        structlog.reset_defaults()


#: The aspects :func:`check_everything` compares.
FAIRNESS_ASPECTS = ("spans", "instruments", "metric_points", "active_during_request", "log_lines")


def check_everything(requests: int = 3) -> dict[str, Any]:
    """Verify that each hand-written everything-on reference records what its polydatum
    contender records: the same spans (names, nesting, kind, status, attributes), the
    same instruments (kind, name, unit, description, bucket advice), the same metric
    points (attributes, counts, bounds; exemplars pointing at the same spans), the same
    ``polydatum.context.active`` reading in the middle of a request, and equivalent
    log lines (the same fields and values; ids of the run's context spans).

    Returns, per pair, what both recorded and whether each aspect is the same; ``fair``
    is whether every aspect of every pair is.
    """
    pairs = {
        "step_metrics=True": (True, REFERENCE_EVERYTHING),
        "step_metrics=False": (False, REFERENCE_STEPS_OFF),
    }
    report: dict[str, Any] = {"requests": requests}
    fair = True
    for label, (step_metrics, reference) in pairs.items():

        def ours(tracer: Any, meters: Any, step_metrics: bool = step_metrics) -> Any:
            options = {"tracer_provider": tracer, "meter_provider": meters}
            return polydatum_request("A", step_metrics=step_metrics, **options)[1]

        def theirs(tracer: Any, meters: Any, reference: str = reference) -> Any:
            return reference_request(reference, tracer, meters)

        polydatum_side = capture(ours, requests)
        handwritten_side = capture(theirs, requests)
        same = {a: polydatum_side[a] == handwritten_side[a] for a in FAIRNESS_ASPECTS}
        fair = fair and all(same.values())
        report[label] = {
            "reference": reference,
            "polydatum": polydatum_side,
            "handwritten": handwritten_side,
            "same": same,
        }
    report["fair"] = fair
    return report


def records(dm: DataManager) -> bool:
    """Whether a context of ``dm`` records telemetry at all (False is the idle path)."""
    with dm.context() as ctx:
        recording = ctx._telemetry is not None
    return recording


# -------------------------------------------------------------------------- timing


@dataclass
class Contender:
    name: str
    batch: Callable[[int], float]  # runs n requests, returns seconds
    n: int
    per_request: list[float] = field(default_factory=list)  # seconds, one per round


def measure(
    contenders: list[Contender], rounds: int, settle: Callable[[], Any] | None = None
) -> None:
    """Interleaved rounds: each round times one batch per contender, order rotating.

    ``settle`` runs after every batch, untimed: for the traced conditions it flushes
    the batch span processor, so that spans one contender queued are not exported
    (and a full queue's drops not logged) during the next contender's timed batch.
    """
    for c in contenders:  # warm-up: caches, branch history, the child's first batch
        c.batch(c.n)
        if settle is not None:
            settle()
    count = len(contenders)
    for r in range(rounds):
        for i in range(count):
            c = contenders[(r + i) % count]
            c.per_request.append(c.batch(c.n) / c.n)
            if settle is not None:
                settle()


def summarize(c: Contender) -> dict[str, Any]:
    us = [t * 1e6 for t in c.per_request]
    return {
        "batch": c.n,
        "rounds": len(us),
        "median_us": round(statistics.median(us), 3),
        "min_us": round(min(us), 3),
        "samples_us": [round(u, 3) for u in us],
    }


def compare(
    subject: Contender, reference: Contender, target: float, informational: bool = False
) -> dict[str, Any]:
    """One comparison; ``informational`` ones are reported against the condition's target
    for scale but are no verdict of the issue (an option that is off by default)."""
    s, r = subject.per_request, reference.per_request
    ratio = round(statistics.median(s) / statistics.median(r), 3)
    return {
        "subject": subject.name,
        "reference": reference.name,
        "median_ratio": ratio,
        "min_ratio": round(min(s) / min(r), 3),
        "paired_ratio": round(statistics.median(a / b for a, b in zip(s, r, strict=True)), 3),
        "target": target,
        "met": ratio <= target,  # the ratio as reported (as bench_instructions judges)
        "informational": informational,
    }


def local(run: Callable[[], Any]) -> Callable[[int], float]:
    return lambda n: _workloads.timed_batch(run, n)


def remote(child: LegacyProcess, shape: str) -> Callable[[int], float]:
    return lambda n: float(child.ask(f"run {shape} {n}"))


def normalized(value: Any) -> Any:
    return json.loads(json.dumps(value))


def condition_idle(
    child: LegacyProcess | None, rounds: int, sizes: dict[str, int]
) -> dict[str, Any]:
    structlog_quiet()
    contenders: dict[str, Contender] = {}
    recording = {}
    for shape in ("A", "B"):
        dm, run = polydatum_request(shape)
        recording[shape] = records(dm)
        if normalized(run()) != normalized(_workloads.EXPECTED[shape]):
            raise SystemExit(f"polydatum shape {shape} returned {run()!r}")
        contenders[f"polydatum {shape}"] = Contender(f"polydatum {shape}", local(run), sizes[shape])
        if child is not None:
            got = json.loads(child.ask(f"check {shape}"))
            if got != normalized(_workloads.EXPECTED[shape]):
                raise SystemExit(f"legacy shape {shape} returned {got!r}")
            name = f"polydatum {child.info['polydatum']} {shape} (child)"
            contenders[f"legacy {shape}"] = Contender(name, remote(child, shape), sizes[shape])
    measure(list(contenders.values()), rounds)
    comparisons = []
    if child is not None:
        for shape in ("A", "B"):
            ours, legacy = contenders[f"polydatum {shape}"], contenders[f"legacy {shape}"]
            comparisons.append(compare(ours, legacy, TARGETS["idle"]))
    return {
        "name": "idle",
        "setup": "no SDK configured; structlog filtering below WARNING",
        "recording": recording,
        "contenders": {c.name: summarize(c) for c in contenders.values()},
        "comparisons": comparisons,
    }


def condition_traced(name: str, rounds: int, sizes: dict[str, int]) -> dict[str, Any]:
    """``tracing`` (spans only) or ``everything`` (spans, metrics, INFO JSON logs)."""
    provider = tracer_provider()
    meter_providers: list[MeterProvider] = []
    expected = normalized(_workloads.EXPECTED["A"])

    def contender(label: str, run: Callable[[], Any]) -> Contender:
        if normalized(run()) != expected:
            raise SystemExit(f"{label} returned something unexpected")
        return Contender(label, local(run), sizes["A"])

    # (subject, reference, target, informational)
    pairs: list[tuple[Contender, Contender, float, bool]] = []
    if name == "everything":
        structlog_json_info()
        setup = (
            "SDK TracerProvider + BatchSpanProcessor(drop); a MeterProvider + "
            "InMemoryMetricReader per contender; structlog JSON at INFO to /dev/null"
        )

        def meters() -> MeterProvider:
            meter_providers.append(meter_provider())
            return meter_providers[-1]

        _, ours = polydatum_request("A", tracer_provider=provider, meter_provider=meters())
        _, lean = polydatum_request(
            "A", step_metrics=False, tracer_provider=provider, meter_provider=meters()
        )
        subject = contender("polydatum A", ours)
        reference = contender(
            REFERENCE_EVERYTHING, reference_request(REFERENCE_EVERYTHING, provider, meters())
        )
        lean_subject = contender(STEPS_OFF, lean)
        lean_reference = contender(
            REFERENCE_STEPS_OFF, reference_request(REFERENCE_STEPS_OFF, provider, meters())
        )
        old = contender(REFERENCE_OLD, reference_request(REFERENCE_OLD, provider))
        contenders = [subject, reference, lean_subject, lean_reference, old]
        pairs = [
            (subject, reference, TARGETS[name], False),
            (lean_subject, lean_reference, TARGETS[name], False),
            (subject, old, OLD_EVERYTHING_TARGET, True),
            (lean_subject, old, OLD_EVERYTHING_TARGET, True),
        ]
    else:
        structlog_quiet()
        setup = "SDK TracerProvider + BatchSpanProcessor(drop); structlog filtering below WARNING"
        _, ours = polydatum_request("A", tracer_provider=provider)
        subject = contender("polydatum A", ours)
        reference = contender(REFERENCE_SPANS, reference_request(REFERENCE_SPANS, provider))
        contenders = [subject, reference]
        pairs = [(subject, reference, TARGETS[name], False)]
    try:
        measure(contenders, rounds, settle=provider.force_flush)
    finally:
        provider.shutdown()
        for meter_provider_ in meter_providers:
            meter_provider_.shutdown()
    return {
        "name": name,
        "setup": setup,
        "contenders": {c.name: summarize(c) for c in contenders},
        "comparisons": [compare(*pair) for pair in pairs],
    }


# -------------------------------------------------------------------------- memory

_TRACKED = ("DataAccessContext", "ContextTelemetry", "GeneratorRecord", "_DalScope", "_Step")


def _alive() -> int:
    from polydatum import context, dal, lifecycle, telemetry

    classes = tuple(
        getattr(module, name)
        for module in (context, dal, lifecycle, telemetry)
        for name in _TRACKED
        if hasattr(module, name)
    )
    return sum(1 for o in gc.get_objects() if isinstance(o, classes))


def memory_check(name: str, contexts: int) -> dict[str, Any]:
    """Run ``contexts`` sequential shape-A contexts; what survives, and what stays allocated."""
    provider = meter_provider = None
    options: dict[str, Any] = {}
    if name == "everything":
        provider = tracer_provider()
        meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        options = {"tracer_provider": provider, "meter_provider": meter_provider}
        structlog_json_info()
    else:
        structlog_quiet()
    _, run = polydatum_request("A", **options)

    def settle() -> None:
        if provider is not None:
            provider.force_flush()
        gc.collect()

    for _ in range(min(1000, contexts // 4)):  # warm every cache (paths, instruments, loggers)
        run()
    settle()
    # Freed by reference counting alone (no cycles)? Count with the collector off.
    gc.disable()
    try:
        before = _alive()
        for _ in range(200):
            run()
        without_gc = _alive() - before
    finally:
        gc.enable()
    settle()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for _ in range(contexts):
            run()
        settle()
        retained = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    alive = _alive()
    active = polydatum.get_active_context()
    if provider is not None:
        provider.shutdown()
    if meter_provider is not None:
        meter_provider.shutdown()
    return {
        "condition": name,
        "contexts": contexts,
        "alive_after_gc": alive,
        "alive_without_gc_per_200": without_gc,
        "active_context_left": active is not None,
        "retained_bytes": retained,
        "limit_bytes": MEMORY_LIMIT_BYTES,
        "met": alive == 0 and active is None and retained < MEMORY_LIMIT_BYTES,
    }


# -------------------------------------------------------------------------- report


def render(report: dict[str, Any]) -> str:
    legacy = report["legacy"].get("polydatum", "-")
    quick = "  [QUICK: figures are not meaningful]" if report["quick"] else ""
    conditions = report["conditions"]
    width = max([9, *(len(name) for cond in conditions for name in cond["contenders"])])
    pair_width = max(
        [
            22,
            *(
                len(f"{c['subject']} / {c['reference']}")
                for d in conditions
                for c in d["comparisons"]
            ),
        ]
    )
    lines = [
        f"polydatum {report['polydatum']} (this checkout) vs {legacy} (legacy child) "
        f"on Python {report['python']}; {report['rounds']} interleaved rounds{quick}",
        "",
        f"{'condition':<11} {'contender':<{width}} {'batch':>6} {'median µs':>10} {'min µs':>9}",
    ]
    for cond in report["conditions"]:
        for name, c in cond["contenders"].items():
            lines.append(
                f"{cond['name']:<11} {name:<{width}} {c['batch']:>6} "
                f"{c['median_us']:>10.2f} {c['min_us']:>9.2f}"
            )
    lines += [
        "",
        f"{'condition':<11} {'polydatum vs reference':<{pair_width}} {'ratio':>6} {'min':>6} "
        f"{'paired':>6} {'target':>7}  verdict",
    ]
    for cond in report["conditions"]:
        for cmp in cond["comparisons"]:
            pair = f"{cmp['subject']} / {cmp['reference']}"
            target = f"<= {cmp['target']}"
            verdict = "met" if cmp["met"] else "MISSED"
            if cmp["informational"]:
                verdict = f"(for information: {verdict.lower()})"
            lines.append(
                f"{cond['name']:<11} {pair:<{pair_width}} {cmp['median_ratio']:>6.2f} "
                f"{cmp['min_ratio']:>6.2f} {cmp['paired_ratio']:>6.2f} {target:>7}  {verdict}"
            )
    if report["memory"]:
        lines += ["", "memory (sequential shape-A contexts):"]
        for m in report["memory"]:
            retained = m["retained_bytes"]
            verdict = "met" if m["met"] else "MISSED"
            lines.append(
                f"  {m['condition']:<11} {m['contexts']:>7} contexts: "
                f"{m['alive_after_gc']} context objects alive after gc "
                f"({m['alive_without_gc_per_200']} per 200 with gc off), "
                f"{retained} bytes retained (limit {m['limit_bytes']})  {verdict}"
            )
    check = report.get("span_check")
    if check is not None:
        lines += ["", f"hand-written spans identical to polydatum's: {check['same']}"]
    fairness = report.get("everything_check")
    if fairness is not None:
        lines += ["", render_everything_check(fairness)]
    return "\n".join(lines)


def render_everything_check(check: dict[str, Any]) -> str:
    """One line per everything-on pair: which aspects the fairness check found the same."""
    lines = [
        f"everything-on references record what polydatum records ({check['requests']} "
        f"requests each): {'FAIR' if check['fair'] else 'NOT FAIR'}"
    ]
    for label in ("step_metrics=True", "step_metrics=False"):
        pair = check[label]
        ours = pair["polydatum"]
        aspects = ", ".join(
            f"{a} {'same' if ok else 'DIFFERENT'}" for a, ok in pair["same"].items()
        )
        lines.append(
            f"  polydatum A, {label} / {pair['reference']}: {aspects} "
            f"({len(ours['spans'])} spans, {len(ours['instruments'])} instruments, "
            f"{sum(len(m['points']) for m in ours['metric_points'])} metric points, "
            f"{len(ours['log_lines'])} log lines)"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply the batch sizes (default 1.0)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny run (3 rounds, small batches) to check it works"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument(
        "--conditions",
        default="idle,tracing,everything,memory",
        help="comma-separated subset of idle,tracing,everything,memory",
    )
    parser.add_argument(
        "--memory-contexts",
        type=int,
        default=100_000,
        help="contexts in the idle memory check (default 100000)",
    )
    parser.add_argument(
        "--memory-contexts-traced",
        type=int,
        default=20_000,
        help="contexts in the everything-on memory check (default 20000: tracemalloc "
        "makes every span allocation slow; 100000 takes minutes)",
    )
    legacy = parser.add_mutually_exclusive_group()
    legacy.add_argument(
        "--legacy-venv", type=Path, default=DEFAULT_VENV,
        help=f"virtualenv with polydatum {LEGACY_VERSION} (created when missing)",
    )  # fmt: skip
    legacy.add_argument(
        "--legacy-python",
        help="run the legacy child with this interpreter as is (no install; any polydatum)",
    )
    legacy.add_argument("--no-legacy", action="store_true", help="skip the 0.9.1 comparison")
    args = parser.parse_args(argv)
    wanted = {c.strip() for c in args.conditions.split(",") if c.strip()}
    unknown = wanted - {"idle", "tracing", "everything", "memory"}
    if unknown:
        parser.error(f"unknown condition(s) {', '.join(sorted(unknown))}")
    args.wanted = wanted
    if args.quick:
        args.rounds = min(args.rounds, 3)
        args.scale = min(args.scale, 0.02)
        args.memory_contexts = min(args.memory_contexts, 2000)
        args.memory_contexts_traced = min(args.memory_contexts_traced, 2000)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    sizes = {"A": max(1, int(2000 * args.scale)), "B": max(1, int(400 * args.scale))}
    child: LegacyProcess | None = None
    if "idle" in args.wanted and not args.no_legacy:
        python = args.legacy_python or str(ensure_legacy_venv(args.legacy_venv))
        child = LegacyProcess(python)
    report: dict[str, Any] = {
        "polydatum": polydatum.__version__,
        "python": platform.python_version(),
        "legacy": {**(child.info if child else {}), "interpreter": child.python if child else None},
        "rounds": args.rounds,
        "quick": args.quick,
        "conditions": [],
        "memory": [],
    }
    try:
        if "idle" in args.wanted:
            log("idle ...")
            report["conditions"].append(condition_idle(child, args.rounds, sizes))
    finally:
        if child is not None:
            child.close()
    if "tracing" in args.wanted or "everything" in args.wanted:
        report["span_check"] = check_same_spans()
    if "everything" in args.wanted:
        report["everything_check"] = check_everything()
        if not report["everything_check"]["fair"]:
            print(json.dumps(report["everything_check"], indent=2), file=sys.stderr)
            raise SystemExit(
                "an everything-on reference does not record what polydatum records "
                "(see the check above): the comparison would not be fair"
            )
    for name in ("tracing", "everything"):
        if name in args.wanted:
            log(f"{name} ...")
            report["conditions"].append(condition_traced(name, args.rounds, sizes))
    if "memory" in args.wanted:
        for name, contexts in (
            ("idle", args.memory_contexts),
            ("everything", args.memory_contexts_traced),
        ):
            log(f"memory ({name}, {contexts} contexts) ...")
            report["memory"].append(memory_check(name, contexts))
    structlog.reset_defaults()
    if args.json:
        print(json.dumps(report, indent=2))
        log(render(report))
    else:
        print(render(report))
    return report


if __name__ == "__main__":
    main()
