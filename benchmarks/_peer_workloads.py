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
with one trivial generator middleware. One more, ``STRAIGHT_LINE``, is no library: what
a polydatum lifecycle generated for this one registration would cost (see
:func:`straight_line`), the estimate the benchmarks README gives for closing the gap.

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
from typing import Any, Literal

#: The contenders, in report order; ``PEERS`` are the libraries compared with polydatum.
FLOOR = "hand-written floor"
POLYDATUM = "polydatum"
POLYDATUM_MW = "polydatum + 1 middleware"
STRAIGHT_LINE = "straight-line estimate"
PEERS = ("dishka", "wireup", "svcs")
CONTENDERS = (FLOOR, *PEERS, POLYDATUM, POLYDATUM_MW, STRAIGHT_LINE)

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
            result: str = request_container.get(Users).get(1)
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
            result: str = scope.get(Users).get(1)
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
            result: str = container.get(Users).get(1)
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


def straight_line() -> Workload:
    """polydatum's idle bookkeeping for this one registration (no middleware, the one
    resource ``db``, the one service method), written out straight: what a lifecycle
    generated per DataManager configuration would run. Not a product: an estimate.

    It keeps what the driver does in an idle request -- the context object with its
    DataManager, DAL and read-only Meta; the lifecycle states (polydatum's own
    ``State`` members); the open-context set and the active-context variable (set,
    then reset with its token); the per-context decision that nothing records
    (``dm.observers.start``, polydatum's own); the resource created on first use in a
    ``copy_context()`` of its own (stepped with ``Context.run`` for setup and
    teardown, its ``FINISHED`` / did-not-yield checks); the service call's
    active-context check and its guard against a patched class -- and leaves out
    what a generated lifecycle would decide once: looking the steps up per context,
    the loops over the middleware and resource stacks, the table-driven transitions.
    """
    from contextvars import ContextVar, copy_context
    from types import GeneratorType

    from polydatum import DataManager
    from polydatum.lifecycle import State
    from polydatum.lifecycle.stepping import FINISHED
    from polydatum.meta import Meta

    active: ContextVar[Any] = ContextVar("straight_line_active", default=None)
    active_context = active.get
    open_contexts: set[Any] = set()
    created, entered, exited = State.CREATED, State.ACTIVE, State.EXITED
    tearing_down = State.TEARING_DOWN_RESOURCES
    empty_meta = Meta()
    dm: DataManager[Any] = DataManager()

    class Context:
        __slots__ = (
            "__weakref__",
            "_token",
            "dal",
            "data_manager",
            "meta",
            "observer",
            "resources",
            "stack",
            "state",
        )

        def __init__(self, data_manager: Any, dal: Any) -> None:
            self.data_manager = data_manager
            self.dal = dal
            self.meta = empty_meta
            self.state = created
            self.resources: dict[str, Any] = {}
            self.stack: list[tuple[Any, Any]] = []

        def __enter__(self) -> Any:
            if self.state is not created:
                raise RuntimeError("entered twice")
            self.state = entered
            open_contexts.add(self)
            self._token = active.set(self)
            self.observer = self.data_manager.observers.start(self)
            return self.dal

        def db(self) -> Any:
            resources = self.resources
            if "db" in resources:
                return resources["db"]
            gen = polydatum_db(self)
            if type(gen) is not GeneratorType:
                raise TypeError("not a generator")
            cv = copy_context()
            value = cv.run(next, gen, FINISHED)
            if value is FINISHED:
                raise RuntimeError("did not yield")
            self.stack.append((gen, cv))
            resources["db"] = value
            return value

        def __exit__(self, *exc_info: Any) -> Literal[False]:
            self.state = tearing_down
            stack = self.stack
            while stack:
                gen, cv = stack[-1]
                if exc_info[1] is None and cv.run(next, gen, FINISHED) is not FINISHED:
                    raise RuntimeError("yielded twice")
                stack.pop()
            self.state = exited
            open_contexts.discard(self)
            active.reset(self._token)
            return False

    class StraightUsers:
        def get(self, user_id: int) -> str:
            ctx = active_context()
            if ctx is None:
                raise RuntimeError("no active context")
            return ctx.db()["users"][user_id]  # type: ignore[no-any-return]

    class Method:
        __slots__ = ("function", "service")

        def __init__(self, service: Any, function: Any) -> None:
            self.service = service
            self.function = function

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            ctx = active_context()
            if ctx is None or type(self.service).get is not self.function:
                raise RuntimeError("no active context, or the class was patched")
            return self.function(self.service, *args, **kwargs)

    class Dal:
        def __init__(self) -> None:
            self.users = StraightUsers()
            self.users.get = Method(self.users, StraightUsers.get)  # type: ignore[method-assign]

    dal = Dal()

    def run() -> str:
        with Context(dm, dal) as scope:
            result: str = scope.users.get(1)
        return result

    def empty_scope() -> None:
        with Context(dm, dal):
            pass

    return Workload(STRAIGHT_LINE, run, empty_scope)


BUILDERS: dict[str, Callable[[], Workload]] = {
    FLOOR: floor,
    "dishka": dishka,
    "wireup": wireup,
    "svcs": svcs,
    POLYDATUM: lambda: polydatum(middleware=False),
    POLYDATUM_MW: lambda: polydatum(middleware=True),
    STRAIGHT_LINE: straight_line,
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
