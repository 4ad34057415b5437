"""The two application shapes the benchmark runs, written against polydatum 0.9.1's API only.

This module is imported twice: by ``bench_core.py`` (with this checkout's polydatum)
and by ``_legacy_runner.py`` inside the 0.9.1 virtualenv, so both versions run
byte-for-byte the same application code. It therefore uses nothing newer than
0.9.1 offers: ``DataManager``, ``Service``, generator middleware and resources,
``dm.dal(meta)``, ``self._ctx.<resource>`` and ``self._dal`` for nested calls.

Shape A: 1 context middleware, 1 lazy resource, 1 service call.
Shape B: 5 context middleware, 3 lazy resources, 10 service calls, 4 of them nested
(``orders.summary`` calls ``users.profile.get``, which calls ``users.get``, and
``orders.list``; ``users.profile.get`` is also called directly).

The "work" is deliberately tiny (dictionary look-ups) so that the framework's own
overhead is what the benchmark measures.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

META = {"request_id": "r-0001", "tenant": "acme"}

#: Expected results, checked against both versions before timing.
EXPECTED = {
    "A": "ada",
    "B": [
        "ada",
        {"name": "ada", "lang": "en"},
        [("o-1", 12.5)],
        {"profile": {"name": "ada", "lang": "en"}, "orders": [("o-1", 12.5)]},
        "grace",
        [("o-2", 7.0)],
    ],
}


# --------------------------------------------------------------------------- shape A


def request_id_middleware(ctx: Any) -> Generator[None, None, None]:
    """Reads the request id from the meta on setup; nothing on teardown."""
    ctx.meta.get("request_id")
    yield


def db(ctx: Any) -> Generator[dict[str, Any], None, None]:
    """A stand-in database handle: set up lazily, 'committed' on teardown."""
    handle = {"users": {1: "ada", 2: "grace"}, "committed": False}
    yield handle
    handle["committed"] = True


# --------------------------------------------------------------------------- shape B


def auth_middleware(ctx: Any) -> Generator[None, None, None]:
    ctx.meta.get("request_id")
    yield


def tenant_middleware(ctx: Any) -> Generator[None, None, None]:
    ctx.meta.get("tenant")
    yield


def audit_middleware(ctx: Any) -> Generator[None, None, None]:
    events = ["start"]
    yield
    events.append("end")


def locale_middleware(ctx: Any) -> Generator[None, None, None]:
    ctx.meta.get("locale", "en")
    yield


def quota_middleware(ctx: Any) -> Generator[None, None, None]:
    used = 0
    yield
    used += 1


def cache(ctx: Any) -> Generator[dict[Any, Any], None, None]:
    store: dict[Any, Any] = {1: "en", 2: "fr"}
    yield store
    store.clear()


def blob(ctx: Any) -> Generator[dict[str, Any], None, None]:
    bucket = {"orders": {1: [("o-1", 12.5)], 2: [("o-2", 7.0)]}}
    yield bucket


def build(shape: str, DataManager: Any, Service: Any, **dm_options: Any) -> Any:
    """A DataManager with the services, resources and middleware of ``shape`` ("A" or "B").

    ``DataManager`` and ``Service`` come from whichever polydatum is importable, so
    the same code builds the app on both versions; ``dm_options`` (this checkout
    only) passes explicit tracer/meter providers.
    """

    class Users(Service):  # type: ignore[misc, valid-type]
        def get(self, user_id: int) -> Any:
            return self._ctx.db["users"][user_id]

    class Profiles(Service):  # type: ignore[misc, valid-type]
        def get(self, user_id: int) -> Any:
            lang = self._ctx.cache[user_id]
            return {"name": self._dal.users.get(user_id), "lang": lang}

    class Orders(Service):  # type: ignore[misc, valid-type]
        def list(self, user_id: int) -> Any:
            assert self._ctx.db["users"][user_id]
            return self._ctx.blob["orders"][user_id]

        def summary(self, user_id: int) -> Any:
            return {
                "profile": self._dal.users.profile.get(user_id),
                "orders": self._dal.orders.list(user_id),
            }

    dm = DataManager(**dm_options)
    if shape == "A":
        dm.register_context_middleware(request_id_middleware)
        dm.register_resources(db=db)
        dm.register_services(users=Users())
    elif shape == "B":
        dm.register_context_middleware(
            auth_middleware, tenant_middleware, audit_middleware, locale_middleware,
            quota_middleware,
        )  # fmt: skip
        dm.register_resources(db=db, cache=cache, blob=blob)
        dm.register_services(users=Users().register_services(profile=Profiles()), orders=Orders())
    else:
        raise ValueError(f"unknown shape {shape!r}: use 'A' or 'B'")
    return dm


def request(shape: str, dm: Any) -> Callable[[], Any]:
    """One request of ``shape``: a context through ``dm.dal(meta)`` and its service calls."""
    meta = META
    if shape == "A":

        def run_a() -> Any:
            with dm.dal(meta) as dal:
                return dal.users.get(1)

        return run_a

    def run_b() -> Any:
        with dm.dal(meta) as dal:
            return [
                dal.users.get(1),  # 1 call
                dal.users.profile.get(1),  # 2 calls (1 nested)
                dal.orders.list(1),  # 1 call
                dal.orders.summary(1),  # 4 calls (3 nested)
                dal.users.get(2),  # 1 call
                dal.orders.list(2),  # 1 call
            ]

    return run_b


def timed_batch(run: Callable[[], Any], n: int) -> float:
    """Run ``run`` ``n`` times; the elapsed wall time in seconds (``perf_counter``)."""
    from time import perf_counter

    t0 = perf_counter()
    for _ in range(n):
        run()
    return perf_counter() - t0
