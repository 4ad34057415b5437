"""polydatum 0.9.1's and 1.0's semantics at once (issue 16, point 2).

0.9.1 applications hold ``dal.<service>`` as the registered Service object; 1.0
applications rely on method middleware wrapping every call, ``dal_resolver`` naming
services as well as methods, DAL attribute access deferred until the call, and
``DataManager`` subclasses with a ``DataAccessLayer`` of their own. Every test below is
one of those behaviours, with method middleware and tracing checked to still apply.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest

from polydatum import DataManager, Service
from polydatum.dal import DataAccessLayer
from polydatum.errors import DalMethodError, NoActiveContextError
from polydatum.middleware import DalCommand, DalCommandRequest, PathSegment, dal_resolver
from polydatum.resources import ResourceManager
from polydatum.testing import TelemetryCapture


class Profile(Service):
    def get(self, user_id: int) -> dict[str, Any]:
        return {"id": user_id, "user": self._ctx.meta.user}


class Users(Service):
    def __init__(self) -> None:
        super().__init__()
        self.register_services(profile=Profile())

    def name(self, user_id: int) -> str:
        return f"user {user_id}"

    def shout(self, user_id: int) -> str:
        return self.name(user_id).upper()  # a call to its own public method


def recording_middleware(calls: list[str]) -> Any:
    def middleware(request: DalCommandRequest, handler: Any) -> Any:
        calls.append(".".join(p.name for p in request.path))
        return handler(request)

    return middleware


def test_dal_service_is_the_registered_object_and_calls_still_run_middleware() -> None:
    calls: list[str] = []
    dm = DataManager(method_middleware=[recording_middleware(calls)])
    users = Users()
    dm.register_services(users=users)
    with dm.dal({"user": "ann"}) as dal:
        assert dal.users is users  # 0.9.1
        assert dal.users.profile is users.profile
        assert dal.users.name(1) == "user 1"
        assert dal.users.profile.get(2) == {"id": 2, "user": "ann"}
        assert dal["users.profile.get"](3) == {"id": 3, "user": "ann"}
    assert calls == ["users.name", "users.profile.get", "users.profile.get"]


def test_replace_service_gives_the_new_object_and_frees_the_old_one() -> None:
    dm = DataManager()
    old, new = Users(), Users()
    dm.register_services(users=old)
    dm.replace_service("users", new)
    with dm.dal({"user": "bob"}) as dal:
        assert dal.users is new
        ctx = dm.require_active_context()
        assert dal_resolver(ctx, (PathSegment("users"),)) is new  # 1.0
        assert dal_resolver(ctx, dal["users"].path) is new
        assert dal_resolver(ctx, dal["users.profile"].path) is new.profile
        method = dal_resolver(ctx, dal["users.name"].path)
        assert method == Users.name.__get__(new)  # the method as the class defines it
        with pytest.raises(DalMethodError, match=r"Invalid dal method: users.nope"):
            dal_resolver(ctx, dal["users.nope"].path)
    # The replaced service's methods are its own again: no DAL command on it.
    assert "name" not in old.__dict__
    assert "get" not in old.profile.__dict__
    assert "name" in new.__dict__


def test_calls_through_the_service_object_are_traced_including_its_own_calls() -> None:
    with TelemetryCapture() as cap:
        dm = cap.data_manager()
        dm.register_services(users=Users())
        with dm.dal() as dal:
            assert dal.users.shout(7) == "USER 7"
    spans = [(s.name, s.parent) for s in cap.spans()]
    assert spans == [
        ("polydatum.context", None),
        ("users.shout", "polydatum.context"),
        # self.name(...) inside the service is a DAL call too: traced, under its caller
        ("users.name", "users.shout"),
    ]


def test_dal_attribute_access_outside_a_context_fails_only_when_called() -> None:
    dm = DataManager()
    users = Users()
    dm.register_services(users=users)
    dal = dm.get_dal()
    assert dal.users is users  # no context needed to read it
    command = dal.nope.deeper  # nor to build a command (1.0)
    assert isinstance(command, DalCommand)
    assert command.path == (PathSegment("nope"), PathSegment("deeper"))
    message = (
        "A DataAccessContext must be started to access the DAL: use `with dm.dal() as dal:` "
        "or `with dm.context() as ctx:`."
    )
    for call in (lambda: dal.users.name(1), lambda: command(), lambda: dal["users.name"](1)):
        with pytest.raises(NoActiveContextError) as caught:
            call()
        assert str(caught.value) == message
        assert isinstance(caught.value, AssertionError)  # what 0.9.1 and 1.0 raised
    with dm.dal() as inside:
        with pytest.raises(DalMethodError, match=r"Invalid dal method: nope.deeper"):
            command()
        assert inside.users.name(2) == "user 2"


def test_a_dal_subclass_whose_init_takes_only_the_data_manager() -> None:
    calls: list[str] = []

    class MyDal(DataAccessLayer):
        def __init__(self, data_manager: Any) -> None:
            super().__init__(data_manager)
            self.built_for = data_manager

    class MyManager(DataManager):
        DataAccessLayer = MyDal

    dm = MyManager(method_middleware=[recording_middleware(calls)])
    dm.register_method_middleware(recording_middleware(calls))
    dm.register_services(users=Users())
    assert type(dm.get_dal()) is MyDal
    assert dm.get_dal().built_for is dm
    with dm.dal() as dal:
        assert dal.users.name(5) == "user 5"
    assert calls == ["users.name", "users.name"]  # both middleware ran


def test_the_resource_manager_is_taken_positionally() -> None:
    class Counting(ResourceManager):
        registered: list[str] = []

        def register_resources(self, **resources: Any) -> None:
            self.registered.extend(resources)
            super().register_resources(**resources)

    resources = Counting(None)  # type: ignore[arg-type]
    manager = DataManager(resources)
    assert manager._resource_manager is resources

    def db(ctx: Any) -> Any:
        yield "db handle"

    manager.register_resources(db=db)
    assert Counting.registered == ["db"]
    with manager.context() as ctx:
        assert ctx.db == "db handle"


def test_patching_a_service_method_is_honoured_by_every_way_of_calling_it() -> None:
    dm = DataManager()
    users = Users()
    dm.register_services(users=users)
    with dm.dal() as dal:
        # On the class (as a function: autospec; a MagicMock on the class is no method
        # the DAL reaches): every path calls the patch, through the DAL.
        with mock.patch.object(Users, "name", autospec=True, return_value="patched class"):
            assert dal.users.name(1) == "patched class"
            assert dal["users.name"](1) == "patched class"
        # On the instance: the patch replaces the DAL's command there, and the string
        # path calls the patch too.
        with mock.patch.object(users, "name", return_value="patched instance"):
            assert dal.users.name(1) == "patched instance"
            assert dal["users.name"](1) == "patched instance"
        assert dal.users.name(1) == "user 1"
        assert repr(users.__dict__["name"]) == "<DAL method users.name>"  # restored


def test_a_misspelt_method_of_a_service_is_an_attribute_error_at_once() -> None:
    """``dal.users`` is the Service object, so a misspelt method fails where it is
    read, as in 0.9.1 (and is a type error, see tests/typing): a ``DalMethodError`` is
    an ``AttributeError`` too, so 1.0's ``except DalMethodError`` and 0.9.1's ``except
    AttributeError`` around the call keep working for string paths."""
    dm = DataManager()
    dm.register_services(users=Users())
    with dm.dal() as dal:
        with pytest.raises(AttributeError, match="'Users' object has no attribute 'nmae'"):
            dal.users.nmae
        with pytest.raises(DalMethodError, match=r"Invalid dal method: users.nmae"):
            dal["users.nmae"](1)
