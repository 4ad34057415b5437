"""Read-only request metadata (``polydatum.context.Meta``).

Meta values are frozen when the Meta is built: a ``dict`` becomes a :class:`FrozenDict`,
a ``list`` a :class:`FrozenList`, a ``set`` a ``frozenset``, and a ``tuple`` holding any of
them a tuple of their frozen copies, at any depth (up to :data:`MAX_FREEZE_DEPTH`
levels; cycles and shared values are kept). So neither the caller, changing its dict
after opening the context, nor a step, changing a nested value, changes what the other
steps see. The frozen types are subclasses of ``dict`` and ``list``: they compare equal
to the originals, ``isinstance`` and ``json.dumps`` work as before, and ``dict(value)`` /
``list(value)`` give a mutable copy. Other objects (a dataclass instance, a user object)
are shared, not copied: make them immutable (``@dataclass(frozen=True)``) when steps must
not change them. Freezing guards against mistakes, not against code that goes around it
(``dict.__setitem__(value, ...)``). When every value is a str, int, float, bool, bytes or
None, nothing is copied beyond the top-level dict.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

from polydatum.redaction import walk_as_mapping

#: Values nested deeper than this are shared, not frozen.
MAX_FREEZE_DEPTH = 100

_CHANGE = (
    "Meta values can not be changed: this {kind} is a read-only copy; "
    "{kind}(value) makes a mutable one."
)


class FrozenDict(dict[Any, Any]):
    """A ``dict`` Meta value: equal to the dict it was made from, and read-only."""

    __slots__ = ()

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(_CHANGE.format(kind="dict"))

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self),))


class FrozenList(list[Any]):
    """A ``list`` Meta value: equal to the list it was made from, and read-only."""

    __slots__ = ()

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(_CHANGE.format(kind="list"))

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenList, (list(self),))


#: Values that are immutable as they are: kept, not copied.
_PLAIN = frozenset({str, int, float, bool, bytes, type(None)})


def _freeze(value: Any, memo: dict[int, Any], depth: int) -> Any:
    cls = type(value)
    if cls in _PLAIN or depth > MAX_FREEZE_DEPTH:
        return value
    done = memo.get(id(value))
    if done is not None:
        return done
    if cls is dict:
        frozen_dict = memo[id(value)] = FrozenDict()
        dict.update(frozen_dict, {k: _freeze(v, memo, depth + 1) for k, v in value.items()})
        return frozen_dict
    if cls is list:
        frozen_list = memo[id(value)] = FrozenList()
        list.extend(frozen_list, [_freeze(v, memo, depth + 1) for v in value])
        return frozen_list
    if cls is set:
        return frozenset(value)
    if cls is tuple:
        items = tuple(_freeze(v, memo, depth + 1) for v in value)
        if any(a is not b for a, b in zip(items, value, strict=True)):
            return items
    return value


def _frozen(opts: Mapping[str, Any]) -> dict[str, Any]:
    """``dict(opts)`` with its values frozen (see the module docstring)."""
    values = dict(opts)
    for value in values.values():
        if type(value) not in _PLAIN:
            memo: dict[int, Any] = {}
            return {key: _freeze(value, memo, 1) for key, value in values.items()}
    return values


class Meta:
    """Read-only metadata about a context: the user, the request id, ...

    Keys read as attributes; a missing key reads as ``None``. Nothing can be
    assigned after construction (``AttributeError``) and nested dicts, lists and sets
    are frozen copies (see the module docstring), so services can trust that what
    the request started with is what they see.
    """

    __slots__ = ("_values",)
    _values: dict[str, Any]

    def __init__(self, opts: Mapping[str, Any] | None = None) -> None:
        object.__setattr__(self, "_values", _frozen(opts) if opts else {})

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("Meta values can not be changed.")

    def __delattr__(self, key: str) -> None:
        raise AttributeError("Meta values can not be changed.")

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__") and key.endswith("__"):
            raise AttributeError(key)
        return self._values.get(key)

    def get(self, key: str, default: Any = None) -> Any:
        """Return the value for ``key``, or ``default`` when it is not set."""
        return self._values.get(key, default)

    def require(self, key: str) -> Any:
        """Return the value for ``key``; ``ValueError`` when it is missing or empty."""
        value = self._values.get(key)
        if not value:
            raise ValueError(f'"{key}" is empty.')
        return value

    def items(self) -> Iterator[tuple[str, Any]]:
        """Iterate over ``(key, value)`` pairs."""
        yield from self._values.items()

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Meta):
            return self._values == other._values
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __str__(self) -> str:
        return json.dumps(self._values, indent=2, default=repr)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self}>"


walk_as_mapping(Meta)  # telemetry records a nested Meta as the mapping it is

_new = object.__new__
_set_values = Meta._values.__set__  # type: ignore[misc, attr-defined]


def meta_of(opts: Mapping[str, Any]) -> Meta:
    """``Meta(opts)`` for a non-empty mapping, without the generic instance-creation
    path (``type.__call__`` looking up and calling ``__init__``, which then calls
    ``object.__setattr__``): a context builds one per request. Values are frozen as in
    ``Meta(opts)``; when all are plain (str, numbers...) that costs one type check each."""
    meta: Meta = _new(Meta)
    values = dict(opts)
    for value in values.values():
        if type(value) not in _PLAIN:
            values = _frozen(values)
            break
    _set_values(meta, values)
    return meta
