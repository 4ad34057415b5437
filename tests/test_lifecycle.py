"""The lifecycle state machine and the exception semantics of DESIGN.md §2."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from polydatum import DataManager, Service, State
from polydatum.context import DataAccessContext
from polydatum.errors import ContextStateError, TeardownErrors
from polydatum.lifecycle import (
    RESOURCE_CREATE_STATES,
    RESOURCE_USE_STATES,
    TRANSITIONS,
    transition,
)


class Boom(Exception):
    pass


class Other(Exception):
    pass


def test_transition_table_is_the_documented_one() -> None:
    assert {(s.value, e): t.value for (s, e), t in TRANSITIONS.items()} == {
        ("created", "enter"): "setting_up",
        ("setting_up", "setup_done"): "active",
        ("setting_up", "setup_failed"): "tearing_down_middleware",
        ("active", "exit"): "tearing_down_middleware",
        ("tearing_down_middleware", "middleware_done"): "tearing_down_resources",
        ("tearing_down_resources", "resources_done"): "exited",
        # An interrupted lifecycle (KeyboardInterrupt between two steps) ends at once.
        ("created", "abort"): "exited",
        ("setting_up", "abort"): "exited",
        ("active", "abort"): "exited",
        ("tearing_down_middleware", "abort"): "exited",
        ("tearing_down_resources", "abort"): "exited",
    }
    assert {s.value for s in RESOURCE_CREATE_STATES} == {
        "setting_up",
        "active",
        "tearing_down_middleware",
    }
    assert RESOURCE_USE_STATES == RESOURCE_CREATE_STATES | {State.TEARING_DOWN_RESOURCES}


def test_illegal_transitions_name_the_state_and_what_to_do() -> None:
    with pytest.raises(ContextStateError) as info:
        transition(State.EXITED, "enter")
    assert str(info.value) == (
        "Cannot enter a context in state 'exited': a context is single-use; "
        "call dm.context() again for a new one."
    )
    with pytest.raises(ContextStateError) as info:
        transition(State.ACTIVE, "resources_done")
    assert str(info.value) == (
        "Cannot resources done a context in state 'active': events allowed in this state: exit."
    )


def test_exit_without_enter() -> None:
    ctx = DataManager().context()
    with pytest.raises(ContextStateError) as info:
        ctx.__exit__(None, None, None)
    assert str(info.value) == (
        "Cannot exit a context in state 'created': it was never entered; use "
        "`with dm.context() as ctx:` (or `async with`) so that enter and exit pair up."
    )


def test_enter_twice_while_active() -> None:
    ctx = DataManager().context()
    with ctx:
        assert ctx.state is State.ACTIVE
        with pytest.raises(ContextStateError, match="state 'active'.*single-use"):
            ctx.__enter__()
    assert ctx.state is State.EXITED


def _recording_dm(log: list[str], **behaviour: Any) -> DataManager:
    """Middleware a, b and resources r1, r2 that log every step."""
    dm = DataManager()

    def make_mw(name: str) -> Any:
        def mw(ctx: DataAccessContext) -> Iterator[None]:
            log.append(f"{name} setup")
            if behaviour.get(f"{name}_setup_raises"):
                raise behaviour[f"{name}_setup_raises"]
            if behaviour.get(f"{name}_creates"):
                getattr(ctx, behaviour[f"{name}_creates"])
            try:
                yield
            except BaseException as error:
                log.append(f"{name} saw {type(error).__name__}")
                action = behaviour.get(f"{name}_on_error")
                if action == "suppress":
                    return
                if isinstance(action, BaseException):
                    raise action from error
                raise
            else:
                log.append(f"{name} clean")
                if behaviour.get(f"{name}_teardown_raises"):
                    raise behaviour[f"{name}_teardown_raises"]

        mw.__name__ = name
        return mw

    def make_res(name: str) -> Any:
        def res(ctx: DataAccessContext) -> Iterator[str]:
            log.append(f"{name} setup")
            try:
                yield name
            except BaseException as error:
                log.append(f"{name} rollback {type(error).__name__}")
                raise
            else:
                log.append(f"{name} commit")
            finally:
                if behaviour.get(f"{name}_teardown_raises"):
                    raise behaviour[f"{name}_teardown_raises"]

        return res

    dm.register_context_middleware(make_mw("a"), make_mw("b"))
    dm.register_resources(r1=make_res("r1"), r2=make_res("r2"))
    return dm


def test_order_of_setup_and_teardown() -> None:
    log: list[str] = []
    dm = _recording_dm(log)
    with dm.context() as ctx:
        ctx.r1
        ctx.r2
    assert log == [
        "a setup",
        "b setup",
        "r1 setup",
        "r2 setup",
        "b clean",
        "a clean",
        "r2 commit",
        "r1 commit",
    ]


def test_error_travels_through_middleware_then_resources() -> None:
    log: list[str] = []
    dm = _recording_dm(log)
    error = Boom("in context")
    with pytest.raises(Boom) as info, dm.context() as ctx:
        ctx.r1
        raise error
    assert info.value is error
    assert log == ["a setup", "b setup", "r1 setup", "b saw Boom", "a saw Boom", "r1 rollback Boom"]


def test_middleware_suppresses_and_block_completes() -> None:
    log: list[str] = []
    dm = _recording_dm(log, b_on_error="suppress")
    with dm.context() as ctx:
        ctx.r1
        raise Boom()
    # b (innermost) suppressed: a and the resource see a clean exit.
    assert log == ["a setup", "b setup", "r1 setup", "b saw Boom", "a clean", "r1 commit"]


def test_middleware_replaces_error() -> None:
    log: list[str] = []
    replacement = Other("replaced")
    dm = _recording_dm(log, b_on_error=replacement)
    original = Boom("original")
    with pytest.raises(Other) as info, dm.context() as ctx:
        ctx.r1
        raise original
    assert info.value is replacement
    assert info.value.__cause__ is original
    assert log == [
        "a setup",
        "b setup",
        "r1 setup",
        "b saw Boom",
        "a saw Other",
        "r1 rollback Other",
    ]


def test_middleware_teardown_error_raised_out_of_clean_block() -> None:
    log: list[str] = []
    failure = Other("teardown")
    dm = _recording_dm(log, b_teardown_raises=failure)
    with pytest.raises(Other) as info, dm.context():
        pass
    assert info.value is failure
    assert log == ["a setup", "b setup", "b clean", "a saw Other"]


def test_setup_failure_part_way_aborts_context() -> None:
    log: list[str] = []
    failure = Boom("b setup failed")
    dm = _recording_dm(log, a_creates="r1", b_setup_raises=failure)
    body_ran = False
    with pytest.raises(Boom) as info, dm.context():
        body_ran = True
    assert info.value is failure
    assert not body_ran
    # a was set up (and created r1), b failed: a is torn down with the error, then r1.
    assert log == ["a setup", "r1 setup", "b setup", "a saw Boom", "r1 rollback Boom"]


def test_suppressed_setup_failure_still_propagates() -> None:
    log: list[str] = []
    failure = Boom("b setup failed")
    dm = _recording_dm(log, b_setup_raises=failure, a_on_error="suppress")
    with pytest.raises(Boom) as info, dm.context():
        pass
    assert info.value is failure


def test_resources_created_by_middleware_teardown_are_torn_down() -> None:
    dm = DataManager()
    log: list[str] = []

    def mw(ctx: DataAccessContext) -> Iterator[None]:
        yield
        log.append(f"mw uses {ctx.late}")

    def late(ctx: DataAccessContext) -> Iterator[str]:
        yield "late"
        log.append("late torn down")

    dm.register_context_middleware(mw)
    dm.register_resources(late=late)
    with dm.context() as ctx:
        assert "late" not in ctx
    assert log == ["mw uses late", "late torn down"]


def test_resource_cannot_be_created_during_resource_teardown() -> None:
    dm = DataManager()

    def first(ctx: DataAccessContext) -> Iterator[str]:
        yield "first"
        ctx.second

    def second(ctx: DataAccessContext) -> Iterator[str]:
        yield "second"

    dm.register_resources(first=first, second=second)
    with dm.context() as ctx:
        ctx.first
    ((kind, error, _),) = ctx.get_resource_exit_errors()
    assert kind is ContextStateError
    assert str(error) == (
        "Cannot create resource 'second': the context is in state 'tearing_down_resources' "
        "and resources are being torn down; create it earlier (during setup, in the block, "
        "or in middleware teardown)."
    )


BEFORE = (
    "Cannot use resource 'db': the context is in state 'created' (not entered yet); "
    "use it inside `with dm.context() as ctx:`."
)
AFTER = (
    "Cannot use resource 'db': the context is in state 'exited'; resources can only be "
    "used while the context is active. Open a new context with dm.context()."
)


@pytest.mark.parametrize("traced", [False, True], ids=["idle", "traced"])
@pytest.mark.parametrize("read", ["attribute", "resource()"])
def test_a_resource_outside_the_context_names_the_state_and_what_to_do(
    traced: bool, read: str
) -> None:
    """The same message whichever way the resource is asked for, recorded or not (the
    attribute path creates through a different route than ``ctx.resource()``)."""
    from polydatum.testing import TelemetryCapture

    def db(ctx: DataAccessContext) -> Iterator[str]:
        yield "db"

    def get(ctx: DataAccessContext) -> Any:
        return ctx.db if read == "attribute" else ctx.resource("db")

    # Idle means no capture at all: capturing logs turns INFO on, and with it recording.
    with TelemetryCapture() if traced else contextlib.nullcontext() as capture:
        options = (
            {"tracer_provider": capture.tracer_provider, "meter_provider": capture.meter_provider}
            if capture is not None
            else {}
        )
        dm = DataManager(**options)
        dm.register_resources(db=db)
        ctx = dm.context()
        with pytest.raises(ContextStateError) as before:
            get(ctx)
        assert str(before.value) == BEFORE
        with ctx:
            assert (ctx._telemetry is None) is not traced  # the path under test
            assert get(ctx) == "db"
        with pytest.raises(ContextStateError) as after:
            get(ctx)
        assert str(after.value) == AFTER
        if capture is not None:  # nothing was set up by the failed attempts
            assert [s.name for s in capture.spans() if s.name.startswith("polydatum.resource")] == [
                "polydatum.resource.setup db",
                "polydatum.resource.teardown db",
            ]


async def test_an_async_resource_outside_the_context_names_the_state() -> None:
    async def db(ctx: DataAccessContext) -> Any:
        yield "db"

    dm = DataManager()
    dm.register_resources(db=db)
    ctx = dm.context()
    with pytest.raises(ContextStateError) as before:
        await ctx.aresource("db")
    assert str(before.value) == BEFORE
    async with ctx:
        assert await ctx.aresource("db") == "db"
    with pytest.raises(ContextStateError) as after:
        await ctx.aresource("db")
    assert str(after.value) == AFTER


def test_resource_setup_failure_is_not_torn_down() -> None:
    dm = DataManager()
    log: list[str] = []

    def broken(ctx: DataAccessContext) -> Iterator[str]:
        log.append("broken setup")
        raise Boom("cannot connect")
        yield "never"

    dm.register_resources(broken=broken)
    with pytest.raises(Boom, match="cannot connect"), dm.context() as ctx:
        ctx.broken
    assert log == ["broken setup"]
    assert ctx.get_resource_exit_errors() == []


def test_resource_teardown_errors_do_not_stop_others() -> None:
    log: list[str] = []
    first, second = Boom("r1 close"), Other("r2 close")
    dm = _recording_dm(log, r1_teardown_raises=first, r2_teardown_raises=second)
    with dm.context() as ctx:
        ctx.r1
        ctx.r2
    assert [e for _, e, _ in ctx.get_resource_exit_errors()] == [second, first]
    assert log[-2:] == ["r2 commit", "r1 commit"]


def test_strict_policy_raises_group_chained_to_context_error() -> None:
    dm = DataManager(teardown_errors="raise")
    close_error = OSError("close failed")

    def flaky(ctx: DataAccessContext) -> Iterator[int]:
        try:
            yield 1
        finally:
            raise close_error

    dm.register_resources(flaky=flaky)
    with pytest.raises(TeardownErrors) as info, dm.context() as ctx:
        ctx.flaky
    assert info.value.exceptions == (close_error,)
    assert str(info.value) == "1 resource(s) failed to tear down (1 sub-exception)"
    assert info.value.__cause__ is None

    in_context = Boom("body")
    with pytest.raises(TeardownErrors) as info, dm.context() as ctx:
        ctx.flaky
        raise in_context
    assert info.value.__cause__ is in_context


def test_strict_policy_value_is_checked() -> None:
    with pytest.raises(ValueError, match="teardown_errors must be 'record' or 'raise'"):
        DataManager(teardown_errors="ignore")  # type: ignore[arg-type]


def test_base_exceptions_flow_through_middleware() -> None:
    log: list[str] = []
    dm = _recording_dm(log)
    with pytest.raises(KeyboardInterrupt), dm.context() as ctx:
        ctx.r1
        raise KeyboardInterrupt
    assert log[-3:] == [
        "b saw KeyboardInterrupt",
        "a saw KeyboardInterrupt",
        "r1 rollback KeyboardInterrupt",
    ]


def test_stop_iteration_in_block_is_not_swallowed() -> None:
    log: list[str] = []
    dm = _recording_dm(log)
    with pytest.raises(StopIteration), dm.context():
        raise StopIteration
    assert log == ["a setup", "b setup", "b saw StopIteration", "a saw StopIteration"]


def test_generators_cannot_leak_contextvars_into_caller() -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="caller")
    dm = DataManager()

    def mw(ctx: DataAccessContext) -> Iterator[None]:
        var.set("middleware")
        yield
        assert var.get() == "middleware"  # its own context persists across steps

    def res(ctx: DataAccessContext) -> Iterator[str]:
        var.set("resource")
        yield "r"

    dm.register_context_middleware(mw)
    dm.register_resources(res=res)
    with dm.context() as ctx:
        assert var.get() == "caller"
        ctx.res
        assert var.get() == "caller"
    assert var.get() == "caller"


def test_service_resource_use_in_exiting_middleware() -> None:
    dm = DataManager()
    seen: list[Any] = []

    class Svc(Service):
        def read(self) -> Any:
            return self._ctx.db

    def db(ctx: DataAccessContext) -> Iterator[str]:
        yield "conn"

    def mw(ctx: DataAccessContext) -> Iterator[None]:
        yield
        seen.append(ctx.dal.svc.read())

    dm.register_services(svc=Svc())
    dm.register_resources(db=db)
    dm.register_context_middleware(mw)
    with dm.context() as ctx:
        assert ctx.dal.svc.read() == "conn"
    assert seen == ["conn"]


def test_context_id_is_stable_and_random() -> None:
    dm = DataManager()
    first, second = dm.context(), dm.context()
    assert first.id == first.id
    assert first.id != second.id
    assert len(first.id) == 16
    assert repr(first) == f"<DataAccessContext {first.id} created>"


CYCLE = (
    "Resource 'db' asked for itself while setting up (a cycle): a resource cannot use "
    "itself; set up what both need in a third resource."
)


def _cyclic_data_manager(**options: Any) -> DataManager:
    def db(ctx: DataAccessContext) -> Iterator[str]:
        ctx.cache  # a resource used by another one's setup: fine
        ctx.db
        yield "db"

    def cache(ctx: DataAccessContext) -> Iterator[str]:
        yield "cache"

    dm = DataManager(**options)
    dm.register_resources(db=db, cache=cache)
    return dm


@pytest.mark.parametrize("traced", [False, True], ids=["idle", "traced"])
def test_a_resource_asking_for_itself_is_a_cycle_error_and_leaves_no_trace(
    traced: bool,
) -> None:
    from polydatum.errors import ResourceException
    from polydatum.testing import TelemetryCapture

    # Idle means no capture at all: capturing logs turns INFO on, and with it recording.
    with TelemetryCapture() if traced else contextlib.nullcontext() as capture:
        options = (
            {"tracer_provider": capture.tracer_provider, "meter_provider": capture.meter_provider}
            if capture is not None
            else {}
        )
        dm = _cyclic_data_manager(**options)
        with dm.context() as ctx:
            assert (ctx._telemetry is None) is not traced  # the path under test
            with pytest.raises(ResourceException) as info:
                ctx.db
            assert str(info.value) == CYCLE
            assert "db" not in ctx and "cache" in ctx
            with pytest.raises(ResourceException, match="a cycle"):
                ctx.resource("db")  # the same again: nothing was left half set up
            assert ctx.cache == "cache"
        assert ctx.state is State.EXITED
        assert ctx.get_resource_exit_errors() == []
        if capture is not None:
            # One failed setup span per attempt (the inner request fails before a span).
            assert [
                (s.name, s.status, s.attributes.get("error.type"))
                for s in capture.spans()
                if s.name.startswith("polydatum.resource.")
            ] == [
                ("polydatum.resource.setup db", "ERROR", "polydatum.errors.ResourceException"),
                ("polydatum.resource.setup cache", "UNSET", None),
                ("polydatum.resource.setup db", "ERROR", "polydatum.errors.ResourceException"),
                ("polydatum.resource.teardown cache", "UNSET", None),
            ]


async def test_an_async_resource_asking_for_itself_is_a_cycle_error() -> None:
    from polydatum.errors import ResourceException

    async def db(ctx: DataAccessContext) -> Any:
        await ctx.aresource("db")
        yield "db"

    dm = DataManager()
    dm.register_resources(db=db)
    async with dm.context() as ctx:
        with pytest.raises(ResourceException) as info:
            await ctx.aresource("db")
        assert str(info.value) == CYCLE
        assert "db" not in ctx
    assert ctx.state is State.EXITED


def test_a_data_manager_overriding_get_resource_is_honoured_when_nothing_records() -> None:
    def db(ctx: DataAccessContext) -> Iterator[str]:
        yield "registered"

    def wrapped(ctx: DataAccessContext) -> Iterator[str]:
        yield "from get_resource"

    class Custom(DataManager):
        def get_resource(self, name: str) -> Any:
            return wrapped if name in ("db", "extra") else super().get_resource(name)

    dm = Custom()
    dm.register_resources(db=db)
    with dm.context() as ctx:
        assert ctx.db == "from get_resource"
        assert ctx.extra == "from get_resource"  # not registered at all
    with DataManager().context():
        pass  # a plain DataManager reads its registry directly


def test_a_resource_manager_overriding_get_is_honoured_when_nothing_records() -> None:
    from polydatum.resources import ResourceManager

    def db(ctx: DataAccessContext) -> Iterator[str]:
        yield "registered"

    def wrapped(ctx: DataAccessContext) -> Iterator[str]:
        yield "from get"

    class Wrapping(ResourceManager):
        def get(self, name: str) -> Any:
            return wrapped if name == "db" else super().get(name)

    dm = DataManager(resource_manager=Wrapping(None))  # type: ignore[arg-type]
    dm.register_resources(db=db)
    with dm.context() as ctx:
        assert ctx.db == "from get"


def test_resource_exit_errors_is_one_list_per_context_even_read_before_any_error() -> None:
    def bad(ctx: DataAccessContext) -> Iterator[str]:
        yield "bad"
        raise Boom("teardown")

    dm = DataManager()
    dm.register_resources(bad=bad)
    with dm.context() as ctx:
        errors = ctx.get_resource_exit_errors()
        assert errors == []
        ctx.bad
    assert ctx.get_resource_exit_errors() is errors
    assert [(kind, str(error)) for kind, error, _ in errors] == [(Boom, "teardown")]
    with dm.context() as clean:
        pass
    assert clean.get_resource_exit_errors() == []


@pytest.mark.parametrize("entered", ["sync", "async"])
def test_get_middleware_and_get_dal_overrides_are_called_for_every_context(entered: str) -> None:
    import asyncio

    log: list[str] = []

    def audit(ctx: DataAccessContext) -> Iterator[None]:
        log.append(f"audit {ctx.meta.user}")
        yield

    class PerUser(DataManager):
        def get_middleware(self, context: DataAccessContext) -> list[Any]:
            return [audit] if context.meta.user == "admin" else []

        def get_dal(self) -> Any:
            log.append("get_dal")
            return super().get_dal()

    dm = PerUser()

    async def run_async(user: str) -> None:
        async with dm.context({"user": user}) as ctx:
            assert ctx.dal is DataManager.get_dal(dm)

    for user in ("admin", "guest", "admin"):
        if entered == "sync":
            with dm.context({"user": user}) as ctx:
                assert ctx.dal is DataManager.get_dal(dm)
        else:
            asyncio.run(run_async(user))
    assert log == ["get_dal", "audit admin", "get_dal", "get_dal", "audit admin"]
    assert DataManager().context_middleware is not None  # the plain one reads its list
