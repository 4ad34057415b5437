"""The two application shapes the benchmark runs, written against polydatum 0.9.1's API only.

This module is imported twice: by ``bench_core.py`` (with this checkout's polydatum)
and by ``_legacy_runner.py`` inside the 0.9.1 virtualenv, so both versions run
byte-for-byte the same application code. It therefore uses nothing newer than
0.9.1 offers: ``DataManager``, ``Service``, generator middleware and resources,
``dm.dal(meta)``, ``self._ctx.<resource>`` and ``self._dal`` for nested calls.

Shape A: 1 context middleware, 1 lazy resource, 1 service call.
Shape B: 5 context middleware, 3 lazy resources, 10 service calls, 4 of them nested
(``orders.summary`` calls ``users.profile.get``, which calls ``users.get``, and
``orders.list``; ``users.profile.get`` is also called directly).

The "work" is deliberately tiny (dictionary look-ups) so that the framework's own
overhead is what the benchmark measures.

The end of the module holds the hand-written references polydatum is compared with
when it records (shape A without polydatum, one function per reference). They take
the tracer, meter and logger as arguments and import nothing at module level beyond
the standard library, so the 0.9.1 child can still import this module.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator
from random import getrandbits
from types import SimpleNamespace
from typing import Any

META = {"request_id": "r-0001", "tenant": "acme"}

#: Expected results, checked against both versions before timing.
EXPECTED = {
    "A": "ada",
    "B": [
        "ada",
        {"name": "ada", "lang": "en"},
        [("o-1", 12.5)],
        {"profile": {"name": "ada", "lang": "en"}, "orders": [("o-1", 12.5)]},
        "grace",
        [("o-2", 7.0)],
    ],
}


# --------------------------------------------------------------------------- shape A


def request_id_middleware(ctx: Any) -> Generator[None, None, None]:
    """Reads the request id from the meta on setup; nothing on teardown."""
    ctx.meta.get("request_id")
    yield


def db(ctx: Any) -> Generator[dict[str, Any], None, None]:
    """A stand-in database handle: set up lazily, 'committed' on teardown."""
    handle = {"users": {1: "ada", 2: "grace"}, "committed": False}
    yield handle
    handle["committed"] = True


# --------------------------------------------------------------------------- shape B


def auth_middleware(ctx: Any) -> Generator[None, None, None]:
    ctx.meta.get("request_id")
    yield


def tenant_middleware(ctx: Any) -> Generator[None, None, None]:
    ctx.meta.get("tenant")
    yield


def audit_middleware(ctx: Any) -> Generator[None, None, None]:
    events = ["start"]
    yield
    events.append("end")


def locale_middleware(ctx: Any) -> Generator[None, None, None]:
    ctx.meta.get("locale", "en")
    yield


def quota_middleware(ctx: Any) -> Generator[None, None, None]:
    used = 0
    yield
    used += 1


def cache(ctx: Any) -> Generator[dict[Any, Any], None, None]:
    store: dict[Any, Any] = {1: "en", 2: "fr"}
    yield store
    store.clear()


def blob(ctx: Any) -> Generator[dict[str, Any], None, None]:
    bucket = {"orders": {1: [("o-1", 12.5)], 2: [("o-2", 7.0)]}}
    yield bucket


def build(shape: str, DataManager: Any, Service: Any, **dm_options: Any) -> Any:
    """A DataManager with the services, resources and middleware of ``shape`` ("A" or "B").

    ``DataManager`` and ``Service`` come from whichever polydatum is importable, so
    the same code builds the app on both versions; ``dm_options`` (this checkout
    only) passes explicit tracer/meter providers.
    """

    class Users(Service):  # type: ignore[misc]
        def get(self, user_id: int) -> Any:
            return self._ctx.db["users"][user_id]

    class Profiles(Service):  # type: ignore[misc]
        def get(self, user_id: int) -> Any:
            lang = self._ctx.cache[user_id]
            return {"name": self._dal.users.get(user_id), "lang": lang}

    class Orders(Service):  # type: ignore[misc]
        def list(self, user_id: int) -> Any:
            assert self._ctx.db["users"][user_id]
            return self._ctx.blob["orders"][user_id]

        def summary(self, user_id: int) -> Any:
            return {
                "profile": self._dal.users.profile.get(user_id),
                "orders": self._dal.orders.list(user_id),
            }

    dm = DataManager(**dm_options)
    if shape == "A":
        dm.register_context_middleware(request_id_middleware)
        dm.register_resources(db=db)
        dm.register_services(users=Users())
    elif shape == "B":
        dm.register_context_middleware(
            auth_middleware, tenant_middleware, audit_middleware, locale_middleware,
            quota_middleware,
        )  # fmt: skip
        dm.register_resources(db=db, cache=cache, blob=blob)
        dm.register_services(users=Users().register_services(profile=Profiles()), orders=Orders())
    else:
        raise ValueError(f"unknown shape {shape!r}: use 'A' or 'B'")
    return dm


def request(shape: str, dm: Any) -> Callable[[], Any]:
    """One request of ``shape``: a context through ``dm.dal(meta)`` and its service calls."""
    meta = META
    if shape == "A":

        def run_a() -> Any:
            with dm.dal(meta) as dal:
                return dal.users.get(1)

        return run_a

    def run_b() -> Any:
        with dm.dal(meta) as dal:
            return [
                dal.users.get(1),  # 1 call
                dal.users.profile.get(1),  # 2 calls (1 nested)
                dal.orders.list(1),  # 1 call
                dal.orders.summary(1),  # 4 calls (3 nested)
                dal.users.get(2),  # 1 call
                dal.orders.list(2),  # 1 call
            ]

    return run_b


def timed_batch(run: Callable[[], Any], n: int) -> float:
    """Run ``run`` ``n`` times; the elapsed wall time in seconds (``perf_counter``)."""
    perf_counter = time.perf_counter
    t0 = perf_counter()
    for _ in range(n):
        run()
    return perf_counter() - t0


# ------------------------------------------------ hand-written references (shape A)
#
# Shape A written by hand against the OpenTelemetry API and structlog: the same work
# (the same generators, stepped in polydatum's order) and the same telemetry
# polydatum records for it (DESIGN.md §4, polydatum/telemetry.py). bench_core.py's
# span_check and everything_check verify, on every run, that each records exactly
# what polydatum records; only then is a ratio against it fair.

#: The contenders' names, shared by bench_core.py and bench_instructions.py.
STEPS_OFF = "polydatum A, step_metrics=False"
REFERENCE_SPANS = "hand-written A (6 spans)"
REFERENCE_EVERYTHING = "hand-written A (6 spans + 6 metric samples + canonical INFO line)"
REFERENCE_STEPS_OFF = (
    "hand-written A, step_metrics=False (6 spans + 2 metric samples + canonical INFO line)"
)
#: The reference of the first everything-on target (1.3x): no metrics, a 3-field line.
REFERENCE_OLD = "hand-written A (6 spans + 1 INFO line, no metrics: old reference)"

#: polydatum's histogram bucket advice (``polydatum.telemetry.DURATION_BUCKETS``), by hand.
DURATION_BUCKETS = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
]  # fmt: skip

#: ``code.function.name`` of ``users.get`` (the method's module and qualified name).
USERS_GET = f"{__name__}.build.<locals>.Users.get"

_MW_SPAN_ATTRS = {
    "polydatum.middleware.name": "request_id_middleware",
    "polydatum.middleware.position": 0,
}
_MW_DOWN_SPAN_ATTRS = {**_MW_SPAN_ATTRS, "polydatum.outcome": "ok"}
_DB_SPAN_ATTRS = {"polydatum.resource.name": "db"}
_DB_DOWN_SPAN_ATTRS = {**_DB_SPAN_ATTRS, "polydatum.outcome": "ok"}
_CALL_SPAN_ATTRS = {"polydatum.service.path": "users.get", "code.function.name": USERS_GET}


def handwritten_a(tracer: Any, logger: Any = None) -> Callable[[], Any]:
    """Shape A without polydatum: the same work and the same six spans, by hand.

    The spans carry the attributes polydatum records (DESIGN.md §4) and nest the
    same way: the lazy resource's setup under the service call that needs it,
    everything else under the context span. With ``logger``, one INFO line with three
    fields at the end (the old reference of the everything condition: no metrics, a
    line shorter than polydatum's canonical one). Unchanged since it was written (its
    context id comes from ``os.urandom``; the references below use polydatum's
    ``getrandbits``), so its figures compare with earlier runs.
    """
    shim = SimpleNamespace(meta=META)
    mw_fn = request_id_middleware
    db_fn = db
    span = tracer.start_as_current_span
    perf_counter = time.perf_counter

    def run() -> Any:
        t0 = perf_counter()
        context_id = os.urandom(8).hex()
        with span("polydatum.context", attributes={"polydatum.context.id": context_id}):
            with span(
                "polydatum.middleware.setup request_id_middleware", attributes=_MW_SPAN_ATTRS
            ):
                mw = mw_fn(shim)
                next(mw)
            with span("users.get", attributes=_CALL_SPAN_ATTRS):
                with span("polydatum.resource.setup db", attributes=_DB_SPAN_ATTRS):
                    resource = db_fn(shim)
                    handle = next(resource)
                result = handle["users"][1]
            with span(
                "polydatum.middleware.teardown request_id_middleware",
                attributes=_MW_DOWN_SPAN_ATTRS,
            ):
                next(mw, None)
            with span("polydatum.resource.teardown db", attributes=_DB_DOWN_SPAN_ATTRS):
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


def handwritten_instruments(meter: Any) -> SimpleNamespace:
    """polydatum's instruments, created by hand on ``meter``: the same names, kinds,
    units, descriptions and bucket advice (``polydatum.telemetry._Instruments``).

    ``active`` is the one-element list the ``polydatum.context.active`` callback
    reads: a reference adds 1 when a context starts and subtracts it at the end.
    """
    from opentelemetry.metrics import Observation

    buckets = DURATION_BUCKETS
    active = [0]
    instruments = SimpleNamespace(active=active)
    instruments.context_duration = meter.create_histogram(
        "polydatum.context.duration", unit="s",
        description="Duration of a polydatum context, from enter to the end of teardown.",
        explicit_bucket_boundaries_advisory=buckets,
    )  # fmt: skip
    instruments.middleware_duration = meter.create_histogram(
        "polydatum.middleware.duration", unit="s",
        description="Duration of one context-middleware phase (setup or teardown).",
        explicit_bucket_boundaries_advisory=buckets,
    )  # fmt: skip
    instruments.resource_duration = meter.create_histogram(
        "polydatum.resource.duration", unit="s",
        description="Duration of one resource phase (lazy setup or teardown).",
        explicit_bucket_boundaries_advisory=buckets,
    )  # fmt: skip
    instruments.service_duration = meter.create_histogram(
        "polydatum.service.duration", unit="s",
        description="Duration of one service method call through the DAL.",
        explicit_bucket_boundaries_advisory=buckets,
    )  # fmt: skip
    instruments.teardown_errors = meter.create_counter(
        "polydatum.resource.teardown.errors", unit="{error}",
        description="Errors raised by resources while tearing down (suppressed and recorded).",
    )  # fmt: skip
    meter.create_observable_up_down_counter(
        "polydatum.context.active", callbacks=[lambda _options: [Observation(active[0])]],
        unit="{context}", description="Contexts currently entered and not yet exited.",
    )  # fmt: skip
    return instruments


def log_context_line(
    info: Callable[..., Any], context_id: str, duration: float, setup_s: float, down_s: float
) -> None:
    """The canonical INFO line polydatum logs for a successful shape-A context, by hand."""
    info(
        "polydatum.context",
        context_id=context_id,
        outcome="ok",
        duration_ms=round(duration * 1000, 3),
        middleware=[
            {
                "name": "request_id_middleware",
                "setup_ms": round(setup_s * 1000, 3),
                "teardown_ms": round(down_s * 1000, 3),
            }
        ],
        resources=["db"],
        service_calls=1,
        teardown_errors=[],
    )


def handwritten_everything_a(tracer: Any, meter: Any, logger: Any) -> Callable[[], Any]:
    """Shape A by hand with everything polydatum records for it when all is on.

    The six spans of :func:`handwritten_a`; the six histogram samples of DESIGN.md §4
    (the context's duration without attributes; each middleware and resource phase by
    name and phase; the call by path), each recorded while its step's span is current,
    so that the SDK's exemplar filter sees the same span as polydatum's explicit
    context; the ``polydatum.context.active`` gauge kept up to date; and polydatum's
    canonical INFO line (``polydatum.context``: the context id, outcome, duration,
    each middleware with its phase durations, the resources set up, the number of
    service calls, the teardown errors; the trace and span ids come from
    ``configure_logging``'s processor, since the line is logged in the context span).
    """
    shim = SimpleNamespace(meta=META)
    mw_fn = request_id_middleware
    db_fn = db
    span = tracer.start_as_current_span
    clock = time.perf_counter
    instruments = handwritten_instruments(meter)
    active = instruments.active
    record_context = instruments.context_duration.record
    record_middleware = instruments.middleware_duration.record
    record_resource = instruments.resource_duration.record
    record_call = instruments.service_duration.record
    mw_setup = {"polydatum.middleware.name": "request_id_middleware", "polydatum.phase": "setup"}
    mw_down = {"polydatum.middleware.name": "request_id_middleware", "polydatum.phase": "teardown"}
    db_setup = {"polydatum.resource.name": "db", "polydatum.phase": "setup"}
    db_down = {"polydatum.resource.name": "db", "polydatum.phase": "teardown"}
    call = {"polydatum.service.path": "users.get"}
    info = logger.info

    def run() -> Any:
        t0 = clock()
        active[0] += 1
        try:
            context_id = f"{getrandbits(64):016x}"
            with span("polydatum.context", attributes={"polydatum.context.id": context_id}):
                with span(
                    "polydatum.middleware.setup request_id_middleware", attributes=_MW_SPAN_ATTRS
                ):
                    t = clock()
                    mw = mw_fn(shim)
                    next(mw)
                    mw_setup_s = clock() - t
                    record_middleware(mw_setup_s, mw_setup)
                with span("users.get", attributes=_CALL_SPAN_ATTRS):
                    t_call = clock()
                    with span("polydatum.resource.setup db", attributes=_DB_SPAN_ATTRS):
                        t = clock()
                        resource = db_fn(shim)
                        handle = next(resource)
                        record_resource(clock() - t, db_setup)
                    result = handle["users"][1]
                    record_call(clock() - t_call, call)
                with span(
                    "polydatum.middleware.teardown request_id_middleware",
                    attributes=_MW_DOWN_SPAN_ATTRS,
                ):
                    t = clock()
                    next(mw, None)
                    mw_down_s = clock() - t
                    record_middleware(mw_down_s, mw_down)
                with span("polydatum.resource.teardown db", attributes=_DB_DOWN_SPAN_ATTRS):
                    t = clock()
                    next(resource, None)
                    record_resource(clock() - t, db_down)
                duration = clock() - t0
                record_context(duration)
                log_context_line(info, context_id, duration, mw_setup_s, mw_down_s)
        finally:
            active[0] -= 1
        return result

    return run


def handwritten_everything_lean_a(tracer: Any, meter: Any, logger: Any) -> Callable[[], Any]:
    """What polydatum records for shape A with ``DataManager(step_metrics=False)``, by hand.

    :func:`handwritten_everything_a` without the four phase samples
    (``polydatum.middleware.duration``, ``polydatum.resource.duration``): the six
    spans, the context and call samples, the gauge and the same canonical line, whose
    middleware phase durations are still timed (the resource phases no longer are:
    nothing uses their duration).
    """
    shim = SimpleNamespace(meta=META)
    mw_fn = request_id_middleware
    db_fn = db
    span = tracer.start_as_current_span
    clock = time.perf_counter
    instruments = handwritten_instruments(meter)
    active = instruments.active
    record_context = instruments.context_duration.record
    record_call = instruments.service_duration.record
    call = {"polydatum.service.path": "users.get"}
    info = logger.info

    def run() -> Any:
        t0 = clock()
        active[0] += 1
        try:
            context_id = f"{getrandbits(64):016x}"
            with span("polydatum.context", attributes={"polydatum.context.id": context_id}):
                with span(
                    "polydatum.middleware.setup request_id_middleware", attributes=_MW_SPAN_ATTRS
                ):
                    t = clock()
                    mw = mw_fn(shim)
                    next(mw)
                    mw_setup_s = clock() - t
                with span("users.get", attributes=_CALL_SPAN_ATTRS):
                    t_call = clock()
                    with span("polydatum.resource.setup db", attributes=_DB_SPAN_ATTRS):
                        resource = db_fn(shim)
                        handle = next(resource)
                    result = handle["users"][1]
                    record_call(clock() - t_call, call)
                with span(
                    "polydatum.middleware.teardown request_id_middleware",
                    attributes=_MW_DOWN_SPAN_ATTRS,
                ):
                    t = clock()
                    next(mw, None)
                    mw_down_s = clock() - t
                with span("polydatum.resource.teardown db", attributes=_DB_DOWN_SPAN_ATTRS):
                    next(resource, None)
                duration = clock() - t0
                record_context(duration)
                log_context_line(info, context_id, duration, mw_setup_s, mw_down_s)
        finally:
            active[0] -= 1
        return result

    return run
