"""How polydatum's cost grows: with the steps of a context, and with concurrency.

Run it from the repository root::

    .venv/bin/python benchmarks/bench_scaling.py            # ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_scaling.py --json     # the same report as JSON on stdout
    .venv/bin/python benchmarks/bench_scaling.py --quick    # under a minute; structure only
    .venv/bin/python benchmarks/bench_scaling.py --parts throughput --modes idle

Two parts:

* **instructions** -- instructions per context (valgrind callgrind, the n/3n method of
  ``bench_instructions.py``, whose helpers this uses) against the number of context
  middleware, of lazy resources and of service calls, each at 1, 5, 20 and 100 with the
  other two at 1; idle (no SDK, structlog filtering below WARNING) and traced (an SDK
  ``TracerProvider`` with a ``SimpleSpanProcessor`` into an exporter that drops, as in
  ``bench_instructions.py``). Each middleware is its own generator function (a name
  of its own); each resource too; the one service method reads every resource, and
  the calls are made one after the other in the context. Reported per axis: the
  per-step cost of a least-squares line through the four points (its slope), the
  residuals of that line, and the per-step cost between consecutive points: growth is
  linear when those agree.
* **throughput** -- contexts per second (wall clock) of shape A (``_workloads``: one
  middleware, one resource, one call) from 8 threads at once and from 1,000 asyncio
  tasks at once (``async with dm.dal(meta)``, an ``await asyncio.sleep(0)`` inside the
  context so that the 1,000 contexts are open together), each against the same number
  of contexts from a single thread or task; idle and traced (here the
  ``BatchSpanProcessor`` of ``bench_core.py``, flushed after every batch, untimed).
  The same runners also run a control: the same work without polydatum (the
  generators stepped by hand; traced, with the six spans by hand), so what the
  interpreter, asyncio and the SDK lose to concurrency is told apart from what
  polydatum loses. Rounds interleave all runners in a rotating order, as in
  ``bench_core.py``; reported: the median contexts/s of each, the ratio concurrent /
  single (of the medians, and the median of the per-round ratios) and the time
  concurrency adds to one request. With the GIL, 1.0 means that concurrency costs
  nothing; below 1.0 is what contention (or a loop of 1,000 tasks) costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

import _workloads  # noqa: E402
import bench_instructions  # noqa: E402

AXES = ("middleware", "resources", "calls")
SIZES = (1, 5, 20, 100)
MODES = ("idle", "traced")
PARTS = ("instructions", "throughput")
QUICK_SIZES = (1, 2)
#: Spans one more step adds when traced: a middleware's and a resource's setup and
#: teardown, a call's own.
SPANS_PER_STEP = {"middleware": 2, "resources": 2, "calls": 1}

#: Threads and tasks of the throughput part, and the contexts each batch runs in all.
THREADS = 8
TASKS = 1000
CONTEXTS = {
    ("idle", "threads"): 8000,
    ("idle", "asyncio"): 10000,
    ("traced", "threads"): 4000,
    ("traced", "asyncio"): 5000,
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- workload


def _middleware(i: int) -> Callable[[Any], Generator[None, None, None]]:
    def middleware(ctx: Any) -> Generator[None, None, None]:
        ctx.meta.get("request_id")
        yield

    middleware.__name__ = middleware.__qualname__ = f"middleware_{i}"
    return middleware


def _resource(i: int) -> Callable[[Any], Generator[dict[str, Any], None, None]]:
    def resource(ctx: Any) -> Generator[dict[str, Any], None, None]:
        handle = {"value": i, "closed": False}
        yield handle
        handle["closed"] = True

    resource.__name__ = resource.__qualname__ = f"resource_{i}"
    return resource


def build(middleware: int, resources: int, calls: int, **dm_options: Any) -> Callable[[], Any]:
    """One request: a context with ``middleware`` context middleware, in which
    ``calls`` calls of one service method each read all ``resources`` lazy resources
    (the first call sets them up)."""
    from polydatum import DataManager, Service

    names = tuple(f"resource_{i}" for i in range(resources))

    class Work(Service):
        def touch(self, names: tuple[str, ...]) -> int:
            ctx = self._ctx
            total = 0
            for name in names:
                total += getattr(ctx, name)["value"]
            return total

    dm = DataManager(**dm_options)
    dm.register_context_middleware(*(_middleware(i) for i in range(middleware)))
    dm.register_resources(**{name: _resource(i) for i, name in enumerate(names)})
    dm.register_services(work=Work())
    meta = _workloads.META

    def run() -> Any:
        result = None
        with dm.dal(meta) as dal:
            for _ in range(calls):
                result = dal.work.touch(names)
        return result

    return run


def expected(resources: int) -> int:
    return sum(range(resources))


# ------------------------------------------------------------------ instructions


def child(mode: str, middleware: int, resources: int, calls: int, n: int, warmup: int) -> None:
    """The measured process: ``warmup`` contexts, a frozen heap, then ``n`` contexts."""
    import bench_core
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    bench_core.structlog_quiet()
    options: dict[str, Any] = {}
    if mode == "traced":
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(bench_core.DropExporter()))
        options["tracer_provider"] = provider
    run = build(middleware, resources, calls, **options)
    if run() != expected(resources):
        raise SystemExit("the scaling workload returned something unexpected")
    bench_instructions.run_measured(run, n, warmup)


def shape(axis: str, size: int) -> tuple[int, int, int]:
    """(middleware, resources, calls) of ``size`` steps on ``axis``, the others at 1."""
    return (
        size if axis == "middleware" else 1,
        size if axis == "resources" else 1,
        size if axis == "calls" else 1,
    )


def requests_for(mode: str, workload: tuple[int, int, int], quick: bool) -> int:
    """n (and the warm-up) of one point: 200 as in bench_instructions, fewer when traced
    contexts are long (a traced 100-middleware context is ~200 spans)."""
    if quick:
        return 2
    if mode == "idle":
        return 200
    return max(10, 200 // max(workload))


def command(mode: str, workload: tuple[int, int, int], warmup: int) -> Callable[[int], list[str]]:
    def for_n(n: int) -> list[str]:
        return [
            sys.executable, str(Path(__file__).resolve()), "--child", mode,
            *map(str, workload), str(n), str(warmup),
        ]  # fmt: skip

    return for_n


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, Any]:
    """Least-squares ``y = intercept + slope * x``, its residuals and R²; and the slope
    between consecutive points (equal for a straight line)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    intercept = my - slope * mx
    residuals = [y - (intercept + slope * x) for x, y in zip(xs, ys, strict=True)]
    total = sum((y - my) ** 2 for y in ys)
    steps = [
        {
            "from": xs[i],
            "to": xs[i + 1],
            "per_step": round((ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])),
        }
        for i in range(n - 1)
    ]
    return {
        "slope": round(slope),
        "intercept": round(intercept),
        "r2": round(1 - sum(r * r for r in residuals) / total, 6) if total else 1.0,
        "residuals": [round(r) for r in residuals],
        "max_residual_pct": round(
            max(abs(r) / y for r, y in zip(residuals, ys, strict=True)) * 100, 2
        ),
        "steps": steps,
        # > 1: each step costs more as there are more of them (superlinear growth)
        "growth": round(steps[-1]["per_step"] / steps[0]["per_step"], 3)
        if steps and steps[0]["per_step"]
        else None,
    }


def instructions(modes: Sequence[str], sizes: Sequence[int], quick: bool) -> dict[str, Any]:
    """Instructions per context at every point; a line per (mode, axis)."""
    workloads = sorted({shape(axis, size) for axis in AXES for size in sizes})
    jobs = [(mode, workload) for mode in modes for workload in workloads]

    def measure(job: tuple[str, tuple[int, int, int]]) -> float:
        mode, workload = job
        n = requests_for(mode, workload, quick)
        return bench_instructions.per_request_of(command(mode, workload, n), n)

    log(f"instructions: {len(jobs)} workloads under callgrind, n and 3n each ...")
    counts = dict(zip(jobs, bench_instructions.in_parallel(measure, jobs), strict=True))
    points = [
        {
            "mode": mode,
            "middleware": workload[0],
            "resources": workload[1],
            "calls": workload[2],
            "requests": requests_for(mode, workload, quick),  # n; the warm-up is n too
            "instructions_per_context": round(counts[mode, workload]),
        }
        for mode, workload in jobs
    ]
    axes = []
    for mode in modes:
        for axis in AXES:
            ys = [counts[mode, shape(axis, size)] for size in sizes]
            axes.append(
                {
                    "mode": mode,
                    "axis": axis,
                    "spans_per_step": SPANS_PER_STEP[axis] if mode == "traced" else 0,
                    "sizes": list(sizes),
                    "instructions": [round(y) for y in ys],
                    **linear_fit(list(sizes), ys),
                }
            )
    return {
        "method": "callgrind, (count(3n) - count(n)) / 2n per context, after n warm-up contexts",
        "modes": list(modes),
        "sizes": list(sizes),
        "points": points,
        "axes": axes,
    }


# -------------------------------------------------------------------- throughput


def _setup(mode: str) -> tuple[Any, Any, Any]:
    """Shape A's DataManager for ``mode``, the tracer provider (traced) and the
    hand-written control's tracer (``None`` when idle)."""
    import bench_core

    from polydatum import DataManager, Service

    bench_core.structlog_quiet()
    options: dict[str, Any] = {}
    provider = tracer = None
    if mode == "traced":
        provider = bench_core.tracer_provider()
        options["tracer_provider"] = provider
        tracer = provider.get_tracer("bench")
    dm = _workloads.build("A", DataManager, Service, **options)
    return dm, provider, tracer


def control_sync(tracer: Any) -> Callable[[], Any]:
    """Shape A without polydatum, for the same concurrency: the six spans by hand
    (``_workloads.handwritten_a``) when traced, the generators stepped by hand when idle."""
    if tracer is not None:
        return _workloads.handwritten_a(tracer)
    shim = SimpleNamespace(meta=_workloads.META)
    mw_fn, db_fn = _workloads.request_id_middleware, _workloads.db

    def run() -> Any:
        mw = mw_fn(shim)
        next(mw)
        resource = db_fn(shim)
        result = next(resource)["users"][1]
        next(mw, None)
        next(resource, None)
        return result

    return run


def control_async(tracer: Any) -> Callable[[], Awaitable[Any]]:
    """:func:`control_sync` as a coroutine with the ``await asyncio.sleep(0)`` where the
    polydatum task has it: after the call, before the teardowns."""
    shim = SimpleNamespace(meta=_workloads.META)
    mw_fn, db_fn = _workloads.request_id_middleware, _workloads.db
    sleep = asyncio.sleep
    if tracer is None:

        async def plain() -> Any:
            mw = mw_fn(shim)
            next(mw)
            resource = db_fn(shim)
            result = next(resource)["users"][1]
            await sleep(0)
            next(mw, None)
            next(resource, None)
            return result

        return plain

    span = tracer.start_as_current_span
    mw_attrs = {
        "polydatum.middleware.name": "request_id_middleware",
        "polydatum.middleware.position": 0,
    }
    mw_down = {**mw_attrs, "polydatum.outcome": "ok"}
    call_attrs = {"polydatum.service.path": "users.get", "code.function.name": _workloads.USERS_GET}

    async def traced() -> Any:
        with span("polydatum.context", attributes={"polydatum.context.id": os.urandom(8).hex()}):
            with span("polydatum.middleware.setup request_id_middleware", attributes=mw_attrs):
                mw = mw_fn(shim)
                next(mw)
            with span("users.get", attributes=call_attrs):
                with span(
                    "polydatum.resource.setup db", attributes={"polydatum.resource.name": "db"}
                ):
                    resource = db_fn(shim)
                    handle = next(resource)
                result = handle["users"][1]
            await sleep(0)
            with span("polydatum.middleware.teardown request_id_middleware", attributes=mw_down):
                next(mw, None)
            with span(
                "polydatum.resource.teardown db",
                attributes={"polydatum.resource.name": "db", "polydatum.outcome": "ok"},
            ):
                next(resource, None)
        return result

    return traced


def polydatum_async(dm: Any) -> Callable[[], Awaitable[Any]]:
    """One shape-A request through ``async with dm.dal(meta)``, open across an await."""
    meta = _workloads.META
    sleep = asyncio.sleep

    async def request() -> Any:
        async with dm.dal(meta) as dal:
            result = dal.users.get(1)
            await sleep(0)
        return result

    return request


def threads_batch(run: Callable[[], Any], workers: int, contexts: int) -> float:
    """Seconds for ``workers`` threads to run ``contexts`` requests in all (started
    together by a barrier; thread creation is not timed)."""
    each = contexts // workers
    barrier = threading.Barrier(workers + 1)
    errors: list[BaseException] = []
    want = _workloads.EXPECTED["A"]

    def work() -> None:
        barrier.wait()
        try:
            for _ in range(each):
                if run() != want:
                    raise AssertionError("shape A returned something unexpected")
        except BaseException as error:  # reported by the caller
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    barrier.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return elapsed


def tasks_batch(request: Callable[[], Awaitable[Any]], workers: int, contexts: int) -> float:
    """Seconds for ``workers`` asyncio tasks to run ``contexts`` requests in all, one
    after the other in each task (task creation is timed: it is part of the work)."""
    each = contexts // workers
    want = _workloads.EXPECTED["A"]

    async def work() -> None:
        for _ in range(each):
            if await request() != want:
                raise AssertionError("shape A returned something unexpected")

    async def batch() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(work() for _ in range(workers)))
        return time.perf_counter() - t0

    return asyncio.run(batch())


def throughput(modes: Sequence[str], rounds: int, scale: float) -> dict[str, Any]:
    """Contexts/s of the concurrent runners and their single-runner baselines, per mode,
    for polydatum and for the hand-written control."""
    results = [r for mode in modes for r in throughput_of(mode, rounds, scale)]
    return {
        "rounds": rounds,
        "switch_interval_s": sys.getswitchinterval(),
        "cpus": _cpus(),
        "results": results,
    }


def throughput_of(mode: str, rounds: int, scale: float) -> list[dict[str, Any]]:
    dm, provider, tracer = _setup(mode)
    n_threads = max(THREADS, int(CONTEXTS[mode, "threads"] * scale) // THREADS * THREADS)
    n_tasks = max(TASKS, int(CONTEXTS[mode, "asyncio"] * scale) // TASKS * TASKS)
    sync = {"polydatum": _workloads.request("A", dm), "control": control_sync(tracer)}
    coroutines = {"polydatum": polydatum_async(dm), "control": control_async(tracer)}
    runners: dict[tuple[str, str], tuple[Callable[[], float], int]] = {}
    for who in ("polydatum", "control"):
        run, request = sync[who], coroutines[who]
        for workers in (1, THREADS):
            runners[who, f"{workers} thread{'s' if workers > 1 else ''}"] = (
                partial(threads_batch, run, workers, n_threads),
                n_threads,
            )
        for workers in (1, TASKS):
            runners[who, f"{workers} task{'s' if workers > 1 else ''}"] = (
                partial(tasks_batch, request, workers, n_tasks),
                n_tasks,
            )
    settle = provider.force_flush if provider is not None else None
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in runners}
    keys = list(runners)
    log(f"throughput ({mode}): {rounds} rounds of {len(keys)} runners ...")
    for key in keys:  # warm-up
        runners[key][0]()
        if settle is not None:
            settle()
    for r in range(rounds):
        for i in range(len(keys)):
            key = keys[(r + i) % len(keys)]
            batch, contexts = runners[key]
            samples[key].append(contexts / batch())
            if settle is not None:
                settle()
    if provider is not None:
        provider.shutdown()
    results = []
    for kind, single, concurrent, workers, contexts in (
        ("threads", "1 thread", f"{THREADS} threads", THREADS, n_threads),
        ("asyncio", "1 task", f"{TASKS} tasks", TASKS, n_tasks),
    ):
        entry: dict[str, Any] = {
            "mode": mode,
            "kind": kind,
            "workers": workers,
            "contexts_per_batch": contexts,
        }
        for who in ("polydatum", "control"):
            base, many = samples[who, single], samples[who, concurrent]
            entry[who] = {
                "baseline": _cps(single, base),
                "concurrent": _cps(concurrent, many),
                "ratio_of_medians": round(statistics.median(many) / statistics.median(base), 3),
                "paired_ratio": round(
                    statistics.median(m / b for m, b in zip(many, base, strict=True)), 3
                ),
                # what concurrency adds to one request, in µs (medians)
                "extra_us": round(1e6 / statistics.median(many) - 1e6 / statistics.median(base), 3),
            }
        results.append(entry)
    return results


def _cps(name: str, samples: list[float]) -> dict[str, Any]:
    return {
        "runner": name,
        "median_cps": round(statistics.median(samples)),
        "max_cps": round(max(samples)),
        "samples_cps": [round(s) for s in samples],
    }


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# -------------------------------------------------------------------------- report


def render(report: dict[str, Any]) -> str:
    quick = "  [QUICK: figures are not meaningful]" if report["quick"] else ""
    lines = [f"polydatum {report['polydatum']} on Python {report['python']}{quick}"]
    part = report.get("instructions")
    if part is not None:
        sizes = part["sizes"]
        lines += [
            "",
            f"instructions per context ({part['method']})",
            "",
            f"{'mode':<7} {'axis':<11} "
            + " ".join(f"{f'n={s}':>11}" for s in sizes)
            + f" {'per step':>9} {'intercept':>10} {'max resid':>9} {'R²':>9}"
            + "  per step between points",
        ]
        for axis in part["axes"]:
            steps = ", ".join(f"{s['from']}→{s['to']}: {s['per_step']:,}" for s in axis["steps"])
            lines.append(
                f"{axis['mode']:<7} {axis['axis']:<11} "
                + " ".join(f"{y:>11,}" for y in axis["instructions"])
                + f" {axis['slope']:>9,} {axis['intercept']:>10,} "
                f"{axis['max_residual_pct']:>8.2f}% {axis['r2']:>9.6f}  {steps}"
            )
    part = report.get("throughput")
    if part is not None:
        lines += [
            "",
            f"throughput of shape A contexts, wall clock ({part['rounds']} interleaved rounds, "
            f"{part['cpus']} CPUs, switch interval {part['switch_interval_s'] * 1000:g} ms); "
            "control: the same work by hand (traced: the six spans by hand)",
            "",
            f"{'mode':<7} {'runner':<10} {'contexts':>8} {'who':<9} {'single ctx/s':>13} "
            f"{'concurrent ctx/s':>17} {'ratio':>6} {'paired':>7} {'extra µs':>9}",
        ]
        for r in part["results"]:
            for who in ("polydatum", "control"):
                x = r[who]
                lines.append(
                    f"{r['mode']:<7} {x['concurrent']['runner']:<10} "
                    f"{r['contexts_per_batch']:>8} {who:<9} "
                    f"{x['baseline']['median_cps']:>13,} {x['concurrent']['median_cps']:>17,} "
                    f"{x['ratio_of_medians']:>6.3f} {x['paired_ratio']:>7.3f} "
                    f"{x['extra_us']:>9.2f}"
                )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument(
        "--quick", action="store_true",
        help=f"sizes {QUICK_SIZES}, n=2, instructions of the first mode only (each callgrind "
        "run of an interpreter importing the SDK takes seconds), small batches, 2 rounds: "
        "checks it works",
    )  # fmt: skip
    parser.add_argument("--parts", default=",".join(PARTS), help="instructions,throughput")
    parser.add_argument("--modes", default=",".join(MODES), help="idle,traced")
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES)), help="steps per axis (default 1,5,20,100)"
    )
    parser.add_argument("--rounds", type=int, default=7, help="throughput rounds (default 7)")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply the throughput batches (default 1.0)"
    )
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return args
    args.part_set = _choices(parser, "--parts", args.parts, PARTS)
    args.mode_list = [m for m in MODES if m in _choices(parser, "--modes", args.modes, MODES)]
    try:
        args.size_list = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--sizes: integers, not {args.sizes!r}")
    if len(args.size_list) < 2 or args.size_list[0] < 1:
        parser.error("--sizes: at least two sizes, each at least 1")
    args.instruction_modes = args.mode_list
    if args.quick:
        args.instruction_modes = args.mode_list[:1]
        args.size_list = list(QUICK_SIZES)
        args.rounds = min(args.rounds, 2)
        args.scale = min(args.scale, 0.02)
    return args


def _choices(
    parser: argparse.ArgumentParser, flag: str, value: str, known: Sequence[str]
) -> set[str]:
    wanted = {v.strip() for v in value.split(",") if v.strip()}
    unknown = wanted - set(known)
    if unknown or not wanted:
        parser.error(f"{flag}: unknown {sorted(unknown)}; use {','.join(known)}")
    return wanted


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.child:
        mode, *numbers = args.child
        middleware, resources, calls, n, warmup = map(int, numbers)
        child(mode, middleware, resources, calls, n, warmup)
        return None
    import polydatum

    report: dict[str, Any] = {
        "polydatum": polydatum.__version__,
        "python": platform.python_version(),
        "quick": args.quick,
        "modes": args.mode_list,
    }
    if "instructions" in args.part_set:
        report["instructions"] = instructions(args.instruction_modes, args.size_list, args.quick)
    if "throughput" in args.part_set:
        report["throughput"] = throughput(args.mode_list, args.rounds, args.scale)
    if args.json:
        print(json.dumps(report, indent=2))
        log(render(report))
    else:
        print(render(report))
    return report


if __name__ == "__main__":
    main()
