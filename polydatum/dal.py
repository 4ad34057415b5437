"""The DataManager (the registry) and the DataAccessLayer (the way into services)."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from polydatum.context import (
    DataAccessContext,
    _active_lifecycle,
    add_resource_attribute,
    context_class_for,
    get_active_context,
)
from polydatum.errors import (
    AlreadyExistsException,
    ContextStateError,
    DalMethodError,
    InvalidMiddleware,
    NoActiveContextError,
    RegistrationError,
    ValidationError,
)
from polydatum.lifecycle import callable_name
from polydatum.meta import Meta
from polydatum.middleware import (
    DalCommand,
    DalCommandRequest,
    PathSegment,
    Resolved,
    dal_method_resolver_middleware,
    handle_dal_method,
    resolve_path,
)
from polydatum.resources import ResourceManager, is_generator
from polydatum.telemetry import Telemetry, error_type

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from polydatum.services import Service

MethodMiddleware = Callable[[DalCommandRequest, Callable[[DalCommandRequest], Any]], Any]


def _sync_caller(path: str) -> ContextStateError:
    """An ``async def`` service method called in a context entered with a sync ``with``."""
    return ContextStateError(
        f"dal.{path} is an `async def` method, but the active context was entered with a "
        f"sync `with`: enter it with `async with dm.context()` (or `async with dm.dal()`) "
        f"and call `await dal.{path}(...)`."
    )


def _no_context() -> NoActiveContextError:
    return NoActiveContextError(
        "A DataAccessContext must be started to access the DAL: "
        "use `with dm.dal() as dal:` or `with dm.context() as ctx:`."
    )


class _ServiceAttribute:
    """``dal.<service>`` for a registered service, found on the DAL's own class.

    The first hop of a DAL path would otherwise go through ``__getattr__``, which on
    CPython 3.11 costs a failed attribute look-up first (an ``AttributeError`` built
    and discarded: ~4x a descriptor's cost). Same result and the same check (a
    context must be active) as ``__getattr__``.
    """

    __slots__ = ("command", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.command: DalCommand | None = None  # the DAL's command for name, once made

    def __get__(self, dal: DataAccessLayer | None, owner: type | None = None) -> Any:
        if dal is None:
            return self
        command = self.command
        if command is None or (c := _active_lifecycle()) is None or c.ctx is None:
            command = self.command = dal._command(self.name)  # raises outside a context
        return command


class DataAccessLayer:
    """Gives access to a DataManager's services: ``dal.users.profile.get(7)``.

    ``middleware`` are method middleware ``mw(request, handler)``, outermost first
    (a class is instantiated); ``default_middleware`` run innermost (by default the
    resolver) and ``handler`` calls the resolved method.
    """

    def __init__(
        self,
        data_manager: DataManager | None,
        middleware: Iterable[Any] | None = None,
        default_middleware: Iterable[Any] | None = (dal_method_resolver_middleware,),
        handler: Callable[[DalCommandRequest], Any] = handle_dal_method,
    ) -> None:
        cls = type(self)
        if "_services_class" not in cls.__dict__:
            # A class of this DAL's own, to hold a _ServiceAttribute per service.
            self.__class__ = type(
                cls.__name__,
                (cls,),
                {"_services_class": True, "__module__": cls.__module__,
                 "__qualname__": cls.__qualname__},
            )  # fmt: skip
        self._services: dict[str, Service] = {}
        self._data_manager = data_manager
        self._resolved: dict[tuple[str, ...], Resolved] = {}
        # Replaced whenever what a path resolves to may change (services, middleware):
        # commands remember their resolution together with the cell it is valid for.
        self._valid = [True]
        self._base_handler = handler
        self._default_middleware = [self._check(m) for m in (default_middleware or ())]
        self._middleware: list[Any] = []
        self._handler: Callable[[DalCommandRequest], Any] = handler
        self._ahandler: Callable[[DalCommandRequest], Any] = handler
        self.add_middleware(*(middleware or ()))

    @staticmethod
    def _check(middleware: Any) -> Any:
        if inspect.isclass(middleware):
            middleware = middleware()
        if not callable(middleware):
            raise InvalidMiddleware(
                f"{middleware!r} is not a valid method middleware: it must be a callable "
                f"mw(request, handler)."
            )
        return middleware

    def add_middleware(self, *middleware: Any) -> None:
        """Append method middleware (inside those already added) and rebuild the chain."""
        checked = [self._check(m) for m in middleware]
        self._middleware.extend(checked)
        chain = [*self._middleware, *self._default_middleware]
        handler: Callable[[DalCommandRequest], Any] = self._base_handler
        for m in reversed(chain):
            handler = partial(m, handler=handler)
        self._handler = handler

        async def innermost(request: DalCommandRequest) -> Any:
            result = self._base_handler(request)
            if inspect.isawaitable(result):
                result = await result
            return result

        ahandler: Callable[[DalCommandRequest], Any] = innermost
        for m in reversed(chain):
            ahandler = _async_link(m, ahandler)
        self._ahandler = ahandler
        # No method middleware of the user's and the stock resolver and handler: a
        # resolved call can go straight to the method (the common, hot case).
        self._bump()
        # A sync method's call runs the sync chain: an ``async def`` middleware there
        # would hand the caller a coroutine instead of the result (see _sync_result).
        self._async_middleware: list[str] = [
            callable_name(m) for m in self._middleware if _is_async_callable(m)
        ]
        self._direct = (
            not self._middleware
            and self._default_middleware == [dal_method_resolver_middleware]
            and self._base_handler is handle_dal_method
        )

    @property
    def method_middleware(self) -> list[Any]:
        """The method middleware in call order (outermost first), defaults included."""
        return [*self._middleware, *self._default_middleware]

    # -- services -------------------------------------------------------------------

    def register_services(self, **services: Service) -> DataAccessLayer:
        """Register services; ``AlreadyExistsException`` for a name already taken."""
        for key in services:
            if key in self._services:
                raise AlreadyExistsException(
                    f"A Service for {key} is already registered; "
                    f"use replace_service({key!r}, ...) to override it."
                )
        for key, service in services.items():
            self._init_service(key, service)
        return self

    def replace_service(self, key: str, service: Service) -> Service:
        """Register ``service`` under ``key``, replacing any existing one (tests, variants)."""
        return self._init_service(key, service)

    def _init_service(self, key: str, service: Service) -> Service:
        setup = getattr(service, "setup", None)
        if not callable(setup):
            raise RegistrationError(
                f"Service {key}={service!r} must be a polydatum.Service (it has no setup() method)."
            )
        setup(self._data_manager)
        self._services[key] = service
        cls = type(self)
        if (
            cls.__dict__.get("_services_class")
            and not key.startswith("_")
            and not any(key in klass.__dict__ for klass in cls.__mro__[1:])
        ):
            setattr(cls, key, _ServiceAttribute(key))  # never over the DAL's own attributes
        self._invalidate()
        return service

    def _invalidate(self) -> None:
        """Forget every cached resolution (a service was registered or replaced)."""
        self._resolved.clear()
        self._bump()

    def _bump(self) -> None:
        """A new registration generation: what any path resolves to may have changed.

        Commands that remember a resolution hold the generation's ``_valid`` cell (a
        one-item list) and check ``cell[0]``: cheaper than comparing counters through
        the DAL, whose attributes are slow to read (it has ``__getattr__``).
        """
        self._valid[0] = False
        self._valid = [True]

    @property
    def services(self) -> dict[str, Service]:
        """The registered top-level services (a copy)."""
        return dict(self._services)

    # -- calling ------------------------------------------------------------------

    def _resolve(self, names: tuple[str, ...]) -> Resolved:
        try:
            return self._resolved[names]
        except KeyError:
            pass
        except TypeError:  # unhashable names from a hostile caller
            raise DalMethodError(tuple(PathSegment(str(n)) for n in names), "bad path") from None
        resolved = resolve_path(self._services, names)
        if len(self._resolved) < 10_000:
            self._resolved[names] = resolved
        return resolved

    def _call(self, path: tuple[PathSegment, ...], *args: Any, **kwargs: Any) -> Any:
        """Handler of :class:`DalCommand` objects built by hand (polydatum 1.0 style)."""
        return self._call_names(tuple(p.name for p in path), args, kwargs, path)

    def _call_names(
        self,
        names: tuple[str, ...],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        path: tuple[PathSegment, ...] | None = None,
        command: _DalPath | None = None,
    ) -> Any:
        c = _active_lifecycle()
        if c is None or c.ctx is None:  # none, or one exited in another thread or task
            raise _no_context()
        resolved = self._resolved.get(names)
        if resolved is None:
            try:
                resolved = self._resolve(names)
            except DalMethodError:
                resolved = None  # middleware may still handle it; the resolver raises otherwise
        if resolved is not None and self._direct and not resolved.is_async:
            if command is not None:  # next time the command calls the method itself
                command._fast = (self._valid, resolved)
            method = getattr(resolved.service, resolved.method)
            telemetry = c._telemetry
            if telemetry is None:
                return method(*args, **kwargs)
            step = telemetry.call_started(resolved.path, resolved.function)
            try:
                result = method(*args, **kwargs)
            except BaseException as error:
                telemetry.call_finished(step, error)
                raise
            telemetry.call_finished(step, None)
            return result
        if path is None:
            path = tuple(PathSegment(n) for n in names)
        request = DalCommandRequest(c.ctx, path, args, kwargs)
        if resolved is not None:
            request.dal_method = getattr(resolved.service, resolved.method)
            request._resolved_path = path
            if resolved.is_async:
                if not c._is_async:
                    raise _sync_caller(resolved.path)
                return self._acall(request, resolved)
        telemetry = c._telemetry
        if telemetry is None or resolved is None:
            result = self._handler(request)
            if self._async_middleware and resolved is not None:
                self._check_sync_result(result, resolved)
            return result
        step = telemetry.call_started(resolved.path, resolved.function)
        try:
            result = self._handler(request)
            if self._async_middleware:
                self._check_sync_result(result, resolved)
        except BaseException as error:
            telemetry.call_finished(step, error)
            raise
        telemetry.call_finished(step, None)
        return result

    def _check_sync_result(self, result: Any, resolved: Resolved) -> None:
        """A sync method called through ``async def`` method middleware got back an
        awaitable: say so, instead of handing the caller an un-awaited coroutine."""
        if not inspect.isawaitable(result):
            return
        if inspect.iscoroutine(result):
            result.close()  # never started: the method did not run
        names = ", ".join(self._async_middleware)
        raise InvalidMiddleware(
            f"dal.{resolved.path} is a sync method, but the method middleware {names} "
            f"is async (it returned an awaitable, not the result). Make the method "
            f"`async def` and await it, or make the middleware a plain function that "
            f"returns handler(request) for sync methods."
        )

    async def _acall(self, request: DalCommandRequest, resolved: Resolved) -> Any:
        c = request.ctx._c
        if c.ctx is None:  # the call was made in the context, awaited after it ended
            raise ContextStateError(
                f"dal.{resolved.path}(...) was awaited after its context ended: await a "
                f"DAL call inside the `async with dm.context()` block that made it."
            )
        telemetry = c._telemetry
        if telemetry is None:
            return await self._ahandler(request)
        step = telemetry.call_started(resolved.path, resolved.function)
        try:
            result = await self._ahandler(request)
        except BaseException as error:
            telemetry.call_finished(step, error)
            raise
        telemetry.call_finished(step, None)
        return result

    def __getattr__(self, name: str) -> DalCommand:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._command(name)

    def _command(self, name: str) -> DalCommand:
        """The command for ``dal.<name>``; ``dal.<name>`` needs an active context (0.9.1)."""
        c = _active_lifecycle()
        if c is None or c.ctx is None:  # none, or one exited in another thread or task
            raise _no_context()
        # Commands are immutable: the DAL hands out one per name (bounded), so that
        # ``dal.users.get(7)`` allocates no command objects on the hot path.
        commands: dict[str, DalCommand] | None = self.__dict__.get("_commands")
        if commands is None:
            commands = self.__dict__["_commands"] = {}
        command = commands.get(name)
        if command is None:
            command = _DalPath._from_names(self._call, (name,))
            if len(commands) < _COMMAND_CACHE_SIZE:
                commands[name] = command
        return command

    def __getitem__(self, path: str) -> DalCommand:
        """A command from a dotted path (``dal['users.profile.get']``); a leading ``dal.``
        is ignored. Resolution (and any DalMethodError) happens when it is called."""
        if not isinstance(path, str):
            raise DalMethodError((PathSegment(repr(path)),), "a DAL path is a dotted string")
        names = path.split(".")
        if names and names[0] == "dal":
            names = names[1:]
        return _DalPath._from_names(self._call, tuple(names))


_DAL = DataAccessLayer


#: Most cached child commands per command (and top-level commands per DAL): attribute
#: names come from code, but ``getattr(dal, untrusted)`` must not grow memory unbounded.
_COMMAND_CACHE_SIZE = 1000


class _DalPath(DalCommand):
    """A command built by the DAL itself: calls go straight to the DAL with plain names.

    Child commands are cached in the instance ``__dict__`` (``dal.users.get`` is the
    same object every time, and after the first time Python finds it without calling
    ``__getattr__``) and always carry plain names, so calling one costs no
    allocation besides the call. Only names that are no attribute of the class get
    there: ``__getattr__`` runs for those alone.
    """

    __slots__ = ("__dict__", "_fast")
    #: ``(valid cell, resolution)`` once resolved with no method middleware in the
    #: way; used while ``cell[0]`` (see ``DataAccessLayer._bump``).
    _fast: tuple[list[bool], Resolved] | None

    @classmethod
    def _from_names(cls, handler: Callable[..., Any], names: tuple[str, ...]) -> DalCommand:
        command = super()._from_names(handler, names)
        command._fast = None  # type: ignore[attr-defined]
        return command

    def __getattr__(self, name: str) -> DalCommand:
        if name.startswith("__"):
            raise AttributeError(name)
        child = _DalPath._from_names(self._handler, (*self.names, name))
        children = self.__dict__
        if len(children) < _COMMAND_CACHE_SIZE:  # bounded: names may come from getattr()
            children[name] = child
        return child

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fast = self._fast
        if fast is not None and fast[0][0]:
            # Resolved before for this registration, no method middleware: call the
            # method directly (looked up every call: it may be patched), in a service
            # call span when the context records.
            c = _active_lifecycle()
            if c is not None and c.ctx is not None:  # else _call_names raises
                target = fast[1]
                telemetry = c._telemetry
                if telemetry is None:
                    return getattr(target.service, target.method)(*args, **kwargs)
                step = telemetry.call_started(target.path, target.function)
                try:
                    result = getattr(target.service, target.method)(*args, **kwargs)
                except BaseException as error:
                    telemetry.call_finished(step, error)
                    raise
                telemetry.call_finished(step, None)
                return result
        dal: DataAccessLayer = self._handler.__self__  # type: ignore[attr-defined]
        return dal._call_names(self._names or self.names, args, kwargs, command=self)


def _public_methods(service: Any) -> list[tuple[str, Any]]:
    """``(name, function)`` of each method the DAL reaches on ``service``, found
    statically: a descriptor (a property, a ServiceSafe, ...) may need an active
    context, and inspecting a registration must not run application code."""
    from polydatum.services import Service

    found = []
    subs = service.__dict__.get("_services") or {}
    base = dir(Service)
    for attr in dir(type(service)):
        if attr.startswith("_") or attr in subs:
            continue
        if attr in base and attr not in type(service).__dict__:
            continue
        static = inspect.getattr_static(service, attr)
        if isinstance(static, (staticmethod, classmethod)):
            static = static.__func__
        if inspect.isfunction(static) or (
            callable(static) and not hasattr(type(static), "__get__")
        ):
            found.append((attr, static))
    return found


def _is_async_callable(obj: Any) -> bool:
    """An ``async def`` function (or partial of one), or an object whose ``__call__`` is."""
    return inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(
        getattr(obj, "__call__", None)  # noqa: B004 - the attribute itself
    )


def _async_link(middleware: Any, inner: Callable[[DalCommandRequest], Any]) -> Any:
    async def link(request: DalCommandRequest) -> Any:
        result = middleware(request, inner)
        if inspect.isawaitable(result):
            result = await result
        return result

    return link


@dataclass(frozen=True, slots=True)
class PingResult:
    """The outcome of one resource health ping."""

    resource: str
    ok: bool
    duration_s: float
    error: str | None = None


class DataManager:
    """The registry of services, resources and middleware; one per process, usually.

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

    DataAccessLayer = DataAccessLayer
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
        # The registered factories, read directly when nothing customises the look-up
        # (a context with nothing to record creates resources from here); otherwise
        # empty, so that every resource goes through get_resource().
        self._idle_factories: dict[str, Callable[..., Any]] = (
            self._resource_manager._resources
            if type(self).get_resource is DataManager.get_resource
            and type(self._resource_manager).get is ResourceManager.get
            else {}
        )
        self._middleware: list[Any] = []
        self._telemetry = Telemetry(tracer_provider, meter_provider, meta_attributes, step_metrics)
        self.teardown_errors = teardown_errors
        self._dal: _DAL = self.DataAccessLayer(self, middleware=list(method_middleware))
        # What every context reads when get_dal() / get_middleware() are DataManager's own
        # (two method calls fewer per context); None when a subclass overrides them, so
        # that the override is called for every context, as documented.
        plain = type(self)
        self._plain_dal: _DAL | None = self._dal if plain.get_dal is DataManager.get_dal else None
        self._plain_middleware: list[Any] | None = (
            self._middleware if plain.get_middleware is DataManager.get_middleware else None
        )
        self._context_class()

    def _context_class(self) -> type[DataAccessContext]:
        """``self.Context`` with the registered resources as descriptors (cached; made
        again when ``Context`` is replaced). See :class:`polydatum.context._ResourceAttribute`."""
        base = self.Context
        cls: type[DataAccessContext] | None = self.__dict__.get("_ctx_class")
        if cls is None or self.__dict__.get("_ctx_base") is not base:
            cls = context_class_for(base, list(self._resource_manager))
            self._ctx_class = cls
            self._ctx_base = base
        return cls

    def _resource_registered(self, name: str) -> None:
        """Called by the ResourceManager: ``ctx.<name>`` becomes a descriptor."""
        cls = self.__dict__.get("_ctx_class")
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

    def get_resource(self, name: str) -> Callable[..., Any] | None:
        """The registered resource callable named ``name``, or ``None``."""
        return self._resource_manager.get(name)

    def get_dal(self) -> _DAL:
        return self._dal

    # -- contexts ---------------------------------------------------------------------

    def context(self, meta: Meta | dict[str, Any] | None = None) -> DataAccessContext:
        """A new (not yet entered) context; use ``with`` or ``async with``."""
        cls = self._ctx_class if self.Context is self._ctx_base else self._context_class()
        return cls(self, meta=meta)

    def dal(self, meta: Meta | dict[str, Any] | None = None) -> DataAccessContext:
        """Start a context and give the DAL: ``with dm.dal() as dal:`` (or ``async with``).

        The context itself is returned; entering it yields its DAL.
        """
        cls = self._ctx_class if self.Context is self._ctx_base else self._context_class()
        ctx = cls(self, meta=meta)
        ctx._c._yields_dal = True
        return ctx

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
        if dal_class.__dict__.get("_services_class"):  # its _ServiceAttribute holder
            dal_class = dal_class.__mro__[1]
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

        from polydatum.services import Service

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
                        for method, function in _public_methods(service)
                        if not _is_async_callable(function)
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
        tracer = self._telemetry.tracer()
        if tracer is None:
            return None
        return tracer.start_span(
            f"polydatum.resource.ping {name}", attributes={"polydatum.resource.name": name}
        )

    def _ping_done(
        self, name: str, span: Any, t0: float, error: BaseException | None
    ) -> PingResult:
        duration = time.perf_counter() - t0
        if span is not None:
            if error is not None:
                from opentelemetry.trace import Status, StatusCode

                span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
                span.set_attribute("error.type", error_type(error))
                span.record_exception(error)
            span.end()
        if error is None:
            return PingResult(name, True, duration)
        return PingResult(name, False, duration, f"{error_type(error)}: {error}")

    def _ping_one(self, name: str, ping: Callable[[], Any]) -> PingResult:
        span = self._ping_span(name)
        t0 = time.perf_counter()
        try:
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
            return [name for name, _ in _public_methods(service)]

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
