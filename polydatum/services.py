"""Services: business logic and all data access, reached through the DAL."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

from polydatum.errors import AlreadyExistsException, NoActiveContextError, RegistrationError
from polydatum.lifecycle import active_lifecycle

if TYPE_CHECKING:
    from polydatum.access import DataAccessLayer
    from polydatum.context import DataAccessContext
    from polydatum.registry import DataManager


__all__ = ["Service", "check_service"]


def check_service(path: str, service: Any) -> None:
    """Refuse, before anything is bound, what cannot be registered as the service
    ``path``: a class (an instance is registered) or an object without ``setup()``."""
    if isinstance(service, type):
        name = service.__name__
        raise RegistrationError(
            f"Service {path}={name} is a class; register an instance: {path}={name}()."
        )
    if not callable(getattr(service, "setup", None)):
        raise RegistrationError(
            f"Service {path}={service!r} must be a polydatum.Service (it has no setup() method)."
        )


class Service:
    """Base class of services. Nest them with :meth:`register_services`.

    Inside a method, ``self._ctx`` is the active context (its ``meta``, its
    resources), ``self._dal`` the DAL (call other services through it so that
    method middleware and tracing apply) and ``self._data_manager`` the manager.
    """

    def __init__(self) -> None:
        self._services: dict[str, Service] = {}
        # None until the service is registered with a DataManager; typed as set
        # because service methods only run once registered (no assert needed).
        self._data_manager: DataManager = None  # type: ignore[assignment]
        self._dal: DataAccessLayer = None  # type: ignore[assignment]

    def register_services(self, **services: Service) -> Self:
        """Register sub-services (``dal.users.profile``); returns ``self`` for chaining."""
        subs = self.__dict__.setdefault("_services", {})
        for key, service in services.items():
            if key in subs:
                raise AlreadyExistsException(
                    f"A Service for {key} is already registered on {type(self).__name__}."
                )
            check_service(f"{type(self).__name__}.{key}", service)
        for key, service in services.items():
            service.setup(self.__dict__.get("_data_manager"))
            subs[key] = service
            # Reachable as an attribute (``self.profile``) the way 0.9.1's __getattr__
            # fallback made it: never over a class attribute or an instance attribute.
            # Kept in the instance dict rather than found by ``__getattr__``, because a
            # class with ``__getattr__`` gets no specialised attribute access from
            # CPython: every ``self._ctx`` in every service method would pay for it
            # (benchmarks/README.md).
            if key not in self.__dict__ and not hasattr(type(self), key):
                self.__dict__[key] = service
        dal = self.__dict__.get("_dal")
        if dal is not None:
            path = self.__dict__.get("_dal_path")
            if path is not None:  # registered already: route the new sub-services' methods
                dal._route(self, path)
            dal._invalidate()  # paths through this service may resolve differently now
        return self

    def setup(self, data_manager: DataManager[Any] | None) -> None:
        """Bind this service (and its sub-services) to a DataManager; called on registration."""
        self._data_manager = data_manager  # type: ignore[assignment]
        self._dal = data_manager.get_dal() if data_manager is not None else None  # type: ignore[assignment]
        for service in self.__dict__.get("_services", {}).values():
            service.setup(data_manager)

    @property
    def _ctx(self) -> DataAccessContext:
        """The active context; ``RuntimeError`` when none is active."""
        c = active_lifecycle()
        if c is None or c.ctx is None:  # none, or one exited in another thread or task
            raise NoActiveContextError(
                f"{type(self).__name__}._ctx used with no context active; call services "
                f"inside `with dm.context():` (or `with dm.dal() as dal:`)."
            )
        ctx: DataAccessContext = c.ctx
        return ctx
