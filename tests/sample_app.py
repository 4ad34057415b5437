"""A small DataManager used by the CLI tests (``polydatum inspect tests.sample_app:dm``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from polydatum import DataManager, Service
from polydatum.context import DataAccessContext


class Profiles(Service):
    def get(self, uid: int) -> dict[str, Any]:
        return {"id": uid}


class Users(Service):
    def list(self) -> list[int]:
        return [1, 2]


def auth(ctx: DataAccessContext) -> Iterator[None]:
    yield


def transaction(ctx: DataAccessContext) -> Iterator[None]:
    yield


def db(ctx: DataAccessContext) -> Iterator[str]:
    yield "db"


db.ping = lambda: None  # type: ignore[attr-defined]


def audit(request: Any, handler: Any) -> Any:
    return handler(request)


def make() -> DataManager:
    dm = DataManager()
    dm.register_services(users=Users().register_services(profiles=Profiles()))
    dm.register_context_middleware(auth, transaction)
    dm.register_resources(db=db)
    dm.register_method_middleware(audit)
    return dm


dm = make()


class App:
    """What an application factory returns: an object holding its DataManager."""

    def __init__(self) -> None:
        self.name = "sample"
        self.dm = make()


def create_app() -> App:
    return App()


class TwoManagers:
    def __init__(self) -> None:
        self.replica = make()
        self.primary = make()


two = TwoManagers()
