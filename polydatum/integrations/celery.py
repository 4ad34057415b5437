"""Celery: one polydatum context per task run, with Meta and trace from the producer.

::

    from celery import Celery
    from polydatum.integrations.celery import PolydatumTask, init_celery

    app = Celery("shop", broker=..., backend=..., task_cls=PolydatumTask)
    init_celery(app, dm)

    @app.task(bind=True, max_retries=3)
    def charge(self, order_id):
        return self.dal.orders.charge(order_id)     # or dm.get_dal() / services

    @app.task(bind=True)
    async def refund(self, order_id):               # an async body is awaited
        return await self.dal.orders.refund(order_id)

Every run of a task (each retry is a run) happens inside one context of the
DataManager; its outcome is the task's (a task that succeeds has committed, one that
fails rolled back -- including a failed COMMIT, which raises
:class:`~polydatum.errors.CommitError` and fails the task).

* **Sync or async context**, decided once per DataManager (at ``worker_init``, or at
  the first task run of a process that had none): a DataManager with an
  async-generator resource or context middleware, or an ``async def`` service
  method, needs ``async with dm.context(meta)``; any other runs in ``with
  dm.context(meta)``. A task whose body is ``async def`` also runs in an async
  context. Register everything before the worker starts.
* **The event loop**: an async context runs on one event loop per worker thread,
  created at its first task and kept until the worker stops. Async connection pools
  (asyncpg, psycopg, aiosqlite through SQLAlchemy's ``AsyncEngine``) are bound to
  the loop their connections were made on, so a loop per task (``asyncio.run``)
  would break them. With ``--pool solo`` the loop is the worker's main thread's;
  with ``prefork`` each child process has its own (created in the child, never
  inherited through ``fork``); ``threads`` with more than one thread, ``gevent``
  and ``eventlet`` cannot share one process's async pools between their threads
  or greenlets, and the worker refuses to start. A sync body in an async context
  runs on the loop (it must not start one of its own; make it ``async def`` to
  await async resources).
* **Meta** comes from ``meta(task)`` (default :func:`default_meta`): ``task`` (the
  name), ``task_id``, ``retries``, plus what the producer attached: when a task is
  published while a polydatum context is active (of any DataManager, in sync code or
  in a coroutine), the values of its Meta keys listed in the app's
  ``propagate_meta`` (default ``("request_id",)``) travel in the ``polydatum_meta``
  message header; a producer can also pass
  ``apply_async(headers={"polydatum_meta": {...}})``. Producer values never
  override the task's own keys. Keep ``propagate_meta`` to small, JSON-serializable,
  non-secret values: they are stored in the broker.
* **Trace**: the producer's current span context is injected into the standard
  message headers (``traceparent``... through the globally configured
  propagator), where ``opentelemetry-instrumentation-celery`` puts and reads it.
  In the worker the context span is a child of the current span: the CONSUMER
  ``run/<task>`` span of opentelemetry-instrumentation-celery when it is
  installed; without it, polydatum extracts the producer's context from the
  message itself, so the task's context span is a child of the producer's span.
  Messages published by earlier versions of polydatum carried it in a private
  ``polydatum_trace`` header instead: still read, while such messages may be queued
  (deprecated; nothing writes it any more).
* An error raised by the task (including Celery's ``Retry``) reaches context
  middleware and resources (rollback) and is re-raised for Celery to handle; resource
  teardown errors are suppressed and recorded, as in any context.

Worker lifecycle: ``worker_init`` validates the DataManager, and checks that the
worker's pool can run it: a problem stops the worker from starting, with every
problem listed (and logged: ``polydatum.worker.invalid_data_manager``).
``worker_shutdown`` (and, in a prefork child, ``worker_process_shutdown``) disposes
resources (SQL engine pools) -- an async ``dispose()`` on the loop that made the
connections -- and closes the process's event loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import os
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter

from polydatum.access import public_methods
from polydatum.context import get_active_context
from polydatum.errors import ValidationError
from polydatum.integrations import adispose_resources, dispose_resources, missing_framework
from polydatum.lifecycle import callable_name
from polydatum.meta import Meta

try:
    from celery import Celery, Task, signals
    from celery.concurrency import ALIASES as _POOL_ALIASES
except ImportError as _error:  # pragma: no cover - exercised in a subprocess test
    missing_framework("polydatum.integrations.celery", "Celery", "celery", _error)

if TYPE_CHECKING:
    from polydatum.access import DataAccessLayer
    from polydatum.registry import DataManager

__all__ = ["META_HEADER", "TRACE_HEADER", "PolydatumTask", "default_meta", "init_celery"]

#: Message header carrying the producer's Meta values (a JSON object).
META_HEADER = "polydatum_meta"
#: Deprecated: the private header in which earlier versions of polydatum carried the
#: producer's trace context. Still read, for messages such a producer published; never
#: written (the trace context travels in the standard headers, ``traceparent``...).
TRACE_HEADER = "polydatum_trace"
#: The Meta keys that travel when the publishing app is not known (``send_task`` by
#: name from a context of a DataManager that no app was configured with).
DEFAULT_PROPAGATE_META = ("request_id",)

_log = structlog.get_logger("polydatum")


@dataclass(frozen=True)
class _Config:
    data_manager: DataManager
    meta: Callable[[Any], Mapping[str, Any] | Meta]
    propagate_meta: tuple[str, ...]


_CONFIGS: weakref.WeakKeyDictionary[Any, _Config] = weakref.WeakKeyDictionary()


def _header(request: Any, name: str) -> Any:
    """A custom message header as the worker sees it (an attribute of the request, or
    in its ``headers`` mapping)."""
    value = getattr(request, name, None)
    if value is None:
        headers = getattr(request, "headers", None)
        if isinstance(headers, Mapping):
            value = headers.get(name)
    return value


def default_meta(task: Any) -> dict[str, Any]:
    """Meta for one task run: ``task``, ``task_id``, ``retries`` and the producer's values."""
    request = task.request
    meta: dict[str, Any] = {
        "task": task.name,
        "task_id": request.id,
        "retries": request.retries or 0,
    }
    produced = _header(request, META_HEADER)
    if isinstance(produced, Mapping):
        for key, value in produced.items():
            if isinstance(key, str):
                meta.setdefault(key, value)
    return meta


def init_celery(
    app: Celery,
    data_manager: DataManager,
    *,
    meta: Callable[[Any], Mapping[str, Any] | Meta] | None = None,
    propagate_meta: Iterable[str] = DEFAULT_PROPAGATE_META,
) -> None:
    """Run the tasks of ``app`` that use :class:`PolydatumTask` in contexts of ``data_manager``.

    Call it in the module that defines ``app`` (producers and workers both import it).
    ``propagate_meta``: the Meta keys of the producer's active context that travel
    with every task this app publishes.
    """
    _CONFIGS[app] = _Config(data_manager, meta or default_meta, tuple(propagate_meta))
    signals.before_task_publish.connect(
        _attach_producer_headers, weak=False, dispatch_uid="polydatum.before_task_publish"
    )
    signals.worker_init.connect(_validate, weak=False, dispatch_uid="polydatum.worker_init")
    signals.worker_shutdown.connect(_dispose, weak=False, dispatch_uid="polydatum.worker_shutdown")
    signals.worker_process_shutdown.connect(
        _dispose_child, weak=False, dispatch_uid="polydatum.worker_process_shutdown"
    )


def _config(app: Any) -> _Config | None:
    """``app``'s configuration (``None`` for no app, or one init_celery never saw)."""
    return None if app is None else _CONFIGS.get(app)


# ------------------------------------------------------------------ producer side

#: The app whose task is being published in this thread / asyncio task (set by
#: :meth:`PolydatumTask.apply_async`, read by the ``before_task_publish`` handler,
#: whose arguments do not say which app sends the message).
_PUBLISHING: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "polydatum_celery_publishing", default=None
)


def _publishing_config(ctx: Any) -> _Config | None:
    """The configuration of the app publishing now: the task's own app, else (a task
    sent by name) the app configured with the producer context's DataManager."""
    config = _config(_PUBLISHING.get())
    if config is None and ctx is not None:
        config = next((c for c in _CONFIGS.values() if c.data_manager is ctx.data_manager), None)
    return config


def _attach_producer_headers(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """``before_task_publish``: add the active context's Meta values and the trace context."""
    if headers is None:
        return
    ctx = get_active_context()
    if ctx is not None:
        config = _publishing_config(ctx)
        keys = config.propagate_meta if config is not None else DEFAULT_PROPAGATE_META
        values = {k: v for k in keys if (v := ctx.meta.get(k)) is not None}
        explicit = headers.get(META_HEADER)
        if isinstance(explicit, Mapping):
            values.update(explicit)
        if values:
            headers[META_HEADER] = values
    # The standard message headers, as opentelemetry-instrumentation-celery writes
    # them (when it is installed its PRODUCER span is current here, or it overwrites
    # these with the same span's context right after): one trace context per message.
    propagate.inject(headers)


# -------------------------------------------------------------------- worker side


class _RequestGetter(Getter[Any]):
    """Reads propagation fields from a Celery task request (the message headers)."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        value = _header(carrier, key)
        if isinstance(value, str):
            return [value]
        if isinstance(value, list | tuple):
            return [str(v) for v in value]
        return None

    def keys(self, carrier: Any) -> list[str]:
        return []


_GETTER = _RequestGetter()


def _producer_trace(request: Any) -> otel_context.Context | None:
    """The producer's trace context from the message: the standard headers, else the
    deprecated ``polydatum_trace`` header; ``None`` when the message carries none."""
    extracted = propagate.extract(request, getter=_GETTER)
    if trace.get_current_span(extracted).get_span_context().is_valid:
        return extracted
    legacy = _header(request, TRACE_HEADER)
    if isinstance(legacy, Mapping):
        extracted = propagate.extract({str(k): str(v) for k, v in legacy.items()})
        if trace.get_current_span(extracted).get_span_context().is_valid:
            return extracted
    return None


#: Per DataManager, why it needs an async context (empty: it does not). Decided once.
_ASYNC_REASONS: weakref.WeakKeyDictionary[Any, tuple[str, ...]] = weakref.WeakKeyDictionary()


def _is_async_generator_callable(obj: Any) -> bool:
    return inspect.isasyncgenfunction(obj) or inspect.isasyncgenfunction(
        getattr(obj, "__call__", None)  # noqa: B004 - the attribute itself
    )


def _async_methods(prefix: str, services: Mapping[str, Any]) -> list[str]:
    """Dotted paths of the ``async def`` methods of ``services`` (nested ones too),
    found statically: inspecting a registration must not run application code."""
    found: list[str] = []
    for name, service in services.items():
        found += [
            f"{prefix}{name}.{attr}"
            for attr, function in public_methods(service)
            if inspect.iscoroutinefunction(inspect.unwrap(function))
        ]
        found += _async_methods(f"{prefix}{name}.", service.__dict__.get("_services") or {})
    return found


def _async_reasons(dm: DataManager) -> tuple[str, ...]:
    """Why ``dm`` needs ``async with dm.context()`` (empty when a sync ``with`` runs it).

    Decided on first use and kept: a registration made after the worker started its
    first task is not seen.
    """
    reasons = _ASYNC_REASONS.get(dm)
    if reasons is None:
        found = [
            f"context middleware {callable_name(m)!r} is an async generator"
            for m in dm.registered_context_middleware()
            if _is_async_generator_callable(m)
        ]
        found += [
            f"resource {name!r} is an async generator"
            for name, resource in dm.registered_resources().items()
            if _is_async_generator_callable(resource)
        ]
        methods = _async_methods("", dm.get_dal().services)
        if methods:
            found.append(f"service method(s) {', '.join(methods)} are `async def`")
        reasons = _ASYNC_REASONS[dm] = tuple(found)
    return reasons


# ------------------------------------------------------------- the event loops

#: This thread's event loop runner (``runner``), created at its first async task run.
_LOCAL = threading.local()
#: Every runner this process created (closed at worker shutdown), under ``_RUNNERS_LOCK``.
_RUNNERS: list[asyncio.Runner] = []
_RUNNERS_LOCK = threading.Lock()


def _forget_parent_loops() -> None:
    """In a forked child: the parent's loops are not this process's to run or close."""
    global _LOCAL, _RUNNERS_LOCK
    _LOCAL = threading.local()
    _RUNNERS.clear()
    _RUNNERS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_parent_loops)


def _thread_runner() -> asyncio.Runner:
    """This thread's runner: one event loop for every task run in the thread."""
    runner: asyncio.Runner | None = getattr(_LOCAL, "runner", None)
    if runner is None:
        runner = _LOCAL.runner = asyncio.Runner()
        with _RUNNERS_LOCK:
            _RUNNERS.append(runner)
    return runner


def _run_on_thread_loop(task_name: str, make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run the coroutine ``make()`` returns on this thread's loop, in a copy of the
    caller's contextvars (the current span of the worker's ``run/<task>``, the attached
    producer trace); returns its result or raises its error.

    An exception that interrupts the loop itself (a signal handler raising, e.g.
    Celery's soft time limit, while the coroutine waits) cancels the coroutine and
    lets it finish -- its context exits, rolling back -- before the exception goes on.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            f"task {task_name!r} runs its polydatum context on the thread's event loop, "
            f"but this thread is already running one (a task applied eagerly or called "
            f"from async code?): run it in a worker, or await the body inside your own "
            f"`async with dm.context()`"
        )
    loop = _thread_runner().get_loop()
    task = loop.create_task(make(), context=contextvars.copy_context())
    try:
        return loop.run_until_complete(task)
    except BaseException:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                loop.run_until_complete(task)
        raise


def _process_runner() -> asyncio.Runner | None:
    """The runner whose loop made this process's async connections: the current
    thread's, else the last one created (the one pool thread of ``threads -c 1``)."""
    runner: asyncio.Runner | None = getattr(_LOCAL, "runner", None)
    if runner is None:
        with _RUNNERS_LOCK:
            runner = _RUNNERS[-1] if _RUNNERS else None
    return runner


def _close_loops() -> None:
    with _RUNNERS_LOCK:
        runners = list(_RUNNERS)
        _RUNNERS.clear()
    _LOCAL.__dict__.pop("runner", None)
    for runner in runners:
        try:
            runner.close()
        except Exception as error:  # a loop still running in a thread that hung
            _log.warning(
                "polydatum.worker.loop_close_failed",
                error_type=type(error).__qualname__,
                exc_info=(type(error), error, error.__traceback__),
            )


# ---------------------------------------------------------------- worker lifecycle


def _worker_app(sender: Any) -> Any:
    return getattr(sender, "app", None)


_POOL_KINDS = {
    "celery.concurrency.thread": "threads",
    "celery.concurrency.gevent": "gevent",
    "celery.concurrency.eventlet": "eventlet",
}


def _pool_kind(pool_cls: Any) -> str | None:
    """``"threads"``, ``"gevent"`` or ``"eventlet"`` for those pools (or a subclass),
    else ``None`` (prefork, solo, custom: one task at a time per thread of a process)."""
    if isinstance(pool_cls, str):
        target = _POOL_ALIASES.get(pool_cls, pool_cls)
        return _POOL_KINDS.get(target.partition(":")[0])
    for klass in getattr(pool_cls, "__mro__", ()):
        kind = _POOL_KINDS.get(getattr(klass, "__module__", ""))
        if kind is not None:
            return kind
    return None


def _pool_problem(worker: Any, reasons: tuple[str, ...]) -> str | None:
    """Why the worker's pool cannot run an async DataManager (``None`` if it can)."""
    kind = _pool_kind(getattr(worker, "pool_cls", None))
    concurrency = getattr(worker, "concurrency", None)
    if kind is None or (kind == "threads" and concurrency == 1):
        return None
    if kind == "threads":
        pool = f"threads with concurrency {concurrency}"
        detail = (
            "each thread would run its own event loop, but async connection pools "
            "(an AsyncEngine's) cannot be shared between loops"
        )
        fixes = "--pool prefork (one event loop per process), --pool solo or --concurrency 1"
    else:
        pool = kind
        detail = f"{kind} runs tasks in greenlets, which cannot each run an asyncio event loop"
        fixes = "--pool prefork (one event loop per process) or --pool solo"
    return (
        f"the worker pool is {pool}, which cannot run this DataManager: it needs an "
        f"async context ({'; '.join(reasons)}), and {detail}; use {fixes}"
    )


def _validate(sender: Any = None, **_: Any) -> None:
    """``worker_init``: refuse to start a worker that cannot run its DataManager."""
    config = _config(_worker_app(sender))
    if config is None:
        return
    dm = config.data_manager
    problems = dm.validate(raise_on_error=False)
    reasons = _async_reasons(dm)
    if reasons:
        pool = _pool_problem(sender, reasons)
        if pool is not None:
            problems.append(pool)
    if problems:
        error = ValidationError(problems)
        _log.critical("polydatum.worker.invalid_data_manager", problems=error.problems)
        # Celery logs and ignores exceptions raised by signal handlers; SystemExit
        # is not an Exception, so it stops the worker as it should.
        raise SystemExit(f"polydatum: the worker cannot start: {error}") from error
    if reasons:
        _log.debug("polydatum.worker.async_context", reasons=list(reasons))


def _dispose_here(dm: DataManager) -> None:
    """Dispose ``dm``'s resources in this process: an async ``dispose()`` runs on the
    loop that made the connections (another loop could not close them)."""
    runner = _process_runner()
    if runner is None:
        dispose_resources(dm)
    else:
        runner.get_loop().run_until_complete(adispose_resources(dm))


def _dispose(sender: Any = None, **_: Any) -> None:
    """``worker_shutdown``: dispose every resource that has a ``dispose()``, close the loops."""
    config = _config(_worker_app(sender))
    if config is not None:
        _dispose_here(config.data_manager)
    _close_loops()


def _dispose_child(**_: Any) -> None:
    """``worker_process_shutdown`` (a prefork child exiting): the child's connections
    and loop are its own; dispose and close them there."""
    seen: set[int] = set()
    for config in list(_CONFIGS.values()):
        dm = config.data_manager
        if id(dm) not in seen:
            seen.add(id(dm))
            _dispose_here(dm)
    _close_loops()


class PolydatumTask(Task):  # type: ignore[misc]
    """Task base class: each run happens inside a polydatum context.

    Use it as the app's task class (``Celery(..., task_cls=PolydatumTask)``) or per
    task (``@app.task(base=PolydatumTask)``). In a bound task ``self.dal`` is the DAL
    and ``self.context`` the running context. Calling a task directly (``add(1, 2)``)
    inside an active context reuses that context (an ``async def`` body then returns
    its coroutine, for the caller to await).
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        config = _config(self.app)
        if config is None:
            raise RuntimeError(
                f"task {self.name!r} uses PolydatumTask but its app was not set up: "
                f"call polydatum.integrations.celery.init_celery(app, data_manager)"
            )
        if self.request.called_directly and get_active_context() is not None:
            return super().__call__(*args, **kwargs)
        produced = config.meta(self)
        meta = produced if isinstance(produced, Meta) else dict(produced)
        token = None
        if not trace.get_current_span().get_span_context().is_valid:
            parent = _producer_trace(self.request)
            if parent is not None:
                token = otel_context.attach(parent)
        try:
            dm = config.data_manager
            if _async_reasons(dm) or inspect.iscoroutinefunction(self.run):
                return _run_on_thread_loop(self.name, lambda: self._arun(dm, meta, args, kwargs))
            with dm.context(meta):
                return super().__call__(*args, **kwargs)
        finally:
            if token is not None:
                otel_context.detach(token)

    async def _arun(
        self,
        dm: DataManager,
        meta: Meta | dict[str, Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """One run in ``async with dm.context(meta)``; an awaitable result is awaited
        inside it, with the run's request pushed (``self.request`` as in a sync body)."""
        async with dm.context(meta):
            result = super().__call__(*args, **kwargs)
            if inspect.isawaitable(result):
                self.push_request(args=args, kwargs=kwargs)
                try:
                    result = await result
                finally:
                    self.pop_request()
            return result

    def apply_async(self, *args: Any, **kwargs: Any) -> Any:
        """Publish the task; the ``polydatum_meta`` it carries follows this task's app's
        ``propagate_meta`` (whatever DataManager the producer's context belongs to)."""
        token = _PUBLISHING.set(self.app)
        try:
            return super().apply_async(*args, **kwargs)
        finally:
            _PUBLISHING.reset(token)

    @property
    def context(self) -> Any:
        """The running task's context (``RuntimeError`` outside a run)."""
        ctx = get_active_context()
        if ctx is None:
            raise RuntimeError(f"task {self.name!r}: no polydatum context is active")
        return ctx

    @property
    def dal(self) -> DataAccessLayer:
        """The running task's DAL."""
        dal: DataAccessLayer = self.context.dal
        return dal
