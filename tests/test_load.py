"""Load and isolation: many contexts at once, in threads and asyncio tasks.

* 100,000 contexts with idle telemetry: 8 threads run 6,250 sync contexts each while
  1,000 asyncio tasks run 50 async contexts each, every context doing randomised
  work (0-3 service calls, a lazily created resource, awaits that interleave the
  tasks, one in ten failing). No context ever sees another's Meta or resources, and
  every resource is torn down by the context that created it.
* 4,000 of them again with in-memory tracing: every span tree is complete and
  correctly parented (one trace per context, the right Meta on the context span).
* Memory is flat: after a warm-up, 20,000 more contexts leave fewer than 100 new
  objects behind (``gc.get_objects()``) and 1,000 leave less than 64 KiB of new
  allocations (tracemalloc, after garbage collection).

Throughput is measured by ``benchmarks/``, not here; the figures printed with ``-s``
are informative only.
"""

from __future__ import annotations

import asyncio
import gc
import random
import threading
import time
import tracemalloc
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from typing import Any

from polydatum import DataManager, Service, get_active_context
from polydatum.testing import SpanRecord, TelemetryCapture

THREADS = 8
SYNC_PER_THREAD = 6_250
TASKS = 1_000
ASYNC_PER_TASK = 50


class AppError(Exception):
    pass


class Conn:
    """A per-context handle that knows which request it belongs to."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.closed = False


class Work(Service):
    def whoami(self) -> tuple[str, str]:
        ctx = self._ctx
        return ctx.meta.req, ctx.conn.owner

    async def awhoami(self) -> tuple[str, str]:
        await asyncio.sleep(0)  # let other tasks run while this context is open
        ctx = self._ctx
        conn = await ctx.aresource("aconn")
        await asyncio.sleep(0)
        return ctx.meta.req, conn.owner


class Ledger:
    """What every context saw; checked after the run."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.problems: list[str] = []
        self.torn_down = 0
        self.contexts = 0

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)


def build(ledger: Ledger, dm: DataManager | None = None) -> DataManager:
    dm = dm or DataManager()

    def torn_down(ctx: Any, handle: Conn) -> None:
        if get_active_context() is not ctx:
            ledger.problem(f"{handle.owner}: torn down while another context was active")
        if handle.closed:
            ledger.problem(f"{handle.owner}: torn down twice")
        handle.closed = True
        with ledger.lock:
            ledger.torn_down += 1

    def conn(ctx: Any) -> Iterator[Conn]:
        handle = Conn(ctx.meta.req)
        try:
            yield handle
        finally:
            torn_down(ctx, handle)

    async def aconn(ctx: Any) -> AsyncIterator[Conn]:
        handle = Conn(ctx.meta.req)
        await asyncio.sleep(0)
        try:
            yield handle
        finally:
            await asyncio.sleep(0)
            torn_down(ctx, handle)

    dm.register_services(work=Work())
    dm.register_resources(conn=conn, aconn=aconn)
    return dm


def plan(rng: random.Random) -> tuple[int, bool]:
    """How many service calls a context makes and whether it fails."""
    return rng.randint(0, 3), rng.random() < 0.1


def run_sync(dm: DataManager, ledger: Ledger, req: str, calls: int, fail: bool) -> None:
    try:
        with dm.dal({"req": req}) as dal:
            for _ in range(calls):
                seen = dal.work.whoami()
                if seen != (req, req):
                    ledger.problem(f"{req} saw {seen}")
            if fail:
                raise AppError(req)
    except AppError as error:
        if error.args != (req,):
            ledger.problem(f"{req} got {error.args}")
    if get_active_context() is not None:
        ledger.problem(f"{req}: a context stayed active")


async def run_async(dm: DataManager, ledger: Ledger, req: str, calls: int, fail: bool) -> None:
    try:
        async with dm.dal({"req": req}) as dal:
            for _ in range(calls):
                seen = await dal.work.awhoami()
                if seen != (req, req):
                    ledger.problem(f"{req} saw {seen}")
            await asyncio.sleep(0)
            if fail:
                raise AppError(req)
    except AppError as error:
        if error.args != (req,):
            ledger.problem(f"{req} got {error.args}")
    if get_active_context() is not None:
        ledger.problem(f"{req}: a context stayed active")


def run_load(
    dm: DataManager, ledger: Ledger, per_thread: int, tasks: int, per_task: int
) -> dict[str, tuple[int, bool]]:
    """Run threads and tasks at the same time; returns every context's plan by id."""
    plans: dict[str, tuple[int, bool]] = {}
    plans_lock = threading.Lock()
    start = threading.Barrier(THREADS + 1)

    def thread_main(t: int) -> None:
        rng = random.Random(t)
        start.wait()
        for i in range(per_thread):
            req = f"t{t}-{i}"
            calls, fail = plan(rng)
            with plans_lock:
                plans[req] = (calls, fail)
            run_sync(dm, ledger, req, calls, fail)

    async def task_main(k: int) -> None:
        rng = random.Random(10_000 + k)
        for i in range(per_task):
            req = f"a{k}-{i}"
            calls, fail = plan(rng)
            with plans_lock:
                plans[req] = (calls, fail)
            await run_async(dm, ledger, req, calls, fail)

    async def all_tasks() -> None:
        await asyncio.gather(*(task_main(k) for k in range(tasks)))

    threads = [threading.Thread(target=thread_main, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    start.wait()
    asyncio.run(all_tasks())
    for thread in threads:
        thread.join()
    return plans


def test_100k_contexts_in_threads_and_tasks_stay_isolated() -> None:
    ledger = Ledger()
    dm = build(ledger)
    t0 = time.perf_counter()
    plans = run_load(dm, ledger, SYNC_PER_THREAD, TASKS, ASYNC_PER_TASK)
    elapsed = time.perf_counter() - t0
    assert len(plans) == THREADS * SYNC_PER_THREAD + TASKS * ASYNC_PER_TASK == 100_000
    assert ledger.problems == []
    # every context that made a call created its resource once and tore it down once
    assert ledger.torn_down == sum(1 for calls, _ in plans.values() if calls)
    print(f"\n100,000 contexts in {elapsed:.2f} s: {100_000 / elapsed:,.0f} contexts/s")


def _tree(records: list[SpanRecord], root: SpanRecord) -> tuple[str, list[Any]]:
    children = sorted((r for r in records if r.parent_id == root.span_id), key=lambda r: r.start)
    return (root.name, [_tree(records, c) for c in children])


def expected_tree(calls: int, fail: bool, is_async: bool) -> tuple[str, list[Any]]:
    service = "work.awhoami" if is_async else "work.whoami"
    resource = "aconn" if is_async else "conn"
    steps: list[Any] = []
    for i in range(calls):
        steps.append((service, [(f"polydatum.resource.setup {resource}", [])] if i == 0 else []))
    if calls:
        steps.append((f"polydatum.resource.teardown {resource}", []))
    return ("polydatum.context", steps)


def test_span_trees_are_complete_under_load() -> None:
    ledger = Ledger()
    with TelemetryCapture() as cap:
        dm = build(ledger, cap.data_manager(meta_attributes=["req"]))
        plans = run_load(dm, ledger, per_thread=250, tasks=250, per_task=8)
        records = cap.spans()
    assert len(plans) == 4_000
    assert ledger.problems == []
    by_trace: dict[int, list[SpanRecord]] = defaultdict(list)
    for record in records:
        by_trace[record.trace_id].append(record)
    assert len(by_trace) == 4_000  # one trace per context: nothing leaked across
    seen = set()
    for spans in by_trace.values():
        (root,) = [s for s in spans if s.parent_id is None]
        req = root.attributes["polydatum.meta.req"]
        seen.add(req)
        calls, fail = plans[req]
        assert _tree(spans, root) == expected_tree(calls, fail, req.startswith("a")), req
        assert root.status == ("ERROR" if fail else "UNSET")
        if fail:
            assert root.attributes["error.type"].endswith("AppError")
    assert seen == set(plans)


def test_memory_is_flat_after_warm_up() -> None:
    ledger = Ledger()
    dm = build(ledger)
    rng = random.Random(7)
    for i in range(2_000):  # warm-up: caches, interned strings, free lists
        run_sync(dm, ledger, f"w{i}", *plan(rng))
    gc.collect()
    objects_before = len(gc.get_objects())
    for i in range(20_000):
        run_sync(dm, ledger, f"n{i}", *plan(rng))
    gc.collect()
    object_growth = len(gc.get_objects()) - objects_before
    # tracemalloc slows every allocation down: bytes are measured over fewer contexts.
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(1_000):
        run_sync(dm, ledger, f"m{i}", *plan(rng))
    gc.collect()
    after, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert ledger.problems == []
    assert object_growth < 100, f"{object_growth} objects retained by 20,000 contexts"
    growth = after - before
    assert growth < 64 * 1024, f"{growth} bytes retained by 1,000 contexts"
    print(
        f"\nretained: {object_growth} objects after 20,000 contexts, {growth} B after 1,000 "
        f"(peak {(peak - before) / 1024:.1f} KiB)"
    )
