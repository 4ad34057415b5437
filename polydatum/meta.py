"""Read-only request metadata (``polydatum.context.Meta``)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any


class Meta:
    """Read-only metadata about a context: the user, the request id, ...

    Keys read as attributes; a missing key reads as ``None``. Nothing can be
    assigned after construction (``AttributeError``), so services can trust that
    what the request started with is what they see.
    """

    __slots__ = ("_values",)
    _values: dict[str, Any]

    def __init__(self, opts: Mapping[str, Any] | None = None) -> None:
        object.__setattr__(self, "_values", dict(opts) if opts else {})

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


_new = object.__new__
_set_values = Meta._values.__set__  # type: ignore[misc, attr-defined]


def meta_of(opts: Mapping[str, Any]) -> Meta:
    """``Meta(opts)`` for a non-empty mapping, without the generic instance-creation
    path (``type.__call__`` looking up and calling ``__init__``, which then calls
    ``object.__setattr__``): a context builds one per request."""
    meta: Meta = _new(Meta)
    _set_values(meta, dict(opts))
    return meta
