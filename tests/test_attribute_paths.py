"""How contexts, the DAL and services are reached: the same behaviour as 0.9.1's
``__getattr__`` protocol, through the faster paths (descriptors on a class of each
DataManager's own, a lifecycle object without ``__getattr__``)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from polydatum import DataAccessContext, DataManager, Service, get_active_context
from polydatum.dal import DataAccessLayer
from polydatum.errors import ContextStateError, ValidationError


class Users(Service):
    def get(self, uid: int) -> Any:
        return (uid, self._ctx.db)


def db(ctx: DataAccessContext) -> Iterator[str]:
    yield "handle"


def test_context_class_is_a_subclass_with_the_same_name() -> None:
    dm = DataManager()
    dm.register_resources(db=db)
    ctx = dm.context()
    assert isinstance(ctx, DataAccessContext)
    assert type(ctx).__name__ == "DataAccessContext"
    assert type(ctx).__qualname__ == "DataAccessContext"
    assert type(ctx).__module__ == "polydatum.context"
    assert type(ctx).__mro__[1] is DataAccessContext
    # The descriptor lives on this DataManager's class only.
    assert "db" in type(ctx).__dict__
    assert "db" not in DataAccessContext.__dict__
    assert type(DataManager().context()) is not type(ctx)


def test_resources_registered_later_are_descriptors_too() -> None:
    dm = DataManager()
    with dm.context() as ctx:
        pass
    dm.register_resources(db=db)
    dm.replace_resource("cache", db)
    with dm.context() as ctx:
        assert {"db", "cache"} <= set(type(ctx).__dict__)
        assert "db" not in ctx
        assert ctx.db == "handle"
        assert "db" in ctx
        assert ctx.cache == "handle"
        with pytest.raises(AttributeError, match='No resource named "nope" for context'):
            ctx.nope
    with pytest.raises(ContextStateError, match="resources can only be used while the context"):
        ctx.db


def test_a_resource_never_shadows_a_context_attribute() -> None:
    def meta(ctx: DataAccessContext) -> Iterator[str]:
        yield "the resource"

    dm = DataManager()
    dm.register_resources(meta=meta)
    with dm.context({"user": "ada"}) as ctx:
        assert ctx.meta.user == "ada"
        assert ctx.resource("meta") == "the resource"


def test_replacing_the_context_class_is_honoured() -> None:
    hooks: list[str] = []

    class Hooked(DataAccessContext):
        def _setup_hook(self) -> None:
            hooks.append("setup")

    dm = DataManager()
    dm.register_resources(db=db)
    dm.Context = Hooked  # type: ignore[misc]
    with dm.dal() as dal:
        ctx = dm.require_active_context()
        assert isinstance(ctx, Hooked)
        assert type(ctx).__name__ == "Hooked"
        assert ctx.db == "handle"
        assert dal is dm.get_dal()
    assert hooks == ["setup"]


def test_dal_services_are_instance_attributes_and_keep_the_checks() -> None:
    dm = DataManager()
    dm.register_resources(db=db)
    dm.register_services(users=Users())
    dal = dm.get_dal()
    assert "users" in dal.__dict__  # an instance attribute: no __getattr__, no descriptor
    assert type(dal) is DataAccessLayer
    users = dm.get_dal().services["users"]
    assert dal.users is users  # the Service object, context or not (0.9.1 and 1.0)
    with pytest.raises(AssertionError, match="A DataAccessContext must be started"):
        dal.users.get(1)  # calling needs the context
    with dm.dal() as dal:
        assert dal.users.get(1) == (1, "handle")
        assert dal.users.get is dal.users.get  # one command per method


def test_a_service_named_like_a_dal_attribute_does_not_shadow_it() -> None:
    dm = DataManager()
    dm.register_services(services=Users())
    assert "services" not in dm.get_dal().__dict__
    with dm.dal():
        assert set(dm.get_dal().services) == {"services"}  # the DAL's own property
    with pytest.raises(ValidationError, match="service 'services' collides"):
        dm.validate()


def test_an_exited_context_is_freed_without_the_garbage_collector() -> None:
    dm = DataManager()
    dm.register_resources(db=db)
    dm.register_services(users=Users())
    gc.disable()
    try:
        with dm.context() as ctx:
            ctx.dal.users.get(1)
        ref = weakref.ref(ctx)
        lifecycle = weakref.ref(ctx._c)
        del ctx
        assert ref() is None
        assert lifecycle() is None
    finally:
        gc.enable()


def test_a_resource_read_twice_is_cached_on_the_context_until_exit() -> None:
    dm = DataManager()
    dm.register_resources(db=db)
    with dm.context() as ctx:
        assert ctx.db == "handle"
        assert "db" not in vars(ctx)  # read once: nothing cached (most are read once)
        assert ctx.db == "handle"
        assert vars(ctx)["db"] == "handle"  # read again: later reads skip the descriptor
        assert get_active_context() is ctx
    assert "db" not in vars(ctx)
    assert get_active_context() is None
    with pytest.raises(ContextStateError, match="resources can only be used while the context"):
        ctx.db
