"""What of a Meta value may be recorded on a span or in a log line.

Meta may hold personal data and secrets, so telemetry records only the keys the
application allow-lists (``DataManager(meta_attributes=...)``) and passes each of their
values through :func:`redact_meta` first:

* **Keys that look secret** (:func:`is_secret_key`) have their value replaced by
  ``[REDACTED]``, at the top and at any depth. A key is folded before it is matched:
  compatibility decomposition (NFKD: fullwidth and mathematical letters become ASCII,
  accents and other combining marks drop off), invisible format characters removed,
  the common Cyrillic, Greek, Armenian and small-capital look-alikes of Latin letters
  mapped to those letters, case folded, separators ignored. A folded key is secret when
  it contains one of :data:`SECRET_WORDS`, has one of :data:`SECRET_TOKENS` as a word of
  its own (``user_pin``, ``pinCode``; not ``shipping``), or is one of :data:`SECRET_NAMES`.
* **Values are walked**, not ``repr``-ed: mappings, lists, tuples, sets, named tuples,
  registered mapping-likes (Meta, see :func:`walk_as_mapping`) and objects (dataclasses,
  attrs classes, anything with an instance ``__dict__`` or ``__slots__``: their fields are
  read from the instance itself, so properties, ``__getattr__`` and ``__iter__`` of the
  object never run). A two-item list or tuple whose first item is a secret-looking string
  is a (key, value) pair: its value is redacted (``[("authorization", "Bearer ...")]``).
* **Credentials in text** are stripped from every string (:func:`redact_text`), whatever
  the key: URL passwords (``postgresql://u:pw@host/db`` becomes
  ``postgresql://u:[REDACTED]@host/db``), the credentials of an ``Authorization``-style
  value (``Bearer abc...`` becomes ``Bearer [REDACTED]``; also ``Basic``, ``Token``,
  ``Digest``) and JSON Web Tokens (``eyJ...`` with three dot-separated parts). A key
  spelt with digits or symbols for letters (``passw0rd``, ``pa$$word``) is secret too.
* **Bounded strings:** a string longer than :data:`MAX_STRING` characters is cut there,
  followed by :func:`truncate`'s marker.
* Dates, times, UUIDs, decimals and paths are recorded as their text, enum members as
  ``Class.NAME``. **Anything else** (bytes, functions, classes, objects without fields)
  is recorded as a placeholder naming its type, ``<object of type module.Qualname>``,
  never as its ``repr``.
* **Bounded:** nothing deeper than :data:`MAX_DEPTH` levels and no more than
  :data:`MAX_ITEMS` values per recorded value are walked; what is left out is
  ``[TRUNCATED]``. Walking never raises: a value whose walk fails is its placeholder.

This module is the bottom import layer: it imports nothing from polydatum.
"""

from __future__ import annotations

import contextlib
import datetime
import decimal
import enum
import functools
import json
import pathlib
import re
import types
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from typing import Any, Protocol

__all__ = [
    "MAX_DEPTH",
    "MAX_ITEMS",
    "MAX_STRING",
    "REDACTED",
    "SECRET_NAMES",
    "SECRET_TOKENS",
    "SECRET_WORDS",
    "TRUNCATED",
    "attribute_value",
    "fold_key",
    "is_secret_key",
    "placeholder",
    "redact_meta",
    "redact_text",
    "redact_value",
    "strip_url_passwords",
    "truncate",
    "walk_as_mapping",
]

#: What a secret value is recorded as.
REDACTED = "[REDACTED]"
#: What a value beyond :data:`MAX_DEPTH` or :data:`MAX_ITEMS` is recorded as (the last
#: entry of a cut-off list, and the key and value of a cut-off mapping's last entry).
TRUNCATED = "[TRUNCATED]"
#: Containers and objects nested deeper than this are recorded as ``[TRUNCATED]``.
MAX_DEPTH = 8
#: At most this many values (containers, entries and leaves) are walked per recorded value.
MAX_ITEMS = 256
#: The longest string recorded from Meta (a longer one ends in the truncation marker):
#: a request's metadata may carry a payload, which every span and log line would repeat.
MAX_STRING = 1024


def truncate(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, followed by ``…[truncated N chars]``."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[truncated {len(text) - limit} chars]"


#: A folded key containing one of these is secret.
SECRET_WORDS: tuple[str, ...] = (
    "password", "passwd", "passphrase", "passcode", "pwd", "token", "secret",
    "authorization", "auth", "bearer", "cookie", "session", "credential", "signature",
    "apikey", "accesskey", "privatekey", "privkey", "sshkey", "signingkey",
    "encryptionkey", "masterkey", "jwt", "csrf", "xsrf", "hmac", "cvv",
)  # fmt: skip
#: A key with one of these as a word of its own (split at separators, case changes and
#: digits) is secret: too short to match inside other words.
SECRET_TOKENS: frozenset[str] = frozenset(
    {"pin", "pw", "pass", "otp", "mfa", "sid", "creds", "cvc"}
)
#: A key that folds to one of these, whole, is secret.
SECRET_NAMES: frozenset[str] = frozenset({"key"})

# Look-alikes of Latin letters that NFKD leaves alone, by Unicode name, mapped to the
# letter they imitate, case kept (names, not the characters: they would look like Latin).
_LOOK_ALIKES: dict[str, str] = {
    "CYRILLIC SMALL LETTER A": "a",
    "CYRILLIC CAPITAL LETTER A": "A",
    "CYRILLIC CAPITAL LETTER VE": "B",
    "CYRILLIC SMALL LETTER VE": "b",
    "CYRILLIC CAPITAL LETTER SOFT SIGN": "b",
    "CYRILLIC SMALL LETTER SOFT SIGN": "b",
    "CYRILLIC SMALL LETTER ES": "c",
    "CYRILLIC CAPITAL LETTER ES": "C",
    "CYRILLIC SMALL LETTER KOMI DE": "d",
    "CYRILLIC SMALL LETTER IE": "e",
    "CYRILLIC CAPITAL LETTER IE": "E",
    "CYRILLIC SMALL LETTER IO": "e",
    "CYRILLIC CAPITAL LETTER IO": "E",
    "CYRILLIC SMALL LETTER SHHA": "h",
    "CYRILLIC CAPITAL LETTER SHHA": "H",
    "CYRILLIC SMALL LETTER EN": "h",
    "CYRILLIC CAPITAL LETTER EN": "H",
    "CYRILLIC SMALL LETTER BYELORUSSIAN-UKRAINIAN I": "i",
    "CYRILLIC CAPITAL LETTER BYELORUSSIAN-UKRAINIAN I": "I",
    "CYRILLIC SMALL LETTER YI": "i",
    "CYRILLIC CAPITAL LETTER YI": "I",
    "CYRILLIC SMALL LETTER PALOCHKA": "l",
    "CYRILLIC LETTER PALOCHKA": "I",
    "CYRILLIC SMALL LETTER JE": "j",
    "CYRILLIC CAPITAL LETTER JE": "J",
    "CYRILLIC SMALL LETTER KA": "k",
    "CYRILLIC CAPITAL LETTER KA": "K",
    "CYRILLIC SMALL LETTER EM": "m",
    "CYRILLIC CAPITAL LETTER EM": "M",
    "CYRILLIC SMALL LETTER PE": "n",
    "CYRILLIC SMALL LETTER O": "o",
    "CYRILLIC CAPITAL LETTER O": "O",
    "CYRILLIC SMALL LETTER ER": "p",
    "CYRILLIC CAPITAL LETTER ER": "P",
    "CYRILLIC SMALL LETTER QA": "q",
    "CYRILLIC CAPITAL LETTER QA": "Q",
    "CYRILLIC SMALL LETTER DZE": "s",
    "CYRILLIC CAPITAL LETTER DZE": "S",
    "CYRILLIC SMALL LETTER TE": "t",
    "CYRILLIC CAPITAL LETTER TE": "T",
    "CYRILLIC SMALL LETTER U": "y",
    "CYRILLIC CAPITAL LETTER U": "Y",
    "CYRILLIC SMALL LETTER STRAIGHT U": "y",
    "CYRILLIC CAPITAL LETTER STRAIGHT U": "Y",
    "CYRILLIC SMALL LETTER WE": "w",
    "CYRILLIC CAPITAL LETTER WE": "W",
    "CYRILLIC SMALL LETTER HA": "x",
    "CYRILLIC CAPITAL LETTER HA": "X",
    "GREEK SMALL LETTER ALPHA": "a",
    "GREEK CAPITAL LETTER ALPHA": "A",
    "GREEK SMALL LETTER BETA": "b",
    "GREEK CAPITAL LETTER BETA": "B",
    "GREEK LUNATE SIGMA SYMBOL": "c",
    "GREEK CAPITAL LUNATE SIGMA SYMBOL": "C",
    "GREEK SMALL LETTER FINAL SIGMA": "c",
    "GREEK SMALL LETTER DELTA": "d",
    "GREEK SMALL LETTER EPSILON": "e",
    "GREEK CAPITAL LETTER EPSILON": "E",
    "GREEK SMALL LETTER ETA": "n",
    "GREEK CAPITAL LETTER ETA": "H",
    "GREEK SMALL LETTER IOTA": "i",
    "GREEK CAPITAL LETTER IOTA": "I",
    "GREEK SMALL LETTER KAPPA": "k",
    "GREEK CAPITAL LETTER KAPPA": "K",
    "GREEK CAPITAL LETTER MU": "M",
    "GREEK SMALL LETTER MU": "u",
    "GREEK SMALL LETTER NU": "v",
    "GREEK CAPITAL LETTER NU": "N",
    "GREEK SMALL LETTER OMICRON": "o",
    "GREEK CAPITAL LETTER OMICRON": "O",
    "GREEK SMALL LETTER PI": "n",
    "GREEK SMALL LETTER RHO": "p",
    "GREEK CAPITAL LETTER RHO": "P",
    "GREEK SMALL LETTER SIGMA": "o",
    "GREEK SMALL LETTER TAU": "t",
    "GREEK CAPITAL LETTER TAU": "T",
    "GREEK SMALL LETTER UPSILON": "u",
    "GREEK CAPITAL LETTER UPSILON": "Y",
    "GREEK SMALL LETTER CHI": "x",
    "GREEK CAPITAL LETTER CHI": "X",
    "GREEK SMALL LETTER GAMMA": "y",
    "GREEK SMALL LETTER OMEGA": "w",
    "GREEK CAPITAL LETTER ZETA": "Z",
    "ARMENIAN SMALL LETTER OH": "o",
    "ARMENIAN CAPITAL LETTER OH": "O",
    "ARMENIAN SMALL LETTER SEH": "u",
    "ARMENIAN CAPITAL LETTER SEH": "U",
    "ARMENIAN SMALL LETTER HO": "h",
    "ARMENIAN SMALL LETTER VO": "n",
    "ARMENIAN SMALL LETTER CO": "g",
    "LATIN LETTER SMALL CAPITAL A": "a",
    "LATIN LETTER SMALL CAPITAL B": "b",
    "LATIN LETTER SMALL CAPITAL C": "c",
    "LATIN LETTER SMALL CAPITAL D": "d",
    "LATIN LETTER SMALL CAPITAL E": "e",
    "LATIN LETTER SMALL CAPITAL G": "g",
    "LATIN LETTER SMALL CAPITAL H": "h",
    "LATIN LETTER SMALL CAPITAL I": "i",
    "LATIN LETTER SMALL CAPITAL J": "j",
    "LATIN LETTER SMALL CAPITAL K": "k",
    "LATIN LETTER SMALL CAPITAL L": "l",
    "LATIN LETTER SMALL CAPITAL M": "m",
    "LATIN LETTER SMALL CAPITAL N": "n",
    "LATIN LETTER SMALL CAPITAL O": "o",
    "LATIN LETTER SMALL CAPITAL P": "p",
    "LATIN LETTER SMALL CAPITAL R": "r",
    "LATIN LETTER SMALL CAPITAL S": "s",
    "LATIN LETTER SMALL CAPITAL T": "t",
    "LATIN LETTER SMALL CAPITAL U": "u",
    "LATIN LETTER SMALL CAPITAL V": "v",
    "LATIN LETTER SMALL CAPITAL W": "w",
    "LATIN LETTER SMALL CAPITAL Y": "y",
    "LATIN LETTER SMALL CAPITAL Z": "z",
    "LATIN SMALL LETTER DOTLESS I": "i",
    "LATIN SMALL LETTER DOTLESS J": "j",
    "LATIN SMALL LETTER ALPHA": "a",
    "LATIN SMALL LETTER SCRIPT G": "g",
    "LATIN SMALL LETTER IOTA": "i",
    "LATIN SMALL LETTER TURNED ALPHA": "a",
}
_CONFUSABLES = str.maketrans({unicodedata.lookup(name): to for name, to in _LOOK_ALIKES.items()})
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")


def _ascii_fold(name: str) -> str:
    """NFKD, look-alikes mapped, combining marks and format characters dropped, and
    what is still not ASCII case-folded (``ß`` to ``ss``): ASCII letters keep their case
    (it splits ``pinCode`` into words)."""
    # Before NFKD too: it turns some look-alikes into others (lunate sigma into sigma).
    name = unicodedata.normalize("NFKD", name.translate(_CONFUSABLES)).translate(_CONFUSABLES)
    kept = []
    for char in name:
        if char.isascii():
            kept.append(char)
        elif not unicodedata.combining(char) and unicodedata.category(char) != "Cf":
            folded = char.casefold()
            kept.append(folded if folded.isascii() else " ")
    return "".join(kept)


def fold_key(key: str) -> tuple[str, ...]:
    """The words of ``key`` as matching sees them: folded (see the module docstring),
    split at separators, case changes and digits, lower case.

    ``fold_key("X-PIN-Code") == ("x", "pin", "code")``; a fullwidth ``password``, or
    one spelt with a Cyrillic ``a``, folds to ``("password",)``.
    """
    if not key.isascii():
        key = _ascii_fold(key)
    return tuple(word.lower() for word in _WORD.findall(key))


#: Digits and symbols written for letters (``passw0rd``, ``pa$$word``, ``t0k3n``).
_LEET = str.maketrans("013457@$!|", "oieastasil")
#: The secret words long enough to look for in a key with such spellings (a short word
#: would match by accident once digits read as letters).
_LEET_WORDS = tuple(word for word in SECRET_WORDS if len(word) >= 5)
_NOT_ALNUM = re.compile(r"[^a-z0-9@$!|]")


@functools.lru_cache(maxsize=1024)
def _is_secret_name(name: str) -> bool:
    words = fold_key(name)
    folded = "".join(words)
    if (
        folded in SECRET_NAMES
        or any(word in folded for word in SECRET_WORDS)
        or not SECRET_TOKENS.isdisjoint(words)
    ):
        return True
    plain = name if name.isascii() else _ascii_fold(name)
    spelt = _NOT_ALNUM.sub("", plain.lower()).translate(_LEET)
    return any(word in spelt for word in _LEET_WORDS)


def _key_name(key: object) -> str | None:
    """A mapping key as text (JSON object keys are strings); ``None`` when it has none."""
    if type(key) is str:
        return key
    if isinstance(key, str):
        return str.__str__(key)
    if isinstance(key, bytes | bytearray):
        return bytes(key).decode("latin-1")
    if key is None or isinstance(key, bool | int | float):
        return json.dumps(_scalar(key))
    return None


def is_secret_key(key: object) -> bool:
    """True when ``key`` looks like it names a secret, in any spelling (``API-Key``,
    ``x_auth``, ``user_pin``, ``password`` in fullwidth letters or with a Cyrillic ``a``).

    A key that is not text (nor bytes, a number, a bool or None) counts as secret: it
    cannot be checked.
    """
    name = _key_name(key)
    if name is None:
        return True
    return _is_secret_name(name)


# ------------------------------------------------------------------------------ strings

#: An ``Authorization``-style credential: the scheme, then the credentials (kept: the
#: scheme; redacted: what follows, up to the next whitespace, comma or quote).
_AUTH_SCHEME = re.compile(r"(?i)\b(bearer|basic|token|digest)(\s+)([^\s,;\"']{8,})")
#: A JSON Web Token: base64url header starting ``eyJ`` (``{"``), payload, signature.
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")


def redact_text(text: str) -> str:
    """``text`` bounded by :data:`MAX_STRING` and with the credentials in it redacted:
    URL passwords (:func:`strip_url_passwords`), ``Bearer``/``Basic``/``Token``/``Digest``
    credentials and JSON Web Tokens. Linear in ``len(text)``."""
    text = truncate(text, MAX_STRING)
    text = strip_url_passwords(text)
    lowered = text.lower()
    if "eyJ" in text or any(scheme in lowered for scheme in ("bearer", "basic", "token", "digest")):
        text = _JWT.sub(REDACTED, text)
        text = _AUTH_SCHEME.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    return text


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_SPACE = re.compile(r"\s")
_USER = re.compile(r"[^:/?#@\s]*")


def strip_url_passwords(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``[REDACTED]``.

    The password runs from the ``:`` after the user name to the last ``@`` before the
    next whitespace, so a password with a raw ``@`` or ``/`` in it is covered too (the
    host may be redacted with it; nothing secret is left). Linear in ``len(text)``.
    """
    if "://" not in text or "@" not in text:
        return text
    parts: list[str] = []
    done = 0  # text[:done] is in parts
    run_end = last_at = -1
    for match in _SCHEME.finditer(text):
        start = match.end()
        if start < done:
            continue
        if start > run_end:  # a new run of non-whitespace: where it ends, its last "@"
            space = _SPACE.search(text, start)
            run_end = space.start() if space else len(text)
            last_at = text.rfind("@", start, run_end)
        if last_at < start:
            continue
        user = _USER.match(text, start, last_at)
        colon = user.end() if user else start
        if colon >= last_at or text[colon] != ":":
            continue
        parts.append(text[done : colon + 1])
        parts.append(REDACTED)
        done = last_at
    if not parts:
        return text
    parts.append(text[done:])
    return "".join(parts)


# ------------------------------------------------------------------------------- values


def placeholder(value: object) -> str:
    """``<object of type module.Qualname>`` (builtins unqualified), read without running
    any code of the value or its class."""
    try:
        cls = type(value)
        qualname = type.__dict__["__qualname__"].__get__(cls)
        module = type.__dict__["__module__"].__get__(cls)
        if type(qualname) is not str or type(module) is not str:
            raise TypeError
    except Exception:
        return "<object>"
    if module == "builtins":
        return f"<object of type {qualname}>"
    return f"<object of type {module}.{qualname}>"


_MAPPING_LIKE: tuple[type, ...] = ()


def walk_as_mapping(cls: type) -> None:
    """Walk instances of ``cls`` through their ``items()`` (key, value) pairs, as a
    mapping (polydatum's Meta registers itself)."""
    global _MAPPING_LIKE
    if cls not in _MAPPING_LIKE:
        _MAPPING_LIKE = (*_MAPPING_LIKE, cls)


#: Kinds of object that are never walked for fields (functions, classes, modules, ...).
_OPAQUE = (
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.ModuleType,
    types.CodeType,
    types.FrameType,
    types.TracebackType,
    types.GeneratorType,
    types.CoroutineType,
    BaseException,
)
_NOT_FIELDS = frozenset({"__dict__", "__weakref__"})
_get_type_dict: Callable[[type], Mapping[str, Any]] = type.__dict__["__dict__"].__get__


def _scalar(value: Any) -> Any:
    """A bool, int or float (or a subclass: an IntEnum...) as the exact builtin type."""
    if isinstance(value, bool):
        return bool.__bool__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    return value


def _fields(value: object) -> Iterator[tuple[str, Any]] | None:
    """An object's own fields: its instance ``__dict__`` and its slots, read from the
    instance (no property, ``__getattr__`` or ``__getattribute__`` of its class runs)."""
    if isinstance(value, _OPAQUE):
        return None
    found: list[tuple[str, Any]] = []
    try:
        own = object.__getattribute__(value, "__dict__")
    except AttributeError:
        own = None
    if type(own) is dict:
        found.extend(dict.items(own))
    for klass in type(value).__mro__:
        for name, member in _get_type_dict(klass).items():
            # (a C type's __dict__ can be a member too: SimpleNamespace's)
            if type(member) is types.MemberDescriptorType and name not in _NOT_FIELDS:
                with contextlib.suppress(AttributeError):  # an empty slot
                    found.append((name, member.__get__(value, klass)))
    return iter(found) if found else None


def _walk_pairs(pairs: Iterator[Any], depth: int, budget: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in pairs:
        if budget[0] <= 0:
            out[TRUNCATED] = TRUNCATED
            break
        name = _key_name(key)
        if name is None:
            budget[0] -= 1
            out[placeholder(key)] = REDACTED
        elif _is_secret_name(name):
            budget[0] -= 1
            out[redact_text(name)] = REDACTED  # a key is text too: bounded, no URL password
        else:
            out[redact_text(name)] = _walk(item, depth + 1, budget)
    return out


def _walk_items(items: Iterator[Any], depth: int, budget: list[int]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if budget[0] <= 0:
            out.append(TRUNCATED)
            break
        out.append(_walk(item, depth + 1, budget))
    return out


def _walk(value: Any, depth: int, budget: list[int]) -> Any:
    budget[0] -= 1
    try:
        return _walk_one(value, depth, budget)
    except Exception:
        return placeholder(value)


def _walk_one(value: Any, depth: int, budget: list[int]) -> Any:
    cls = type(value)
    if value is None or cls is bool or cls is int or cls is float:
        return value
    if cls is str:
        return redact_text(value)
    if isinstance(value, enum.Enum):
        qualname = type.__dict__["__qualname__"].__get__(cls)
        return f"{qualname}.{object.__getattribute__(value, '_name_')}"
    if isinstance(value, bool | int | float):
        return _scalar(value)
    if isinstance(value, str):
        return redact_text(str.__str__(value))
    if isinstance(value, datetime.date | datetime.time):
        return _iso(value)
    if isinstance(value, datetime.timedelta):
        return datetime.timedelta.__str__(value)
    if isinstance(value, uuid.UUID):
        return uuid.UUID.__str__(value)
    if isinstance(value, decimal.Decimal):
        return decimal.Decimal.__str__(value)
    if isinstance(value, pathlib.PurePath):
        return redact_text(pathlib.PurePath.__str__(value))
    if depth >= MAX_DEPTH:
        return TRUNCATED
    remaining = budget[0] + 1  # no iterator is read further than the budget allows
    if isinstance(value, dict):
        return _walk_pairs(islice(dict.items(value), remaining), depth, budget)
    if isinstance(value, (*_MAPPING_LIKE, Mapping)):
        items: Any = value.items()  # type: ignore[attr-defined]  # mapping-likes have items()
        return _walk_pairs(islice(iter(items), remaining), depth, budget)
    if isinstance(value, tuple):
        fields = getattr(cls, "_fields", None)  # a named tuple: its fields by name
        if type(fields) is tuple and all(type(f) is str for f in fields):
            return _walk_pairs(
                islice(zip(fields, tuple.__iter__(value), strict=False), remaining),
                depth,
                budget,
            )
        return _walk_sequence(value, tuple, depth, budget)
    if isinstance(value, list):
        return _walk_sequence(value, list, depth, budget)
    if isinstance(value, set):
        return _walk_items(islice(set.__iter__(value), remaining), depth, budget)
    if isinstance(value, frozenset):
        return _walk_items(islice(frozenset.__iter__(value), remaining), depth, budget)
    fields = _fields(value)
    if fields is not None:
        return _walk_pairs(islice(fields, remaining), depth, budget)
    return placeholder(value)


def _iso(value: datetime.date | datetime.time) -> str:
    if isinstance(value, datetime.datetime):
        return datetime.datetime.isoformat(value)
    if isinstance(value, datetime.date):
        return datetime.date.isoformat(value)
    return datetime.time.isoformat(value)


def _walk_sequence(
    value: Any, base: type[list[Any]] | type[tuple[Any, ...]], depth: int, budget: list[int]
) -> list[Any]:
    """A list or tuple; a (secret-looking key, value) pair keeps its key, value redacted."""
    if base.__len__(value) == 2:
        first = base.__getitem__(value, 0)
        if isinstance(first, str | bytes | bytearray) and is_secret_key(first):
            budget[0] -= 2
            name = _key_name(first)
            return [redact_text(name) if name is not None else None, REDACTED]
    return _walk_items(islice(base.__iter__(value), budget[0] + 1), depth, budget)


def redact_value(value: Any) -> Any:
    """``value`` as JSON-able data with every secret redacted (see the module docstring).
    Never raises."""
    return _walk(value, 0, [MAX_ITEMS])


def attribute_value(value: Any) -> str | bool | int | float:
    """``value`` as a span attribute: a bool, number or (URL-stripped) string as itself,
    anything else as the JSON text of :func:`redact_value` (keys sorted), or as the
    string it walks to (a placeholder, a date...). Never raises."""
    cls = type(value)
    if cls is str:
        return redact_text(value)
    if cls is bool or cls is int or cls is float:
        return value  # type: ignore[no-any-return]
    walked = redact_value(value)
    if isinstance(walked, str | bool | int | float):
        return walked
    return json.dumps(walked, sort_keys=True)


class _Gettable(Protocol):
    def get(self, key: str, /) -> Any: ...


def redact_meta(meta: _Gettable, allow: Iterable[str]) -> dict[str, Any]:
    """The meta values that may be recorded: allow-listed keys only, secrets always redacted.

    Returned keys are ``polydatum.meta.<key>``; values are span-attribute-safe
    (see :func:`attribute_value`). Keys whose value is ``None`` are left out. Never
    raises: a key whose value cannot be read is left out too.
    """
    out: dict[str, Any] = {}
    for key in allow:
        try:
            value = meta.get(key)
        except Exception:
            continue
        if value is None:
            continue
        out[f"polydatum.meta.{key}"] = REDACTED if is_secret_key(key) else attribute_value(value)
    return out
