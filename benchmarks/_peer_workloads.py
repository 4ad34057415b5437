"""One request, for polydatum and for the dependency-injection containers users pick instead.

The request (the same for every contender):

1. open a request scope;
2. make one service call; the service needs the request's *session*, a generator
   resource created lazily, on first use (a ``Session`` dict);
3. the service returns a value read from the session;
4. close the scope: the session's teardown runs (it sets a flag).

Contenders (see ``CONTENDERS``): the hand-written floor (the generator stepped by
hand: the minimum), dishka (sync container, a REQUEST-scoped generator provider and a
REQUEST-scoped service class depending on it), wireup (a sync container's scope, a
scoped generator factory and a scoped service class), svcs (a ``Registry`` with a
generator factory and a service factory that takes the container, one
``svcs.Container`` per request), polydatum without context middleware, and polydatum
with one trivial generator middleware.

Each DI container builds the service per request with the session injected into its
constructor (what their documentation shows for a service that needs a request
resource); polydatum's service is registered once and reads the resource through its
context, and the floor calls a module-level service object with the session. That is
each library used as it is meant to be used, not one shape forced on all.

Every session is created and torn down by the same code (``session()``, and
``polydatum_db()``, which has the same body with polydatum's resource signature); it
counts both in ``TALLY``, which ``check()`` reads before anything is measured and
each measured child reads at its end.

The peers are imported inside their builders: a missing one fails only its own
contender (``bench_peers.py`` says which group to install).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

#: The contenders, in report order; ``PEERS`` are the libraries compared with polydatum.
FLOOR = "hand-written floor"
POLYDATUM = "polydatum"
POLYDATUM_MW = "polydatum + 1 middleware"
PEERS = ("dishka", "wireup", "svcs")
CONTENDERS = (FLOOR, *PEERS, POLYDATUM, POLYDATUM_MW)

#: What one request returns.
EXPECTED = "ada"
USERS = {1: "ada", 2: "grace"}


class Tally:
    """Sessions created and torn down since the last ``reset()``."""

    created = 0
    torn_down = 0

    @classmethod
    def reset(cls) -> None:
        cls.created = 0
        cls.torn_down = 0


TALLY = Tally


class Session(dict[str, Any]):
    """The request's resource: a dict, its own type so that the containers can key on it."""


def session() -> Iterator[Session]:
    """The generator resource of the peers and the floor: created on first use, torn down."""
    handle = Session(users=USERS, closed=False)
    TALLY.created += 1
    try:
        yield handle
    finally:
        handle["closed"] = True
        TALLY.torn_down += 1


def polydatum_db(ctx: Any) -> Iterator[Session]:
    """``session()`` with polydatum's resource signature (the context is the argument)."""
    handle = Session(users=USERS, closed=False)
    TALLY.created += 1
    try:
        yield handle
    finally:
        handle["closed"] = True
        TALLY.torn_down += 1


class Users:
    """The service of the DI containers: built per request with the session injected."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, user_id: int) -> str:
        return self.session["users"][user_id]  # type: ignore[no-any-return]


class FloorUsers:
    """The floor's service: one object, the session passed to the call."""

    def get(self, session: Session, user_id: int) -> str:
        return session["users"][user_id]  # type: ignore[no-any-return]


def trivial_middleware(ctx: Any) -> Iterator[None]:
    """polydatum's one context middleware: nothing before or after the request."""
    yield


@dataclass(frozen=True)
class Workload:
    """One contender: a request, and the same scope opened and closed with no call in it."""

    name: str
    run: Callable[[], str]
    #: Opens and closes a request scope without using the service: must create no session.
    empty_scope: Callable[[], None]
    #: polydatum's DataManager (to check that its contexts take the idle path), else None.
    dm: Any = None


# ----------------------------------------------------------------------------- builders


def floor() -> Workload:
    users = FloorUsers()

    def run() -> str:
        gen = session()
        handle = next(gen)
        try:
            return users.get(handle, 1)
        finally:
            next(gen, None)  # the teardown (after the yield), as a context exit runs it

    def empty_scope() -> None:
        pass  # nothing is opened before the first use

    return Workload(FLOOR, run, empty_scope)


def dishka() -> Workload:
    from dishka import Provider, Scope, make_container

    provider = Provider(scope=Scope.REQUEST)
    provider.provide(session)
    provider.provide(Users)
    container = make_container(provider)

    def run() -> str:
        with container() as request_container:
            result = request_container.get(Users).get(1)
        return result

    def empty_scope() -> None:
        with container():
            pass

    return Workload("dishka", run, empty_scope)


def wireup() -> Workload:
    import wireup

    # wireup.injectable marks the shared session() and Users in place (an attribute that
    # the container reads when it is created); the other contenders never look at it.
    container = wireup.create_sync_container(
        injectables=[
            wireup.injectable(session, lifetime="scoped"),
            wireup.injectable(Users, lifetime="scoped"),
        ]
    )

    def run() -> str:
        with container.enter_scope() as scope:
            result = scope.get(Users).get(1)
        return result

    def empty_scope() -> None:
        with container.enter_scope():
            pass

    return Workload("wireup", run, empty_scope)


def svcs() -> Workload:
    import svcs

    def users_factory(svcs_container: svcs.Container) -> Users:
        return Users(svcs_container.get(Session))

    registry = svcs.Registry()
    registry.register_factory(Session, session)  # a generator: its cleanup runs on close
    registry.register_factory(Users, users_factory)

    def run() -> str:
        with svcs.Container(registry) as container:
            result = container.get(Users).get(1)
        return result

    def empty_scope() -> None:
        with svcs.Container(registry):
            pass

    return Workload("svcs", run, empty_scope)


def polydatum(middleware: bool) -> Workload:
    from polydatum import DataManager, Service

    class PolydatumUsers(Service):
        def get(self, user_id: int) -> str:
            return self._ctx.db["users"][user_id]  # type: ignore[no-any-return]

    dm: DataManager[Any] = DataManager()
    if middleware:
        dm.register_context_middleware(trivial_middleware)
    dm.register_resources(db=polydatum_db)
    dm.register_services(users=PolydatumUsers())

    def run() -> str:
        with dm.dal() as dal:
            result: str = dal.users.get(1)
        return result

    def empty_scope() -> None:
        with dm.dal():
            pass

    return Workload(POLYDATUM_MW if middleware else POLYDATUM, run, empty_scope, dm)


BUILDERS: dict[str, Callable[[], Workload]] = {
    FLOOR: floor,
    "dishka": dishka,
    "wireup": wireup,
    "svcs": svcs,
    POLYDATUM: lambda: polydatum(middleware=False),
    POLYDATUM_MW: lambda: polydatum(middleware=True),
}


def build(name: str) -> Workload:
    try:
        return BUILDERS[name]()
    except KeyError:
        raise ValueError(f"unknown contender {name!r}: one of {', '.join(CONTENDERS)}") from None


def check(workload: Workload, requests: int = 3) -> dict[str, Any]:
    """Run ``requests`` requests and an empty scope; what the session counters saw.

    Passes when every request returned ``EXPECTED`` and, right after it, exactly one
    more session had been created and torn down (so the teardown ran when the scope
    closed, not later), and the empty scope created none (the session is lazy).
    """
    TALLY.reset()
    workload.empty_scope()
    lazy = TALLY.created == 0 and TALLY.torn_down == 0
    per_request = []
    results = []
    for i in range(1, requests + 1):
        results.append(workload.run())
        per_request.append(TALLY.created == i and TALLY.torn_down == i)
    report = {
        "requests": requests,
        "results": results,
        "created": TALLY.created,
        "torn_down": TALLY.torn_down,
        "lazy": lazy,
        "once_per_request": all(per_request),
    }
    report["passed"] = (
        lazy
        and all(per_request)
        and results == [EXPECTED] * requests
        and TALLY.created == TALLY.torn_down == requests
    )
    TALLY.reset()
    return report
