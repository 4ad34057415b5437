"""Resources: lazily created, per-context handles to backends.

A resource is a generator callable ``resource(context)`` that sets the handle up,
yields it once, and tears it down after the yield. The exception the context ended
with (if any) is thrown in at the ``yield`` so the resource can roll back::

    def db_session(context):
        session = Session()
        try:
            yield session
        except BaseException:
            session.rollback()
            raise
        else:
            session.commit()
        finally:
            session.close()

Async generator callables work in ``async with`` contexts. A resource may declare
``telemetry_attributes`` (a mapping added to its setup/teardown spans) and a
``ping()`` health check, run by :meth:`polydatum.DataManager.ping`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

from polydatum.errors import AlreadyExistsException, RegistrationError

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext
    from polydatum.registry import DataManager


def is_generator(obj: Any) -> bool:
    """Whether ``obj`` is a generator callable: a (async) generator function, or an
    object whose ``__call__`` is one."""
    if not callable(obj):
        return False
    if inspect.isgeneratorfunction(obj) or inspect.isasyncgenfunction(obj):
        return True
    call = getattr(obj, "__call__", None)  # noqa: B004 - we need the attribute itself
    return inspect.isgeneratorfunction(call) or inspect.isasyncgenfunction(call)


class Resource:
    """Base class for class-based resources; override ``__call__`` as a generator."""

    # Deprecated in 0.8.4; kept so that old resources that read it still work.
    _data_manager: DataManager[Any] | None = None

    def setup(self, data_manager: DataManager[Any]) -> None:
        """Deprecated 0.8.4 hook, called on registration (use ``context.data_manager``)."""
        self._data_manager = data_manager

    def __call__(self, context: DataAccessContext) -> Generator[Any, None, None]:
        yield None


class ValueResource(Resource):
    """A resource that is just a value, the same for every context."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self._value = value

    def __call__(self, context: DataAccessContext) -> Generator[Any, None, None]:
        yield self._value


class ResourceManager:
    """The registry of resources of one DataManager."""

    def __init__(self, data_manager: DataManager[Any]) -> None:
        self._resources: dict[str, Callable[..., Any]] = {}
        self._data_manager = data_manager

    def register_resources(self, **resources: Callable[..., Any]) -> None:
        """Register resources; ``AlreadyExistsException`` for a name already taken."""
        for key in resources:
            if key in self._resources:
                raise AlreadyExistsException(
                    f"A Resource for {key} is already registered; "
                    f"use replace_resource({key!r}, ...) to override it."
                )
        for key, resource in resources.items():
            self._init_resource(key, resource)

    def replace_resource(self, key: str, resource: Callable[..., Any]) -> None:
        """Register ``resource`` under ``key``, replacing any existing one."""
        self._init_resource(key, resource)

    def _init_resource(self, key: str, resource: Callable[..., Any]) -> None:
        if not is_generator(resource):
            raise RegistrationError(
                f"Resource {key}:{resource!r} must be a Python generator callable "
                f"(a function that yields the resource once, or an object whose "
                f"__call__ does)."
            )
        setup = getattr(resource, "setup", None)
        if callable(setup):
            setup(self._data_manager)
        self._resources[key] = resource
        registered = getattr(self._data_manager, "_resource_registered", None)
        if registered is not None:  # makes ctx.<key> fast to reach (DataManager)
            registered(key)

    def __getitem__(self, name: str) -> Callable[..., Any]:
        return self._resources[name]

    def get(self, name: str) -> Callable[..., Any] | None:
        return self._resources.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._resources

    def __iter__(self) -> Iterator[str]:
        return iter(self._resources)

    def items(self) -> Iterator[tuple[str, Callable[..., Any]]]:
        return iter(self._resources.items())
