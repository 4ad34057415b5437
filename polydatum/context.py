"""The request context users hold: ``DataAccessContext`` (sync and async) and ``Meta``.

A context is entered once, sets up the context middleware in registration order,
hands out resources lazily while active, then tears middleware down in reverse
order and resources most-recently-created first. Its lifecycle -- states, exception
rules, the driver -- is :mod:`polydatum.lifecycle`; this object delegates to it
(``ctx._c``) and is what middleware, resources and hooks are handed. The exception
semantics, in short:

* an exception raised in the ``with`` block is thrown into each middleware on
  teardown, innermost first; a middleware may suppress it (the block then completes
  normally), replace it, or let it through;
* resources then see the exception as it stands (so they can roll back); errors they
  raise while tearing down are suppressed and recorded -- in
  :meth:`DataAccessContext.get_resource_exit_errors`, on the teardown span, as a
  warning log event and in the ``polydatum.resource.teardown.errors`` counter -- unless
  the DataManager's ``teardown_errors="raise"`` policy asks for an
  :class:`~polydatum.errors.TeardownErrors` group at exit;
* a middleware failing during setup aborts the context: what was set up is torn down
  with that error, and the error (or what middleware replaced it with) propagates.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Protocol, Self

from typing_extensions import TypeVar

from polydatum.lifecycle import CREATING, ExcInfo, Lifecycle, LifecycleHost, State, active_lifecycle
from polydatum.meta import Meta, meta_of

if TYPE_CHECKING:
    from polydatum.access import DataAccessLayer
    from polydatum.lifecycle import ContextObserver

__all__ = [
    "DalScope",
    "DalT",
    "DataAccessContext",
    "Meta",
    "add_resource_attribute",
    "context_class_for",
    "get_active_context",
    "lifecycle_of",
    "observer_of",
]

_EMPTY_META = Meta()

#: The static type of a DataManager's DAL: ``DataAccessLayer`` unless the application
#: declares its services (``DataManager[AppServices]``, ``AppServices`` a Protocol with
#: one attribute per service: then ``dal.notes`` is ``Notes`` and a misspelt service or
#: method is a type error). Only the type checker sees it: at run time ``dal.notes`` is
#: the registered service either way.
DalT = TypeVar("DalT", default="DataAccessLayer")
_DalT_co = TypeVar("_DalT_co", covariant=True, default="DataAccessLayer")


def get_active_context() -> DataAccessContext | None:
    """The context active in this thread / asyncio task, or ``None``."""
    c = active_lifecycle()
    found: DataAccessContext | None = None if c is None else c.ctx
    return found


def lifecycle_of(ctx: DataAccessContext) -> Lifecycle:
    """The lifecycle behind ``ctx`` (for the core modules: the DAL, the registry)."""
    return ctx._c


def observer_of(ctx: DataAccessContext) -> ContextObserver | None:
    """What records ``ctx`` (``None`` when nothing does, or once it has exited)."""
    return ctx._c.observer


class _ResourceAttribute:
    """``ctx.<resource>`` for a registered resource, found on the context's class.

    The same result and checks as ``__getattr__`` (which would also reach it), only
    cheaper: Python tries ``__getattr__`` after a failed look-up, which builds and
    discards an ``AttributeError`` (benchmarks/README.md). A non-data descriptor, so
    a resource cached in the instance dict (see ``LifecycleCore.reread``) wins.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, ctx: DataAccessContext | None, owner: type | None = None) -> Any:
        if ctx is None:
            return self
        c = ctx._c
        name = self.name
        if name not in c.resources:  # first use: create it
            return c._create(name)
        return c.reread(name)


def context_class_for(base: type[DataAccessContext[Any]], resources: Iterable[str]) -> type[Any]:
    """A subclass of ``base`` of one DataManager's own, with a :class:`_ResourceAttribute`
    per resource (more are added by :func:`add_resource_attribute`). Same name, same
    behaviour: only faster to reach the resources."""
    cls = type(
        base.__name__,
        (base,),
        {"__module__": base.__module__, "__qualname__": base.__qualname__},
    )
    for name in resources:
        add_resource_attribute(cls, name)
    return cls


def add_resource_attribute(cls: type[DataAccessContext[Any]], name: str) -> None:
    """Make ``ctx.<name>`` a descriptor on ``cls`` unless the context class has that name."""
    if not name.startswith("_") and name not in cls._class_attributes:
        setattr(cls, name, _ResourceAttribute(name))


class DataAccessContext(Generic[DalT]):
    """One request's state: read-only ``meta``, the ``dal``, and lazily created resources.

    Use it as ``with dm.context(meta) as ctx:`` or ``async with``. Resources are
    attributes (``ctx.db``), created on first access; ``'db' in ctx`` tells whether
    that happened. In an async context, ``await ctx.aresource('db')`` also creates
    async-generator resources. A context is single-use.
    """

    #: Whether a subclass overrides one of 0.9.1's hooks (skips three no-op calls if not).
    _has_hooks = False

    #: Names defined on the class (a resource never shadows one); set per subclass.
    _class_attributes: frozenset[str] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._class_attributes = frozenset(dir(cls))
        cls._has_hooks = any(
            getattr(cls, hook) is not getattr(DataAccessContext, hook)
            for hook in ("_setup_hook", "_teardown_hook", "_final_hook")
        )

    def __init__(self, data_manager: Any, meta: Meta | dict[str, Any] | None = None):
        self.data_manager = data_manager
        dal = data_manager.plain_dal
        self.dal: DalT = data_manager.get_dal() if dal is None else dal
        if isinstance(meta, Meta):
            self.meta = meta
        else:
            self.meta = meta_of(meta) if meta else _EMPTY_META  # read-only: safe to share
        host: LifecycleHost = data_manager
        self._c = Lifecycle(self, host)

    # ----------------------------------------------------------------- public API

    @property
    def id(self) -> str:
        """A random id for this context (recorded as ``polydatum.context.id``)."""
        return self._c.id

    @property
    def state(self) -> State:
        """Where this context is in its lifecycle."""
        return self._c.state

    @property
    def _telemetry(self) -> ContextObserver | None:
        """What records this context (``None`` when nothing does)."""
        return self._c.observer

    @property
    def enclosing(self) -> DataAccessContext | None:
        """The context that was active in this thread or task when this one was entered.

        ``None`` for a context that is not nested (or not entered, or exited), and once
        the enclosing context has exited. Resources use it to cooperate with the outer
        context's handle instead of opening a second one (the SQL resource shares the
        outer session, inside a SAVEPOINT, so nested contexts never wait on each other).
        """
        outer = self._c.enclosing
        found: DataAccessContext | None = None if outer is None else outer.ctx
        return found

    def get_resource_exit_errors(self) -> list[ExcInfo]:
        """Errors resources raised while tearing down, as ``sys.exc_info()`` triples."""
        return self._c.exit_errors()

    def __contains__(self, name: object) -> bool:
        """Whether the resource ``name`` has been created in this context."""
        if not isinstance(name, str):
            return False
        return self._c.resources.get(name, CREATING) is not CREATING

    def __getattr__(self, name: str) -> Any:
        if name == "_c":  # not set yet: a subclass's __init__ reading attributes early
            raise AttributeError(name)
        return self._c.attribute(name)

    def resource(self, name: str) -> Any:
        """Return resource ``name``, creating it on first use (sync resources only)."""
        return self._c.resource(name)

    async def aresource(self, name: str) -> Any:
        """Return resource ``name``, creating it on first use (sync or async resources)."""
        return await self._c.aresource(name)

    def __enter__(self) -> Self:
        entered: Self = self._c.enter()
        return entered

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return self._c.exit(exc_type, exc, tb)

    async def __aenter__(self) -> Self:
        entered: Self = await self._c.aenter()
        return entered

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return await self._c.aexit(exc_type, exc, tb)

    # ------------------------------------------------------ hooks (polydatum 0.9.1)

    def _setup_hook(self) -> None:
        """Override to run code when the context starts, before middleware setup."""

    def _teardown_hook(self, exception: BaseException | None) -> None:
        """Override to run code after middleware teardown, before resources tear down."""

    def _final_hook(self, exception: BaseException | None) -> None:
        """Override to run code at the very end of the context."""

    def __repr__(self) -> str:
        c = self._c
        return f"<{type(self).__name__} {c._id or hex(id(self))} {c.state.value}>"


DataAccessContext._class_attributes = frozenset(dir(DataAccessContext))


class DalScope(Protocol[_DalT_co]):
    """What ``dm.dal()`` returns, as the type checker sees it: a context whose ``with``
    / ``async with`` gives its DAL (at run time it is the :class:`DataAccessContext`).

    ``__exit__`` returns ``bool``, not ``None``: a context middleware may suppress the
    block's exception (then execution goes on after the ``with``), so type checkers
    rightly treat code after the block as reachable -- a function that returns inside
    ``with dm.dal() as dal:`` needs a ``return`` (or ``raise``) after the block too.
    """

    @property
    def meta(self) -> Meta: ...

    def __enter__(self) -> _DalT_co: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...

    async def __aenter__(self) -> _DalT_co: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...
