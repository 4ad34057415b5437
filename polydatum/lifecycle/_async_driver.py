"""The lifecycle driver: entering a context, creating its resources, tearing it down.

This file is the one copy of that logic. It is written for ``async with`` contexts;
``_sync_driver.py`` is generated from it by ``scripts/unasync.py`` (``await`` removed,
``async`` names mapped to their sync twins, and the lines marked ``# async only``
left out -- an ``else:`` so marked keeps its block, one level out), and
``tests/test_unasync.py`` fails when the generated file is not what the script makes.
Edit this file, then run ``python scripts/unasync.py``.

Contexts that record and contexts that do not run the same code: ``observer`` is
``None`` when nothing records, and every observer call is behind that check.

The bookkeeping always completes, whatever is raised where (a KeyboardInterrupt can
arrive between any two steps, a task can be cancelled at any ``await``): each entry
point checks its transition before it changes anything, then runs in a ``try``
whose handler (``_aabort``) closes every generator still on a stack and ends the
lifecycle (``force_end``). A generator is pushed on its stack in the same ``try``
that steps it, and popped only after its teardown step: at every instant it is on
a stack, finished, or being closed.
"""

from __future__ import annotations

from contextvars import copy_context
from types import GeneratorType, TracebackType
from typing import Any

import polydatum.lifecycle.stepping as stepping  # async only
from polydatum.errors import TeardownErrors
from polydatum.lifecycle.core import (
    CREATING,
    LifecycleCore,
    creates_resources,
    setting_up_on_this_stack,
)
from polydatum.lifecycle.records import Registration, StepRecord
from polydatum.lifecycle.rules import (
    RAISED,
    RETURNED,
    SUPPRESSED,
    YIELDED,
    after_middleware_teardown,
    cannot_create,
    cannot_use,
    classify,
    did_not_yield,
    is_teardown_error,
    resource_cycle,
    setup_problem,
    twice_yielded,
)
from polydatum.lifecycle.states import (
    RESOURCE_CREATE_STATES,
    RESOURCE_USE_STATES,
    on_enter,
    on_exit,
    on_middleware_done,
    on_setup_done,
    on_setup_failed,
    transition,
)
from polydatum.lifecycle.stepping import FINISHED

__all__ = ["AsyncDriver"]

#: Whether this driver steps async generators.
AWAITS = True


class AsyncDriver(LifecycleCore):
    """Drives a context entered with ``async with``: sync and async generators."""

    async def aenter(self) -> Any:
        """Enter: set the context middleware up in registration order."""
        state = self.state
        entered = on_enter(state) or transition(state, "enter")  # a misuse changes nothing
        try:
            self.is_async = True  # async only
            self.begin(entered)
            ctx = self.ctx
            dm = self.data_manager
            chain = dm.context_middleware
            if chain is None:  # get_middleware() is overridden: asked for each context
                chain = dm.context_middleware_for(ctx)
            stack = self.middleware_stack
            for registration in chain:
                await self._aset_up(registration, stack)
            handed_out = ctx.dal if self.yields_dal else ctx
            state = self.state
            self.state = on_setup_done(state) or transition(state, "setup_done")
        except BaseException as error:
            final = await self._afail_setup(error)
            if final is None or final is error:
                raise
            if isinstance(final, TeardownErrors):
                raise final from final.__cause__  # the error the setup ended with
            raise final from error  # a middleware replaced the setup error
        return handed_out

    async def _afail_setup(self, error: BaseException) -> BaseException | None:
        """Tear down what a failed setup left; returns what the ``with`` raises."""
        try:
            failed = on_setup_failed(self.state)
            if failed is None:  # interrupted before setting up began, or after it ended
                await self._aabort(error, None)
                return error
            self.state = failed
            return await self._ateardown(error, True)
        except BaseException as interrupted:
            await self._aabort(interrupted, error)
            raise

    async def aexit(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        """Exit: tear down; ``True`` when middleware suppressed the block's exception."""
        state = self.state
        exiting = on_exit(state) or transition(state, "exit")  # a misuse changes nothing
        try:
            self.state = exiting
            if exc_type is not None and exc is None:
                exc = exc_type()
            final = await self._ateardown(exc, False)
        except BaseException as interrupted:
            await self._aabort(interrupted, exc)
            raise
        if final is None:
            return exc is not None  # suppressed by middleware: the block completes
        if final is exc:
            return False  # let Python re-raise it with its own traceback
        raise final

    async def aresource(self, name: str) -> Any:
        """Resource ``name``, created on first use."""
        state = self.state
        if state not in RESOURCE_USE_STATES:
            raise cannot_use(name, state)
        resources = self.resources
        if name in resources:
            value = resources[name]
            if value is CREATING:
                return await self._await_creation(name)
            return value
        return await self._acreate(name)

    async def _await_creation(self, name: str) -> Any:
        """Resource ``name`` while its setup runs: a cycle when the caller is inside
        that setup; otherwise another thread or task set it up first, at the same
        moment (``asyncio.gather`` of two calls): wait for its setup to end, then read
        it -- or, when that setup failed, set it up here, as a later read would."""
        resources = self.resources
        while True:
            if self.state not in RESOURCE_USE_STATES:  # it ended while we waited
                raise cannot_use(name, self.state)
            if setting_up_on_this_stack(self, name):
                raise resource_cycle(name)
            done = self.setup_done(name)
            if resources.get(name) is CREATING:  # still setting up
                await self.await_until_set_up(name, done)
            if name not in resources:
                return await self._acreate(name)
            value = resources[name]
            if value is not CREATING:
                return value

    @creates_resources
    async def _acreate(self, name: str) -> Any:
        """Create resource ``name``, known not to exist yet."""
        state = self.state
        if state not in RESOURCE_CREATE_STATES:
            raise cannot_create(name, state)
        dm = self.data_manager
        registration = dm.resource_registrations.get(name)
        if registration is None:  # a customised look-up, or no such resource
            registration = dm.resource_registration(name)
        resources = self.resources
        try:
            resources[name] = CREATING  # a caller asking meanwhile waits, or is a cycle
            value = await self._aset_up(registration, self.resource_stack)
            resources[name] = value
        except BaseException:
            if resources.get(name) is CREATING:
                del resources[name]
            raise
        finally:
            if self._setup_waiters is not None:  # other callers wait for this setup
                self.wake_waiters(name)
        return value

    async def _aset_up(self, registration: Registration, stack: list[StepRecord]) -> Any:
        """Call a middleware or resource and run it to its ``yield``: push it on
        ``stack`` and return what it yielded, or raise what went wrong (a generator
        that did not get on the stack is closed)."""
        observer = self.observer
        position = len(stack)
        scope: Any = None
        if observer is not None:
            scope = observer.step_started(
                registration.kind, "setup", registration.name, position, registration.attributes
            )
        gen: Any = None
        is_async = False
        outcome = RAISED
        try:
            made = registration.source(self.ctx)
            if type(made) is not GeneratorType:
                problem = setup_problem(registration, made, AWAITS)
                if problem is not None:
                    raise problem
                is_async = True
            cv = copy_context()
            gen = made  # from here on, closed unless it gets on the stack
            if scope is not None:
                cv.run(scope.enter)  # the step's span is current for the generator's code
            if is_async:  # async only
                outcome, value = await stepping.astep(gen, cv, None)  # async only
            else:  # async only
                try:
                    value = cv.run(next, gen, FINISHED)
                except BaseException as raised:
                    outcome, value = RAISED, raised
                else:
                    outcome = RETURNED if value is FINISHED else YIELDED
            if outcome is YIELDED:
                stack.append((registration, position, gen, is_async, cv))
            else:
                raise value if outcome is RAISED else did_not_yield(registration)
        except BaseException as failure:
            if gen is not None and not (stack and stack[-1][2] is gen):
                cleanup = await self._aclose(gen, is_async, cv)
                if cleanup is not None:
                    self.keep_cleanup_error(registration, cleanup, failure)
            if scope is not None:
                observer.step_finished(scope, outcome, failure, None)  # type: ignore[union-attr]
            raise
        if scope is not None:
            observer.step_finished(scope, YIELDED, None, None)  # type: ignore[union-attr]
        return value

    async def _ateardown(
        self, exc: BaseException | None, setup_failed: bool
    ) -> BaseException | None:
        """Tear middleware down innermost first, each seeing the exception as it stands,
        then resources most recently created first; returns what the block ends with."""
        observer = self.observer
        current = exc
        interrupt: BaseException | None = None  # a resource's KeyboardInterrupt, ...
        stack = self.middleware_stack
        tearing_down_middleware = True
        while True:
            if not stack:
                if not tearing_down_middleware:
                    break
                tearing_down_middleware = False
                state = self.state
                self.state = on_middleware_done(state) or transition(state, "middleware_done")
                if self.has_hooks:
                    self.teardown_hook(current)
                stack = self.resource_stack
                continue
            # Read, step, then pop: interrupted in between, it is still there to close.
            registration, position, gen, is_async, cv = stack[-1]
            if observer is not None:
                scope = observer.step_started(
                    registration.kind,
                    "teardown",
                    registration.name,
                    position,
                    registration.attributes,
                )
                cv.run(scope.enter)
            if is_async:  # async only
                outcome, value = await stepping.astep(gen, cv, current)  # async only
            else:  # async only
                outcome = YIELDED  # unless it finishes or raises
                if current is None:
                    try:
                        value = cv.run(next, gen, FINISHED)
                    except BaseException as raised:
                        outcome, value = RAISED, raised
                else:
                    try:
                        value = cv.run(gen.throw, current)
                    except StopIteration:
                        # It returned from the yield the exception was thrown into.
                        outcome, value = SUPPRESSED, None
                    except BaseException as raised:
                        outcome, value = classify(current, raised), raised
            if value is FINISHED:  # it returned: torn down cleanly
                stack.pop()
                if observer is not None:
                    observer.step_finished(scope, RETURNED, None, current)
                continue
            # Not a clean teardown: closed (a no-op for a generator that finished),
            # and an error closing it raises is kept.
            cleanup = await self._aclose(gen, is_async, cv)
            error: BaseException | None = None
            if outcome is YIELDED:
                error = twice_yielded(registration)
                if cleanup is not None:
                    error.__cause__ = cleanup  # what closing it raised: in the chain
            elif outcome is not SUPPRESSED:
                error = value
            if (
                cleanup is not None
                and error is not None
                and outcome is not YIELDED
                and tearing_down_middleware
            ):
                # Still suspended although it raised (an interrupt between its step and
                # polydatum's next instruction): a note on what travels on (a resource's
                # is recorded below).
                self.keep_cleanup_error(registration, cleanup, error)
            stack.pop()
            if observer is not None:
                observer.step_finished(scope, outcome, error, current)
            if tearing_down_middleware:
                current = after_middleware_teardown(current, outcome, error)
            elif is_teardown_error(outcome, error):
                self.record_teardown_error(registration.name, error)  # type: ignore[arg-type]
                if cleanup is not None:
                    self.record_teardown_error(registration.name, cleanup)
                if not isinstance(error, Exception) and interrupt is None:
                    interrupt = error  # recorded, and raised once teardown is done
        return self.end(exc, current, setup_failed, interrupt)

    async def _aclose(self, gen: Any, is_async: bool, cv: Any) -> BaseException | None:
        """Close a generator polydatum is done with; returns what closing it raised."""
        try:
            if is_async:  # async only
                await stepping.aclose(gen, cv)  # async only
            else:  # async only
                cv.run(gen.close)
        except BaseException as raised:
            return raised
        return None

    async def _aabort(self, interrupted: BaseException, exc: BaseException | None) -> None:
        """The bookkeeping was interrupted (``interrupted`` propagates): close every
        generator still on a stack, middleware innermost first, then resources most
        recently created first, and end the lifecycle whatever state it reached."""
        if exc is not None and exc is not interrupted and interrupted.__context__ is None:
            interrupted.__context__ = exc  # what the block ended with is not lost
        for stack in (self.middleware_stack, self.resource_stack):
            while stack:
                registration, _, gen, is_async, cv = stack[-1]
                cleanup = await self._aclose(gen, is_async, cv)
                stack.pop()
                if cleanup is not None:
                    self.keep_cleanup_error(registration, cleanup, interrupted)
        self.force_end(interrupted)
