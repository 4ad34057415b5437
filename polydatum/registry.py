"""The DataManager: the registry of services, resources and middleware.

One per process, usually. It normalises each registration once
(:class:`~polydatum.lifecycle.Registration`), makes contexts and the DAL, holds the
telemetry that observes its contexts, and validates, describes and pings what is
registered.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, cast

from polydatum.access import DataAccessLayer, is_async_callable, public_methods
from polydatum.context import (
    DalScope,
    DalT,
    DataAccessContext,
    add_resource_attribute,
    context_class_for,
    get_active_context,
)
from polydatum.errors import (
    NoActiveContextError,
    RegistrationError,
    UnknownResourceError,
    ValidationError,
)
from polydatum.lifecycle import Registration, middleware_registration
from polydatum.meta import Meta
from polydatum.resources import ResourceManager, is_generator
from polydatum.services import Service
from polydatum.telemetry import (
    Telemetry,
    current_span,
    end_span,
    error_type,
    exception_message,
    fail_span,
    start_span,
)

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

__all__ = ["DataManager", "PingResult"]

#: The DataAccessLayer class, under a name the ``DataManager.DataAccessLayer``
#: attribute (which subclasses may replace) does not shadow in annotations.
_DAL = DataAccessLayer


def _no_context() -> NoActiveContextError:
    return NoActiveContextError(
        "A DataAccessContext must be started to access the DAL: "
        "use `with dm.dal() as dal:` or `with dm.context() as ctx:`."
    )


@dataclass(frozen=True, slots=True)
class PingResult:
    """The outcome of one resource health ping."""

    resource: str
    ok: bool
    duration_s: float
    error: str | None = None


class DataManager(Generic[DalT]):
    """The registry of services, resources and middleware; one per process, usually.

    Typed service access: ``DataManager[AppServices]()``, where ``AppServices`` is a
    ``typing.Protocol`` with one attribute per registered service (``notes: Notes``),
    makes ``dm.dal()`` give an ``AppServices``: ``dal.notes.get(1)`` has the method's
    return type and a misspelt service or method is a type error. It changes nothing at
    run time (``dal.notes`` is the registered service either way); without it the DAL
    is a ``DataAccessLayer``, whose unknown attributes are commands (``Any`` results).

    Telemetry options (all keyword-only, all optional):

    * ``tracer_provider`` / ``meter_provider``: where spans and metrics go (default:
      the global providers; nothing is recorded while none is configured);
    * ``meta_attributes``: the Meta keys that may be recorded on spans and logs
      (secret-looking keys are redacted even when listed);
    * ``teardown_errors``: ``"record"`` (default, as polydatum 0.9.1: suppressed and
      recorded) or ``"raise"`` (raise them as a ``TeardownErrors`` group at context
      exit -- for test suites);
    * ``method_middleware``: method middleware, outermost first;
    * ``step_metrics``: ``True`` (default) records ``polydatum.middleware.duration`` and
      ``polydatum.resource.duration`` for every phase; ``False`` leaves those two
      histograms out (spans, logs, the context and service histograms and the counters
      stay). Each sample is one SDK ``Histogram.record`` (~8 µs on the benchmark machine,
      SDK defaults): four per context of one middleware and one resource.
    """

    DataAccessLayer = _DAL
    Context = DataAccessContext

    def __init__(
        self,
        resource_manager: ResourceManager | None = None,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        meta_attributes: Iterable[str] = (),
        teardown_errors: Literal["record", "raise"] = "record",
        method_middleware: Sequence[Any] = (),
        step_metrics: bool = True,
    ) -> None:
        if teardown_errors not in ("record", "raise"):
            raise ValueError(
                f"teardown_errors must be 'record' or 'raise', not {teardown_errors!r}"
            )
        self._resource_manager = resource_manager or ResourceManager(self)
        if getattr(self._resource_manager, "_data_manager", self) is None:
            # Made before its DataManager (``DataManager(ResourceManager(None))``): it
            # belongs to this one, which it tells of every resource registered later.
            self._resource_manager._data_manager = self
        plain = type(self)
        #: The registered resources, normalised once; read by every context unless the
        #: look-up is customised (an overridden ``get_resource`` or ``ResourceManager.get``),
        #: in which case it stays empty and every resource goes through ``get_resource``.
        self.resource_registrations: dict[str, Registration] = {}
        self._plain_resources = (
            plain.get_resource is DataManager.get_resource
            and type(self._resource_manager).get is ResourceManager.get
        )
        if self._plain_resources:
            for name, factory in self._resource_manager.items():
                self.resource_registrations[name] = Registration.of("resource", factory, name)
        self._middleware: list[Any] = []
        self._middleware_registrations: list[Registration] = []
        self._seen_middleware: dict[int, Registration] = {}  # for an overridden get_middleware
        #: The context middleware every context sets up; ``None`` when ``get_middleware``
        #: is overridden, so that the override is asked for every context, as documented.
        self.context_middleware: list[Registration] | None = (
            self._middleware_registrations
            if plain.get_middleware is DataManager.get_middleware
            else None
        )
        self.telemetry = Telemetry(tracer_provider, meter_provider, meta_attributes, step_metrics)
        #: What observes this manager's contexts (the lifecycle's name for the telemetry).
        self.observers = self.telemetry
        self.teardown_errors = teardown_errors
        # Built with the DataManager alone: a polydatum 1.0 subclass may set
        # ``DataAccessLayer = MyDal`` whose ``__init__`` takes only that.
        self._dal: DataAccessLayer = self.DataAccessLayer(self)
        if method_middleware:
            self._dal.add_middleware(*method_middleware)
        #: The DAL every context is given; ``None`` when ``get_dal`` is overridden (then
        #: it is called for every context).
        self.plain_dal: _DAL | None = self._dal if plain.get_dal is DataManager.get_dal else None
        self._context_class()

    def _context_class(self) -> type[DataAccessContext[Any]]:
        """``self.Context`` with the registered resources as descriptors (cached; made
        again when ``Context`` is replaced). See :class:`polydatum.context._ResourceAttribute`."""
        base = self.Context
        # getattr, not self.__dict__: reading an instance's __dict__ turns its attributes
        # into a dict that CPython 3.11 cannot specialise reads of (benchmarks/README.md).
        cls: type[DataAccessContext[Any]] | None = getattr(self, "_ctx_class", None)
        if cls is None or getattr(self, "_ctx_base", None) is not base:
            cls = context_class_for(base, list(self._resource_manager))
            self._ctx_class = cls
            self._ctx_base = base
        return cls

    def _resource_registered(self, name: str) -> None:
        """Called by the ResourceManager: normalise the registration, and make
        ``ctx.<name>`` a descriptor."""
        if getattr(self, "_plain_resources", False):
            factory = self._resource_manager.get(name)
            if factory is not None:
                self.resource_registrations[name] = Registration.of("resource", factory, name)
        cls = getattr(self, "_ctx_class", None)
        if cls is not None:
            add_resource_attribute(cls, name)

    # -- registration ---------------------------------------------------------------

    def register_context_middleware(self, *middleware: Any) -> None:
        """Register context middleware, in order of execution (setup order)."""
        for m in middleware:
            if not is_generator(m):
                raise RegistrationError(
                    f"Middleware {m!r} must be a Python generator callable "
                    f"(a function that yields once, or an object whose __call__ does)."
                )
        self._middleware.extend(middleware)
        self._middleware_registrations.extend(middleware_registration(m) for m in middleware)

    def context_middleware_for(self, ctx: DataAccessContext) -> list[Registration]:
        """The registrations of what ``get_middleware(ctx)`` returns (an override's)."""
        registrations = []
        seen = self._seen_middleware
        for m in self.get_middleware(ctx):
            registration = seen.get(id(m))
            if registration is None or registration.source is not m:
                registration = middleware_registration(m)
                if len(seen) < 10_000:  # the registration keeps m alive: its id stays its own
                    seen[id(m)] = registration
            registrations.append(registration)
        return registrations

    def resource_registration(self, name: str) -> Registration:
        """The registration of resource ``name`` through ``get_resource`` (a customised
        look-up); :class:`~polydatum.errors.UnknownResourceError` when there is none."""
        factory = self.get_resource(name)
        if factory is None:
            known = ", ".join(sorted(self._resource_manager)) or "none"
            raise UnknownResourceError(
                f'No resource named "{name}" for context (registered: {known}). '
                f"Register it with dm.register_resources({name}=...)."
            )
        return Registration.of("resource", factory, name)

    def register_method_middleware(self, *middleware: Any) -> None:
        """Register method middleware ``mw(request, handler)``, outermost first."""
        self._dal.add_middleware(*middleware)

    def get_middleware(self, context: DataAccessContext) -> list[Any]:
        """All context middleware in order of execution; override to vary per context."""
        return self._middleware

    def register_resources(self, **resources: Callable[..., Any]) -> None:
        """Register resources (generator callables), created lazily per context."""
        self._resource_manager.register_resources(**resources)

    def replace_resource(self, key: str, resource: Callable[..., Any]) -> None:
        """Replace (or add) a resource."""
        self._resource_manager.replace_resource(key, resource)

    def register_services(self, **services: Service) -> None:
        """Register services with the DAL."""
        self._dal.register_services(**services)

    def replace_service(self, key: str, service: Service) -> None:
        """Replace (or add) a service."""
        self._dal.replace_service(key, service)

    def registered_resources(self) -> dict[str, Callable[..., Any]]:
        """The registered resources by name (a copy), as registered."""
        return dict(self._resource_manager.items())

    def registered_context_middleware(self) -> list[Any]:
        """The registered context middleware in setup order (a copy), as registered."""
        return list(self._middleware)

    def get_resource(self, name: str) -> Callable[..., Any] | None:
        """The registered resource callable named ``name``, or ``None``."""
        return self._resource_manager.get(name)

    def get_dal(self) -> DalT:
        return cast("DalT", self._dal)

    # -- contexts ---------------------------------------------------------------------

    def context(self, meta: Meta | dict[str, Any] | None = None) -> DataAccessContext[DalT]:
        """A new (not yet entered) context; use ``with`` or ``async with``."""
        cls = self._ctx_class if self.Context is self._ctx_base else self._context_class()
        ctx: DataAccessContext[DalT] = cls(self, meta)
        return ctx

    def dal(self, meta: Meta | dict[str, Any] | None = None) -> DalScope[DalT]:
        """Start a context and give the DAL: ``with dm.dal() as dal:`` (or ``async with``).

        The context itself is returned; entering it yields its DAL.
        """
        cls = self._ctx_class if self.Context is self._ctx_base else self._context_class()
        ctx = cls(self, meta)
        ctx._c.yields_dal = True  # entering it gives its DAL
        scope: DalScope[DalT] = ctx  # type: ignore[assignment]  # (entered, it gives the DAL)
        return scope

    def get_active_context(self) -> DataAccessContext | None:
        """The active context in this thread / task, or ``None``."""
        return get_active_context()

    def require_active_context(self) -> DataAccessContext:
        """The active context; ``RuntimeError`` when none is active."""
        ctx = get_active_context()
        if ctx is None:
            raise _no_context()
        return ctx

    # -- validation and health ---------------------------------------------------------

    def validate(self, *, raise_on_error: bool = True) -> list[str]:
        """Check the whole registration and report *every* problem at once.

        Raises :class:`~polydatum.errors.ValidationError` listing them (or returns
        the list when ``raise_on_error`` is false). Call it at startup.
        """
        problems: list[str] = []
        context_attrs = set(dir(DataAccessContext)) | {"data_manager", "dal", "meta"}
        dal_class = type(self._dal)
        dal_attrs = set(dir(dal_class))
        for position, m in enumerate(self._middleware):
            if not is_generator(m):
                problems.append(f"context middleware #{position} {m!r} is not a generator callable")
        for name, resource in self._resource_manager.items():
            if not is_generator(resource):
                problems.append(f"resource {name!r} is not a generator callable")
            if name.startswith("_") or not name.isidentifier():
                problems.append(
                    f"resource {name!r} is not a public identifier: ctx.{name} cannot reach it"
                )
            elif name in context_attrs:
                problems.append(
                    f"resource {name!r} collides with DataAccessContext.{name}: "
                    f"ctx.{name} returns the attribute, not the resource; rename it"
                )
            ping = getattr(resource, "ping", None)
            if ping is not None and not callable(ping):
                problems.append(f"resource {name!r} has a ping attribute that is not callable")
        for m in self._dal.method_middleware:
            if not callable(m):
                problems.append(f"method middleware {m!r} is not callable")

        sync_methods: list[str] = []

        def walk(prefix: str, services: dict[str, Any], reserved: set[str]) -> None:
            for name, service in services.items():
                path = f"{prefix}{name}"
                if name.startswith("_") or not name.isidentifier():
                    problems.append(
                        f"service {path!r} is not a public identifier: the DAL cannot reach it"
                    )
                elif name in reserved:
                    problems.append(
                        f"service {path!r} collides with an attribute of the same name "
                        f"on its parent; dal.{path} would not reach it; rename it"
                    )
                if not isinstance(service, Service):
                    problems.append(f"service {path!r} is {type(service).__name__}, not a Service")
                    continue
                if service.__dict__.get("_data_manager") is not self:
                    problems.append(
                        f"service {path!r} is bound to another DataManager "
                        f"(it was registered elsewhere after this one)"
                    )
                if self._dal._async_middleware:  # what an async method middleware can't wrap
                    sync_methods.extend(
                        f"{path}.{method}"
                        for method, function in public_methods(service)
                        if not is_async_callable(function)
                    )
                walk(
                    f"{path}.",
                    service.__dict__.get("_services") or {},
                    set(dir(type(service))),
                )

        walk("", self._dal._services, dal_attrs)
        if sync_methods:
            names = ", ".join(self._dal._async_middleware)
            problems.append(
                f"method middleware {names} is async, so these sync methods cannot be "
                f"called through the DAL (each call raises InvalidMiddleware): "
                f"{', '.join(sync_methods)}; make them `async def`, or the middleware "
                f"a plain function that returns handler(request)"
            )
        if problems and raise_on_error:
            raise ValidationError(problems)
        return problems

    def _pings(self) -> list[tuple[str, Callable[[], Any]]]:
        pings = []
        for name, resource in self._resource_manager.items():
            ping = getattr(resource, "ping", None)
            if callable(ping):
                pings.append((name, ping))
        return pings

    def ping(self) -> dict[str, PingResult]:
        """Run every resource's health ``ping()``; one traced span per resource.

        Returns ``{resource name: PingResult}``; never raises for a failed ping.
        """
        return {name: self._ping_one(name, ping) for name, ping in self._pings()}

    async def aping(self) -> dict[str, PingResult]:
        """Async :meth:`ping`: coroutine pings are awaited."""
        results = {}
        for name, ping in self._pings():
            results[name] = await self._aping_one(name, ping)
        return results

    def _ping_span(self, name: str) -> Any:
        tracer = self.telemetry.tracer()
        if tracer is None:
            return None
        return start_span(
            tracer, f"polydatum.resource.ping {name}", {"polydatum.resource.name": name}
        )

    def _ping_done(
        self, name: str, span: Any, t0: float, error: BaseException | None
    ) -> PingResult:
        duration = time.perf_counter() - t0
        if span is not None:
            if error is not None:
                fail_span(span, error)
            end_span(span)
        if error is None:
            return PingResult(name, True, duration)
        return PingResult(name, False, duration, f"{error_type(error)}: {exception_message(error)}")

    def _ping_one(self, name: str, ping: Callable[[], Any]) -> PingResult:
        span = self._ping_span(name)
        t0 = time.perf_counter()
        try:
            with current_span(span):  # the ping's own statement spans nest under it
                result = ping()
            if inspect.isawaitable(result):
                close = getattr(result, "close", None)
                if close is not None:
                    close()
                raise TypeError(f"ping of {name!r} is async: use `await dm.aping()`")
        except Exception as error:
            return self._ping_done(name, span, t0, error)
        return self._ping_done(name, span, t0, None)

    async def _aping_one(self, name: str, ping: Callable[[], Any]) -> PingResult:
        span = self._ping_span(name)
        t0 = time.perf_counter()
        try:
            with current_span(span):
                result = ping()
                if inspect.isawaitable(result):
                    await result
        except Exception as error:
            return self._ping_done(name, span, t0, error)
        return self._ping_done(name, span, t0, None)

    # -- introspection ----------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """A plain description of the registration (used by ``polydatum inspect``)."""

        def methods(service: Any) -> list[str]:
            return [name for name, _ in public_methods(service)]

        def tree(services: dict[str, Any]) -> dict[str, Any]:
            return {
                name: {
                    "class": f"{type(s).__module__}.{type(s).__qualname__}",
                    "methods": methods(s),
                    "services": tree(s.__dict__.get("_services") or {}),
                }
                for name, s in services.items()
            }

        def label(obj: Any) -> str:
            name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
            module = getattr(obj, "__module__", None) or type(obj).__module__
            kind = (
                "async generator"
                if inspect.isasyncgenfunction(obj)
                or (
                    inspect.isasyncgenfunction(getattr(obj, "__call__", None))  # noqa: B004
                )
                else "generator"
            )
            return f"{module}.{name} ({kind})"

        middleware = [label(m) for m in self._middleware]
        return {
            "services": tree(self._dal._services),
            "resources": {
                name: {
                    "callable": label(r),
                    "ping": callable(getattr(r, "ping", None)),
                    "attributes": dict(getattr(r, "telemetry_attributes", None) or {}),
                }
                for name, r in self._resource_manager.items()
            },
            "context_middleware": {
                "setup_order": middleware,
                "teardown_order": list(reversed(middleware)),
            },
            "method_middleware": [
                getattr(m, "__qualname__", None) or type(m).__qualname__
                for m in self._dal.method_middleware
            ],
        }
