"""The polydatum 0.9.1 surface (plus 1.0's method middleware), with its import paths."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

from polydatum import DataAccessLayer, DataManager, Service
from polydatum.context import DataAccessContext, Meta
from polydatum.errors import (
    AlreadyExistsException,
    ContextStateError,
    DalMethodError,
    InvalidMiddleware,
    MiddlewareException,
    MiddlewareSetupException,
    NotFound,
    PolydatumException,
    RegistrationError,
    ResourceException,
    ResourceSetupException,
    ServiceError,
)
from polydatum.middleware import DalCommand, DalCommandRequest, PathSegment
from polydatum.resources import Resource, ValueResource


class Profile(Service):
    def get(self, uid: int) -> dict[str, Any]:
        return {"id": uid, "user": self._ctx.meta.user}

    def _secret(self) -> str:
        return "never"


class Users(Service):
    def whoami(self) -> Any:
        return self._ctx.meta.user

    def via_dal(self, uid: int) -> Any:
        assert self._dal is not None
        return self._dal.users.profile.get(uid)

    def manager(self) -> Any:
        return self._data_manager


@pytest.fixture
def dm() -> DataManager:
    dm = DataManager()
    dm.register_services(users=Users().register_services(profile=Profile()))
    return dm


def test_error_hierarchy_and_codes() -> None:
    assert issubclass(ServiceError, PolydatumException)
    assert ServiceError.code == 500
    assert issubclass(NotFound, ServiceError)
    assert NotFound.code == 404
    assert issubclass(MiddlewareSetupException, MiddlewareException)
    assert issubclass(ResourceSetupException, ResourceException)
    assert issubclass(AlreadyExistsException, PolydatumException)


def test_nested_services_and_service_attributes(dm: DataManager) -> None:
    with dm.dal(meta={"user": "bob"}) as dal:
        assert dal.users.profile.get(7) == {"id": 7, "user": "bob"}
        assert dal.users.whoami() == "bob"
        assert dal.users.via_dal(3) == {"id": 3, "user": "bob"}
        assert dal.users.manager() is dm


def test_register_services_returns_self() -> None:
    users = Users()
    assert users.register_services(profile=Profile()) is users


def test_register_twice_raises_and_replace_overrides(dm: DataManager) -> None:
    with pytest.raises(AlreadyExistsException, match="A Service for users is already registered"):
        dm.register_services(users=Users())

    class OtherUsers(Users):
        def whoami(self) -> str:
            return "replaced"

    dm.replace_service("users", OtherUsers())
    with dm.dal() as dal:
        assert dal.users.whoami() == "replaced"


def test_sub_services_are_attributes_below_class_and_instance_attributes() -> None:
    class Shadowing(Service):
        def history(self) -> str:
            return "the method"

        def __init__(self) -> None:
            super().__init__()
            self.cache = "the instance attribute"

    profile, history, cache = Profile(), Profile(), Profile()
    svc = Shadowing().register_services(profile=profile, history=history, cache=cache)
    # As with 0.9.1's __getattr__ fallback: a sub-service is an attribute unless the
    # class or the instance already has one by that name.
    assert svc.profile is profile
    assert svc.history() == "the method"
    assert svc.cache == "the instance attribute"
    with pytest.raises(AttributeError, match="'Shadowing' object has no attribute 'nope'"):
        svc.nope
    # No __getattr__ on Service: CPython specialises attribute access (self._ctx,
    # self._dal) only on classes without one.
    assert not hasattr(Service, "__getattr__")


def test_nested_register_twice_raises() -> None:
    users = Users().register_services(profile=Profile())
    with pytest.raises(AlreadyExistsException):
        users.register_services(profile=Profile())


def test_resources_register_replace_and_reject_non_generators() -> None:
    dm = DataManager()

    def db(ctx: DataAccessContext) -> Iterator[str]:
        yield "db1"

    dm.register_resources(db=db)
    with pytest.raises(AlreadyExistsException):
        dm.register_resources(db=db)
    dm.replace_resource("db", ValueResource("db2"))
    with dm.context() as ctx:
        assert ctx.db == "db2"
    with pytest.raises(TypeError, match="must be a Python generator callable"):
        dm.register_resources(bad=lambda ctx: "not a generator")
    assert dm.get_resource("missing") is None


def test_middleware_must_be_generator_callable() -> None:
    dm = DataManager()
    with pytest.raises(Exception, match="must be a Python generator callable"):
        dm.register_context_middleware(lambda ctx: None)

    class CallableMiddleware:
        def __call__(self, ctx: DataAccessContext) -> Iterator[None]:
            yield

    dm.register_context_middleware(CallableMiddleware())
    assert len(dm.get_middleware(dm.context())) == 1


def test_service_ctx_without_context_is_runtime_error(dm: DataManager) -> None:
    users = dm.get_dal().services["users"]
    with pytest.raises(RuntimeError, match="no context active"):
        users._ctx


def test_a_dal_call_without_context_is_assertion_error(dm: DataManager) -> None:
    # 0.9.1 and 1.0 asserted; the error is both AssertionError and RuntimeError. Reading
    # dal.users needs no context (tests/test_compat_versions.py); calling does.
    with pytest.raises(AssertionError, match="A DataAccessContext must be started"):
        dm.get_dal().users.profile.get(1)


def test_meta_is_read_only() -> None:
    meta = Meta({"user": "bob", "empty": ""})
    assert meta.user == "bob"
    assert meta.missing is None
    assert meta.get("missing", 5) == 5
    assert meta.require("user") == "bob"
    with pytest.raises(ValueError, match='"empty" is empty.'):
        meta.require("empty")
    with pytest.raises(AttributeError, match="Meta values can not be changed."):
        meta.user = "eve"
    assert dict(meta.items()) == {"user": "bob", "empty": ""}


def test_context_meta_is_meta(dm: DataManager) -> None:
    with dm.context({"user": "bob"}) as ctx:
        assert isinstance(ctx.meta, Meta)
        assert ctx.dal is dm.get_dal()
        assert ctx.data_manager is dm
        with pytest.raises(AttributeError):
            ctx.meta.user = "eve"


def test_lazy_resources_and_contains() -> None:
    dm = DataManager()
    created: list[str] = []

    def db(ctx: DataAccessContext) -> Iterator[str]:
        created.append("db")
        yield "handle"

    dm.register_resources(db=db)
    with dm.context() as ctx:
        assert "db" not in ctx
        assert created == []
        assert ctx.db == "handle"
        assert ctx.db == "handle"
        assert "db" in ctx
    assert created == ["db"]


def test_unknown_resource_is_attribute_error() -> None:
    dm = DataManager()
    with dm.context() as ctx:
        with pytest.raises(AttributeError, match='No resource named "nope" for context'):
            ctx.nope
        assert getattr(ctx, "nope", None) is None


def test_class_based_resource_setup_hook() -> None:
    dm = DataManager()

    class Counter(Resource):
        def __call__(self, context: DataAccessContext) -> Iterator[Any]:
            yield self._data_manager

    dm.register_resources(counter=Counter())
    with dm.context() as ctx:
        assert ctx.counter is dm


def test_resource_exit_errors_are_exc_info_triples() -> None:
    dm = DataManager()

    def flaky(ctx: DataAccessContext) -> Iterator[int]:
        yield 1
        raise OSError("close failed")

    dm.register_resources(flaky=flaky)
    with dm.context() as ctx:
        ctx.flaky
    (triple,) = ctx.get_resource_exit_errors()
    assert triple[0] is OSError
    assert str(triple[1]) == "close failed"
    assert triple[2] is triple[1].__traceback__


def test_context_is_single_use(dm: DataManager) -> None:
    ctx = dm.context()
    with ctx:
        pass
    with pytest.raises(RuntimeError, match="a context is single-use"), ctx:
        pass


def test_resources_unusable_before_and_after() -> None:
    dm = DataManager()
    dm.register_resources(db=ValueResource(1))
    ctx = dm.context()
    with pytest.raises(RuntimeError, match="state 'created'"):
        ctx.db
    with ctx:
        assert ctx.db == 1
    with pytest.raises(RuntimeError, match="state 'exited'"):
        ctx.db


def test_never_yielding_middleware_and_resource() -> None:
    dm = DataManager()

    def lazy_mw(ctx: DataAccessContext) -> Iterator[None]:
        return
        yield

    dm.register_context_middleware(lazy_mw)
    with pytest.raises(MiddlewareSetupException, match="Middleware lazy_mw did not yield"):
        with dm.context():
            pass

    dm2 = DataManager()

    def lazy_res(ctx: DataAccessContext) -> Iterator[None]:
        return
        yield

    dm2.register_resources(res=lazy_res)
    with pytest.raises(ResourceSetupException, match="Resource res did not yield on setup."):
        with dm2.context() as ctx:
            ctx.res


def test_twice_yielding_middleware_raises_runtime_error() -> None:
    dm = DataManager()

    def twice(ctx: DataAccessContext) -> Iterator[None]:
        yield
        yield

    dm.register_context_middleware(twice)
    with pytest.raises(RuntimeError, match="Middleware 'twice' yielded more than once"):
        with dm.context():
            pass


def test_twice_yielding_resource_is_recorded() -> None:
    dm = DataManager()

    def twice(ctx: DataAccessContext) -> Iterator[int]:
        yield 1
        yield 2

    dm.register_resources(twice=twice)
    with dm.context() as ctx:
        ctx.twice
    ((kind, error, _),) = ctx.get_resource_exit_errors()
    assert kind is RuntimeError
    assert str(error) == (
        "Resource 'twice' yielded more than once; a resource generator must yield exactly once."
    )


def test_dal_string_paths(dm: DataManager) -> None:
    with dm.dal({"user": "ann"}) as dal:
        assert dal["users.profile.get"](1) == {"id": 1, "user": "ann"}
        assert dal["dal.users.profile.get"](2) == {"id": 2, "user": "ann"}
        with pytest.raises(DalMethodError, match=r"Invalid dal method: users.nope"):
            dal["users.nope"]()
        with pytest.raises(DalMethodError, match="names starting with '_'"):
            dal["users.profile._secret"]()
        with pytest.raises(DalMethodError, match="names starting with '_'"):
            dal["users._data_manager.context"]()


def test_deferred_attribute_access(dm: DataManager) -> None:
    # dal.users is the Service object (0.9.1); below an unregistered name, and in string
    # paths, access is deferred to the call (1.0).
    with dm.dal() as dal:
        command = dal.accounts.profile.nope
        assert isinstance(command, DalCommand)
        assert command.path == (
            PathSegment("accounts"), PathSegment("profile"), PathSegment("nope")
        )  # fmt: skip
        assert str(command) == "accounts.profile.nope"
        with pytest.raises(DalMethodError, match=r"Invalid dal method: accounts.profile.nope"):
            command()
        with pytest.raises(DalMethodError, match=r"Invalid dal method: users.profile.nope"):
            dal["users.profile.nope"]()
        with pytest.raises(DalMethodError, match="a service, not a method"):
            dal["users.profile"]()


def test_command_built_outside_is_called_inside(dm: DataManager) -> None:
    command = dm.get_dal()["users.profile.get"]
    with dm.context({"user": "zed"}):
        assert command(4) == {"id": 4, "user": "zed"}


def test_method_middleware_order_and_request() -> None:
    calls: list[str] = []

    class Outer:
        def __call__(self, request: DalCommandRequest, handler: Any) -> Any:
            calls.append(f"outer-in {'.'.join(p.name for p in request.path)}")
            result = handler(request)
            calls.append("outer-out")
            return result

    def inner(request: DalCommandRequest, handler: Any) -> Any:
        calls.append(f"inner-in {request.args} {request.kwargs}")
        request.args = (request.args[0] * 10,)
        return handler(request)

    dm = DataManager(method_middleware=[Outer])
    dm.register_method_middleware(inner)
    dm.register_services(users=Users().register_services(profile=Profile()))
    with dm.dal({"user": "u"}) as dal:
        assert dal.users.profile.get(2, **{}) == {"id": 20, "user": "u"}
    assert calls == ["outer-in users.profile.get", "inner-in (2,) {}", "outer-out"]


def test_method_middleware_short_circuit_and_raise() -> None:
    class Denied(Exception):
        pass

    def auth(request: DalCommandRequest, handler: Any) -> Any:
        if request.path[-1].name == "whoami":
            return "short-circuited"
        if request.ctx.meta.user != "admin":
            raise Denied("no")
        return handler(request)

    dm = DataManager(method_middleware=[auth])
    dm.register_services(users=Users().register_services(profile=Profile()))
    with dm.dal({"user": "guest"}) as dal:
        assert dal.users.whoami() == "short-circuited"
        with pytest.raises(Denied):
            dal.users.profile.get(1)


def test_invalid_method_middleware() -> None:
    with pytest.raises(InvalidMiddleware, match="is not a valid method middleware"):
        DataAccessLayer(data_manager=None, middleware=["nope"])


def test_standalone_dal_with_default_middleware_override() -> None:
    """polydatum 1.0: a custom default middleware may resolve paths itself."""

    def fake(request: DalCommandRequest, handler: Any) -> Any:
        request.dal_method = lambda: ["handled"]
        return handler(request)

    dm = DataManager()
    dal = DataAccessLayer(data_manager=dm, middleware=[], default_middleware=(fake,))
    with dm.context():
        assert dal.fake.service.method() == ["handled"]


def test_monkeypatching_a_service_method(dm: DataManager, monkeypatch: Any) -> None:
    profile = dm.get_dal().services["users"].profile
    monkeypatch.setattr(profile, "get", lambda uid: "mocked")
    with dm.dal() as dal:
        assert dal.users.profile.get(1) == "mocked"


def test_get_active_context_and_nesting(dm: DataManager) -> None:
    assert dm.get_active_context() is None
    with dm.context({"user": "outer"}) as outer:
        assert dm.get_active_context() is outer
        with dm.context({"user": "inner"}) as inner:
            assert dm.get_active_context() is inner
            assert outer.dal.users.whoami() == "inner"
        assert dm.get_active_context() is outer
        assert outer.dal.users.whoami() == "outer"
    assert dm.get_active_context() is None


def test_old_hooks_are_called() -> None:
    seen: list[str] = []

    class HookedContext(DataAccessContext):
        def _setup_hook(self) -> None:
            seen.append("setup")

        def _teardown_hook(self, exception: BaseException | None) -> None:
            seen.append(f"teardown {exception!r}")

        def _final_hook(self, exception: BaseException | None) -> None:
            seen.append(f"final {exception!r}")

    class HookedManager(DataManager):
        Context = HookedContext

    with HookedManager().context():
        pass
    assert seen == ["setup", "teardown None", "final None"]


def test_module_layout() -> None:
    import polydatum

    for name in ("DataManager", "Service", "DataAccessLayer"):
        assert hasattr(polydatum, name)
    assert "polydatum.dal" in sys.modules


@pytest.mark.parametrize(
    "path", ["users.register_services", "users.setup", "users.mro", "users.profile.setup"]
)
def test_framework_methods_are_not_service_methods(dm: DataManager, path: str) -> None:
    with dm.dal() as dal:
        with pytest.raises(DalMethodError, match="has no public method"):
            dal[path]()


def test_replacing_services_after_calls_takes_effect(dm: DataManager) -> None:
    class Other(Profile):
        def get(self, uid: int) -> dict[str, Any]:
            return {"other": uid}

    with dm.dal({"user": "u"}) as dal:
        assert dal.users.profile.get(1) == {"id": 1, "user": "u"}
        assert dal.users.profile.get(1) == {"id": 1, "user": "u"}  # cached resolution
    dm.get_dal().services["users"].register_services(extra=Profile())
    users = Users().register_services(profile=Other())
    dm.replace_service("users", users)
    with dm.dal({"user": "u"}) as dal:
        assert dal.users.profile.get(2) == {"other": 2}
    users.register_services(more=Other())
    with dm.dal({"user": "u"}) as dal:
        assert dal.users.more.get(3) == {"other": 3}
        assert dal.users.profile.get(4) == {"other": 4}


def test_the_three_common_mistakes_say_what_to_do() -> None:
    class Notes(Service):
        def mine(self) -> int:
            return 1

    dm = DataManager()
    dm.register_services(notes=Notes())
    dal = dm.dal()  # forgot `with`
    with pytest.raises(ContextStateError) as state:
        dal.notes.mine()
    assert str(state.value) == (
        "Cannot use 'notes': `dm.dal()` gives a context, not the DAL, and this one was never "
        "entered; use `with dm.dal() as dal:` (or `async with`), then `dal.notes`."
    )
    with dm.dal() as entered:  # and the context was not spoilt by the mistake
        assert entered.notes.mine() == 1

    with pytest.raises(RegistrationError) as registration:
        dm.register_services(more=Notes(), other=Notes)  # type: ignore[arg-type]
    assert str(registration.value) == (
        "Service other=Notes is a class; register an instance: other=Notes()."
    )
    assert "more" not in dm.get_dal()._services  # refused before any was registered
    with pytest.raises(RegistrationError, match=r"^Service Notes\.sub=Notes is a class"):
        Notes().register_services(sub=Notes)  # type: ignore[arg-type]
    with pytest.raises(RegistrationError, match=r"^Service notes=Notes is a class"):
        dm.replace_service("notes", Notes)  # type: ignore[arg-type]

    def audit(ctx: Any, request: Any) -> Any:
        return None

    with pytest.raises(InvalidMiddleware) as shape:
        dm.register_method_middleware(audit)
    assert str(shape.value) == (
        "Method middleware audit(ctx: 'Any', request: 'Any') -> 'Any' has the wrong shape: "
        "it is called as "
        "mw(request, handler=next_handler), so it must take (request, handler)."
    )
    with dm.dal() as entered:  # nothing half-registered
        assert entered.notes.mine() == 1
