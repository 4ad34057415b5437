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
  ``InMemoryMetricReader``, structlog JSON at INFO to /dev/null: polydatum A vs the
  hand-written six spans plus one hand-written INFO log line (target <= 1.3x).
  Also measured, for information (no target): the same with
  ``DataManager(step_metrics=False)``, which leaves out the four per-phase histogram
  samples (see benchmarks/README.md, "Why everything-on is still missed").
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
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
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
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
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
TARGETS = {"idle": 0.6, "tracing": 1.0, "everything": 1.3}

#: The informational contender of the everything condition (no target of its own).
STEPS_OFF = "polydatum A, step_metrics=False"


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
    """Shape A without polydatum: the same work and the same six spans, by hand.

    The spans carry the attributes polydatum records (DESIGN.md §4) and nest the
    same way: the lazy resource's setup under the service call that needs it,
    everything else under the context span. With ``logger``, one INFO line at the
    end (the hand-written counterpart of polydatum's canonical log line).
    """
    meta = _workloads.META
    shim = SimpleNamespace(meta=meta)
    mw_fn = _workloads.request_id_middleware
    db_fn = _workloads.db
    span = tracer.start_as_current_span
    function = f"{_workloads.__name__}.build.<locals>.Users.get"
    mw_attrs = {"polydatum.middleware.name": mw_fn.__name__, "polydatum.middleware.position": 0}
    mw_down = {**mw_attrs, "polydatum.outcome": "ok"}
    db_attrs = {"polydatum.resource.name": "db"}
    db_down = {**db_attrs, "polydatum.outcome": "ok"}
    call_attrs = {"polydatum.service.path": "users.get", "code.function.name": function}
    perf_counter = time.perf_counter

    def run() -> Any:
        t0 = perf_counter()
        context_id = os.urandom(8).hex()
        with span("polydatum.context", attributes={"polydatum.context.id": context_id}):
            with span("polydatum.middleware.setup request_id_middleware", attributes=mw_attrs):
                mw = mw_fn(shim)
                next(mw)
            with span("users.get", attributes=call_attrs):
                with span("polydatum.resource.setup db", attributes=db_attrs):
                    resource = db_fn(shim)
                    handle = next(resource)
                result = handle["users"][1]
            with span("polydatum.middleware.teardown request_id_middleware", attributes=mw_down):
                next(mw, None)
            with span("polydatum.resource.teardown db", attributes=db_down):
                next(resource, None)
            if logger is not None:
                logger.info(
                    "request",
                    context_id=context_id,
                    outcome="ok",
                    duration_ms=round((perf_counter() - t0) * 1000, 3),
                )
        return result

    return run


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


def records(dm: DataManager) -> bool:
    """Whether a context of ``dm`` records telemetry at all (False is the idle path)."""
    with dm.context() as ctx:
        return ctx._telemetry is not None


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
    ratio = statistics.median(s) / statistics.median(r)
    return {
        "subject": subject.name,
        "reference": reference.name,
        "median_ratio": round(ratio, 3),
        "min_ratio": round(min(s) / min(r), 3),
        "paired_ratio": round(statistics.median(a / b for a, b in zip(s, r, strict=True)), 3),
        "target": target,
        "met": ratio <= target,
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
    meter_provider = None
    logger = None
    if name == "everything":
        meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        structlog_json_info()
        logger = structlog.get_logger("app")
        setup = (
            "SDK TracerProvider + BatchSpanProcessor(drop); MeterProvider + "
            "InMemoryMetricReader; structlog JSON at INFO to /dev/null"
        )
        reference_name = "hand-written A (6 spans + 1 INFO line)"
    else:
        structlog_quiet()
        setup = "SDK TracerProvider + BatchSpanProcessor(drop); structlog filtering below WARNING"
        reference_name = "hand-written A (6 spans)"
    options: dict[str, Any] = {"tracer_provider": provider}
    if meter_provider is not None:
        options["meter_provider"] = meter_provider
    _, ours = polydatum_request("A", **options)
    theirs = handwritten_a(provider.get_tracer("bench"), logger)
    expected = normalized(_workloads.EXPECTED["A"])
    if normalized(ours()) != expected or normalized(theirs()) != expected:
        raise SystemExit("shape A returned something unexpected")
    subject = Contender("polydatum A", local(ours), sizes["A"])
    reference = Contender(reference_name, local(theirs), sizes["A"])
    contenders = [subject, reference]
    if name == "everything":
        _, lean = polydatum_request("A", step_metrics=False, **options)
        contenders.append(Contender(STEPS_OFF, local(lean), sizes["A"]))
    try:
        measure(contenders, rounds, settle=provider.force_flush)
    finally:
        provider.shutdown()
        if meter_provider is not None:
            meter_provider.shutdown()
    comparisons = [compare(subject, reference, TARGETS[name])]
    if len(contenders) == 3:
        comparisons.append(compare(contenders[2], reference, TARGETS[name], informational=True))
    return {
        "name": name,
        "setup": setup,
        "contenders": {c.name: summarize(c) for c in contenders},
        "comparisons": comparisons,
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
    lines = [
        f"polydatum {report['polydatum']} (this checkout) vs {legacy} (legacy child) "
        f"on Python {report['python']}; {report['rounds']} interleaved rounds{quick}",
        "",
        f"{'condition':<11} {'contender':<40} {'batch':>6} {'median µs':>10} {'min µs':>9}",
    ]
    for cond in report["conditions"]:
        for name, c in cond["contenders"].items():
            lines.append(
                f"{cond['name']:<11} {name:<40} {c['batch']:>6} "
                f"{c['median_us']:>10.2f} {c['min_us']:>9.2f}"
            )
    lines += [
        "",
        f"{'condition':<11} {'polydatum vs reference':<54} {'ratio':>6} {'min':>6} "
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
                f"{cond['name']:<11} {pair:<54} {cmp['median_ratio']:>6.2f} "
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
