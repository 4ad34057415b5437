"""Instructions per request, counted by valgrind: bench_core.py's comparisons without noise.

Wall-clock ratios on a shared two-core machine move by 10-20 % from one run to the
next. ``valgrind --tool=callgrind`` counts the instructions a process executes,
which does not depend on what else the machine is doing, so it tells small changes
apart that timing cannot. It is a proxy: it ignores cache misses and the cost of a
syscall, so it complements ``bench_core.py`` (the verdict) rather than replacing it.

Method: each contender runs in its own process under callgrind twice, with ``n``
and ``3n`` requests after the same warm-up; the difference divided by ``2n`` is the
cost of one request, with start-up and import cost cancelled out. After the warm-up
the heap is frozen (``gc.freeze()``): otherwise whether a full collection, which walks
every imported object, falls inside the measured window varies from run to run and
moves the per-request figure by up to 20 %. Collections of the requests' own objects
are still counted. Spans go through
a ``SimpleSpanProcessor`` into an exporter that drops them (the batch processor's
thread wakes on timers, which makes counts vary between runs); the per-span work is
the same for every contender either way.

The everything condition compares polydatum A, and polydatum A with
``step_metrics=False``, with the hand-written references that record the same spans,
metric samples and log line (target 1.05x); before counting, ``bench_core``'s
``check_everything`` runs in this process and stops the run if a pair records
different telemetry (its result is in the report). The old reference (six spans and a
3-field line, no metrics) is still counted, for information. ``per_request_of``
is the n/3n helper for any program (``bench_scaling.py`` uses it too).

    .venv/bin/python benchmarks/bench_instructions.py            # ~4 min on 2 cores
    .venv/bin/python benchmarks/bench_instructions.py --json
    .venv/bin/python benchmarks/bench_instructions.py --requests 50 --no-legacy   # quick

Counts still vary by about 1 % between runs (address-dependent hashing); read the
ratios to two digits.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WARMUP = 200

sys.path.insert(0, str(HERE))
from _workloads import (  # noqa: E402
    REFERENCE_EVERYTHING,
    REFERENCE_OLD,
    REFERENCE_SPANS,
    REFERENCE_STEPS_OFF,
    STEPS_OFF,
)

#: The hand-written contenders (built by ``bench_core.reference_request``).
REFERENCES = (REFERENCE_SPANS, REFERENCE_EVERYTHING, REFERENCE_STEPS_OFF, REFERENCE_OLD)

#: (condition, subject, reference, target): the comparisons bench_core.py makes.
COMPARISONS: tuple[tuple[str, str, str, float], ...] = (
    ("idle", "polydatum A", "polydatum 0.9.1 A", 0.6),
    ("idle", "polydatum B", "polydatum 0.9.1 B", 0.6),
    ("tracing", "polydatum A", REFERENCE_SPANS, 1.0),
    # Everything on against the same spans, metric samples and log line by hand.
    ("everything", "polydatum A", REFERENCE_EVERYTHING, 1.05),
    ("everything", STEPS_OFF, REFERENCE_STEPS_OFF, 1.05),
    # For information: the old reference (no metrics, a 3-field line), old target 1.3.
    ("everything", "polydatum A", REFERENCE_OLD, 1.3),
    ("everything", STEPS_OFF, REFERENCE_OLD, 1.3),
)
#: References whose comparisons are reported for information only (no verdict).
INFORMATIONAL = frozenset({REFERENCE_OLD})

#: The child program for polydatum 0.9.1 (run with ``python -I`` in its virtualenv).
LEGACY_CHILD = """
import sys
sys.path.insert(0, {bench!r})
import _workloads
from polydatum import DataManager, Service
import gc
shape, n = sys.argv[1], int(sys.argv[2])
run = _workloads.request(shape, _workloads.build(shape, DataManager, Service))
for _ in range({warmup}):
    run()
gc.collect()
gc.freeze()
for _ in range(n):
    run()
"""


def child(condition: str, contender: str, requests: int) -> None:
    """Run ``requests`` requests of one contender (after the warm-up); the measured process."""
    sys.path.insert(0, str(HERE))
    import bench_core
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(bench_core.DropExporter()))
    options: dict[str, Any] = {}
    meter_provider = None
    if condition == "idle":
        bench_core.structlog_quiet()
    elif condition == "tracing":
        bench_core.structlog_quiet()
        options["tracer_provider"] = provider
    else:
        bench_core.structlog_json_info()
        meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        options["tracer_provider"] = provider
        options["meter_provider"] = meter_provider
    run: Callable[[], Any]
    if contender in REFERENCES:
        run = bench_core.reference_request(contender, provider, meter_provider)
    elif contender == STEPS_OFF:
        _, run = bench_core.polydatum_request("A", step_metrics=False, **options)
    else:
        _, run = bench_core.polydatum_request(contender.split()[-1], **options)
    run_measured(run, requests)


def run_measured(run: Callable[[], Any], requests: int, warmup: int = WARMUP) -> None:
    """What a counted child process does: ``warmup`` requests, the heap frozen (a full
    collection must not walk the imported modules' objects), then ``requests`` requests.
    (The 0.9.1 child, ``LEGACY_CHILD``, runs the same loop in its own interpreter.)"""
    for _ in range(warmup):
        run()
    gc.collect()
    gc.freeze()
    for _ in range(requests):
        run()


def count(command: Sequence[str]) -> int:
    """Instructions executed by ``command`` under callgrind."""
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *command],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
        check=False,
    )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"callgrind run failed ({' '.join(command)}):\n{done.stderr[-2000:]}")
    return int(found.group(1))


def in_parallel(function: Callable[[Any], float], jobs: Sequence[Any]) -> list[float]:
    """``function`` of every job, one callgrind run per core at a time."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(function, jobs))


def command_for(
    condition: str, contender: str, requests: int, legacy_python: str | None
) -> list[str]:
    if contender.startswith("polydatum 0.9.1"):
        assert legacy_python is not None
        code = LEGACY_CHILD.format(bench=str(HERE), warmup=WARMUP)
        return [legacy_python, "-I", "-c", code, contender.split()[-1], str(requests)]
    return [
        sys.executable, str(Path(__file__).resolve()), "--child",
        condition, contender, str(requests),
    ]  # fmt: skip


def per_request_of(command: Callable[[int], Sequence[str]], requests: int) -> float:
    """Instructions of one request: (count(3n) - count(n)) / 2n, warm-up cancelled out.

    ``command(n)`` is the child that runs ``n`` requests after the warm-up
    (``bench_peers.py`` passes its own). A first, uncounted run writes the bytecode
    caches of everything the contender imports: otherwise the first counted run (after
    an edit, or in a new venv) also compiles them and the difference comes out too small
    (0.9.1 measured 73.7k instead of 90.8k in a fresh venv).
    """
    subprocess.run(
        command(1),
        capture_output=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
        check=True,
    )
    few = count(command(requests))
    many = count(command(3 * requests))
    return (many - few) / (2 * requests)


def per_request(condition: str, contender: str, requests: int, legacy_python: str | None) -> float:
    """Instructions of one request of ``contender`` under ``condition`` (``per_request_of``)."""
    return per_request_of(lambda n: command_for(condition, contender, n, legacy_python), requests)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="n (default 200)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--conditions", default="idle,tracing,everything",
        help="comma-separated subset of idle,tracing,everything",
    )  # fmt: skip
    parser.add_argument("--no-legacy", action="store_true", help="skip polydatum 0.9.1")
    parser.add_argument("--legacy-python", help="an interpreter with polydatum 0.9.1")
    parser.add_argument("--child", nargs=3, metavar=("CONDITION", "CONTENDER", "N"),
                        help=argparse.SUPPRESS)  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.child:
        condition, contender, n = args.child
        child(condition, contender, int(n))
        return None
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: apt-get install valgrind")
    wanted = {c.strip() for c in args.conditions.split(",") if c.strip()}
    unknown = wanted - {c[0] for c in COMPARISONS}
    if unknown or not wanted:
        raise SystemExit(f"--conditions: unknown {sorted(unknown)}; use idle,tracing,everything")
    legacy_python = None
    if not args.no_legacy and "idle" in wanted:
        sys.path.insert(0, str(HERE))
        import bench_core

        legacy_python = args.legacy_python or str(
            bench_core.ensure_legacy_venv(ROOT / ".bench-venv-091")
        )
    comparisons = [
        c for c in COMPARISONS if c[0] in wanted and (legacy_python or "0.9.1" not in c[2])
    ]
    check = None
    if "everything" in wanted:  # first, in this process: what each pair records
        import bench_core

        check = bench_core.check_everything()
        if not check["fair"]:
            print(json.dumps(check, indent=2), file=sys.stderr)
            raise SystemExit("an everything-on reference does not record what polydatum does")
    jobs = sorted({(c[0], who) for c in comparisons for who in (c[1], c[2])})
    counts = dict(
        zip(
            jobs,
            in_parallel(lambda j: per_request(j[0], j[1], args.requests, legacy_python), jobs),
            strict=True,
        )
    )
    ratios = {
        # keyed by the pair: one subject can be compared with several references
        (condition, subject, reference): round(
            counts[condition, subject] / counts[condition, reference], 3
        )
        for condition, subject, reference, _ in comparisons
    }
    report = {
        "requests": args.requests,
        "python": sys.version.split()[0],
        "instructions_per_request": {f"{c} / {who}": round(v) for (c, who), v in counts.items()},
        "comparisons": [
            {
                "condition": condition,
                "subject": subject,
                "reference": reference,
                "ratio": ratios[condition, subject, reference],
                "target": target,
                "met": ratios[condition, subject, reference] <= target,  # the ratio as reported
                "informational": reference in INFORMATIONAL,
            }
            for condition, subject, reference, target in comparisons
        ],
    }
    if check is not None:
        report["everything_check"] = check
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"instructions per request (valgrind callgrind, n={args.requests})\n")
        names = report["instructions_per_request"]
        width = max(len(name) for name in names)
        for name, value in names.items():
            print(f"  {name:<{width}} {value:>12,}")
        print()
        pairs = [f"{c['subject']} / {c['reference']}" for c in report["comparisons"]]
        width = max(len(pair) for pair in pairs)
        for pair, c in zip(pairs, report["comparisons"], strict=True):
            verdict = "met" if c["met"] else "MISSED"
            if c["informational"]:
                verdict = f"(for information: {verdict.lower()})"
            print(
                f"  {c['condition']:<11} {pair:<{width}} "
                f"{c['ratio']:>6.3f}  <= {c['target']}  {verdict}"
            )
        if check is not None:
            import bench_core

            print()
            print(bench_core.render_everything_check(check))
    return report


if __name__ == "__main__":
    main()
