"""Method middleware (polydatum 1.0): callables wrapping every DAL call.

``dal.users.profile.get(7)`` builds a :class:`DalCommand` (attribute access is
deferred); calling it makes a :class:`DalCommandRequest` and runs it through the
method middleware, outermost first, each one ``mw(request, handler)``: it may inspect
or change ``request.args`` / ``request.kwargs``, short-circuit by returning without
calling ``handler(request)``, or raise. The innermost default middleware resolves
the path to a service method (:func:`dal_method_resolver_middleware`) and
:func:`handle_dal_method` calls it.

Only public methods of registered services are reachable: a path whose segment
starts with ``_``, or that walks into anything but a sub-service, raises
:class:`~polydatum.errors.DalMethodError`. DAL string paths may come from untrusted
input (queued commands); they never reach attributes, resources or the DataManager.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import FunctionType
from typing import TYPE_CHECKING, Any

from polydatum.errors import DalMethodError
from polydatum.services import Service

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext

__all__ = [
    "DalCommand",
    "DalCommandRequest",
    "DalMethodError",
    "PathSegment",
    "RoutedMethod",
    "dal_method_resolver_middleware",
    "dal_resolver",
    "find_service",
    "handle_dal_method",
    "method_function",
    "resolve_method",
    "service_method",
]


class PathSegment:
    """One segment of a DAL path (``dal.users.profile.get`` has four... minus ``dal``)."""

    __slots__ = ("meta", "name")

    def __init__(self, name: str, **meta: Any) -> None:
        self.name = name
        self.meta = meta

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PathSegment) and self.name == other.name and self.meta == other.meta
        )

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"PathSegment(name={self.name!r})"

    def __str__(self) -> str:
        return self.name


class DalCommandRequest:
    """The mutable state of one DAL call, passed through the method middleware."""

    __slots__ = ("_resolved_path", "args", "ctx", "dal_method", "kwargs", "path")

    def __init__(
        self,
        ctx: DataAccessContext,
        path: tuple[PathSegment, ...],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.ctx = ctx
        self.path = path
        self.args = args
        self.kwargs = kwargs
        self.dal_method: Callable[..., Any] | None = None
        self._resolved_path: tuple[PathSegment, ...] | None = None

    def __repr__(self) -> str:
        return f"<DalCommandRequest {'.'.join(p.name for p in self.path)}>"


_Segment = PathSegment


class DalCommand:
    """A deferred DAL path: attribute access extends it, calling it runs it.

    Not bound to a context, so it can be stored and called later (inside a context).
    ``path`` is a tuple of :class:`PathSegment`; the handler is called as
    ``handler(path, *args, **kwargs)``.
    """

    PathSegment: type[_Segment] = _Segment

    __slots__ = ("_handler", "_names", "_path")

    def __init__(self, handler: Callable[..., Any], path: tuple[_Segment, ...]) -> None:
        self._handler = handler
        self._path: tuple[_Segment, ...] | None = tuple(path)
        self._names: tuple[str, ...] | None = None

    @classmethod
    def _from_names(cls, handler: Callable[..., Any], names: tuple[str, ...]) -> DalCommand:
        # The DAL's own commands carry plain names; segments are built only if asked for.
        command = cls.__new__(cls)
        command._handler = handler
        command._names = names
        command._path = None
        return command

    @property
    def path(self) -> tuple[_Segment, ...]:
        if self._path is None:
            self._path = tuple(self.PathSegment(n) for n in self._names or ())
        return self._path

    @property
    def names(self) -> tuple[str, ...]:
        """The path as plain strings."""
        if self._names is None:
            self._names = tuple(p.name for p in self.path)
        return self._names

    def __getattr__(self, name: str) -> DalCommand:
        if name.startswith("__"):
            raise AttributeError(name)
        if self._names is not None:
            return self._from_names(self._handler, (*self._names, name))
        return self.__class__(self._handler, (*self.path, self.PathSegment(name=name)))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._handler(self.path, *args, **kwargs)

    def __str__(self) -> str:
        return ".".join(self.names)

    def __repr__(self) -> str:
        return f"<DalCommand {self}>"


class RoutedMethod:
    """The base of what a registered service instance holds for each public method:
    the DAL's call of it (``dal.users.get``; see ``DataAccessLayer._route``)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Resolved:
    """A DAL path resolved to a service method (cached per path by the DAL)."""

    service: Service
    method: str
    path: str  # "users.profile.get": the span name and ``polydatum.service.path``
    function: str  # ``code.function.name``: the method's qualified name
    is_async: bool
    #: The plain function the class defines for ``method`` (``None`` for a static or
    #: class method): while the class still holds it, a call is ``defined(service, ...)``.
    defined: Any = None


def _class_attribute(cls: type, name: str) -> Any:
    """``name`` as defined by the service's own classes (and mixins).

    The framework's :class:`~polydatum.services.Service` (``setup``,
    ``register_services``), ``object`` and the metaclass are never searched: their
    methods are not service methods, and a DAL path may come from untrusted input.
    """
    for klass in cls.__mro__:
        if klass is Service or klass is object:
            continue
        if name in klass.__dict__:
            return klass.__dict__[name]
    return None


def method_function(cls: type, name: str) -> Any:
    """The function behind the service method ``name`` of ``cls``, or ``None`` when
    ``name`` is no method the DAL reaches.

    Only code written as a method (a function, possibly decorated, an async one, a
    static or class method) on the service's own classes is reachable: a builtin stored
    on the class (``opener = open``), a nested class, a property or another callable
    object is not, since a DAL path may come from untrusted input.
    """
    static = _class_attribute(cls, name)
    if static is None:
        return None
    defined = static.__func__ if isinstance(static, staticmethod | classmethod) else static
    return defined if isinstance(_unwrapped(defined), FunctionType) else None


def service_method(service: Any, name: str) -> Any:
    """The bound method ``name`` of ``service``: as its class defines it (looked up per
    call, so a class patched by a test is honoured), or what the application put on the
    instance itself (``mock.patch.object(service, "get")``) -- never the routing
    command registration puts on the instance (``dal.notes.get`` is that command: it
    runs the method middleware and tracing, then this method).
    """
    found = service.__dict__.get(name)
    if found is not None and not isinstance(found, RoutedMethod):
        return found
    cls = type(service)
    attr = cls.__dict__.get(name)
    if attr is None:
        attr = _class_attribute(cls, name)
    get = getattr(type(attr), "__get__", None)
    return attr if get is None else get(attr, service, cls)


def _unwrapped(defined: Any) -> Any:
    """What a decorator chain (``__wrapped__``) was applied to; ``defined`` on a cycle."""
    try:
        return inspect.unwrap(defined)
    except ValueError:
        return defined


def resolve_path(services: Mapping[str, Service], names: tuple[str, ...]) -> Resolved:
    """Resolve ``names`` to a public method of a registered service, or raise DalMethodError."""
    path = tuple(PathSegment(n) for n in names)
    if not names:
        raise DalMethodError(path, "empty path")
    for name in names:
        if not isinstance(name, str) or not name or name.startswith("_"):
            raise DalMethodError(path, "names starting with '_' are not reachable")
    service = services.get(names[0])
    if service is None:
        raise DalMethodError(path, f"no service named {names[0]!r}")
    for name in names[1:-1]:
        subs = service.__dict__.get("_services") or {}
        if name not in subs:
            raise DalMethodError(path, f"{type(service).__name__} has no sub-service {name!r}")
        service = subs[name]
    if len(names) == 1:
        raise DalMethodError(path, "a service, not a method")
    method = names[-1]
    subs = service.__dict__.get("_services") or {}
    if method in subs:
        raise DalMethodError(path, "a service, not a method")
    static = _class_attribute(type(service), method)
    if static is None:
        raise DalMethodError(path, f"{type(service).__name__} has no public method {method!r}")
    if method_function(type(service), method) is None:
        defined = static.__func__ if isinstance(static, staticmethod | classmethod) else static
        raise DalMethodError(
            path,
            f"{type(service).__name__}.{method} is not a method: {type(defined).__name__}",
        )
    bound = service_method(service, method)
    func = inspect.unwrap(bound)
    qualname = getattr(func, "__qualname__", method)
    module = getattr(func, "__module__", None)
    return Resolved(
        service=service,
        method=method,
        path=".".join(names),
        function=f"{module}.{qualname}" if module else qualname,
        is_async=inspect.iscoroutinefunction(func),
        defined=static if isinstance(static, FunctionType) else None,
    )


def find_service(services: Mapping[str, Service], names: tuple[str, ...]) -> Service | None:
    """The service (or sub-service) that ``names`` names, or ``None``."""
    if not names or any(not isinstance(n, str) or n.startswith("_") for n in names):
        return None
    service = services.get(names[0])
    for name in names[1:]:
        if service is None:
            return None
        service = (service.__dict__.get("_services") or {}).get(name)
    return service


def dal_resolver(ctx: DataAccessContext, request_path: tuple[PathSegment, ...]) -> Any:
    """Resolve a path to what it names (polydatum 1.0 API): the bound service method,
    or the service itself when the path names a service (``dal_resolver(ctx,
    dal.users.path)``); ``DalMethodError`` when it names neither."""
    try:
        return resolve_method(ctx, request_path)
    except DalMethodError:
        service = find_service(ctx.dal._services, tuple(p.name for p in request_path))
        if service is None:
            raise
        return service


def resolve_method(ctx: DataAccessContext, request_path: tuple[PathSegment, ...]) -> Any:
    """The bound service method a path names; ``DalMethodError`` for anything else (a
    service included: what the method resolver middleware calls must be a method)."""
    resolved = ctx.dal._resolve(tuple(p.name for p in request_path))
    return service_method(resolved.service, resolved.method)


def dal_method_resolver_middleware(
    request: DalCommandRequest, handler: Callable[[DalCommandRequest], Any]
) -> Any:
    """The innermost default middleware: resolve ``request.path`` unless already done."""
    if request.dal_method is None or request._resolved_path != request.path:
        request.dal_method = resolve_method(request.ctx, request.path)
        request._resolved_path = request.path
    return handler(request)


def handle_dal_method(request: DalCommandRequest) -> Any:
    """The default handler at the end of the chain: call the resolved method."""
    method = request.dal_method
    if method is None:
        raise DalMethodError(request.path, "not resolved")
    return method(*request.args, **request.kwargs)
