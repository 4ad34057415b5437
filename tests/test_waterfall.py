"""The terminal waterfall and ``polydatum trace``."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.trace import SpanContext, Status, StatusCode

from polydatum import DataManager, Service
from polydatum.cli import main as cli_main
from polydatum.testing import TelemetryCapture
from polydatum.waterfall import (
    CallSpecError,
    contexts,
    exception_path,
    format_duration,
    parse_call,
    print_waterfall,
    render_text,
    teardown_errors,
    to_dict,
)

TRACE = 0xABC
MS = 1_000_000


def span(
    name: str,
    sid: int,
    parent: int | None,
    start_ms: float,
    end_ms: float,
    attrs: dict[str, Any] | None = None,
    error: tuple[str, str] | None = None,
) -> ReadableSpan:
    """A finished SDK span with fixed times (so the rendering is exact)."""
    events = []
    status = Status(StatusCode.UNSET)
    if error is not None:
        status = Status(StatusCode.ERROR, f"{error[0]}: {error[1]}")
        events.append(
            Event("exception", {"exception.type": error[0], "exception.message": error[1]})
        )
    return ReadableSpan(
        name=name,
        context=SpanContext(TRACE, sid, is_remote=False),
        parent=SpanContext(TRACE, parent, is_remote=False) if parent else None,
        attributes=attrs or {},
        events=events,
        status=status,
        start_time=int(start_ms * MS),
        end_time=int(end_ms * MS),
    )


def mw(phase: str, name: str, pos: int, **attrs: Any) -> dict[str, Any]:
    return {"polydatum.middleware.name": name, "polydatum.middleware.position": pos, **attrs}


@pytest.fixture
def failing_request() -> list[ReadableSpan]:
    return failing_spans()


def failing_spans() -> list[ReadableSpan]:
    """auth replaces the service's KeyError with PermissionError; cache teardown fails."""
    return [
        span(
            "polydatum.context", 1, None, 0, 10,
            {"polydatum.context.id": "c0ffee", "polydatum.teardown_errors": 1,
             "error.type": "PermissionError"},
            ("PermissionError", "denied"),
        ),
        span("polydatum.middleware.setup auth", 2, 1, 0, 1, mw("setup", "auth", 0)),
        span("shop.books.get", 3, 1, 1, 6,
             {"polydatum.service.path": "shop.books.get", "error.type": "KeyError"},
             ("KeyError", "'nope'")),
        span("polydatum.resource.setup cache", 4, 3, 1.5, 2, {"polydatum.resource.name": "cache"}),
        span("polydatum.middleware.teardown auth", 5, 1, 6, 7,
             mw("teardown", "auth", 0, **{"polydatum.outcome": "raised",
                                          "polydatum.exception.seen": "KeyError",
                                          "error.type": "PermissionError"}),
             ("PermissionError", "denied")),
        span("polydatum.resource.teardown cache", 6, 1, 7, 10,
             {"polydatum.resource.name": "cache", "polydatum.outcome": "raised",
              "polydatum.exception.seen": "PermissionError",
              "error.type": "ConnectionResetError"},
             ("ConnectionResetError", "flush failed")),
    ]  # fmt: skip


def test_render_text_is_exact(failing_request: list[ReadableSpan]) -> None:
    (ctx,) = contexts(failing_request)
    expected = """\
                              0                           10.0 ms
context c0ffee                ███████████████████████████████████   10.0 ms ✗ raised PermissionErro…
├─ auth · middleware setup    ████                                  1.00 ms
├─ shop.books.get                ██████████████████                 5.00 ms ✗ KeyError: 'nope'
│  └─ cache · resource setup       ██                                500 µs
├─ auth · middleware teardown                      ███              1.00 ms KeyError → replaced: Pe…
└─ cache · resource teardown                          ███████████   3.00 ms ⚠ suppressed Connection…

Exception path
  1. shop.books.get raised KeyError: 'nope'
  2. middleware auth saw KeyError and replaced it with PermissionError: denied
  3. resource cache saw PermissionError on teardown
  → PermissionError: denied raised out of the context

Suppressed teardown errors
  ⚠ cache: ConnectionResetError: flush failed
"""
    assert render_text(ctx, width=100) == expected


def test_notes_are_cut_but_the_exception_path_is_complete(
    failing_request: list[ReadableSpan],
) -> None:
    (ctx,) = contexts(failing_request)
    lines = render_text(ctx, width=80).splitlines()
    assert max(len(line) for line in lines) == 80
    assert lines[5].endswith("…")
    assert "  2. middleware auth saw KeyError and replaced it with PermissionError: denied" in lines


SQL_ERROR = "(sqlite3.OperationalError) no such table: books\n[SQL: SELECT *\nFROM books]"


def test_multi_line_messages_keep_rows_on_one_line() -> None:
    """A SQLAlchemy error goes on with the SQL: the table shows its first line, the
    exception path and the teardown errors show all of it, indented under its number."""
    spans = [
        span("polydatum.context", 1, None, 0, 10,
             {"polydatum.context.id": "c0ffee", "polydatum.teardown_errors": 1,
              "error.type": "OperationalError"},
             ("OperationalError", SQL_ERROR)),
        span("shop.books.get", 2, 1, 0, 6,
             {"polydatum.service.path": "shop.books.get", "error.type": "OperationalError"},
             ("OperationalError", SQL_ERROR)),
        span("polydatum.resource.teardown db", 3, 1, 6, 10,
             {"polydatum.resource.name": "db", "polydatum.outcome": "raised",
              "polydatum.exception.seen": "OperationalError",
              "error.type": "InterfaceError"},
             ("InterfaceError", "connection lost\nwhile closing")),
    ]  # fmt: skip
    (ctx,) = contexts(spans)
    expected = """\
                          0                           10.0 ms
context c0ffee            ███████████████████████████████████   10.0 ms ✗ raised OperationalError; …
├─ shop.books.get         █████████████████████                 6.00 ms ✗ OperationalError: (sqlite…
└─ db · resource teardown                      ██████████████   4.00 ms ⚠ suppressed InterfaceError…

Exception path
  1. shop.books.get raised OperationalError: (sqlite3.OperationalError) no such table: books
     [SQL: SELECT *
     FROM books]
  2. resource db saw OperationalError on teardown
  → OperationalError: (sqlite3.OperationalError) no such table: books
    [SQL: SELECT *
    FROM books] raised out of the context

Suppressed teardown errors
  ⚠ db: InterfaceError: connection lost
    while closing
"""
    assert render_text(ctx, width=100) == expected
    wide = render_text(ctx, width=200).splitlines()
    assert wide[2].endswith("✗ OperationalError: (sqlite3.OperationalError) no such table: books …")
    assert wide[3].endswith("⚠ suppressed InterfaceError: connection lost …")


def test_colour_only_on_a_terminal(failing_request: list[ReadableSpan]) -> None:
    (ctx,) = contexts(failing_request)
    plain, coloured = io.StringIO(), io.StringIO()
    print_waterfall(ctx, file=plain, width=120)  # a StringIO is not a TTY
    print_waterfall(ctx, file=coloured, width=120, color=True)
    assert "\x1b[" not in plain.getvalue()
    assert "\x1b[" in coloured.getvalue()
    assert not any(line.endswith(" ") for line in plain.getvalue().splitlines())


def test_to_dict(failing_request: list[ReadableSpan]) -> None:
    (ctx,) = contexts(failing_request)
    data = to_dict(ctx)
    assert data["context_id"] == "c0ffee"
    assert data["teardown_errors"] == ["cache: ConnectionResetError: flush failed"]
    assert [(c["name"], c["offset_us"], c["duration_us"]) for c in data["children"]] == [
        ("polydatum.middleware.setup auth", 0.0, 1000.0),
        ("shop.books.get", 1000.0, 5000.0),
        ("polydatum.middleware.teardown auth", 6000.0, 1000.0),
        ("polydatum.resource.teardown cache", 7000.0, 3000.0),
    ]
    assert data["children"][2]["polydatum.outcome"] == "raised"
    json.dumps(data)


def test_format_duration() -> None:
    assert [format_duration(n) for n in (850, 12_400, 2_500_000, 12_400_000, 1_250_000_000)] == [
        "1 µs",
        "12 µs",
        "2.50 ms",
        "12.4 ms",
        "1.25 s",
    ]


# -------------------------------------------------------- with a real DataManager


class Books(Service):
    def get(self, book_id: int) -> dict[str, Any]:
        self._ctx.db
        if book_id < 0:
            raise LookupError(f"no book {book_id}")
        return {"id": book_id}


def tolerant(ctx: Any) -> Iterator[None]:
    try:
        yield
    except LookupError:
        pass  # suppressed


def passthrough(ctx: Any) -> Iterator[None]:
    yield


def db(ctx: Any) -> Iterator[str]:
    yield "session"


def flaky(ctx: Any) -> Iterator[dict[str, Any]]:
    yield {}
    raise ConnectionResetError("flush failed")


def make_dm(cap: TelemetryCapture) -> DataManager:
    dm = cap.data_manager()
    dm.register_context_middleware(tolerant, passthrough)
    dm.register_resources(db=db, flaky=flaky)
    dm.register_services(books=Books())
    return dm


def test_suppression_path_from_real_spans() -> None:
    with TelemetryCapture() as cap:
        dm = make_dm(cap)
        with dm.context() as ctx:
            ctx.flaky
            ctx.dal.books.get(-1)
        (step,) = contexts(cap.finished_spans())
    assert exception_path(step) == [
        "books.get raised LookupError: no book -1",
        "middleware passthrough saw LookupError and let it through",
        "middleware tolerant saw LookupError and suppressed it",
        "→ suppressed: the with block completed normally",
    ]
    assert teardown_errors(step) == ["flaky: ConnectionResetError: flush failed"]
    text = render_text(step, width=200)
    rows = [line.split("█")[0].rstrip() for line in text.splitlines()[1:8]]
    assert rows == [
        f"context {step.attributes['polydatum.context.id']}",
        "├─ tolerant · middleware setup",
        "├─ passthrough · middleware setup",
        "├─ flaky · resource setup",
        "├─ books.get",
        "│  └─ db · resource setup",
        "├─ passthrough · middleware teardown",
    ]
    assert "LookupError suppressed by middleware; ⚠ 1 teardown error suppressed" in text
    assert "LookupError → suppressed" in text


def test_no_exception_path_for_a_clean_context() -> None:
    with TelemetryCapture() as cap:
        dm = make_dm(cap)
        with dm.dal() as dal:
            dal.books.get(1)
        (step,) = contexts(cap.finished_spans())
    assert exception_path(step) == []
    assert teardown_errors(step) == []
    assert "Exception path" not in render_text(step)


# ------------------------------------------------------------------ polydatum trace


def test_parse_call() -> None:
    assert parse_call("users.profile.get(42, fields=['a'], active=True)") == (
        "users.profile.get",
        [42],
        {"fields": ["a"], "active": True},
    )
    assert parse_call("dal.books.search('x')") == ("books.search", ["x"], {})
    with pytest.raises(CallSpecError, match="must be Python literals"):
        parse_call("books.get(os.system('x'))")
    with pytest.raises(CallSpecError, match="is not a call"):
        parse_call("books.get")
    with pytest.raises(CallSpecError, match="names no method"):
        parse_call("get(1)")
    with pytest.raises(CallSpecError, match="cannot parse"):
        parse_call("books.get(")


APP = """
from polydatum import DataManager, Service

class Books(Service):
    def get(self, book_id):
        self._ctx.db
        if book_id < 0:
            raise LookupError(f"no book {book_id}")
        return {"id": book_id, "user": self._ctx.meta.user}

def db(ctx):
    yield "session"

def audit(ctx):
    yield

dm = DataManager()
dm.register_context_middleware(audit)
dm.register_resources(db=db)
dm.register_services(books=Books())
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "trace_app.py").write_text(textwrap.dedent(APP))
    return tmp_path


def run_cli(app_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from polydatum.cli import main; sys.exit(main())",
         *args],
        cwd=app_dir, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_trace_command_prints_the_waterfall(app_dir: Path) -> None:
    done = run_cli(app_dir, "trace", "trace_app:dm", "books.get(7)", "--meta", "user=alice")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "polydatum trace · books.get(7)"
    assert [line.split("█")[0].rstrip() for line in lines[2:7]] == [
        lines[2].split("█")[0].rstrip(),
        "├─ audit · middleware setup",
        "├─ books.get",
        "│  └─ db · resource setup",
        "├─ audit · middleware teardown",
    ]
    assert lines[2].startswith("context ")
    assert lines[-1] == "result: {'id': 7, 'user': 'alice'}"
    assert "\x1b[" not in done.stdout


def test_trace_command_failure_and_json(app_dir: Path) -> None:
    done = run_cli(app_dir, "trace", "trace_app:dm", "books.get(-2)", "--json")
    assert done.returncode == 1
    data = json.loads(done.stdout)
    assert data["error"] == "LookupError: no book -2"
    assert data["exception_path"] == [
        "books.get raised LookupError: no book -2",
        "middleware audit saw LookupError and let it through",
        "resource db saw LookupError on teardown",
        "→ LookupError: no book -2 raised out of the context",
    ]
    assert [c["name"] for c in data["children"]] == [
        "polydatum.middleware.setup audit",
        "books.get",
        "polydatum.middleware.teardown audit",
        "polydatum.resource.teardown db",
    ]


def test_trace_command_errors_are_one_line(app_dir: Path, capsys: Any) -> None:
    done = run_cli(app_dir, "trace", "trace_app:dm", "books.get(")
    assert done.returncode == 2
    assert done.stderr.startswith("polydatum: error: cannot parse 'books.get(': ")
    assert len(done.stderr.splitlines()) == 1
    assert cli_main(["trace", "nosuchmodule_xyz:dm", "a.b()"]) == 2
    assert "cannot import module 'nosuchmodule_xyz'" in capsys.readouterr().err


ASYNC_APP = """
from polydatum import DataManager, Service

class Books(Service):
    async def get(self, book_id):
        session = await self._ctx.aresource("db")
        return {"id": book_id, "session": session}

async def db(ctx):
    yield "async-session"

async def audit(ctx):
    yield

dm = DataManager()
dm.register_context_middleware(audit)
dm.register_resources(db=db)
dm.register_services(books=Books())

# The same DataManager inside the applications that serve it, for `--target app:...`.
from fastapi import FastAPI
from flask import Flask
from polydatum.integrations.asgi import PolydatumMiddleware
from polydatum.integrations.flask import init_app

fastapi_app = FastAPI()
fastapi_app.add_middleware(PolydatumMiddleware, data_manager=dm)
flask_app = Flask("books")
init_app(flask_app, dm)

def create_fastapi_app():
    return fastapi_app
"""


@pytest.fixture
def async_app_dir(tmp_path: Path) -> Path:
    (tmp_path / "async_trace_app.py").write_text(textwrap.dedent(ASYNC_APP))
    return tmp_path


def test_trace_runs_an_async_data_manager(async_app_dir: Path) -> None:
    done = run_cli(async_app_dir, "trace", "async_trace_app:dm", "books.get(3)", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["error"] is None
    assert data["result"] == "{'id': 3, 'session': 'async-session'}"
    assert [c["name"] for c in data["children"]] == [
        "polydatum.middleware.setup audit",
        "books.get",
        "polydatum.middleware.teardown audit",
        "polydatum.resource.teardown db",
    ]


@pytest.mark.parametrize(
    ("target", "where"),
    [
        ("async_trace_app:fastapi_app", ".user_middleware[0].kwargs['data_manager']"),
        ("async_trace_app:create_fastapi_app", ".user_middleware[0].kwargs['data_manager']"),
        ("async_trace_app:flask_app", ".extensions['polydatum'].data_manager"),
    ],
)
def test_trace_and_inspect_find_the_data_manager_an_app_holds(
    async_app_dir: Path, target: str, where: str
) -> None:
    done = run_cli(async_app_dir, "trace", target, "books.get(4)", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == "{'id': 4, 'session': 'async-session'}"
    called = "()" if target.endswith("create_fastapi_app") else ""
    kind = "FastAPI" if "fastapi" in target else "Flask"
    assert done.stderr == (
        f"polydatum: {target}{called} is of type {kind}, not a polydatum DataManager; "
        f"using the DataManager at {where}\n"
    )
    inspected = run_cli(async_app_dir, "inspect", target)
    assert inspected.returncode == 0, inspected.stderr
    assert "books" in inspected.stdout
