"""The state one context's lifecycle keeps, and what its two drivers share.

:class:`LifecycleCore` holds a context's state, its resources and the stacks of
generators set up, and does what involves no generator: beginning (the active
context, the observer), recording a teardown error, ending (the exit exception,
the teardown-error policy, the 0.9.1 hooks). The drivers that step generators
(:mod:`polydatum.lifecycle._async_driver` and the sync one generated from it)
build on it.

It is kept apart from the :class:`~polydatum.context.DataAccessContext` users hold,
which has a ``__getattr__`` (``ctx.db`` creates the resource ``db``): attribute
reads on a class with ``__getattr__`` take the interpreter's generic path, and the
lifecycle reads its own attributes at every step (benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from contextvars import ContextVar, Token
from random import getrandbits
from types import CodeType, FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from polydatum.errors import CommitError, TeardownErrors
from polydatum.lifecycle.observer import ContextObserver, ObserverFactory
from polydatum.lifecycle.records import Registration, StepRecord
from polydatum.lifecycle.rules import dal_not_entered, resource_set_up_by_another_task
from polydatum.lifecycle.states import (
    RESOURCE_CREATE_STATES,
    State,
    on_abort,
    on_resources_done,
    transition,
)

__all__ = [
    "CREATING",
    "ExcInfo",
    "LifecycleCore",
    "LifecycleHost",
    "active_lifecycle",
    "add_exit_reporter",
    "creates_resources",
    "open_lifecycles",
    "setting_up_on_this_stack",
]

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


class LifecycleHost(Protocol):
    """What the lifecycle needs of its DataManager."""

    #: Makes each context's observer.
    observers: ObserverFactory
    #: ``"record"`` or ``"raise"``: what happens to suppressed teardown errors at exit.
    teardown_errors: str
    #: The context middleware, in setup order; ``None`` when the chain is asked for
    #: per context (an overridden ``get_middleware``): see ``context_middleware_for``.
    context_middleware: list[Registration] | None
    #: The registered resources by name; empty when the look-up is customised (an
    #: overridden ``get_resource``): see ``resource_registration``.
    resource_registrations: dict[str, Registration]

    def context_middleware_for(self, ctx: Any) -> list[Registration]: ...

    def resource_registration(self, name: str) -> Registration:
        """The resource ``name``; raises ``UnknownResourceError`` when there is none."""
        ...


class _Creating:
    """The value of a resource in ``resources`` while its setup runs."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<resource being set up>"


CREATING: Any = _Creating()

#: The code of the drivers' methods that set a resource up (``_create``,
#: ``_acreate``): the frames :func:`setting_up_on_this_stack` looks for.
_CREATE_CODES: set[CodeType] = set()
#: Guards every context's ``_setup_waiters`` (waiters may be in several threads).
_WAITERS_LOCK = threading.Lock()
#: How long a caller waiting for another's setup of a resource waits before it looks
#: again at the resource and the context's state.
RECHECK_SECONDS = 1.0

_Method = TypeVar("_Method", bound=Callable[..., Any])


def creates_resources(method: _Method) -> _Method:
    """Mark a driver method whose frame, while it runs, is a resource's setup in
    progress (its locals ``self``, the lifecycle, and ``name``, the resource)."""
    _CREATE_CODES.add(method.__code__)
    return method


def setting_up_on_this_stack(lifecycle: LifecycleCore, name: str) -> bool:
    """Whether the running code is inside the setup of resource ``name`` of
    ``lifecycle``: the resource asking for itself, directly or through other resources
    (a cycle), rather than another thread or asyncio task asking at the same moment.

    The setup's frame is looked for on the current stack, which a nested call in the
    same thread or task always has below it. It is looked for at the rare moment the
    question comes up rather than marked in every setup: a contextvar set in each
    setup's own context costs a few per cent of an idle request (benchmarks/README.md).
    What this cannot see: a task or thread that the setup starts and waits for, and
    which then asks for the resource, waits for the setup that waits for it.
    """
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code in _CREATE_CODES:
            local = frame.f_locals
            if local.get("self") is lifecycle and local.get("name") == name:
                return True
        frame = frame.f_back
    return False


#: A context's first state, as a module constant: on CPython 3.11 reading a member
#: through its Enum class runs Python code (``EnumType.__getattr__``), about the cost
#: of a function call, once per context (benchmarks/README.md).
_CREATED = State.CREATED
_EXITED = State.EXITED

#: The lifecycle of the context active in this thread or task.
_active: ContextVar[LifecycleCore | None] = ContextVar("polydatum_active_context", default=None)
#: The lifecycle of the context active in this thread or task, or ``None``.
active_lifecycle = _active.get

#: Contexts entered and not yet exited, in any thread or task.
_OPEN: set[LifecycleCore] = set()
_exit_reporters: list[Callable[[list[LifecycleCore]], None]] = []
_exit_report_registered = False


def _forget_parent_contexts() -> None:
    """In a forked child: the parent's contexts are not this process's. A context the
    child opens must not nest in one of them (the SQL resource would share its session,
    on the parent's connection), nor be reported at exit as left open here. The lock
    of the setup waiters is new: a lock another thread held at the fork stays held in
    the child, which has only the thread that forked."""
    global _WAITERS_LOCK
    _active.set(None)
    _OPEN.clear()
    _WAITERS_LOCK = threading.Lock()  # another parent thread may have held it


os.register_at_fork(after_in_child=_forget_parent_contexts)


def open_lifecycles() -> list[LifecycleCore]:
    """The lifecycles of the contexts entered and not yet exited, in any thread or task."""
    return list(_OPEN)


def add_exit_reporter(reporter: Callable[[list[LifecycleCore]], None]) -> None:
    """Call ``reporter`` at interpreter exit with the contexts still open, if any.

    Their resources are *not* torn down then: running application teardown code
    while the interpreter shuts down is unsafe. The report is registered with
    :mod:`atexit` when the first context is entered, so that it runs before the
    OpenTelemetry SDK's own exit flush (atexit runs last-registered first).
    """
    _exit_reporters.append(reporter)


def _report_open_contexts() -> None:
    still_open = list(_OPEN)
    if still_open:
        for reporter in _exit_reporters:
            reporter(still_open)


def _register_exit_report() -> None:
    global _exit_report_registered
    _exit_report_registered = True
    atexit.register(_report_open_contexts)


class LifecycleCore:
    """One context's lifecycle: its state, resources and stacks (see the module doc)."""

    def __init__(self, ctx: Any, data_manager: LifecycleHost) -> None:
        #: The context users hold (``None`` once it has exited).
        self.ctx = ctx
        self.data_manager = data_manager
        self.state = _CREATED
        #: Created resources by name (``CREATING`` while one sets up).
        self.resources: dict[str, Any] = {}
        self.resource_stack: list[StepRecord] = []
        self.middleware_stack: list[StepRecord] = []
        #: What records this context; ``None`` when nothing does.
        self.observer: ContextObserver | None = None
        #: Entered with ``async with``.
        self.is_async = False
        #: Entering yields the DAL (``dm.dal()``) rather than the context.
        self.yields_dal = False
        #: Whether the context class overrides one of 0.9.1's hooks.
        self.has_hooks: bool = type(ctx)._has_hooks
        self.commit_error: CommitError | None = None  # a resource lost the work
        self._exit_errors: list[ExcInfo] | None = None  # made when first needed
        self._shortcuts: list[str] | None = None  # resource names cached in ctx.__dict__
        self._token: Token[LifecycleCore | None] | None = None
        self._id: str | None = None
        #: Futures of the resource setups other callers wait for, by resource name
        #: (made by the first one to wait).
        self._setup_waiters: dict[str, Future[None]] | None = None

    if TYPE_CHECKING:  # the drivers' (see polydatum.lifecycle.Lifecycle)

        def resource(self, name: str) -> Any: ...

        def _create(self, name: str) -> Any: ...

    @property
    def id(self) -> str:
        """A random id for this context (recorded as ``polydatum.context.id``)."""
        if self._id is None:
            # Not a secret, only unique enough to find a request by.
            self._id = f"{getrandbits(64):016x}"
        return self._id

    def __repr__(self) -> str:
        return f"<lifecycle of {self.ctx!r}>" if self.ctx is not None else "<lifecycle, exited>"

    @property
    def enclosing(self) -> LifecycleCore | None:
        """The lifecycle that was active when this one was entered (if still active)."""
        token = self._token
        if token is None:
            return None
        outer = token.old_value
        if outer is Token.MISSING or outer is None:
            return None
        found: LifecycleCore = outer
        return found

    def exit_errors(self) -> list[ExcInfo]:
        """The resource teardown errors recorded so far."""
        errors = self._exit_errors
        if errors is None:
            errors = self._exit_errors = []
        return errors

    # -- a resource several callers ask for first -------------------------------------

    def setup_done(self, name: str) -> Future[None]:
        """The future that ends with the setup of resource ``name`` now running (for a
        caller that waits for it)."""
        with _WAITERS_LOCK:
            waiters = self._setup_waiters
            if waiters is None:
                waiters = self._setup_waiters = {}
            done = waiters.get(name)
            if done is None:
                done = waiters[name] = Future()
        return done

    def wait_until_set_up(self, name: str, done: Future[None]) -> None:
        """Block this thread until another thread's setup of resource ``name`` ends,
        or for :data:`RECHECK_SECONDS` (the caller then looks again: a wake-up lost to
        an interrupted setup costs a pause, never a hang).

        Refused in a thread that runs an event loop: the setup may be another task of
        that loop, which blocking here would stop for ever.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop here: the setup runs in another thread
            wait_futures([done], RECHECK_SECONDS)
        else:
            raise resource_set_up_by_another_task(name)

    async def await_until_set_up(self, name: str, done: Future[None]) -> None:
        """Wait, without blocking the event loop, until another task's or thread's
        setup of resource ``name`` ends, or for :data:`RECHECK_SECONDS`. Neither a
        timeout nor this waiter's cancellation cancels ``done``: the setup and the
        other waiters are left alone."""
        await asyncio.wait([asyncio.wrap_future(done)], timeout=RECHECK_SECONDS)

    def wake_waiters(self, name: str) -> None:
        """The setup of resource ``name`` has ended (its value, or its absence, is in
        ``resources``): wake whoever waits for it."""
        with _WAITERS_LOCK:
            done = self._setup_waiters.pop(name, None) if self._setup_waiters else None
        if done is not None:
            done.set_result(None)

    # -- resources read as attributes ------------------------------------------------

    def attribute(self, name: str) -> Any:
        """``ctx.<name>`` when ``name`` is no attribute of the context: a resource."""
        if name.startswith("__") or name.startswith("_abc"):
            raise AttributeError(name)
        if self.yields_dal and self.state is State.CREATED:
            raise dal_not_entered(name)
        if self.state in RESOURCE_CREATE_STATES and name not in self.resources:
            return self._create(name)
        return self.reread(name)

    def reread(self, name: str) -> Any:
        """``ctx.<name>`` for a resource read before: cache it in the context's
        ``__dict__``, so that later reads skip the descriptor (or ``__getattr__``).

        Done on the second read rather than at creation: most resources of a short
        request are read once, and each cached name is removed again at exit (after
        which ``ctx.<name>`` must raise the state error).
        """
        value = self.resource(name)  # the state check
        ctx = self.ctx
        shortcuts = ctx.__dict__
        if name not in shortcuts and name not in type(ctx)._class_attributes:
            shortcuts[name] = value
            if self._shortcuts is None:
                self._shortcuts = [name]
            else:
                self._shortcuts.append(name)
        return value

    # -- beginning and ending ----------------------------------------------------------

    def begin(self, entered: State) -> None:
        """Enter: the context becomes active here, its observer (if any) starts.

        ``entered`` is the state after ``enter``, looked up by the driver before it
        changed anything (a misuse raises there, with nothing to undo).
        """
        self.state = entered
        ctx = self.ctx
        _OPEN.add(self)
        self._token = _active.set(self)
        if not _exit_report_registered:
            _register_exit_report()
        # Made, then kept, then started: an interruption between two of these steps
        # loses nothing that force_end() could not finish.
        observer = self.data_manager.observers.start(ctx)
        self.observer = observer
        if observer is not None:
            observer.begin()
        if self.has_hooks:
            ctx._setup_hook()

    def teardown_hook(self, current: BaseException | None) -> None:
        """0.9.1's ``_teardown_hook``, between middleware and resource teardown."""
        try:
            self.ctx._teardown_hook(current)
        except Exception as error:  # recorded like a resource exit error, as in 0.9.1
            self.record_teardown_error("_teardown_hook", error)

    def record_teardown_error(self, resource: str, error: BaseException) -> None:
        """A resource's teardown failed: suppress and record it (a CommitError ends
        the context instead: the work is lost)."""
        if isinstance(error, CommitError) and self.commit_error is None:
            # Not suppressed (see end()). Its teardown span already carries it.
            self.commit_error = error
            return
        self.exit_errors().append((type(error), error, error.__traceback__))
        observer = self.observer
        if observer is not None:
            observer.teardown_error(resource, error)
        else:
            self.data_manager.observers.record_unobserved_teardown_error(self.ctx, resource, error)

    def keep_cleanup_error(
        self, registration: Registration, cleanup: BaseException, raising: BaseException
    ) -> None:
        """An error closing a generator raised while ``raising`` propagates: recorded
        for a resource (a teardown error), a note on ``raising`` for a middleware."""
        if registration.kind == "resource":
            self.record_teardown_error(registration.name, cleanup)
        else:
            raising.add_note(
                f"polydatum: closing middleware {registration.name!r} raised "
                f"{type(cleanup).__name__} (kept as this exception's __context__ chain)"
            )
            if raising.__context__ is None and cleanup is not raising:
                raising.__context__ = cleanup

    def end(
        self,
        exc: BaseException | None,
        final: BaseException | None,
        setup_failed: bool,
        interrupt: BaseException | None = None,
    ) -> BaseException | None:
        """Finish the lifecycle; returns the exception the ``with`` block must raise.

        A failed setup always propagates: if middleware suppressed the setup error
        there is still no context to run the block in, so the original error stands.
        ``interrupt`` is a :class:`BaseException` that is no :class:`Exception`
        (KeyboardInterrupt, SystemExit, a cancellation) that a resource raised while
        tearing down: recorded like any teardown error, and then raised, unless the
        block already ends with such an exception -- an interrupt is never swallowed.
        """
        if setup_failed and final is None:
            final = exc
        if final is None and self.commit_error is not None:
            final = self.commit_error  # the work is lost: never a normal exit
        if interrupt is not None and (final is None or isinstance(final, Exception)):
            final = interrupt
        names = self._shortcuts
        if names:
            self._shortcuts = None
            shortcuts = self.ctx.__dict__
            for name in names:
                shortcuts.pop(name, None)
        state = self.state
        self.state = on_resources_done(state) or transition(state, "resources_done")
        exit_errors = self._exit_errors
        if exit_errors and self.data_manager.teardown_errors == "raise":
            final = raise_teardown_errors(final, exit_errors)
        observer = self.observer
        try:
            if observer is not None:
                observer.finish(final, exc if exc is not None and final is None else None)
                self.observer = None  # kept until then: force_end() finishes it otherwise
        finally:
            self._leave(final)
        return final

    def force_end(self, error: BaseException) -> None:
        """End a lifecycle whose own bookkeeping was interrupted (a KeyboardInterrupt
        or a cancellation between two steps), whatever state it reached.

        The driver has closed the generators left on the stacks; this ends what
        :meth:`end` would have ended -- the observer, the 0.9.1 final hook, the open
        set, the active context -- each part at most once however far :meth:`end`
        got before the interruption.
        """
        state = self.state
        if state is not _EXITED:
            self.state = on_abort(state) or transition(state, "abort")
        names, self._shortcuts = self._shortcuts, None
        ctx = self.ctx
        if names and ctx is not None:
            for name in names:
                ctx.__dict__.pop(name, None)
        observer = self.observer
        try:
            if observer is not None:
                observer.finish(error, None)  # finishes once: a second call does nothing
                self.observer = None
        finally:
            self._leave(error)

    def _leave(self, final: BaseException | None) -> None:
        """The last part of ending: the final hook, out of the open set and no longer
        the active context (each done once: :meth:`force_end` may follow :meth:`end`)."""
        ctx = self.ctx
        try:
            if ctx is not None and self.has_hooks:
                self.has_hooks = False
                ctx._final_hook(final)
        finally:
            _OPEN.discard(self)
            token, self._token = self._token, None
            if token is not None:
                try:
                    _active.reset(token)
                except ValueError:  # exited in another thread/task than it was entered
                    outer = token.old_value
                    _active.set(None if outer is Token.MISSING else outer)
            # The context owns this object: dropping the way back breaks the cycle, so
            # an exited context is freed by reference counting alone, without a GC pass.
            self.ctx = None


def raise_teardown_errors(final: BaseException | None, exit_errors: list[ExcInfo]) -> BaseException:
    """What a context ends with under ``teardown_errors="raise"``.

    The recorded errors that are :class:`Exception` become one :class:`TeardownErrors`
    whose ``__cause__`` is what the block ended with. A block that ends with a
    :class:`BaseException` that is no :class:`Exception` (KeyboardInterrupt,
    SystemExit, a cancellation, which ``asyncio.timeout`` turns into TimeoutError)
    keeps it, so that ``except Exception`` does not catch an interrupt and a cancelled
    task ends cancelled: the group is attached to it as ``polydatum_teardown_errors``
    and named in a note.
    """
    grouped = [e for _, e, _ in exit_errors if isinstance(e, Exception)]
    if not grouped:
        return final  # type: ignore[return-value]  # only interrupts: raised as they are
    group = TeardownErrors(f"{len(exit_errors)} resource(s) failed to tear down", grouped)
    if final is not None and not isinstance(final, Exception):
        final.polydatum_teardown_errors = group  # type: ignore[attr-defined]
        final.add_note(
            f"polydatum: {group} while this propagated; see its polydatum_teardown_errors"
        )
        return final
    group.__cause__ = final
    return group
