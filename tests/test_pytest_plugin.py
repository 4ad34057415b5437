"""The pytest plugin, loaded through its ``pytest11`` entry point in a fresh pytest
process (``pytester.runpytest_subprocess``): no conftest, no ``-p`` option."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

USER_TESTS = """
from collections.abc import Iterator

import pytest

from polydatum import Service
from polydatum.testing import MetricPoint, SpanRecord


class Users(Service):
    def get(self, user_id):
        return self._ctx.db[user_id]


class FakeUsers(Service):
    def get(self, user_id):
        return "fake"


def db(ctx) -> Iterator[dict]:
    yield {1: "ada"}


def broken_db(ctx) -> Iterator[dict]:
    try:
        yield {1: "ada"}
    finally:
        raise OSError("close failed")


@pytest.fixture
def dm(polydatum_telemetry):
    dm = polydatum_telemetry.data_manager()
    dm.register_services(users=Users())
    dm.register_resources(db=db)
    return dm


def test_spans_are_isolated_records(dm, polydatum_telemetry, assert_resources_torn_down):
    with dm.dal() as dal:
        assert dal.users.get(1) == "ada"
    assert polydatum_telemetry.tree() == [
        ("polydatum.context", [
            ("users.get", [("polydatum.resource.setup db", [])]),
            ("polydatum.resource.teardown db", []),
        ])
    ]
    assert polydatum_telemetry.span("users.get") == SpanRecord(
        "users.get", "polydatum.context", "UNSET",
        {"polydatum.service.path": "users.get", "code.function.name": "test_user.Users.get"},
    )
    assert_resources_torn_down(polydatum_telemetry)


def test_metric_points(dm, polydatum_metrics, polydatum_telemetry):
    with dm.dal() as dal:
        dal.users.get(1)
    (point,) = polydatum_metrics("polydatum.context.duration")
    assert (point.name, point.value, dict(point.attributes)) == (
        "polydatum.context.duration", 1, {})
    assert polydatum_telemetry.metric("polydatum.service.duration",
                                      **{"polydatum.service.path": "users.get"}).value == 1
    assert isinstance(point, MetricPoint)


def test_log_events(dm, polydatum_logs):
    dm.replace_resource("db", broken_db)
    with dm.dal() as dal:
        dal.users.get(1)
    assert [(e["event"], e["resource"], e["error_type"]) for e in polydatum_logs("warning")] == [
        ("polydatum.resource.teardown_error_suppressed", "db", "OSError")
    ]
    assert [e["event"] for e in polydatum_logs("info")] == ["polydatum.context"]


def test_override_is_scoped_to_one_test(dm, polydatum_override):
    polydatum_override(dm, users=FakeUsers())
    with dm.dal() as dal:
        assert dal.users.get(1) == "fake"


def test_override_was_restored(dm):
    with dm.dal() as dal:
        assert dal.users.get(1) == "ada"


def test_unknown_override_name_fails(dm, polydatum_override):
    with pytest.raises(KeyError, match="'userz' is neither a registered service nor a resource"):
        polydatum_override(dm, userz=FakeUsers())


def test_registered_under_its_entry_point_name(request):
    import polydatum.pytest_plugin

    assert request.config.pluginmanager.get_plugin("polydatum") is polydatum.pytest_plugin


def test_leaked_resource_is_reported(polydatum_telemetry, assert_resources_torn_down):
    dm = polydatum_telemetry.data_manager()
    dm.register_resources(db=db)
    ctx = dm.context()
    ctx.__enter__()
    ctx.db  # set up, and the context is never exited: no teardown span
    with pytest.raises(AssertionError, match="resources not torn down exactly once"):
        assert_resources_torn_down(polydatum_telemetry)


def test_structlog_is_left_unconfigured_after_the_captures():
    # The tests above captured logs; structlog was never configured in this process,
    # so it is not now, and a context that records nothing is idle again.
    import structlog

    from polydatum import DataManager

    assert not structlog.is_configured()
    with DataManager().context() as ctx:
        assert ctx._telemetry is None
"""


def test_plugin_loads_from_its_entry_point(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=9)
