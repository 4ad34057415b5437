"""Secrets in allow-listed Meta never reach a span or a log line; Meta values are frozen.

Every case runs end to end: a real DataManager with telemetry on an in-memory span
exporter and structlog captured, Meta allow-listed with ``meta_attributes``, and the
exact values recorded on the context span and in the canonical log line asserted
(they are always the same). The rules are polydatum.redaction's (its docstring).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import decimal
import enum
import json
import pickle
import types
import unicodedata
import uuid
from collections import namedtuple
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polydatum import DataManager, Service
from polydatum.context import Meta
from polydatum.meta import MAX_FREEZE_DEPTH, FrozenDict, FrozenList
from polydatum.redaction import (
    _LOOK_ALIKES,
    MAX_DEPTH,
    MAX_ITEMS,
    MAX_STRING,
    REDACTED,
    SECRET_NAMES,
    SECRET_TOKENS,
    SECRET_WORDS,
    TRUNCATED,
    fold_key,
    is_secret_key,
)
from polydatum.telemetry import is_secret_key as telemetry_is_secret_key
from polydatum.telemetry import redact_meta
from polydatum.testing import TelemetryCapture

CYRILLIC_A = unicodedata.lookup("CYRILLIC SMALL LETTER A")
FULLWIDTH_PASSWORD = "".join(chr(ord(c) - 0x21 + 0xFF01) for c in "password")
MATH_BOLD_PASSWORD = "".join(chr(0x1D41A + ord(c) - ord("a")) for c in "password")


class Echo(Service):
    def run(self) -> str:
        return "ok"


def everything_recorded(cap: TelemetryCapture) -> str:
    """Every span attribute, event attribute and log event, as one string."""
    parts = []
    for span in cap.finished_spans():
        parts.append(json.dumps(dict(span.attributes or {}), default=repr))
        for event in span.events:
            parts.append(json.dumps(dict(event.attributes or {}), default=repr))
    parts.extend(json.dumps(e, default=repr) for e in cap.logs)
    return "\n".join(parts)


def record(
    cap: TelemetryCapture, meta: Mapping[str, Any], allow: list[str] | None = None
) -> dict[str, Any]:
    """Run one context with ``meta`` (all keys allow-listed unless told) and return the
    recorded meta, checked to be the same on the context span and in the canonical line."""
    dm = cap.data_manager(meta_attributes=list(meta) if allow is None else allow)
    dm.register_services(echo=Echo())
    with dm.dal(meta) as dal:
        assert dal.echo.run() == "ok"
    span = cap.span("polydatum.context")
    on_span = {
        k.removeprefix("polydatum.meta."): v
        for k, v in span.attributes.items()
        if k.startswith("polydatum.meta.")
    }
    (line,) = [e for e in cap.logs if e["event"] == "polydatum.context"]
    assert line["meta"] == on_span
    return on_span


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


# ------------------------------------------------------------------------ object values


@dataclasses.dataclass
class Login:
    user: str
    password: str
    api_token: str


@attrs.define
class AttrsLogin:
    user: str
    passphrase: str


class Upstream:
    def __init__(self) -> None:
        self.host = "db.internal"
        self.authorization = "Basic dTpwdw=="


class Slotted:
    __slots__ = ("__hidden_token", "user")

    def __init__(self) -> None:
        self.user = "bob"
        self.__hidden_token = "slot-token"


def test_object_values_are_walked_and_their_secret_fields_redacted(
    polydatum_telemetry: TelemetryCapture,
) -> None:
    meta = {
        "login": Login("bob", "pw-dataclass", "tok-dataclass"),
        "attrs_login": AttrsLogin("bob", "correct horse"),
        "namespace": types.SimpleNamespace(user="bob", password="pw-namespace"),
        "upstream": Upstream(),
        "slotted": Slotted(),
        "nested_meta": Meta({"user": "bob", "password": "pw-meta"}),
        "point": namedtuple("Point", "user password")("bob", "pw-tuple"),
    }
    assert record(polydatum_telemetry, meta) == {
        "login": dumps({"api_token": REDACTED, "password": REDACTED, "user": "bob"}),
        "attrs_login": dumps({"passphrase": REDACTED, "user": "bob"}),
        "namespace": dumps({"password": REDACTED, "user": "bob"}),
        "upstream": dumps({"authorization": REDACTED, "host": "db.internal"}),
        "slotted": dumps({"_Slotted__hidden_token": REDACTED, "user": "bob"}),
        "nested_meta": dumps({"password": REDACTED, "user": "bob"}),
        "point": dumps({"password": REDACTED, "user": "bob"}),
    }
    recorded = everything_recorded(polydatum_telemetry)
    for secret in ("pw-", "tok-", "correct horse", "dTpwdw", "slot-token"):
        assert secret not in recorded


class Opaque:
    """No fields: recorded as its type; its repr (which leaks) is never used."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Opaque(token='repr-secret')"


class Color(enum.Enum):
    RED = "r"


def test_values_neither_json_nor_walkable_are_type_placeholders(
    polydatum_telemetry: TelemetryCapture,
) -> None:
    meta = {
        "opaque": Opaque(),
        "raw": b"password=bytes-secret",
        "function": len,
        "cls": Opaque,
        "mixed": {"o": Opaque(), "b": bytearray(b"x"), "f": lambda: None, "n": None},
        "known": {
            "when": datetime.datetime(2024, 1, 2, 3, 4, 5),
            "day": datetime.date(2024, 1, 2),
            "wait": datetime.timedelta(seconds=90),
            "id": uuid.UUID(int=1),
            "amount": decimal.Decimal("1.50"),
            "color": Color.RED,
        },
        "exception": ValueError("exception-secret"),
    }
    assert record(polydatum_telemetry, meta) == {
        "opaque": f"<object of type {__name__}.Opaque>",
        "raw": "<object of type bytes>",
        "function": "<object of type builtin_function_or_method>",
        "cls": "<object of type type>",
        "mixed": dumps(
            {
                "o": f"<object of type {__name__}.Opaque>",
                "b": "<object of type bytearray>",
                "f": "<object of type function>",
                "n": None,
            }
        ),
        "known": dumps(
            {
                "when": "2024-01-02T03:04:05",
                "day": "2024-01-02",
                "wait": "0:01:30",
                "id": "00000000-0000-0000-0000-000000000001",
                "amount": "1.50",
                "color": "Color.RED",
            }
        ),
        "exception": "<object of type ValueError>",
    }
    recorded = everything_recorded(polydatum_telemetry)
    assert "repr-secret" not in recorded
    assert "bytes-secret" not in recorded
    assert "exception-secret" not in recorded


class HostileAttributes:
    """Every hook that could run is hostile; only the instance dict is read."""

    def __init__(self) -> None:
        self.user = "bob"
        self.api_token = "hostile-token"

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("__getattr__ ran")

    @property
    def password(self) -> str:
        raise RuntimeError("property ran")

    def __iter__(self) -> Iterator[Any]:
        raise RuntimeError("__iter__ ran")


class HostileDict:
    @property  # type: ignore[misc]
    def __dict__(self) -> Any:  # type: ignore[override]
        raise RuntimeError("__dict__ ran")


class HostileMapping(Mapping[str, Any]):
    def __getitem__(self, key: str) -> Any:
        raise RuntimeError("__getitem__ ran")

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("__iter__ ran")

    def __len__(self) -> int:
        raise RuntimeError("__len__ ran")


class HostileList(list[Any]):
    def __iter__(self) -> Iterator[Any]:
        raise RuntimeError("__iter__ ran")


class HostileKey:
    def __str__(self) -> str:
        raise RuntimeError("__str__ ran")

    __repr__ = __str__


class Endless(Mapping[str, Any]):
    """A mapping whose items never end."""

    def __getitem__(self, key: str) -> Any:
        return 1

    def __iter__(self) -> Iterator[str]:
        n = 0
        while True:
            n += 1
            yield f"k{n}"

    def __len__(self) -> int:
        return 1


def test_hostile_values_give_placeholders_and_the_context_completes(
    polydatum_telemetry: TelemetryCapture,
) -> None:
    meta = {
        "attributes": HostileAttributes(),
        "dict_property": HostileDict(),
        "mapping": HostileMapping(),
        "list": HostileList(["a", ("token", "list-token")]),
        "weird_keys": {HostileKey(): "key-secret", "user": "bob"},
        "endless": Endless(),
    }
    recorded = record(polydatum_telemetry, meta)
    endless = json.loads(recorded.pop("endless"))
    assert recorded == {
        "attributes": dumps({"api_token": REDACTED, "user": "bob"}),
        "dict_property": f"<object of type {__name__}.HostileDict>",
        "mapping": f"<object of type {__name__}.HostileMapping>",
        "list": dumps(["a", ["token", REDACTED]]),
        "weird_keys": dumps({f"<object of type {__name__}.HostileKey>": REDACTED, "user": "bob"}),
    }
    # 1 for the mapping, then one per entry until the budget is spent.
    assert endless == {**{f"k{n}": 1 for n in range(1, MAX_ITEMS)}, TRUNCATED: TRUNCATED}
    everything = everything_recorded(polydatum_telemetry)
    for secret in ("hostile-token", "list-token", "key-secret", " ran"):
        assert secret not in everything


# -------------------------------------------------------------------------------- keys


def test_keys_are_folded_before_matching(polydatum_telemetry: TelemetryCapture) -> None:
    cyrillic = f"p{CYRILLIC_A}ssword"
    meta = {
        FULLWIDTH_PASSWORD: "fullwidth-secret",
        cyrillic: "cyrillic-secret",
        "user": {
            FULLWIDTH_PASSWORD: "nested-fullwidth",
            cyrillic: "nested-cyrillic",
            "Pa\u0301ss\u200bword": "accent-and-zero-width",
            MATH_BOLD_PASSWORD: "math",
            "name": "bob",
        },
    }
    assert record(polydatum_telemetry, meta) == {
        FULLWIDTH_PASSWORD: REDACTED,
        cyrillic: REDACTED,
        "user": dumps(
            {
                FULLWIDTH_PASSWORD: REDACTED,
                cyrillic: REDACTED,
                "Pa\u0301ss\u200bword": REDACTED,
                MATH_BOLD_PASSWORD: REDACTED,
                "name": "bob",
            }
        ),
    }
    assert "secret" not in everything_recorded(polydatum_telemetry).replace("[REDACTED]", "")


EXTENDED = ["passphrase", "pin", "user_pin", "pinCode", "bearer", "jwt", "aws_access_key_id"]


def test_the_extended_word_list(polydatum_telemetry: TelemetryCapture) -> None:
    meta: dict[str, Any] = {key: f"value-of-{key}" for key in EXTENDED}
    meta["nested"] = {key: f"nested-{key}" for key in EXTENDED} | {"shipping": "ground"}
    meta["shipping"] = "ground"  # "pin" inside a word is not the word
    assert record(polydatum_telemetry, meta) == {
        **dict.fromkeys(EXTENDED, REDACTED),
        "nested": dumps({**dict.fromkeys(EXTENDED, REDACTED), "shipping": "ground"}),
        "shipping": "ground",
    }
    for key in ("user", "request_id", "route", "tenant", "cache_key", "spinner", "pinned"):
        assert not is_secret_key(key), key
    assert telemetry_is_secret_key is is_secret_key  # one copy, re-exported


def test_header_pair_lists_keep_names_and_redact_values(
    polydatum_telemetry: TelemetryCapture,
) -> None:
    meta = {
        "headers": [("authorization", "Bearer header-token"), ("accept", "application/json")],
        "asgi_headers": [(b"cookie", b"sid=cookie-secret"), (b"host", b"example.org")],
        "pair": ("X-Api-Key", "pair-secret"),
        "nested": {"raw": [["Proxy-Authorization", "Basic proxy-secret"]]},
    }
    assert record(polydatum_telemetry, meta) == {
        "headers": dumps([["authorization", REDACTED], ["accept", "application/json"]]),
        "asgi_headers": dumps(
            [["cookie", REDACTED], ["<object of type bytes>", "<object of type bytes>"]]
        ),
        "pair": dumps(["X-Api-Key", REDACTED]),
        "nested": dumps({"raw": [["Proxy-Authorization", REDACTED]]}),
    }
    assert "secret" not in everything_recorded(polydatum_telemetry).replace("[REDACTED]", "")


def test_url_passwords_are_stripped(polydatum_telemetry: TelemetryCapture) -> None:
    meta = {
        "dsn": "postgresql://u:pw-secret@host/db",
        "nested": {
            "cache": "redis://:redis-secret@cache:6379/0",
            "note": "failed on amqp://guest:amqp-secret@mq/ then s3://k:s3/se@cret@bucket/x",
            "plain": "https://example.org/@alice",
        },
    }
    assert record(polydatum_telemetry, meta) == {
        "dsn": "postgresql://u:[REDACTED]@host/db",
        "nested": dumps(
            {
                "cache": "redis://:[REDACTED]@cache:6379/0",
                "note": "failed on amqp://guest:[REDACTED]@mq/ then s3://k:[REDACTED]@bucket/x",
                "plain": "https://example.org/@alice",
            }
        ),
    }
    assert "secret" not in everything_recorded(polydatum_telemetry).replace("[REDACTED]", "")


def test_credentials_in_values_are_redacted_whatever_the_key(
    polydatum_telemetry: TelemetryCapture,
) -> None:
    """A bearer token or a JWT under an innocent key (``note``, a list item) is
    redacted; the scheme stays, so the record still says what kind of credential it was."""
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbm4ifQ.c2lnbmF0dXJlLXNlY3JldA"
    meta = {
        "note": "retried with Bearer abcdefgh-secret-token after 401",
        "upstream": ["Basic dXNlcjpwYXNzLXNlY3JldA==", "token  tok-secret-12345"],
        "forwarded": f"jwt was {jwt}; done",
        "short": "Bearer abc",  # too short to be a credential: kept
        "plain": "basic plan, digest of the day",
    }
    assert record(polydatum_telemetry, meta) == {
        "note": "retried with Bearer [REDACTED] after 401",
        "upstream": dumps(["Basic [REDACTED]", "token  [REDACTED]"]),
        "forwarded": "jwt was [REDACTED]; done",
        "short": "Bearer abc",
        "plain": "basic plan, digest of the day",
    }
    assert "secret" not in everything_recorded(polydatum_telemetry).replace("[REDACTED]", "")


def test_keys_spelt_with_digits_or_symbols_are_secret() -> None:
    for key in ("passw0rd", "p4ssw0rd", "pa$$word", "user_t0ken", "S3CRET", "api_k3y_s3cr3t"):
        assert is_secret_key(key), key
    for key in ("user1", "route66", "order_id_2", "v2_shipping", "page404", "h1_title"):
        assert not is_secret_key(key), key


def test_long_meta_strings_are_bounded(polydatum_telemetry: TelemetryCapture) -> None:
    payload = "x" * (MAX_STRING + 5000)
    cut = "x" * MAX_STRING + "…[truncated 5000 chars]"
    meta = {"body": payload, "nested": {"body": payload, payload: 1, "redis://:hunter2@c/0": 2}}
    assert record(polydatum_telemetry, meta) == {
        "body": cut,
        "nested": dumps({"body": cut, cut: 1, "redis://:[REDACTED]@c/0": 2}),
    }


# ------------------------------------------------------------------------------ bounds


def test_walking_is_bounded_in_depth_and_items(polydatum_telemetry: TelemetryCapture) -> None:
    deep: dict[str, Any] = {"leaf": "deep-value"}
    for _ in range(MAX_DEPTH + 2):
        deep = {"d": deep}
    cycle: dict[str, Any] = {}
    cycle["self"] = cycle
    expected_deep: Any = TRUNCATED
    for _ in range(MAX_DEPTH):
        expected_deep = {"d": expected_deep}
    expected_cycle: Any = TRUNCATED
    for _ in range(MAX_DEPTH):
        expected_cycle = {"self": expected_cycle}
    assert record(
        polydatum_telemetry, {"deep": deep, "cycle": cycle, "long": list(range(10_000))}
    ) == {
        "deep": dumps(expected_deep),
        "cycle": dumps(expected_cycle),
        "long": dumps([*range(MAX_ITEMS - 1), TRUNCATED]),
    }
    assert "deep-value" not in everything_recorded(polydatum_telemetry)


def test_redact_meta_never_raises_and_skips_unreadable_keys() -> None:
    class Broken:
        def get(self, key: str) -> Any:
            if key == "bad":
                raise RuntimeError("get ran")
            return {"token": "t", "user": "bob"}

    assert redact_meta(Broken(), ["bad", "good"]) == {
        "polydatum.meta.good": dumps({"token": REDACTED, "user": "bob"})
    }


# ----------------------------------------------------------------------- the property

SEPARATORS = ["_", "-", ".", " "]
# Latin letter -> the look-alikes that fold back to it, of the same case.
LOOK_ALIKES: dict[str, list[str]] = {}
for _name, _latin in _LOOK_ALIKES.items():
    if ("CAPITAL" in _name) == _latin.isupper():
        LOOK_ALIKES.setdefault(_latin, []).append(unicodedata.lookup(_name))


@st.composite
def disguised(draw: st.DrawFn, word: str) -> str:
    """``word`` with some letters fullwidth, some swapped for a look-alike."""
    out = []
    for char in word:
        how = draw(st.sampled_from(["keep", "keep", "fullwidth", "look-alike"]))
        if how == "fullwidth":
            out.append(chr(ord(char) - 0x21 + 0xFF01))
        elif how == "look-alike" and char in LOOK_ALIKES:
            out.append(draw(st.sampled_from(LOOK_ALIKES[char])))
        else:
            out.append(char)
    return "".join(out)


@st.composite
def secret_keys(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["word", "token", "name"]))
    if kind == "name":
        word = draw(st.sampled_from(sorted(SECRET_NAMES)))
        return draw(disguised(draw(st.sampled_from([word, word.upper(), word.title()]))))
    if kind == "token":  # a word of its own: separated, in one case
        word = draw(st.sampled_from(sorted(SECRET_TOKENS)))
        word = draw(st.sampled_from([word, word.upper(), word.title()]))
        sep = draw(st.sampled_from(SEPARATORS))
        prefix = draw(st.sampled_from(["", f"user{sep}", f"X{sep}"]))
        suffix = draw(st.sampled_from(["", f"{sep}code", f"{sep}2"]))
        return prefix + draw(disguised(word)) + suffix
    word = draw(st.sampled_from(SECRET_WORDS))
    word = "".join(c.upper() if draw(st.booleans()) else c for c in word)
    prefix = draw(st.sampled_from(["", "x_", "X-", "user", "db_", "Refresh"]))
    suffix = draw(st.sampled_from(["", "_id", "Id", "-value", "s", "2"]))
    return prefix + draw(disguised(word)) + suffix


plain_keys = st.from_regex(r"[a-z]{1,8}", fullmatch=True).filter(lambda k: not is_secret_key(k))


class Planter:
    """Hands out unique secret strings and remembers them."""

    def __init__(self) -> None:
        self.planted: list[str] = []

    def secret(self) -> str:
        value = f"S3CR3T{len(self.planted):04d}X"
        self.planted.append(value)
        return value


def leaves(planter: Planter) -> st.SearchStrategy[Any]:
    url = st.builds(
        lambda scheme, user: f"{scheme}://{user}:{planter.secret()}@host/db",
        st.sampled_from(["postgresql", "redis", "https", "amqp+ssl"]),
        st.from_regex(r"[a-z]{0,5}", fullmatch=True),
    )
    return st.one_of(
        st.none(), st.booleans(), st.integers(), st.text(max_size=5), url, st.just(b"raw")
    )


def values(planter: Planter) -> st.SearchStrategy[Any]:
    def secret_entry() -> st.SearchStrategy[tuple[str, Any]]:
        # under a secret key, the whole subtree goes: plant a secret inside a container too
        planted = st.one_of(
            st.builds(planter.secret),
            st.builds(lambda: {"inner": planter.secret(), "list": [planter.secret()]}),
        )
        return st.tuples(secret_keys(), planted)

    def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        entries = st.lists(st.one_of(st.tuples(plain_keys, children), secret_entry()), max_size=4)
        as_dict = entries.map(dict)

        def instance(pairs: list[tuple[str, Any]]) -> Any:
            obj = Upstream.__new__(Upstream)
            obj.__dict__.update(pairs)
            return obj

        return st.one_of(
            as_dict,
            as_dict.map(Meta),
            as_dict.map(lambda d: types.SimpleNamespace(**d)),
            entries.map(instance),
            entries.map(lambda pairs: [tuple(p) for p in pairs]),  # header pairs
            st.lists(children, max_size=4),
            st.lists(children, max_size=3).map(tuple),
        )

    return st.recursive(leaves(planter), containers, max_leaves=12)


PLANTER = Planter()  # the strategies are built once; each example starts it afresh
TOP_LEVEL = st.lists(
    st.tuples(st.one_of(plain_keys, secret_keys()), values(PLANTER)), min_size=1, max_size=5
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_no_planted_secret_is_ever_recorded(data: st.DataObject) -> None:
    PLANTER.planted.clear()
    meta = dict(data.draw(TOP_LEVEL))
    planted = list(PLANTER.planted)
    with TelemetryCapture() as cap:
        record(cap, meta)
        recorded = everything_recorded(cap)
    for secret in planted:
        assert secret not in recorded


# ------------------------------------------------------------------------------ freezing


class Probe(Service):
    def read(self) -> Any:
        return self._ctx.meta.user


def test_the_callers_later_changes_do_not_reach_the_meta() -> None:
    dm = DataManager()
    meta: dict[str, Any] = {"user": {"name": "bob", "roles": ["reader"]}, "tags": {"a"}}
    with dm.context(meta) as ctx:
        meta["user"]["name"] = "eve"
        meta["user"]["roles"].append("admin")
        meta["tags"].add("b")
        meta["extra"] = 1
        assert ctx.meta.user == {"name": "bob", "roles": ["reader"]}
        assert ctx.meta.tags == {"a"}
        assert ctx.meta.extra is None
    built = Meta(meta)
    meta["user"]["roles"].append("root")
    assert built.user["roles"] == ["reader", "admin"]


def test_a_step_cannot_change_nested_meta_values() -> None:
    dm = DataManager()
    errors: list[str] = []

    def meddler(ctx: Any) -> Iterator[None]:
        user = ctx.meta.user
        for change in (
            lambda: user.__setitem__("name", "eve"),
            lambda: user.update(name="eve"),
            lambda: user.pop("name"),
            lambda: user["roles"].append("admin"),
            lambda: user["roles"].__setitem__(0, "admin"),
            lambda: user["pair"][1].append("x"),
        ):
            with pytest.raises(TypeError) as info:
                change()
            errors.append(str(info.value))
        with pytest.raises(AttributeError):
            ctx.meta.tags.add("b")
        yield

    dm.register_context_middleware(meddler)
    dm.register_services(probe=Probe())
    meta = {"user": {"name": "bob", "roles": ["reader"], "pair": (1, [2])}, "tags": {"a"}}
    with dm.dal(meta) as dal:
        assert dal.probe.read() == {"name": "bob", "roles": ["reader"], "pair": (1, [2])}
    assert (
        errors
        == [
            "Meta values can not be changed: this dict is a read-only copy; "
            "dict(value) makes a mutable one.",
        ]
        * 3
        + [
            "Meta values can not be changed: this list is a read-only copy; "
            "list(value) makes a mutable one.",
        ]
        * 3
    )


def test_frozen_meta_values_behave_like_the_originals() -> None:
    original = {"user": {"name": "bob", "roles": ["reader"]}, "n": 1, "t": (1, [2])}
    meta = Meta(original)
    assert meta == Meta(original)
    assert meta.get("user") == {"name": "bob", "roles": ["reader"]}
    assert meta.get("missing", 5) == 5
    assert dict(meta.items()) == original
    user = meta.user
    assert type(user) is FrozenDict and isinstance(user, dict)
    assert type(user["roles"]) is FrozenList and isinstance(user["roles"], list)
    assert type(meta.t) is tuple and type(meta.t[1]) is FrozenList
    assert json.loads(json.dumps(user)) == {"name": "bob", "roles": ["reader"]}
    assert json.loads(str(meta)) == {
        "user": {"name": "bob", "roles": ["reader"]},
        "n": 1,
        "t": [1, [2]],
    }
    mutable = dict(user)
    mutable["name"] = "eve"
    assert user["name"] == "bob"
    for clone in (copy.copy(user), copy.deepcopy(user), pickle.loads(pickle.dumps(user))):
        assert clone == user and type(clone) is FrozenDict
    roles = user["roles"]
    for clone in (copy.deepcopy(roles), pickle.loads(pickle.dumps(roles))):
        assert clone == roles and type(clone) is FrozenList


def test_freezing_keeps_cycles_shared_values_and_plain_values() -> None:
    shared = ["x"]
    cycle: dict[str, Any] = {"shared": shared, "again": shared}
    cycle["self"] = cycle
    meta = Meta({"c": cycle, "s": "text", "b": b"raw"})
    frozen = meta.c
    assert frozen["self"] is frozen
    assert frozen["shared"] is frozen["again"]
    text = "text"
    plain = Meta({"s": text})
    assert plain.s is text
    opaque = types.SimpleNamespace(a=[1])
    assert Meta({"o": opaque}).o is opaque  # objects are shared, not copied (documented)
    deep: Any = []
    for _ in range(MAX_FREEZE_DEPTH + 5):
        deep = [deep]
    Meta({"deep": deep})  # deeper than the limit: shared beyond it, no RecursionError


def test_every_look_alike_folds_to_its_latin_letter() -> None:
    for name, latin in _LOOK_ALIKES.items():
        char = unicodedata.lookup(name)
        assert fold_key(f"x{char}") in {("x" + latin.lower(),), ("x", latin.lower())}, name
