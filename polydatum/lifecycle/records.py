"""What the lifecycle keeps: registrations, made once, and the generators in flight.

A :class:`Registration` is made when a middleware or resource is registered (or, for
middleware handed out by an overridden ``DataManager.get_middleware``, when a context
first meets it) and never changes: the name it is known by in errors and telemetry,
its kind, whether it is an async generator function, its telemetry attributes.

A :data:`StepRecord` is one generator set up in one context, kept on the context's
middleware or resource stack until it is torn down:
``(registration, position, generator, is_async, contextvars_context)``. ``position``
is the middleware's index in the chain (a resource's index on its stack); every step
of the generator runs inside ``contextvars_context``, a copy of the context it was
created in, so that what a generator sets there (a contextvar, an OpenTelemetry
current span) never leaks into the caller. It is a plain tuple: two are made per
context of shape A, and a tuple costs no Python-level constructor.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Registration", "StepRecord", "callable_name", "middleware_registration"]

Kind = Literal["middleware", "resource"]


def callable_name(obj: Any) -> str:
    """The name a middleware is known by: its ``__name__``, else its class's name."""
    name = getattr(obj, "__name__", None)
    return name if isinstance(name, str) else type(obj).__name__


def _display_name(obj: Any) -> str:
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    module = getattr(obj, "__module__", None) or type(obj).__module__
    return f"{module}.{name}"


def _is_async_generator_function(obj: Any) -> bool:
    return inspect.isasyncgenfunction(obj) or inspect.isasyncgenfunction(
        getattr(obj, "__call__", None)  # noqa: B004 - the attribute itself
    )


@dataclass(frozen=True, slots=True)
class Registration:
    """One registered middleware or resource, normalised once.

    ``name``: a resource's registered name, a middleware's ``__name__`` (or class
    name); ``display_name``: ``module.qualname`` of the callable (``polydatum
    inspect``); ``source``: the callable itself; ``is_async``: it is an async
    generator function (what it returns decides how it is driven, this is what the
    registration declares); ``attributes``: the resource's ``telemetry_attributes``
    (added to its spans), or ``None``.
    """

    kind: Kind
    name: str
    source: Callable[..., Any]
    display_name: str
    is_async: bool
    attributes: Mapping[str, Any] | None

    @classmethod
    def of(cls, kind: Kind, source: Callable[..., Any], name: str | None = None) -> Registration:
        """The registration of ``source`` (named ``name``, else by :func:`callable_name`)."""
        attributes = getattr(source, "telemetry_attributes", None) if kind == "resource" else None
        return cls(
            kind,
            callable_name(source) if name is None else name,
            source,
            _display_name(source),
            _is_async_generator_function(source),
            attributes,
        )


def middleware_registration(middleware: Callable[..., Any]) -> Registration:
    """The registration of a context middleware callable."""
    return Registration.of("middleware", middleware)


#: ``(registration, position, generator, is_async, contextvars_context)``: see above.
StepRecord = tuple[Registration, int, Any, bool, contextvars.Context]
