"""What a DAL path may reach, and how a hostile path is refused (issue 15, point 8).

A DAL path can come from untrusted input (``dal[request.args["op"]]``), so only code
written as a service method is reachable, and an over-long path is refused before any
look-up with a message of bounded length.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import pytest

from polydatum import DataManager, Service
from polydatum.errors import MAX_DAL_PATH_LENGTH, MAX_DAL_PATH_SEGMENTS, DalMethodError


class Jobs(Service):
    opener = open  # a builtin stored on the class
    label = str.upper  # a method descriptor of a builtin type
    maker = functools.partial(dict, a=1)  # a callable object

    class Nested:
        pass

    @property
    def current(self) -> str:
        return "current"

    def run(self, name: str) -> str:
        return f"ran {name}"

    async def run_later(self) -> str:
        return "later"

    @staticmethod
    def static() -> str:
        return "static"

    @classmethod
    def klass(cls) -> str:
        return cls.__name__

    @functools.lru_cache  # noqa: B019 - a decorated method stays reachable
    def cached(self) -> str:
        return "cached"


@pytest.fixture
def dm() -> DataManager:
    manager = DataManager()
    manager.register_services(jobs=Jobs())
    return manager


def test_methods_written_on_the_service_are_reachable(dm: DataManager) -> None:
    with dm.dal() as dal:
        assert dal.jobs.run("a") == "ran a"
        assert dal["jobs.static"]() == "static"
        assert dal["jobs.klass"]() == "Jobs"
        assert dal["jobs.cached"]() == "cached"


async def test_async_methods_are_reachable(dm: DataManager) -> None:
    async with dm.dal() as dal:
        assert await dal["jobs.run_later"]() == "later"


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("opener", "builtin_function_or_method"),
        ("label", "method_descriptor"),
        ("maker", "partial"),
        ("Nested", "type"),
        ("current", "property"),
    ],
)
def test_other_class_attributes_are_not_reachable(dm: DataManager, name: str, kind: str) -> None:
    with dm.dal() as dal, pytest.raises(DalMethodError) as caught:
        dal[f"jobs.{name}"]("/etc/hostname")
    assert str(caught.value) == (
        f"Invalid dal method: jobs.{name} (Jobs.{name} is not a method: {kind})"
    )


def test_a_path_over_the_limit_is_refused_at_once_with_an_excerpt(dm: DataManager) -> None:
    path = "a" * 2_000_000
    with dm.dal() as dal:
        started = time.perf_counter()
        with pytest.raises(DalMethodError) as caught:
            dal[path]
        elapsed = time.perf_counter() - started
    assert str(caught.value) == (
        "Invalid dal method: "
        + "a" * 80
        + "… (a DAL path is at most 512 characters and 32 segments; "
        + "this one has 2000000 characters)"
    )
    assert elapsed < 0.5  # linear in the path; quadratic work would take seconds


def test_the_limits_themselves_are_accepted(dm: DataManager) -> None:
    longest = "jobs." + "x" * (MAX_DAL_PATH_LENGTH - len("jobs."))
    deepest = ".".join(["jobs"] + ["x"] * (MAX_DAL_PATH_SEGMENTS - 1))
    with dm.dal() as dal:
        for path in (longest, deepest):
            with pytest.raises(DalMethodError) as caught:
                dal[path]()  # accepted, then not found when called
            assert "at most" not in str(caught.value)
        with pytest.raises(DalMethodError, match="at most 512 characters and 32 segments"):
            dal[longest + "x"]
        with pytest.raises(DalMethodError, match="at most 512 characters and 32 segments"):
            dal[deepest + ".x.y"]


def test_a_long_name_in_attribute_access_gives_a_short_message(dm: DataManager) -> None:
    # Below a name that is no registered service, attribute access builds commands; on
    # a registered service (the Service object itself) it is Python's own look-up.
    name = "x" * 2_000_000
    command: Any
    with dm.dal() as dal:
        command = getattr(dal.jobz, name)
        with pytest.raises(DalMethodError) as caught:
            command()
    message = str(caught.value)
    assert len(message) < 400
    assert message == "Invalid dal method: jobz." + "x" * 75 + "… (no service named 'jobz')"


def test_the_command_caches_are_bounded_in_total() -> None:
    """``getattr`` with untrusted names, spread over many levels, caches at most
    MAX_CACHED_COMMANDS commands per DAL (the per-level bound alone let 300k names
    grow memory by ~74 MB)."""
    import tracemalloc

    from polydatum.access import MAX_CACHED_COMMANDS

    dm = DataManager()
    dm.register_services(jobs=Jobs())

    def cached(command: Any) -> int:
        children = [v for v in command.__dict__.values() if hasattr(v, "names")]
        return len(children) + sum(cached(child) for child in children)

    with dm.dal() as dal:
        tracemalloc.start()
        try:
            for i in range(300):  # 300 parents x 1,000 children: 300,000 names
                parent = getattr(dal, f"p{i}")
                for j in range(1000):
                    getattr(parent, f"n{j}")
            grown, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        top = dal.__dict__["_commands"]
        total = len(top) + sum(cached(command) for command in top.values())
        assert total == MAX_CACHED_COMMANDS
        assert grown < 20_000_000, f"{grown} bytes kept"
        assert dal.jobs.run("x") == "ran x"  # and the DAL still works, cached or not
        assert dal.p299.n999.names == ("p299", "n999")
