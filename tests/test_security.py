"""Hostile input: DAL string paths, Meta values in telemetry, exception records.

* A DAL path built from untrusted input (``dal['...']``, as a queued command would)
  reaches public methods of registered services and nothing else: dunder names,
  ``_private`` names, Service plumbing, attribute chains into resources, the
  DataManager or plain attributes all raise ``DalMethodError`` (fuzzed).
* Meta values never reach spans or logs unless allow-listed, and secret-looking keys
  are redacted even when allow-listed, at any nesting depth (fuzzed key spellings).
* Exceptions recorded on spans and in the JSON logs carry no local variable values.

(That the safe refuses pickle unless enabled is proven by
``tests/test_safe.py::test_pickle_refused_unless_enabled``.)
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polydatum import DataManager, Service
from polydatum.errors import DalMethodError
from polydatum.telemetry import REDACTED, configure_logging, is_secret_key
from polydatum.testing import TelemetryCapture

# ------------------------------------------------------------------------- DAL paths


class Profile(Service):
    def get(self, user_id: int = 1) -> str:
        return f"profile {user_id}"

    def _hidden(self) -> str:
        return "HIDDEN REACHED"


class Users(Service):
    limit = 10  # a plain attribute, not a method
    helper = staticmethod(lambda: "STATIC HELPER")

    @property
    def current(self) -> str:
        return "PROPERTY REACHED"

    def get(self, user_id: int = 1) -> str:
        return f"user {user_id}"

    def _secret(self) -> str:
        return "PRIVATE REACHED"


def db(ctx: Any) -> Iterator[Any]:
    yield {"conn": "DB REACHED"}


def make_dm() -> DataManager:
    dm = DataManager()
    dm.register_services(users=Users().register_services(profile=Profile()))
    dm.register_resources(db=db)
    return dm


DM = make_dm()
ALLOWED = {
    ("users", "get"): "user 1",
    ("users", "helper"): "STATIC HELPER",
    ("users", "profile", "get"): "profile 1",
}
HOSTILE = [
    "__class__", "__init__", "__dict__", "__globals__", "__getattribute__", "__call__",
    "__subclasses__", "__reduce__", "__module__", "_secret", "_hidden", "_ctx", "_dal",
    "_data_manager", "_services", "_resource_manager", "_telemetry", "setup",
    "register_services", "replace_service", "data_manager", "get_dal", "get_resource",
    "context", "db", "meta", "dal", "limit", "current", "mro", "users", "profile", "get",
    "helper", "", " ", "get ", "Get", "users.get", "0", "-", "\x00", "🙂",
]  # fmt: skip
segments = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=12))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(segments, min_size=0, max_size=5), st.booleans())
def test_dal_string_paths_reach_public_service_methods_only(
    names: list[str], prefixed: bool
) -> None:
    path = ".".join((["dal"] if prefixed else []) + names)
    key = tuple(path.split("."))
    if key and key[0] == "dal":
        key = key[1:]
    with DM.dal() as dal:
        if key in ALLOWED:
            assert dal[path]() == ALLOWED[key]
            return
        with pytest.raises(DalMethodError) as info:
            dal[path]()
    assert str(info.value).startswith(f"Invalid dal method: {'.'.join(key)}")
    assert [p.name for p in info.value.path] == list(key)


@pytest.mark.parametrize("path", [0, None, b"users.get", ["users", "get"], ("users",)])
def test_dal_paths_that_are_not_strings_are_refused(path: Any) -> None:
    with DM.dal() as dal, pytest.raises(DalMethodError, match="a DAL path is a dotted string"):
        dal[path]()


# ----------------------------------------------------------------------------- Meta

SECRET_WORDS = ["password", "token", "secret", "authorization", "cookie", "api key", "session"]


def looks_secret(key: str) -> bool:
    """DESIGN.md §4's list, matched in any spelling (case, separators)."""
    folded = re.sub(r"[^a-z0-9]", "", key.lower())
    return any(word.replace(" ", "") in folded for word in SECRET_WORDS)


@st.composite
def secret_keys(draw: st.DrawFn) -> str:
    word = draw(st.sampled_from(SECRET_WORDS))
    sep = draw(st.sampled_from(["", "_", "-", " ", "."]))
    word = word.replace(" ", sep)
    word = "".join(c.upper() if draw(st.booleans()) else c for c in word)
    prefix = draw(st.sampled_from(["", "x_", "X-", "user", "db_", "Refresh"]))
    suffix = draw(st.sampled_from(["", "_id", "Id", "-value", "s", "2"]))
    return f"{prefix}{word}{suffix}"


plain_keys = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True).filter(
    lambda k: not is_secret_key(k)
)


def marker(i: int) -> str:
    return f"MARKER-{i:04d}-VALUE"


@st.composite
def metas(draw: st.DrawFn) -> dict[str, Any]:
    """Meta with marker values; some values nest dicts with secret-looking keys."""
    keys = draw(st.lists(st.one_of(secret_keys(), plain_keys), min_size=1, max_size=6, unique=True))
    meta: dict[str, Any] = {}
    counter = iter(range(10_000))
    for key in keys:
        if draw(st.booleans()):
            meta[key] = marker(next(counter))
        else:
            inner_key = draw(st.one_of(secret_keys(), plain_keys))
            meta[key] = {inner_key: marker(next(counter)), "list": [{inner_key: "deep"}]}
    return meta


def everything_recorded(cap: TelemetryCapture) -> str:
    """Every span attribute, event attribute and log event, as one string."""
    parts = []
    for span in cap.finished_spans():
        parts.append(json.dumps(dict(span.attributes or {}), default=repr))
        for event in span.events:
            parts.append(json.dumps(dict(event.attributes or {}), default=repr))
    parts.extend(json.dumps(e, default=repr) for e in cap.logs)
    return "\n".join(parts)


def failing_teardown(ctx: Any) -> Iterator[int]:
    yield 1
    raise RuntimeError("teardown failed")


class Echo(Service):
    def run(self) -> int:
        return int(self._ctx.res)


def run_context(cap: TelemetryCapture, meta: dict[str, Any], allow: list[str]) -> None:
    dm = cap.data_manager(meta_attributes=allow)
    dm.register_services(echo=Echo())
    dm.register_resources(res=failing_teardown)
    with dm.dal(meta) as dal:
        assert dal.echo.run() == 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(metas())
def test_meta_values_never_recorded_unless_allow_listed(meta: dict[str, Any]) -> None:
    with TelemetryCapture() as cap:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
        run_context(cap, meta, allow=[])
        recorded = everything_recorded(cap)
    structlog.reset_defaults()
    assert "MARKER-" not in recorded
    assert "deep" not in recorded


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(metas())
def test_secret_looking_keys_are_redacted_even_when_allow_listed(meta: dict[str, Any]) -> None:
    with TelemetryCapture() as cap:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
        run_context(cap, meta, allow=list(meta))
        span = cap.span("polydatum.context")
        canonical = [e for e in cap.logs if e["event"] == "polydatum.context"]
    structlog.reset_defaults()
    assert len(canonical) == 1
    for key, value in meta.items():
        on_span = span.attributes[f"polydatum.meta.{key}"]
        in_log = canonical[0]["meta"][key]
        assert on_span == in_log
        if looks_secret(key):
            assert is_secret_key(key)
            assert on_span == REDACTED
        elif isinstance(value, str):
            assert on_span == value
        else:
            (inner_key,) = (k for k in value if k != "list")
            decoded = json.loads(on_span)
            if looks_secret(inner_key):
                assert decoded == {inner_key: REDACTED, "list": [{inner_key: REDACTED}]}
            elif not is_secret_key(inner_key):
                assert decoded == value


# ------------------------------------------------------------------ exception records


class Payments(Service):
    def charge(self, card_number: str) -> None:
        cvv = "-".join(["LOCAL", "CVV", "987"])  # noqa: F841 - a local the trace must not show
        raise ValueError("card declined")


def leaky_teardown(ctx: Any) -> Iterator[int]:
    api_secret = "-".join(["LOCAL", "SECRET", "123"])
    try:
        yield len(api_secret)
    finally:
        raise RuntimeError("teardown failed")


def test_exception_records_carry_no_local_values() -> None:
    stream = io.StringIO()
    saved = structlog.get_config()
    configure_logging(json_output=True, stream=stream)
    try:
        with TelemetryCapture() as cap:
            dm = cap.data_manager()
            dm.register_services(payments=Payments())
            dm.register_resources(leaky=leaky_teardown)
            with pytest.raises(ValueError, match="card declined"):
                with dm.context() as ctx:
                    ctx.leaky
                    ctx.dal.payments.charge("-".join(["4111", "LOCAL", "ARG"]))
            events = [
                (span.name, dict(e.attributes or {}))
                for span in cap.finished_spans()
                for e in span.events
            ]
    finally:
        structlog.reset_defaults()
        structlog.configure(**saved)
    names = sorted({name for name, _ in events})
    # recorded once, where it came out of: the context span only says so by its status
    assert names == ["payments.charge", "polydatum.resource.teardown leaky"]
    recorded = json.dumps(events) + stream.getvalue()
    assert "card declined" in recorded and "teardown failed" in recorded
    # (values built at run time, so that source lines quoted in a traceback cannot match)
    for local in ("LOCAL-CVV-987", "LOCAL-SECRET-123", "4111-LOCAL-ARG"):
        assert local not in recorded
