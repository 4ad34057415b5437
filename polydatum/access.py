"""The DataAccessLayer: the way into services (``dal.users.profile.get(7)``).

Attribute access builds immutable commands (cached, so a hot path allocates none);
calling one resolves the path to a service method (cached per registration
generation), runs the method middleware chain around it, and records the call on the
active context's observer when something records.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

from polydatum.context import lifecycle_of
from polydatum.errors import (
    MAX_DAL_PATH_LENGTH,
    MAX_DAL_PATH_SEGMENTS,
    AlreadyExistsException,
    ContextStateError,
    DalMethodError,
    InvalidMiddleware,
    NoActiveContextError,
)
from polydatum.lifecycle import active_lifecycle, callable_name
from polydatum.middleware import (
    DalCommand,
    DalCommandRequest,
    PathSegment,
    Resolved,
    RoutedMethod,
    dal_method_resolver_middleware,
    handle_dal_method,
    method_function,
    resolve_path,
    service_method,
)
from polydatum.services import Service, check_service

if TYPE_CHECKING:
    from polydatum.registry import DataManager

__all__ = ["DataAccessLayer", "MethodMiddleware", "is_async_callable", "public_methods"]

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


class DataAccessLayer:
    """Gives access to a DataManager's services: ``dal.users.profile.get(7)``.

    ``middleware`` are method middleware ``mw(request, handler)``, outermost first
    (a class is instantiated); ``default_middleware`` run innermost (by default the
    resolver) and ``handler`` calls the resolved method.
    """

    def __init__(
        self,
        data_manager: DataManager[Any] | None,
        middleware: Iterable[Any] | None = None,
        default_middleware: Iterable[Any] | None = (dal_method_resolver_middleware,),
        handler: Callable[[DalCommandRequest], Any] = handle_dal_method,
    ) -> None:
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
        try:
            signature = inspect.signature(middleware)
        except (TypeError, ValueError):  # no signature to read (some builtins): trust it
            return middleware
        try:
            signature.bind(None, handler=None)
        except TypeError:
            raise InvalidMiddleware(
                f"Method middleware {callable_name(middleware)}{signature} has the wrong "
                f"shape: it is called as mw(request, handler=next_handler), so it must take "
                f"(request, handler)."
            ) from None
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
        # A sync method's call runs the sync chain: an ``async def`` middleware there
        # would hand the caller a coroutine instead of the result (see _sync_result).
        self._async_middleware: list[str] = [
            callable_name(m) for m in self._middleware if is_async_callable(m)
        ]
        # No method middleware of the user's and the stock resolver and handler: a
        # resolved call can go straight to the method (the common, hot case).
        self._direct = (
            not self._middleware
            and self._default_middleware == [dal_method_resolver_middleware]
            and self._base_handler is handle_dal_method
        )
        # Last: a call that sees the new generation sees the new chain and flag too.
        self._bump()

    @property
    def method_middleware(self) -> list[Any]:
        """The method middleware in call order (outermost first), defaults included."""
        return [*self._middleware, *self._default_middleware]

    # -- services -------------------------------------------------------------------

    def register_services(self, **services: Service) -> DataAccessLayer:
        """Register services; ``AlreadyExistsException`` for a name already taken."""
        for key, service in services.items():
            if key in self._services:
                raise AlreadyExistsException(
                    f"A Service for {key} is already registered; "
                    f"use replace_service({key!r}, ...) to override it."
                )
            check_service(key, service)  # all refused before any is registered
        for key, service in services.items():
            self._init_service(key, service)
        return self

    def replace_service(self, key: str, service: Service) -> Service:
        """Register ``service`` under ``key``, replacing any existing one (tests, variants)."""
        return self._init_service(key, service)

    def _init_service(self, key: str, service: Service) -> Service:
        check_service(key, service)
        service.setup(self._data_manager)
        replaced = self._services.get(key)
        if replaced is not None and replaced is not service:
            _unroute(replaced)  # its methods are its own again
        self._services[key] = service
        self._route(service, (key,))
        if not key.startswith("_") and not any(key in k.__dict__ for k in type(self).__mro__):
            # ``dal.<key>`` is the Service object (0.9.1's ``dal.users is users``), an
            # instance attribute: found without ``__getattr__`` (a failed look-up first
            # builds and discards an AttributeError) or a descriptor's Python call
            # (benchmarks/README.md); never over the DAL's own attributes. Reading it
            # needs no active context; calling one of its methods does.
            self.__dict__[key] = service
        self._invalidate()
        return service

    def _route(self, service: Service, names: tuple[str, ...]) -> None:
        """Make each public method of ``service`` (registered at ``names``) and of its
        sub-services, as seen on the instance, the DAL's command for it.

        So ``dal.users.get`` -- ``dal.users`` being the Service object -- and
        ``self.get`` inside the service are calls through the DAL: method middleware,
        tracing and the active-context check apply, and the command calls the method
        its class defines (:func:`~polydatum.middleware.service_method`). What the
        application set on the instance itself is left alone.
        """
        state = service.__dict__
        state["_dal_path"] = names
        for attr, _ in public_methods(service):
            current = state.get(attr, _ABSENT)
            if current is not _ABSENT and not isinstance(current, RoutedMethod):
                continue  # the application's own instance attribute
            state[attr] = _ServiceMethod(self, (*names, attr))
        for key, sub in (state.get("_services") or {}).items():
            self._route(sub, (*names, key))

    def _invalidate(self) -> None:
        """Forget every cached resolution (a service was registered or replaced).

        A new cache, not a cleared one: a call that resolved against the old
        registration stores its resolution in the cache it read, which is no longer
        used, so it can never become the answer for later calls. The cache is
        replaced before the generation cell (see :meth:`_bump`): a caller that reads
        the cell first and then the cache never pairs a new cell with an old cache.
        """
        self._resolved = {}
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

    def _resolve(
        self, names: tuple[str, ...], cache: dict[tuple[str, ...], Resolved] | None = None
    ) -> Resolved:
        """The resolution of ``names``, cached in ``cache`` (the cache read before the
        services were: a registration in between replaces it, see :meth:`_invalidate`)."""
        if cache is None:
            cache = self._resolved
        try:
            return cache[names]
        except KeyError:
            pass
        except TypeError:  # unhashable names from a hostile caller
            raise DalMethodError(tuple(PathSegment(str(n)) for n in names), "bad path") from None
        resolved = resolve_path(self._services, names)
        if len(cache) < MAX_CACHED_RESOLUTIONS:
            cache[names] = resolved
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
        command: _DalPath | _ServiceMethod | None = None,
    ) -> Any:
        c = active_lifecycle()
        if c is None or c.ctx is None:  # none, or one exited in another thread or task
            raise _no_context()
        # The generation cell first, then the cache and the chain: a registration
        # replaces them before it bumps the cell, so what is read here is at least as
        # new as the cell a command remembers below (never a stale fast path).
        valid = self._valid
        cache = self._resolved
        resolved = cache.get(names)
        if resolved is None:
            try:
                resolved = self._resolve(names, cache)
            except DalMethodError:
                resolved = None  # middleware may still handle it; the resolver raises otherwise
        if resolved is not None and self._direct and not resolved.is_async:
            if command is not None:  # next time the command calls the method itself
                command._fast = (valid, resolved)
            return _call_resolved(c, resolved, args, kwargs)
        if path is None:
            path = tuple(PathSegment(n) for n in names)
        request = DalCommandRequest(c.ctx, path, args, kwargs)
        if resolved is not None:
            request.dal_method = service_method(resolved.service, resolved.method)
            request._resolved_path = path
            if resolved.is_async:
                if not c.is_async:
                    raise _sync_caller(resolved.path)
                return self._acall(request, resolved)
        if resolved is None:  # the middleware handles it, or the resolver raises
            return self._handler(request)
        call = self._checked_handler if self._async_middleware else self._handler
        observer = c.observer
        if observer is None:
            return call(request)
        return _observed(observer, resolved, call, (request,), {})

    def _checked_handler(self, request: DalCommandRequest) -> Any:
        """The chain, for a sync method with ``async def`` method middleware in it."""
        result = self._handler(request)
        self._check_sync_result(result, request)
        return result

    def _check_sync_result(self, result: Any, request: DalCommandRequest) -> None:
        """A sync method called through ``async def`` method middleware got back an
        awaitable: say so, instead of handing the caller an un-awaited coroutine."""
        if not inspect.isawaitable(result):
            return
        if inspect.iscoroutine(result):
            result.close()  # never started: the method did not run
        names = ", ".join(self._async_middleware)
        path = ".".join(p.name for p in request.path)
        raise InvalidMiddleware(
            f"dal.{path} is a sync method, but the method middleware {names} "
            f"is async (it returned an awaitable, not the result). Make the method "
            f"`async def` and await it, or make the middleware a plain function that "
            f"returns handler(request) for sync methods."
        )

    async def _acall(self, request: DalCommandRequest, resolved: Resolved) -> Any:
        c = lifecycle_of(request.ctx)
        if c.ctx is None:  # the call was made in the context, awaited after it ended
            raise ContextStateError(
                f"dal.{resolved.path}(...) was awaited after its context ended: await a "
                f"DAL call inside the `async with dm.context()` block that made it."
            )
        observer = c.observer
        if observer is None:
            return await self._ahandler(request)
        step = observer.call_started(resolved.path, resolved.function)
        try:
            result = await self._ahandler(request)
        except BaseException as error:
            observer.call_finished(step, error)
            raise
        observer.call_finished(step, None)
        return result

    def __getattr__(self, name: str) -> DalCommand:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._command(name)

    def _command(self, name: str) -> DalCommand:
        """The command for ``dal.<name>`` (a name that is no registered service): built
        with or without an active context; calling it needs one (polydatum 1.0)."""
        # Commands are immutable: the DAL hands out one per name (bounded), so that
        # ``dal.users.get(7)`` allocates no command objects on the hot path.
        commands: dict[str, DalCommand] | None = self.__dict__.get("_commands")
        if commands is None:
            commands = self.__dict__["_commands"] = {}
        command = commands.get(name)
        if command is None:
            command = _DalPath._from_names(self._call, (name,))
            if len(commands) < _COMMAND_CACHE_SIZE and _take_from_budget(self):
                commands[name] = command
        return command

    def __getitem__(self, path: str) -> DalCommand:
        """A command from a dotted path (``dal['users.profile.get']``); a leading ``dal.``
        is ignored. Resolution (and any DalMethodError) happens when it is called."""
        if not isinstance(path, str):
            raise DalMethodError((PathSegment(repr(path)),), "a DAL path is a dotted string")
        if len(path) > MAX_DAL_PATH_LENGTH or path.count(".") >= MAX_DAL_PATH_SEGMENTS + 1:
            raise DalMethodError(
                (PathSegment(path),),
                f"a DAL path is at most {MAX_DAL_PATH_LENGTH} characters and "
                f"{MAX_DAL_PATH_SEGMENTS} segments; this one has {len(path)} characters",
            )
        names = path.split(".")
        if names and names[0] == "dal":
            names = names[1:]
        return _DalPath._from_names(self._call, tuple(names))


_DAL = DataAccessLayer


#: Most path resolutions one DAL caches (paths come from code; ``dal[untrusted]`` is
#: bounded by MAX_DAL_PATH_LENGTH and this).
MAX_CACHED_RESOLUTIONS = 10_000

#: Most cached child commands per command (and top-level commands per DAL): attribute
#: names come from code, but ``getattr(dal, untrusted)`` must not grow memory unbounded.
_COMMAND_CACHE_SIZE = 1000
#: Most commands one DAL caches in all, at every depth (beyond it they are built per
#: access: correct, only not remembered).
MAX_CACHED_COMMANDS = 20_000


def _take_from_budget(dal: Any) -> bool:
    """Whether ``dal`` may cache one more command (and count it): at most
    :data:`MAX_CACHED_COMMANDS` (a race between threads may overshoot by a few)."""
    state = dal.__dict__
    left: int = state.get("_command_budget", MAX_CACHED_COMMANDS)
    if left <= 0:
        return False
    state["_command_budget"] = left - 1
    return True


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
        # Bounded per command and in total: names may come from getattr(dal, untrusted).
        dal = self._handler.__self__  # type: ignore[attr-defined]
        if len(children) < _COMMAND_CACHE_SIZE and _take_from_budget(dal):
            children[name] = child
        return child

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fast = self._fast
        if fast is not None and fast[0][0]:
            # Resolved before for this registration, no method middleware: call the
            # method directly (looked up every call: it may be patched), in a service
            # call span when the context records.
            c = active_lifecycle()
            if c is not None and c.ctx is not None:  # else _call_names raises
                return _call_resolved(c, fast[1], args, kwargs)
        dal: DataAccessLayer = self._handler.__self__  # type: ignore[attr-defined]
        return dal._call_names(self._names or self.names, args, kwargs, command=self)


class _ServiceMethod(RoutedMethod):
    """``dal.users.get``: what the service instance holds for its public method ``get``
    (registration puts it there), calling it through the DAL like a command does.

    Not a :class:`DalCommand`: nothing below a method is a path, and a class without
    ``__getattr__`` has its attribute reads specialised by CPython (benchmarks/README.md).
    """

    __slots__ = ("_fast", "dal", "names")

    def __init__(self, dal: DataAccessLayer, names: tuple[str, ...]) -> None:
        self.dal = dal
        self.names = names
        #: As :attr:`_DalPath._fast`.
        self._fast: tuple[list[bool], Resolved] | None = None

    @property
    def path(self) -> tuple[PathSegment, ...]:
        """The path as segments (polydatum 1.0's ``command.path``)."""
        return tuple(PathSegment(n) for n in self.names)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fast = self._fast
        if fast is not None and fast[0][0]:  # as in _DalPath.__call__
            c = active_lifecycle()
            if c is not None and c.ctx is not None:
                # Called, so the instance holds this (or the caller kept it from
                # before a patch of the instance, which 0.9.1's bound method ignored too).
                return _call_resolved(c, fast[1], args, kwargs, True)
        return self.dal._call_names(self.names, args, kwargs, command=self)

    def __str__(self) -> str:
        return ".".join(self.names)

    def __repr__(self) -> str:
        return f"<DAL method {self}>"


def _call_resolved(
    c: Any,
    target: Resolved,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    from_instance: bool = False,
) -> Any:
    """Call the sync method ``target`` resolved to, with no method middleware in the
    way, in a service call span when the lifecycle ``c`` records.

    The method is looked up every call (a test may patch it): the class's function
    while the class still holds it and the instance does not override it (what
    registration put there is the DAL's own command), else
    :func:`~polydatum.middleware.service_method`. ``from_instance``: the caller is the
    method the instance holds, so the instance overrides nothing.
    """
    service = target.service
    name = target.method
    method = target.defined
    if method is not None and getattr(type(service), name) is method:
        found = None if from_instance else service.__dict__.get(name)
        if found is None or found.__class__ is _ServiceMethod:
            args = (service, *args)
        else:
            method = found  # the application's own, on the instance
    else:
        method = service_method(service, name)
    observer = c.observer
    if observer is None:
        return method(*args, **kwargs)
    return _observed(observer, target, method, args, kwargs)


def _observed(
    observer: Any,
    target: Resolved,
    call: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``call(*args, **kwargs)`` as the service call ``target``, recorded by
    ``observer`` (a span, a sample); the one copy for sync calls (``_acall`` awaits)."""
    step = observer.call_started(target.path, target.function)
    try:
        result = call(*args, **kwargs)
    except BaseException as error:
        observer.call_finished(step, error)
        raise
    observer.call_finished(step, None)
    return result


def public_methods(service: Any) -> list[tuple[str, Any]]:
    """``(name, function)`` of each method the DAL reaches on ``service``, found on its
    classes without running application code (a descriptor -- a property, a
    ServiceSafe -- may need an active context): the same rule as the resolver's."""
    found = []
    subs = service.__dict__.get("_services") or {}
    cls = type(service)
    for attr in dir(cls):
        if attr.startswith("_") or attr in subs:
            continue
        function = method_function(cls, attr)
        if function is not None:
            found.append((attr, function))
    return found


#: "No instance attribute of that name" (:meth:`DataAccessLayer._route`).
_ABSENT = object()


def _unroute(service: Service) -> None:
    """Undo :meth:`DataAccessLayer._route` (the service was replaced by another)."""
    state = service.__dict__
    if state.pop("_dal_path", None) is None:
        return
    for attr, value in list(state.items()):
        if isinstance(value, _ServiceMethod):
            del state[attr]
    for sub in (state.get("_services") or {}).values():
        _unroute(sub)


def is_async_callable(obj: Any) -> bool:
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
