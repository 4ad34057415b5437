"""Startup validation, health pings and ``polydatum inspect``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from polydatum import DataManager, PingResult, Service
from polydatum.cli import main
from polydatum.context import DataAccessContext
from polydatum.errors import ValidationError
from polydatum.testing import TelemetryCapture


class Svc(Service):
    def get(self) -> int:
        return 1


def good(ctx: DataAccessContext) -> Iterator[int]:
    yield 1


def test_validate_reports_every_problem_at_once() -> None:
    dm = DataManager()
    dm.register_services(register_services=Svc(), ok=Svc().register_services(setup=Svc()))
    dm.register_resources(meta=good, dal=good, fine=good)
    dm._middleware.append(lambda ctx: None)  # slipped past registration
    other = DataManager()
    shared = Svc()
    dm.register_services(shared=shared)
    other.register_services(shared=shared)
    with pytest.raises(ValidationError) as info:
        dm.validate()
    problems = info.value.problems
    assert len(problems) == 6
    assert problems[0].startswith("context middleware #0 <function")
    assert problems[0].endswith("is not a generator callable")
    assert problems[1:] == [
        "resource 'meta' collides with DataAccessContext.meta: ctx.meta returns the "
        "attribute, not the resource; rename it",
        "resource 'dal' collides with DataAccessContext.dal: ctx.dal returns the "
        "attribute, not the resource; rename it",
        "service 'register_services' collides with an attribute of the same name on its "
        "parent; dal.register_services would not reach it; rename it",
        "service 'ok.setup' collides with an attribute of the same name on its parent; "
        "dal.ok.setup would not reach it; rename it",
        "service 'shared' is bound to another DataManager (it was registered elsewhere "
        "after this one)",
    ]
    assert str(info.value).startswith("6 problem(s) in the DataManager registration:\n  - ")
    assert dm.validate(raise_on_error=False) == problems


def test_validate_reports_sync_methods_an_async_method_middleware_cannot_wrap() -> None:
    class Books(Service):
        async def get(self, book_id: int) -> int:
            return book_id

        def count(self) -> int:
            return 1

        @staticmethod
        def columns() -> list[str]:
            return []

    class Shelves(Service):
        async def list(self) -> list[str]:
            return []

    async def audit(request: Any, handler: Any) -> Any:
        return await handler(request)

    dm = DataManager()
    dm.register_services(books=Books().register_services(shelves=Shelves()))
    assert dm.validate(raise_on_error=False) == []
    dm.register_method_middleware(audit)
    assert dm.validate(raise_on_error=False) == [
        "method middleware audit is async, so these sync methods cannot be called through "
        "the DAL (each call raises InvalidMiddleware): books.columns, books.count; make "
        "them `async def`, or the middleware a plain function that returns handler(request)"
    ]


def test_validate_clean_manager() -> None:
    dm = DataManager()
    dm.register_services(svc=Svc())
    dm.register_resources(fine=good)
    assert dm.validate() == []


def test_ping_reports_per_resource_and_is_traced(polydatum_telemetry: TelemetryCapture) -> None:
    dm = polydatum_telemetry.data_manager()

    def db(ctx: DataAccessContext) -> Iterator[int]:
        yield 1

    def cache(ctx: DataAccessContext) -> Iterator[int]:
        yield 2

    def down() -> None:
        raise ConnectionRefusedError("cache is down")

    db.ping = lambda: None  # type: ignore[attr-defined]
    cache.ping = down  # type: ignore[attr-defined]
    dm.register_resources(db=db, cache=cache, noping=good)
    results = dm.ping()
    assert set(results) == {"db", "cache"}
    assert results["db"].ok and results["db"].error is None
    assert results["cache"] == PingResult(
        "cache", False, results["cache"].duration_s, "ConnectionRefusedError: cache is down"
    )
    spans = {s.name: s for s in polydatum_telemetry.spans()}
    assert spans["polydatum.resource.ping db"].status == "UNSET"
    assert spans["polydatum.resource.ping cache"].status == "ERROR"
    assert spans["polydatum.resource.ping cache"].attributes == {
        "polydatum.resource.name": "cache",
        "error.type": "ConnectionRefusedError",
    }


async def test_async_ping() -> None:
    dm = DataManager()

    async def ok() -> None:
        return None

    def res(ctx: DataAccessContext) -> Iterator[int]:
        yield 1

    res.ping = ok  # type: ignore[attr-defined]
    dm.register_resources(res=res)
    results = await dm.aping()
    assert results["res"].ok
    sync_results = dm.ping()
    assert sync_results["res"].error == "TypeError: ping of 'res' is async: use `await dm.aping()`"


EXPECTED_INSPECT = """\
Services (dal.…)
└── users  [sample_app.Users]
    · list()
    └── users.profiles  [sample_app.Profiles]
        · get()

Resources (created lazily, torn down most recent first)
  db: sample_app.db (generator) ping

Context middleware
  setup order:
    1. sample_app.auth (generator)
    2. sample_app.transaction (generator)
  teardown order:
    1. sample_app.transaction (generator)
    2. sample_app.auth (generator)

Method middleware (outermost first)
  1. audit
  2. dal_method_resolver_middleware

Validation: ok
"""


def test_inspect_prints_tree_and_both_orders(capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.syspath_prepend("tests")
    assert main(["inspect", "sample_app:dm"]) == 0
    assert capsys.readouterr().out == EXPECTED_INSPECT


def test_inspect_json_and_factory(capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.syspath_prepend("tests")
    assert main(["inspect", "--json", "sample_app:make"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["context_middleware"]["teardown_order"] == [
        "sample_app.transaction (generator)",
        "sample_app.auth (generator)",
    ]
    assert data["problems"] == []


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("nocolon", "polydatum: error: expected MODULE:ATTR (e.g. myapp.data:dm), got 'nocolon'"),
        ("no_such_module_xyz:dm", "polydatum: error: cannot import module 'no_such_module_xyz'"),
        ("sample_app:nope", "polydatum: error: module 'sample_app' has no attribute 'nope'"),
        (
            "sample_app:Users",
            "polydatum: error: sample_app:Users() is of type Users, not a polydatum DataManager: "
            "point at a DataManager, a zero-argument function returning one, or an "
            "application holding one\n",
        ),
        (
            "sample_app:two",
            "polydatum: error: sample_app:two is of type TwoManagers, not a polydatum DataManager, "
            "and it holds several (.primary, .replica): point at one of them, e.g. a "
            "module-level `dm = ...` as MODULE:dm\n",
        ),
    ],
)
def test_inspect_bad_targets(target: str, message: str, capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.syspath_prepend("tests")
    assert main(["inspect", target]) == 2
    assert capsys.readouterr().err.startswith(message)


def test_inspect_finds_the_data_manager_an_app_factory_returns(
    capsys: Any, monkeypatch: Any
) -> None:
    monkeypatch.syspath_prepend("tests")
    assert main(["inspect", "sample_app:create_app"]) == 0
    out = capsys.readouterr()
    assert out.out == EXPECTED_INSPECT
    assert out.err == (
        "polydatum: sample_app:create_app() is of type App, not a polydatum DataManager; "
        "using the DataManager at .dm\n"
    )


def test_describe_lists_methods_without_running_descriptors() -> None:
    """A property or a ServiceSafe on a service needs an active context: inspecting a
    registration must list the methods without touching them."""
    from polydatum.safe import ServiceSafe

    class Reports(Service):
        safe = ServiceSafe("reports")

        @property
        def current_user(self) -> Any:
            return self._ctx.meta.user  # raises: no context is active

        def daily(self) -> list[int]:
            return []

        @staticmethod
        def columns() -> list[str]:
            return ["day"]

        @classmethod
        def create(cls) -> Reports:
            return cls()

    dm = DataManager()
    dm.register_services(reports=Reports())
    assert dm.describe()["services"] == {
        "reports": {
            "class": f"{Reports.__module__}.{Reports.__qualname__}",
            "methods": ["columns", "create", "daily"],
            "services": {},
        }
    }


def test_console_script_is_installed() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "polydatum.cli", "inspect", "sample_app:dm"],
        capture_output=True,
        text=True,
        cwd="tests",
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == EXPECTED_INSPECT


MINIMAL_INSTALL = """
import sys
# What a bare `pip install polydatum` lacks (the extras), made unimportable.
for name in ("rich", "opentelemetry.sdk", "sqlalchemy", "fastapi", "flask", "celery"):
    sys.modules[name] = None
from polydatum.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_minimal(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "bare_app.py").write_text("from polydatum import DataManager\ndm = DataManager()\n")
    return subprocess.run(
        [sys.executable, "-c", MINIMAL_INSTALL, *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_every_subcommand_exists_in_a_minimal_install_and_names_its_extra(
    tmp_path: Path,
) -> None:
    listed = run_minimal(tmp_path, "--help")
    assert listed.returncode == 0, listed.stderr
    assert "{inspect,trace,demo}" in listed.stdout
    demo = run_minimal(tmp_path, "demo", "--requests", "3")
    assert (demo.returncode, demo.stdout) == (2, "")
    assert demo.stderr.startswith("polydatum: error: polydatum demo needs ")
    assert demo.stderr.endswith(", which is not installed: pip install 'polydatum[cli,sdk,sql]'\n")
    trace = run_minimal(tmp_path, "trace", "bare_app:dm", "books.get(1)")
    assert (trace.returncode, trace.stdout) == (2, "")
    assert trace.stderr == (
        "polydatum: error: polydatum trace needs the OpenTelemetry SDK, which is not "
        "installed: pip install 'polydatum[cli,sdk]'\n"
    )
    inspected = run_minimal(tmp_path, "inspect", "bare_app:dm")
    assert inspected.returncode == 0, inspected.stderr
    wrong = run_minimal(tmp_path, "inspect", "bare_app:dm", "--bogus")
    assert wrong.returncode == 2
    assert wrong.stderr.endswith("polydatum: error: unrecognized arguments: --bogus\n")
