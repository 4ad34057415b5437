"""Celery: one polydatum context per task run, with Meta and trace from the producer.

::

    from celery import Celery
    from polydatum.integrations.celery import PolydatumTask, init_celery

    app = Celery("shop", broker=..., backend=..., task_cls=PolydatumTask)
    init_celery(app, dm)

    @app.task(bind=True, max_retries=3)
    def charge(self, order_id):
        return self.dal.orders.charge(order_id)     # or dm.get_dal() / services

Every run of a task (each retry is a run) is wrapped in ``with dm.context(meta)``:

* **Meta** comes from ``meta(task)`` (default :func:`default_meta`): ``task`` (the
  name), ``task_id``, ``retries``, plus what the producer attached: when a task is
  published while a polydatum context is active, the values of its Meta keys listed
  in ``propagate_meta`` (default ``("request_id",)``) travel in the
  ``polydatum_meta`` message header; a producer can also pass
  ``apply_async(headers={"polydatum_meta": {...}})``. Producer values never
  override the task's own keys. Keep ``propagate_meta`` to small, JSON-serializable,
  non-secret values: they are stored in the broker.
* **Trace**: the context span is a child of the current span -- the ``run/<task>``
  span of ``opentelemetry-instrumentation-celery``, when installed in the worker. Without
  it, polydatum continues the producer's trace itself: the producer's current span
  context travels in the ``polydatum_trace`` header (W3C trace context through the
  globally configured propagator), so the task's context span joins the trace
  that enqueued it.
* An error raised by the task (including Celery's ``Retry``) reaches context
  middleware and resources (rollback) and is re-raised for Celery to handle; resource
  teardown errors are suppressed and recorded, as in any context.

Worker lifecycle: ``worker_init`` validates the DataManager (a broken registration
stops the worker from starting, with every problem listed) and ``worker_shutdown``
disposes resources (SQL engine pools).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from polydatum.context import get_active_context
from polydatum.errors import ValidationError
from polydatum.integrations import dispose_resources, missing_framework
from polydatum.meta import Meta

try:
    from celery import Celery, Task, signals
except ImportError as _error:  # pragma: no cover - exercised in a subprocess test
    missing_framework("polydatum.integrations.celery", "Celery", "celery", _error)

if TYPE_CHECKING:
    from polydatum.dal import DataAccessLayer, DataManager

__all__ = ["META_HEADER", "TRACE_HEADER", "PolydatumTask", "default_meta", "init_celery"]

#: Message header carrying the producer's Meta values (a JSON object).
META_HEADER = "polydatum_meta"
#: Message header carrying the producer's trace context (W3C ``traceparent`` etc.).
TRACE_HEADER = "polydatum_trace"


@dataclass(frozen=True)
class _Config:
    data_manager: DataManager
    meta: Callable[[Any], Mapping[str, Any] | Meta]
    propagate_meta: tuple[str, ...]


_CONFIGS: weakref.WeakKeyDictionary[Any, _Config] = weakref.WeakKeyDictionary()


def _request_header(task: Any, name: str) -> Any:
    """A custom message header as the worker sees it (top-level, or under ``headers``)."""
    request = task.request
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
    produced = _request_header(task, META_HEADER)
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
    propagate_meta: Iterable[str] = ("request_id",),
) -> None:
    """Run the tasks of ``app`` that use :class:`PolydatumTask` in contexts of ``data_manager``.

    Call it in the module that defines ``app`` (producers and workers both import it).
    """
    _CONFIGS[app] = _Config(data_manager, meta or default_meta, tuple(propagate_meta))
    signals.before_task_publish.connect(
        _attach_producer_headers, weak=False, dispatch_uid="polydatum.before_task_publish"
    )
    signals.worker_init.connect(_validate, weak=False, dispatch_uid="polydatum.worker_init")
    signals.worker_shutdown.connect(_dispose, weak=False, dispatch_uid="polydatum.worker_shutdown")


def _config(app: Any) -> _Config | None:
    return _CONFIGS.get(app)


def _attach_producer_headers(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """``before_task_publish``: add the active context's Meta values and trace context."""
    if headers is None:
        return
    ctx = get_active_context()
    if ctx is not None:
        # The producer's DataManager decides what travels (any app configured with it).
        config = next((c for c in _CONFIGS.values() if c.data_manager is ctx.data_manager), None)
        keys = config.propagate_meta if config is not None else ("request_id",)
        values = {k: ctx.meta.get(k) for k in keys if ctx.meta.get(k) is not None}
        explicit = headers.get(META_HEADER)
        if isinstance(explicit, Mapping):
            values.update(explicit)
        if values:
            headers[META_HEADER] = values
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if carrier:
        headers[TRACE_HEADER] = carrier


def _worker_app(sender: Any) -> Any:
    return getattr(sender, "app", None)


def _validate(sender: Any = None, **_: Any) -> None:
    """``worker_init``: refuse to start a worker whose DataManager is broken."""
    config = _config(_worker_app(sender))
    if config is None:
        return
    try:
        config.data_manager.validate()
    except ValidationError as error:
        structlog.get_logger("polydatum").critical(
            "polydatum.worker.invalid_data_manager", problems=error.problems
        )
        # Celery logs and ignores exceptions raised by signal handlers; SystemExit
        # is not an Exception, so it stops the worker as it should.
        raise SystemExit(f"polydatum: the worker cannot start: {error}") from error


def _dispose(sender: Any = None, **_: Any) -> None:
    """``worker_shutdown``: dispose every resource that has a ``dispose()``."""
    config = _config(_worker_app(sender))
    if config is not None:
        dispose_resources(config.data_manager)


class PolydatumTask(Task):  # type: ignore[misc]
    """Task base class: each run happens inside a polydatum context.

    Use it as the app's task class (``Celery(..., task_cls=PolydatumTask)``) or per
    task (``@app.task(base=PolydatumTask)``). In a bound task ``self.dal`` is the DAL
    and ``self.context`` the running context. Calling a task directly (``add(1, 2)``)
    inside an active context reuses that context.
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
        meta = config.meta(self)
        token = None
        if not trace.get_current_span().get_span_context().is_valid:
            carrier = _request_header(self, TRACE_HEADER)
            if isinstance(carrier, Mapping):
                token = otel_context.attach(propagate.extract(carrier))
        try:
            with config.data_manager.context(meta if isinstance(meta, Meta) else dict(meta)):
                return super().__call__(*args, **kwargs)
        finally:
            if token is not None:
                otel_context.detach(token)

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
