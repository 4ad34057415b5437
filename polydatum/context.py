"""The request context: ``DataAccessContext`` (sync and async) and ``Meta``.

A context is entered once, sets up the context middleware in registration order,
hands out resources lazily while active, then tears middleware down in reverse
order and resources most-recently-created first. The states and legal transitions
are those of :mod:`polydatum.lifecycle`; the exception semantics are:

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

import atexit
from collections.abc import Iterable
from contextvars import ContextVar, Token, copy_context
from random import getrandbits as _random_bits
from types import AsyncGeneratorType, GeneratorType, TracebackType
from typing import TYPE_CHECKING, Any

from polydatum.errors import (
    CommitError,
    ContextStateError,
    MiddlewareSetupException,
    ResourceException,
    ResourceSetupException,
    TeardownErrors,
    UnknownResourceError,
)
from polydatum.lifecycle import (
    FINISHED,
    ON_ENTER,
    ON_EXIT,
    ON_MIDDLEWARE_DONE,
    ON_RESOURCES_DONE,
    ON_SETUP_DONE,
    ON_SETUP_FAILED,
    PROPAGATED,
    RAISED,
    RESOURCE_CREATE_STATES,
    RESOURCE_USE_STATES,
    RETURNED,
    SUPPRESSED,
    YIELDED,
    GeneratorRecord,
    Outcome,
    State,
    aclose_quietly,
    adrive,
    after_middleware_teardown,
    as_record,
    callable_name,
    classify,
    close_quietly,
    step,
    step_error,
    transition,
    twice_yielded,
)
from polydatum.meta import Meta, meta_of

if TYPE_CHECKING:
    from polydatum.dal import DataAccessLayer, DataManager
    from polydatum.telemetry import ContextTelemetry

__all__ = ["DataAccessContext", "Meta", "get_active_context"]

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]

_EMPTY_META = Meta()
_CREATED = State.CREATED  # see polydatum.lifecycle.YIELDED for why a constant

# The per-event views' look-ups, bound once. CPython 3.11 compiles a method call on an
# imported name (``ON_EXIT.get(state)``) as an attribute load followed by a call, which
# builds and frees a bound-method object every time; a module-level alias avoids that.
_after_enter = ON_ENTER.get
_after_setup_done = ON_SETUP_DONE.get
_after_setup_failed = ON_SETUP_FAILED.get
_after_exit = ON_EXIT.get
_after_middleware_done = ON_MIDDLEWARE_DONE.get
_after_resources_done = ON_RESOURCES_DONE.get


class _Creating:
    """The value of a resource in ``_resources`` while its setup runs (cycle detection)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<resource being set up>"


_CREATING: Any = _Creating()

#: The lifecycle of the context active in this thread / task (its ``ctx`` is the
#: context users see). The lifecycle rather than the context: the DAL reads its
#: telemetry on every call, and the lifecycle's attributes are the fast ones.
_active: ContextVar[_Lifecycle | None] = ContextVar("polydatum_active_context", default=None)
#: ``_active.get``, bound once for the modules that import it (see ``_after_enter``).
_active_lifecycle = _active.get


#: Contexts entered and not yet exited, in any thread or task (for the exit report).
_OPEN: set[_Lifecycle] = set()
_exit_report_registered = False


def _report_open_contexts() -> None:
    """At interpreter exit: end the spans of contexts still open, and say so once.

    Their resources are *not* torn down: running application teardown code while the
    interpreter shuts down is unsafe. Registered on the first context, so it runs
    before the OpenTelemetry SDK's own exit flush (atexit runs last-registered first)
    and the ended context spans are still exported.
    """
    still_open = list(_OPEN)
    if not still_open:
        return
    from polydatum.telemetry import _logger

    for ctx in still_open:
        telemetry = ctx._telemetry
        if telemetry is not None:
            telemetry.abandon()
    _logger().warning(
        "polydatum.context.open_at_exit",
        count=len(still_open),
        context_ids=sorted(ctx.id for ctx in still_open),
        states=sorted(ctx.state.value for ctx in still_open),
        detail="these contexts were never exited: their resources were not torn down",
    )


def _idle_records(stack: list[tuple[Any, ...]]) -> bool:
    """Whether every record of ``stack`` is a plain tuple: a sync generator set up on the
    idle path (a :class:`GeneratorRecord`, a tuple subclass, is anything else)."""
    for rec in stack:  # noqa: SIM110 -- a loop: all() of a generator costs a frame per call
        if type(rec) is not tuple:
            return False
    return True


def get_active_context() -> DataAccessContext | None:
    """The context active in this thread / asyncio task, or ``None``."""
    c = _active.get()
    return None if c is None else c.ctx


def _register_exit_report() -> None:
    global _exit_report_registered
    _exit_report_registered = True
    atexit.register(_report_open_contexts)


class _ResourceAttribute:
    """``ctx.<resource>`` for a registered resource, found on the context's class.

    Without it, the first ``ctx.db`` of every context goes through ``__getattr__``,
    which on CPython 3.11 costs a failed attribute look-up first (an
    ``AttributeError`` built and thrown away: ~4x a descriptor's cost). The result is
    the same: the resource, created on first use, with the same state checks. A
    non-data descriptor, so the created resource cached in the instance dict wins
    for the rest of the context.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, ctx: DataAccessContext | None, owner: type | None = None) -> Any:
        if ctx is None:
            return self
        c = ctx._c
        name = self.name
        if name not in c._resources:  # first use: create it
            if c._telemetry is None:  # nothing records
                return c._create_idle(name)
            return c.attribute(name)
        return c.reread(name)


def context_class_for(base: type[DataAccessContext], resources: Iterable[str]) -> type[Any]:
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


def add_resource_attribute(cls: type[DataAccessContext], name: str) -> None:
    """Make ``ctx.<name>`` a descriptor on ``cls`` unless the context class has that name."""
    if not name.startswith("_") and name not in cls._class_attributes:
        setattr(cls, name, _ResourceAttribute(name))


class _Lifecycle:
    """The machinery behind one :class:`DataAccessContext`: its state, stacks and steps.

    Kept apart from the context object users hold because that object needs
    ``__getattr__`` (``ctx.db`` creates the resource ``db``, ``ctx.nope`` raises 0.9.1's
    ``AttributeError``), and CPython does not specialise attribute access on a class
    with ``__getattr__``: every ``self._state`` of the lifecycle would take the slow,
    generic path (measured: ~12 % of an idle request). This class has no
    ``__getattr__``; the context delegates to it and hands itself (``self.ctx``) to
    middleware, resources and hooks, exactly as before.
    """

    def __init__(self, ctx: DataAccessContext, data_manager: DataManager) -> None:
        self.ctx = ctx
        self.data_manager = data_manager
        self._state = _CREATED
        self._resources: dict[str, Any] = {}
        # GeneratorRecords, or (on the idle path) plain tuples of the same fields.
        self._resource_stack: list[tuple[Any, ...]] = []
        self._middleware_stack: list[tuple[Any, ...]] = []
        self._resource_exit_errors: list[ExcInfo] | None = None  # made on the first
        self._commit_error: CommitError | None = None  # a resource lost the work
        self._shortcuts: list[str] | None = None  # names cached in ctx.__dict__
        self._telemetry: ContextTelemetry | None = None
        self._token: Token[_Lifecycle | None] | None = None
        self._id: str | None = None
        self._is_async = False
        self._yields_dal = False  # set by DataManager.dal(): entering yields the DAL
        self._has_hooks = type(ctx)._has_hooks

    @property
    def id(self) -> str:
        """A random id for this context (recorded as ``polydatum.context.id``)."""
        if self._id is None:
            # Not a secret, just unique enough to find a request: no syscall needed.
            self._id = f"{_random_bits(64):016x}"
        return self._id

    @property
    def state(self) -> State:
        return self._state

    def __repr__(self) -> str:
        return f"<lifecycle of {self.ctx!r}>" if self.ctx is not None else "<lifecycle, exited>"

    def exit_errors(self) -> list[ExcInfo]:
        """The resource exit errors: one list per context, made when first needed (most
        contexts never need one)."""
        errors = self._resource_exit_errors
        if errors is None:
            errors = self._resource_exit_errors = []
        return errors

    def attribute(self, name: str) -> Any:
        """``ctx.<name>`` when ``name`` is no attribute of the context: a resource."""
        if name.startswith("__") or name.startswith("_abc"):
            raise AttributeError(name)
        if self._state in RESOURCE_CREATE_STATES and name not in self._resources:
            if self._telemetry is None:
                return self._create_idle(name)
            return self._create_slow(name)
        return self.reread(name)

    def reread(self, name: str) -> Any:
        """``ctx.<name>`` for a resource read before: cache it in the context's
        ``__dict__``, so that later reads skip the descriptor (or ``__getattr__``).

        Done on the second read rather than at creation: most resources of a short
        request are read once, and each cached name is removed again at exit (after
        which ``ctx.<name>`` must raise the state error).
        """
        value = self.resource(name)  # the state check
        shortcuts = self.ctx.__dict__
        if name not in shortcuts and name not in type(self.ctx)._class_attributes:
            shortcuts[name] = value
            if self._shortcuts is None:
                self._shortcuts = [name]
            else:
                self._shortcuts.append(name)
        return value

    def resource(self, name: str) -> Any:
        """Return resource ``name``, creating it on first use (sync resources only)."""
        state = self._state
        if state not in RESOURCE_USE_STATES:
            raise ContextStateError(self._resource_state_message(name))
        try:
            value = self._resources[name]
        except KeyError:
            pass
        else:
            if value is _CREATING:
                raise self._cycle(name)
            return value
        if self._telemetry is None:
            return self._create_idle(name)
        return self._create_slow(name)

    async def aresource(self, name: str) -> Any:
        """Return resource ``name``, creating it on first use (sync or async resources)."""
        state = self._state
        if state not in RESOURCE_USE_STATES:
            raise ContextStateError(self._resource_state_message(name))
        try:
            value = self._resources[name]
        except KeyError:
            pass
        else:
            if value is _CREATING:
                raise self._cycle(name)
            return value
        rec, scope = self._start_resource(name)
        try:
            outcome, value = await adrive(rec, None, scope)
        finally:
            del self._resources[name]  # _CREATING; the value is kept below
        return self._finish_resource(rec, scope, outcome, value)

    @staticmethod
    def _cycle(name: str) -> ResourceException:
        return ResourceException(
            f"Resource {name!r} asked for itself while setting up (a cycle): a resource "
            f"cannot use itself; set up what both need in a third resource."
        )

    def _create_idle(self, name: str) -> Any:
        """Create a sync resource when nothing records: the same checks, no step records.

        Anything unusual (an async or non-generator factory) goes to the full path,
        which produces the error.
        """
        if self._state not in RESOURCE_CREATE_STATES:
            return self._create_slow(name)
        factory = self.data_manager._idle_factories.get(name)
        if factory is None:
            return self._create_slow(name)
        resources = self._resources
        resources[name] = _CREATING
        try:
            gen = factory(self.ctx)
            if type(gen) is GeneratorType:
                position = len(self._resource_stack)
                cv = copy_context()
                value = cv.run(next, gen, FINISHED)
                if value is FINISHED:
                    raise ResourceSetupException(f"Resource {name} did not yield on setup.")
        except BaseException:
            del resources[name]
            raise
        if type(gen) is not GeneratorType:  # outside the try: that path cleans up itself
            del resources[name]
            return self._create_slow(name, gen)
        # _keep_resource, inlined: this runs for every lazy resource of every context.
        # The record is a plain tuple (a GeneratorRecord's fields, built in one step);
        # the paths that need its named fields wrap it (see as_record).
        resources[name] = value
        self._resource_stack.append(("resource", name, position, gen, False, factory, cv))
        return value

    def _create_slow(self, name: str, gen: Any = None) -> Any:
        rec, scope = self._start_resource(name, gen)
        if rec.is_async:
            del self._resources[name]  # _CREATING
            self._finish_resource(rec, scope, RAISED, self._async_misuse(name))
        try:
            outcome, value = rec.cv.run(step, rec.gen, None, scope)
        finally:
            del self._resources[name]  # _CREATING; the value is kept below
        if outcome is YIELDED and self._telemetry is not None:  # the usual case
            self._keep_resource(name, rec, value)
            self._telemetry.step_finished(scope, outcome, None, None)
            return value
        return self._finish_resource(rec, scope, outcome, value)

    def _keep_resource(self, name: str, rec: GeneratorRecord, value: Any) -> None:
        self._resources[name] = value
        self._resource_stack.append(rec)

    # ------------------------------------------------------------------ sync enter/exit

    def enter(self) -> Any:
        self._begin(is_async=False)
        try:
            ctx = self.ctx
            dm = self.data_manager
            middleware_chain = dm._plain_middleware
            if middleware_chain is None:
                middleware_chain = dm.get_middleware(ctx)
            if self._telemetry is None:  # nothing records: one flat loop, no step records
                stack = self._middleware_stack
                for middleware in middleware_chain:
                    position = len(stack)  # each one set up is pushed: its index in the chain
                    gen = middleware(ctx)
                    if type(gen) is not GeneratorType:
                        self._start_middleware(position, middleware, gen)  # raises the error
                    # _set_up_idle, inlined: this loop is the sync idle hot path.
                    cv = copy_context()
                    if cv.run(next, gen, FINISHED) is FINISHED:
                        raise MiddlewareSetupException(
                            f"Middleware {callable_name(middleware)} did not yield on setup."
                        )
                    stack.append(("middleware", None, position, gen, False, middleware, cv))
            else:
                telemetry = self._telemetry
                stack = self._middleware_stack
                for position, middleware in enumerate(middleware_chain):
                    rec, scope = self._start_middleware(position, middleware)
                    outcome, value = rec.cv.run(step, rec.gen, None, scope)
                    if outcome is YIELDED:  # set up: the usual case
                        stack.append(rec)
                        telemetry.step_finished(scope, outcome, None, None)
                    else:
                        self._finish_middleware_setup(rec, scope, outcome, value)
        except BaseException as error:
            self._state = _after_setup_failed(self._state) or transition(
                self._state, "setup_failed"
            )
            final = self._teardown(error, setup_failed=True)
            if final is None or final is error:
                raise
            if isinstance(final, TeardownErrors):
                raise final from final.__cause__  # the error the setup ended with
            raise final from error  # a middleware replaced the setup error
        state = self._state
        self._state = _after_setup_done(state) or transition(state, "setup_done")
        return self.ctx.dal if self._yields_dal else self.ctx

    def exit(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        state = self._state
        self._state = _after_exit(state) or transition(state, "exit")
        if exc_type is not None and exc is None:
            exc = exc_type()
        idle = self._telemetry is None
        final = self._teardown_idle(exc, False) if idle else self._teardown(exc)
        if final is None:
            return exc is not None  # suppressed by middleware: the block completes
        if final is exc:
            return False  # let Python re-raise it with its own traceback
        raise final

    def _teardown(
        self, exc: BaseException | None, setup_failed: bool = False
    ) -> BaseException | None:
        if self._telemetry is None:
            return self._teardown_idle(exc, setup_failed)
        telemetry = self._telemetry
        current = exc
        stack = self._middleware_stack
        while stack:
            rec = as_record(stack.pop())
            scope = self._start_teardown(rec)
            outcome, value = rec.cv.run(step, rec.gen, current, scope)
            if outcome is RETURNED:  # the usual case: finished, nothing in flight
                telemetry.step_finished(scope, outcome, None, current)
                continue
            if outcome is YIELDED:
                close_quietly(rec)
            current = self._finish_middleware_teardown(rec, scope, current, outcome, value)
        self._middleware_done(current)
        stack = self._resource_stack
        while stack:
            rec = as_record(stack.pop())
            scope = self._start_teardown(rec)
            outcome, value = rec.cv.run(step, rec.gen, current, scope)
            if outcome is RETURNED:
                telemetry.step_finished(scope, outcome, None, current)
                continue
            if outcome is YIELDED:
                close_quietly(rec)
            self._finish_resource_teardown(rec, scope, current, outcome, value)
        return self._end(exc, current, setup_failed)

    def _teardown_idle(self, exc: BaseException | None, setup_failed: bool) -> BaseException | None:
        """:meth:`_teardown` when nothing records: the same semantics
        (:func:`~polydatum.lifecycle.after_middleware_teardown`), no step records."""
        current = exc
        stack = self._middleware_stack
        while stack:
            rec = stack.pop()
            gen = rec[3]
            cv = rec[6]
            try:
                if current is None:
                    if cv.run(next, gen, FINISHED) is FINISHED:
                        continue  # torn down cleanly (no StopIteration raised)
                else:
                    cv.run(gen.throw, current)
            except StopIteration:
                if current is not None:
                    current = after_middleware_teardown(current, SUPPRESSED, None)
                continue
            except BaseException as raised:
                current = after_middleware_teardown(current, classify(current, raised), raised)
                continue
            rec = as_record(rec)
            close_quietly(rec)
            current = after_middleware_teardown(current, YIELDED, twice_yielded(rec))
        state = self._state
        self._state = _after_middleware_done(state) or transition(state, "middleware_done")
        if self._has_hooks:
            self._teardown_hook(current)
        stack = self._resource_stack
        while stack:
            rec = stack.pop()
            gen = rec[3]
            cv = rec[6]
            try:
                if current is None:
                    if cv.run(next, gen, FINISHED) is FINISHED:
                        continue
                else:
                    cv.run(gen.throw, current)
            except StopIteration:
                continue
            except BaseException as raised:
                if raised is not current and classify(current, raised) is RAISED:
                    self._record_teardown_error(as_record(rec).name, raised)
                continue
            rec = as_record(rec)
            close_quietly(rec)
            self._record_teardown_error(rec.name, twice_yielded(rec))
        return self._end(exc, current, setup_failed)

    # ----------------------------------------------------------------- async enter/exit

    async def aenter(self) -> Any:
        self._begin(is_async=True)
        try:
            ctx = self.ctx
            dm = self.data_manager
            middleware_chain = dm._plain_middleware
            if middleware_chain is None:
                middleware_chain = dm.get_middleware(ctx)
            if self._telemetry is None:  # nothing records: sync generators as in enter()
                stack = self._middleware_stack
                for middleware in middleware_chain:
                    position = len(stack)
                    gen = middleware(ctx)
                    if type(gen) is GeneratorType:
                        self._set_up_idle(position, middleware, gen)
                        continue
                    rec, scope = self._start_middleware(position, middleware, gen)
                    outcome, value = await adrive(rec, None, scope)
                    self._finish_middleware_setup(rec, scope, outcome, value)
            else:
                for position, middleware in enumerate(middleware_chain):
                    rec, scope = self._start_middleware(position, middleware)
                    outcome, value = await adrive(rec, None, scope)
                    self._finish_middleware_setup(rec, scope, outcome, value)
        except BaseException as error:
            self._state = _after_setup_failed(self._state) or transition(
                self._state, "setup_failed"
            )
            final = await self._ateardown(error, setup_failed=True)
            if final is None or final is error:
                raise
            if isinstance(final, TeardownErrors):
                raise final from final.__cause__  # the error the setup ended with
            raise final from error  # a middleware replaced the setup error
        self._state = _after_setup_done(self._state) or transition(self._state, "setup_done")
        return self.ctx.dal if self._yields_dal else self.ctx

    async def aexit(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self._state = _after_exit(self._state) or transition(self._state, "exit")
        if exc_type is not None and exc is None:
            exc = exc_type()
        final = await self._ateardown(exc)
        if final is None:
            return exc is not None
        if final is exc:
            return False
        raise final

    async def _ateardown(
        self, exc: BaseException | None, setup_failed: bool = False
    ) -> BaseException | None:
        if (
            self._telemetry is None
            and _idle_records(self._middleware_stack)
            and _idle_records(self._resource_stack)
        ):  # only sync generators set up on the idle path: nothing to await
            return self._teardown_idle(exc, setup_failed)
        current = exc
        stack = self._middleware_stack
        while stack:
            rec = as_record(stack.pop())
            scope = None if self._telemetry is None else self._start_teardown(rec)
            outcome, value = await adrive(rec, current, scope)
            if outcome is YIELDED:
                await aclose_quietly(rec)
            current = self._finish_middleware_teardown(rec, scope, current, outcome, value)
        self._middleware_done(current)
        stack = self._resource_stack
        while stack:
            rec = as_record(stack.pop())
            scope = None if self._telemetry is None else self._start_teardown(rec)
            outcome, value = await adrive(rec, current, scope)
            if outcome is YIELDED:
                await aclose_quietly(rec)
            self._finish_resource_teardown(rec, scope, current, outcome, value)
        return self._end(exc, current, setup_failed)

    # ------------------------------------------------------- shared by sync and async

    def _set_up_idle(
        self, position: int, middleware: Any, gen: GeneratorType[Any, Any, Any]
    ) -> None:
        """Set up one middleware generator when nothing records (sync and async contexts)."""
        cv = copy_context()
        if cv.run(next, gen, FINISHED) is FINISHED:
            raise MiddlewareSetupException(
                f"Middleware {callable_name(middleware)} did not yield on setup."
            )
        self._middleware_stack.append(("middleware", None, position, gen, False, middleware, cv))

    def _middleware_done(self, current: BaseException | None) -> None:
        """Between the phases: 0.9.1's teardown hook runs before resources tear down."""
        state = self._state
        self._state = _after_middleware_done(state) or transition(state, "middleware_done")
        if self._has_hooks:
            self._teardown_hook(current)

    def _teardown_hook(self, current: BaseException | None) -> None:
        try:
            self.ctx._teardown_hook(current)
        except Exception as error:  # recorded like a resource exit error, as in 0.9.1
            self._record_teardown_error("_teardown_hook", error)

    def _begin(self, is_async: bool) -> None:
        state = self._state
        self._state = _after_enter(state) or transition(state, "enter")
        if is_async:
            self._is_async = True
        ctx = self.ctx
        self._token = _active.set(self)
        _OPEN.add(self)
        if not _exit_report_registered:
            _register_exit_report()
        self._telemetry = self.data_manager._telemetry.start(ctx)  # opens the context span
        if self._has_hooks:
            ctx._setup_hook()

    def _end(
        self, exc: BaseException | None, final: BaseException | None, setup_failed: bool
    ) -> BaseException | None:
        """Finish the lifecycle; returns the exception the ``with`` block must raise.

        A failed setup always propagates: if middleware suppressed the setup error
        there is still no context to run the block in, so the original error stands.
        """
        if setup_failed and final is None:
            final = exc
        if final is None and self._commit_error is not None:
            final = self._commit_error  # the work is lost: never a normal exit
        names = self._shortcuts
        if names:
            shortcuts = self.ctx.__dict__
            for name in names:
                shortcuts.pop(name, None)
        state = self._state
        self._state = _after_resources_done(state) or transition(state, "resources_done")
        exit_errors = self._resource_exit_errors
        if exit_errors and self.data_manager.teardown_errors == "raise":
            # An ExceptionGroup holds Exceptions only: BaseExceptions (KeyboardInterrupt)
            # a resource raised at teardown stay recorded, as under the "record" policy.
            grouped = [e for _, e, _ in exit_errors if isinstance(e, Exception)]
            if grouped:
                group = TeardownErrors(
                    f"{len(exit_errors)} resource(s) failed to tear down", grouped
                )
                group.__cause__ = final
                final = group
        telemetry = self._telemetry
        try:
            if telemetry is not None:
                telemetry.finish(final, exc if exc is not None and final is None else None)
                self._telemetry = None
        finally:
            if self._has_hooks:
                self.ctx._final_hook(final)
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
            self.ctx = None  # type: ignore[assignment]
        return final

    def _start_middleware(
        self, position: int, middleware: Any, gen: Any = None
    ) -> tuple[GeneratorRecord, Any]:
        """Call a middleware (unless ``gen`` is what it already returned) and check it."""
        name = callable_name(middleware)
        telemetry = self._telemetry
        scope = (
            telemetry.step_started("middleware", "setup", name, position)
            if telemetry is not None
            else None
        )
        try:
            if gen is None:
                gen = middleware(self.ctx)
        except BaseException as error:
            if telemetry is not None:
                telemetry.step_finished(scope, RAISED, error, None)  # type: ignore[arg-type]
            raise
        is_async = isinstance(gen, AsyncGeneratorType)
        rec = GeneratorRecord.new("middleware", name, position, gen, is_async, middleware)
        problem: BaseException | None = None
        if is_async and not self._is_async:
            problem = MiddlewareSetupException(
                f"Middleware {name!r} is an async generator: enter the context with "
                f"`async with dm.context()` (or register a sync generator)."
            )
        elif not is_async and not isinstance(gen, GeneratorType):
            problem = MiddlewareSetupException(
                f"Middleware {name!r} returned {type(gen).__name__}, not a generator: "
                f"middleware must be a generator function that yields once."
            )
        if problem is not None:
            if telemetry is not None:
                telemetry.step_finished(scope, RAISED, problem, None)  # type: ignore[arg-type]
            raise problem
        return rec, scope

    def _finish_middleware_setup(
        self, rec: GeneratorRecord, scope: Any, outcome: Outcome, value: Any
    ) -> None:
        error: BaseException | None = None
        if outcome is YIELDED:
            self._middleware_stack.append(rec)
        elif outcome is RETURNED:
            error = MiddlewareSetupException(f"Middleware {rec.name} did not yield on setup.")
        else:
            error = value
        if self._telemetry is not None:
            self._telemetry.step_finished(scope, outcome, error, None)
        if error is not None:
            raise error

    def _resource_state_message(self, name: str) -> str:
        state = self._state
        if state is State.CREATED:
            return (
                f"Cannot use resource {name!r}: the context is in state 'created' "
                f"(not entered yet); use it inside `with dm.context() as ctx:`."
            )
        return (
            f"Cannot use resource {name!r}: the context is in state '{state.value}'; "
            f"resources can only be used while the context is active. "
            f"Open a new context with dm.context()."
        )

    def _async_misuse(self, name: str) -> ResourceException:
        return ResourceException(
            f"Resource {name!r} is an async generator; create it with "
            f"`await ctx.aresource({name!r})` inside `async with dm.context()`."
        )

    def _start_resource(self, name: str, gen: Any = None) -> tuple[GeneratorRecord, Any]:
        """Check and call a resource factory (unless ``gen`` is what it already returned)."""
        state = self._state
        if state not in RESOURCE_CREATE_STATES:
            if state is not State.TEARING_DOWN_RESOURCES:  # not entered yet, or exited
                raise ContextStateError(self._resource_state_message(name))
            raise ContextStateError(
                f"Cannot create resource {name!r}: the context is in state "
                f"'{state.value}' and resources are being torn down; create it "
                f"earlier (during setup, in the block, or in middleware teardown)."
            )
        factory = self.data_manager.get_resource(name)
        if factory is None:
            known = ", ".join(sorted(self.data_manager._resource_manager)) or "none"
            raise UnknownResourceError(
                f'No resource named "{name}" for context (registered: {known}). '
                f"Register it with dm.register_resources({name}=...)."
            )
        telemetry = self._telemetry
        position = len(self._resource_stack)
        scope = None
        if telemetry is not None:
            attributes = getattr(factory, "telemetry_attributes", None)
            scope = telemetry.step_started("resource", "setup", name, position, attributes)
        try:
            if gen is None:
                gen = factory(self.ctx)
        except BaseException as error:
            if telemetry is not None:
                telemetry.step_finished(scope, RAISED, error, None)  # type: ignore[arg-type]
            raise
        is_async = isinstance(gen, AsyncGeneratorType)
        problem: BaseException | None = None
        if is_async and not self._is_async:
            problem = self._async_misuse(name)
        elif not is_async and not isinstance(gen, GeneratorType):
            problem = ResourceSetupException(
                f"Resource {name!r} returned {type(gen).__name__}, not a generator: "
                f"resources must be generator callables that yield once."
            )
        if problem is not None:
            if telemetry is not None:
                telemetry.step_finished(scope, RAISED, problem, None)  # type: ignore[arg-type]
            raise problem
        self._resources[name] = _CREATING  # until set up (see _cycle)
        return GeneratorRecord.new("resource", name, position, gen, is_async, factory), scope

    def _finish_resource(
        self, rec: GeneratorRecord, scope: Any, outcome: Outcome, value: Any
    ) -> Any:
        error: BaseException | None = None
        if outcome is YIELDED:
            self._keep_resource(rec.name, rec, value)
        elif outcome is RETURNED:
            error = ResourceSetupException(f"Resource {rec.name} did not yield on setup.")
        else:
            error = value
        if self._telemetry is not None:
            self._telemetry.step_finished(scope, outcome, error, None)
        if error is not None:
            raise error
        return value

    def _start_teardown(self, rec: GeneratorRecord) -> Any:
        telemetry = self._telemetry
        if telemetry is None:
            return None
        name = rec._name or rec.name  # set on this path; the property derives it otherwise
        if rec.kind == "resource":  # its source is the factory it was created with
            attributes = getattr(rec.source, "telemetry_attributes", None)
            return telemetry.step_started("resource", "teardown", name, 0, attributes)
        return telemetry.step_started("middleware", "teardown", name, rec.position)

    def _finish_middleware_teardown(
        self,
        rec: GeneratorRecord,
        scope: Any,
        seen: BaseException | None,
        outcome: Outcome,
        value: Any,
    ) -> BaseException | None:
        """Record a middleware teardown step; returns the exception that travels on."""
        error = step_error(rec, outcome, value)
        if self._telemetry is not None:
            self._telemetry.step_finished(scope, outcome, error, seen)
        return after_middleware_teardown(seen, outcome, error)

    def _finish_resource_teardown(
        self,
        rec: GeneratorRecord,
        scope: Any,
        seen: BaseException | None,
        outcome: Outcome,
        value: Any,
    ) -> None:
        """Record a resource teardown step; an error it raised is suppressed and recorded."""
        error = step_error(rec, outcome, value)
        if self._telemetry is not None:
            self._telemetry.step_finished(scope, outcome, error, seen)
        if error is not None and outcome is not PROPAGATED:
            self._record_teardown_error(rec.name, error)

    def _record_teardown_error(self, resource: str, error: BaseException) -> None:
        if isinstance(error, CommitError) and self._commit_error is None:
            # Not suppressed: it ends the context (see _end). Its teardown span
            # already carries it; later ones are recorded as usual.
            self._commit_error = error
            return
        self.exit_errors().append((type(error), error, error.__traceback__))
        if self._telemetry is not None:
            self._telemetry.teardown_error(resource, error)
        else:
            self.data_manager._telemetry.record_idle_teardown_error(self.ctx, resource, error)


class DataAccessContext:
    """One request's state: read-only ``meta``, the ``dal``, and lazily created resources.

    Use it as ``with dm.context(meta) as ctx:`` or ``async with``. Resources are
    attributes (``ctx.db``), created on first access; ``'db' in ctx`` tells whether
    that happened. In an async context, ``await ctx.aresource('db')`` also creates
    async-generator resources. A context is single-use.

    The lifecycle itself runs in a :class:`_Lifecycle` (``ctx._c``), which this
    object delegates to (see there for why).
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

    def __init__(self, data_manager: DataManager, meta: Meta | dict[str, Any] | None = None):
        self.data_manager = data_manager
        dal = data_manager._plain_dal
        self.dal: DataAccessLayer = data_manager.get_dal() if dal is None else dal
        if isinstance(meta, Meta):
            self.meta = meta
        else:
            self.meta = meta_of(meta) if meta else _EMPTY_META  # read-only: safe to share
        self._c = _Lifecycle(self, data_manager)

    # ----------------------------------------------------------------- public API

    @property
    def id(self) -> str:
        """A random id for this context (recorded as ``polydatum.context.id``)."""
        return self._c.id

    @property
    def state(self) -> State:
        """Where this context is in its lifecycle."""
        return self._c._state

    @property
    def _telemetry(self) -> ContextTelemetry | None:
        """What records this context (``None`` when nothing does)."""
        return self._c._telemetry

    @property
    def enclosing(self) -> DataAccessContext | None:
        """The context that was active in this thread or task when this one was entered.

        ``None`` for a context that is not nested (or not entered, or exited), and once
        the enclosing context has exited. Resources use it to cooperate with the outer
        context's handle instead of opening a second one (the SQL resource shares the
        outer session, inside a SAVEPOINT, so nested contexts never wait on each other).
        """
        token = self._c._token
        if token is None:
            return None
        outer = token.old_value
        if outer is Token.MISSING or outer is None:
            return None
        found: DataAccessContext | None = outer.ctx
        return found

    def get_resource_exit_errors(self) -> list[ExcInfo]:
        """Errors resources raised while tearing down, as ``sys.exc_info()`` triples."""
        return self._c.exit_errors()

    def __contains__(self, name: object) -> bool:
        """Whether the resource ``name`` has been created in this context."""
        if not isinstance(name, str):
            return False
        return self._c._resources.get(name, _CREATING) is not _CREATING

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

    def __enter__(self) -> Any:
        return self._c.enter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return self._c.exit(exc_type, exc, tb)

    async def __aenter__(self) -> Any:
        return await self._c.aenter()

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
        return f"<{type(self).__name__} {c._id or hex(id(self))} {c._state.value}>"


DataAccessContext._class_attributes = frozenset(dir(DataAccessContext))
