"""The one module of polydatum that reads other libraries' private state.

polydatum decides for every context, cheaply, whether anything would record it, and
makes a span current at every step. The public OpenTelemetry and structlog APIs answer
both, each through a few calls; on that path polydatum reads the state those calls read.
Each read here is

* decided once, at import: when the private name is missing or not of the shape that
  was checked, the public API is used instead (the *fallback*) for the life of the
  process, and the per-call cost is the fallback's;
* tested (``tests/test_otel_compat.py``): the fast path and the fallback give the same
  answers, and the fallback is taken, and right, when the private name goes away;
* bounded: ``pyproject.toml`` keeps each library below its next major version.

It imports only the standard library, ``opentelemetry`` and ``structlog``: the lowest
layer of polydatum, it never imports polydatum.

The shortcuts
-------------

:data:`structlog_config`
    structlog's configuration object (``structlog._config._CONFIG``), which
    ``structlog.configure`` and ``reset_defaults`` update in place. Its attributes say
    whether structlog is configured and with which wrapper class (so which level
    filter) and processors, without building the dictionary ``structlog.get_config()``
    returns: the idle decision of every context reads two of them. Taken when, at
    import, its attributes are the objects ``get_config()`` returns. Fallback:
    :class:`PublicStructlogConfig`, the same attributes answered by
    ``structlog.is_configured()`` and ``structlog.get_config()``.

:func:`global_tracer_provider_set`, :func:`global_meter_provider_set`,
:func:`global_providers_unset`
    Whether ``trace.set_tracer_provider`` / ``metrics.set_meter_provider`` was called,
    read from the variables they set (``opentelemetry.trace._TRACER_PROVIDER``,
    ``opentelemetry.metrics._internal._METER_PROVIDER``): with neither set and
    structlog quiet, a context records nothing, decided without a call into
    OpenTelemetry. Taken when each variable is there and holds ``None`` or a provider.
    Fallback: ``trace.get_tracer_provider()`` is not the API's
    ``ProxyTracerProvider``; ``metrics.get_meter_provider()`` is not the API's proxy
    (whose class is not public: a class of the API's metrics package other than
    ``NoOpMeterProvider``). Unlike the fast path, ``get_*_provider()`` also loads a
    provider named by ``OTEL_PYTHON_TRACER_PROVIDER`` / ``OTEL_PYTHON_METER_PROVIDER``,
    as any caller of the API would.

:data:`attach`, :data:`detach`, :data:`get_current`
    OpenTelemetry keeps the current context in a ``ContextVar``
    (``opentelemetry.context._RUNTIME_CONTEXT._current_context``);
    ``opentelemetry.context.attach`` / ``detach`` / ``get_current`` are its ``set`` /
    ``reset`` / ``get`` behind two calls. The shortcut is that variable's own methods,
    used at every step; taken when, at import, the runtime context is the contextvars
    one and its variable holds what ``get_current()`` returns. Fallback: the three API
    functions (so also when ``OTEL_PYTHON_CONTEXT`` selects another runtime context).
    Unlike the fast path, the API's ``detach`` logs a token from another context
    instead of raising.

:data:`set_span_in_context`
    ``trace.set_span_in_context(span, parent)``: a copy of ``parent`` (default: the
    current context) with the span under the API's private key
    (``opentelemetry.trace.propagation._SPAN_KEY``), built directly. Fallback:
    ``trace.set_span_in_context``; also taken when, at import, ``trace.get_current_span``
    does not find a span put in by the shortcut.

Checked against the source of every release of opentelemetry-api from 1.27.0 to 1.44.0
and of structlog from 23.1.0 to 26.1.0, and by the tests on opentelemetry-api 1.45.1 and
structlog 26.1.0.
"""

from __future__ import annotations

import contextvars
import importlib
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import structlog
from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.context.context import Context
from opentelemetry.trace import propagation as trace_propagation
from opentelemetry.trace.span import Span

__all__ = [
    "PLAIN_SUPPRESSION_KEY",
    "PublicStructlogConfig",
    "SetSpanInContext",
    "StructlogConfig",
    "attach",
    "build_set_span_in_context",
    "context_functions",
    "detach",
    "find_context_var",
    "find_provider_checks",
    "find_structlog_config",
    "find_suppression_keys",
    "get_current",
    "global_meter_provider_set",
    "global_providers_unset",
    "global_tracer_provider_set",
    "instrumentation_suppressed",
    "public_meter_provider_set",
    "public_tracer_provider_set",
    "set_span_in_context",
    "structlog_config",
    "suppression_keys",
]


def _module(name: str) -> Any:
    """The module ``name``, or ``None`` when the library no longer has it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# The modules holding the private state read here (``None``: no longer there). The
# ``find_*`` functions take them as arguments, so that tests can hand them stand-ins.
_structlog_state: Any = _module("structlog._config")
_metrics_state: Any = _module("opentelemetry.metrics._internal")


# ------------------------------------------------------------------------ structlog


class StructlogConfig(Protocol):
    """What polydatum reads of structlog's configuration (all of it in ``get_config()``)."""

    @property
    def is_configured(self) -> bool: ...

    @property
    def default_wrapper_class(self) -> Any: ...

    @property
    def default_processors(self) -> Iterable[Any]: ...

    @property
    def default_context_class(self) -> Any: ...

    @property
    def logger_factory(self) -> Any: ...


class PublicStructlogConfig:
    """structlog's configuration read through its public API (:data:`structlog_config`'s
    fallback). ``get_config()`` returns the configured objects themselves, so identity
    comparisons give the same answers as on structlog's own object."""

    __slots__ = ()

    @property
    def is_configured(self) -> bool:
        return structlog.is_configured()

    @property
    def default_wrapper_class(self) -> Any:
        return structlog.get_config()["wrapper_class"]

    @property
    def default_processors(self) -> Iterable[Any]:
        processors: Iterable[Any] = structlog.get_config()["processors"]
        return processors

    @property
    def default_context_class(self) -> Any:
        return structlog.get_config()["context_class"]

    @property
    def logger_factory(self) -> Any:
        return structlog.get_config()["logger_factory"]


def find_structlog_config(config_module: Any = _structlog_state) -> StructlogConfig:
    """structlog's own configuration object (``_CONFIG`` of ``config_module``), or
    :class:`PublicStructlogConfig` when it is missing or disagrees with the public API."""
    config: Any = getattr(config_module, "_CONFIG", None)
    public = structlog.get_config()
    try:
        agrees = (
            config.is_configured is structlog.is_configured()
            and config.default_wrapper_class is public["wrapper_class"]
            and config.default_processors is public["processors"]
            and config.default_context_class is public["context_class"]
            and config.logger_factory is public["logger_factory"]
        )
    except AttributeError:
        agrees = False
    if not agrees:
        return PublicStructlogConfig()
    found: StructlogConfig = config
    return found


#: structlog's configuration, live (see the module docstring).
structlog_config: StructlogConfig = find_structlog_config()


# ------------------------------------------------------------------------ providers


def public_tracer_provider_set() -> bool:
    """Whether a global tracer provider was set, asked of the public API."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def public_meter_provider_set() -> bool:
    """Whether a global meter provider was set, asked of the public API.

    Until one is set, ``get_meter_provider()`` returns the API's proxy, whose class is
    not public: a class of the API's own metrics package other than the no-op one.
    """
    cls = type(otel_metrics.get_meter_provider())
    package = otel_metrics.__name__
    in_api = cls.__module__ == package or cls.__module__.startswith(f"{package}.")
    return not in_api or cls is otel_metrics.NoOpMeterProvider


def _holds(holder: Any, name: str, kind: type) -> bool:
    """Whether ``holder`` has an attribute ``name`` that is ``None`` or a ``kind``."""
    value = getattr(holder, name, kind)  # ``kind`` itself: missing
    return value is not kind and (value is None or isinstance(value, kind))


def find_provider_checks(
    trace_state: Any = trace, metrics_state: Any = _metrics_state
) -> tuple[Callable[[], bool], Callable[[], bool], Callable[[], bool]]:
    """``(tracer provider set, meter provider set, neither set)``: each reads the global
    where ``trace_state`` / ``metrics_state`` keep it, if they do, else asks the API."""
    tracer_set: Callable[[], bool] = public_tracer_provider_set
    meter_set: Callable[[], bool] = public_meter_provider_set
    tracer_fast = _holds(trace_state, "_TRACER_PROVIDER", trace.TracerProvider)
    meter_fast = _holds(metrics_state, "_METER_PROVIDER", otel_metrics.MeterProvider)
    if tracer_fast:

        def tracer_set() -> bool:
            return trace_state._TRACER_PROVIDER is not None

    if meter_fast:

        def meter_set() -> bool:
            return metrics_state._METER_PROVIDER is not None

    if tracer_fast and meter_fast:

        def providers_unset() -> bool:
            return trace_state._TRACER_PROVIDER is None and metrics_state._METER_PROVIDER is None

    else:

        def providers_unset() -> bool:
            return not tracer_set() and not meter_set()

    return tracer_set, meter_set, providers_unset


#: Whether a global tracer provider was set (``trace.set_tracer_provider``).
global_tracer_provider_set: Callable[[], bool]
#: Whether a global meter provider was set (``metrics.set_meter_provider``).
global_meter_provider_set: Callable[[], bool]
#: Neither global provider set: every global span and instrument is a no-op (hot path).
global_providers_unset: Callable[[], bool]
global_tracer_provider_set, global_meter_provider_set, global_providers_unset = (
    find_provider_checks()
)


# -------------------------------------------------------------- the current context


def find_context_var(context_module: Any = otel_context) -> contextvars.ContextVar[Context] | None:
    """The ``ContextVar`` behind OpenTelemetry's current context, or ``None`` when the
    context is kept otherwise (another ``OTEL_PYTHON_CONTEXT``) or cannot be found."""
    runtime = getattr(context_module, "_RUNTIME_CONTEXT", None)
    var = getattr(runtime, "_current_context", None)
    if type(runtime).__name__ != "ContextVarsRuntimeContext":
        return None
    if not isinstance(var, contextvars.ContextVar) or var.get() is not otel_context.get_current():
        return None
    found: contextvars.ContextVar[Context] = var
    return found


def context_functions(
    var: contextvars.ContextVar[Context] | None,
) -> tuple[
    Callable[[Context], contextvars.Token[Context]],
    Callable[[contextvars.Token[Context]], None],
    Callable[[], Context],
]:
    """``(attach, detach, get_current)``: ``var``'s own methods, or without it the API's."""
    if var is None:
        return otel_context.attach, otel_context.detach, otel_context.get_current
    return var.set, var.reset, var.get


#: Make an OpenTelemetry context current; returns the token for :data:`detach`.
attach: Callable[[Context], contextvars.Token[Context]]
#: Undo :data:`attach` (strictly LIFO).
detach: Callable[[contextvars.Token[Context]], None]
#: The current OpenTelemetry context.
get_current: Callable[[], Context]
attach, detach, get_current = context_functions(find_context_var())


# --------------------------------------------------------------- the current span


class SetSpanInContext(Protocol):
    """The signature of ``trace.set_span_in_context``."""

    def __call__(self, span: Span, context: Context | None = None) -> Context: ...


def build_set_span_in_context(
    current: Callable[[], Context] | None = None, key_holder: Any = trace_propagation
) -> SetSpanInContext:
    """``trace.set_span_in_context`` without its calls of indirection: a copy of the
    context with the span under ``key_holder``'s ``_SPAN_KEY``, if that is a string and
    a span put in under it is what ``trace.get_current_span`` finds; else the API's.
    ``current`` gives the context used when none is passed (default :data:`get_current`).
    """
    key = getattr(key_holder, "_SPAN_KEY", None)
    if not isinstance(key, str):
        return trace.set_span_in_context
    current_context = get_current if current is None else current

    def in_context(span: Span, context: Context | None = None) -> Context:
        base = current_context() if context is None else context
        return Context({**base, key: span})

    probe = trace.NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)
    if trace.get_current_span(in_context(probe, Context())) is not probe:
        return trace.set_span_in_context
    return in_context


#: ``trace.set_span_in_context(span, context=None)``.
set_span_in_context: SetSpanInContext = build_set_span_in_context()


# ------------------------------------------------------ suppress_instrumentation()

#: The name ``opentelemetry.instrumentation.utils.suppress_instrumentation()`` also
#: sets, for instrumentations older than the API's own key.
PLAIN_SUPPRESSION_KEY = "suppress_instrumentation"


def find_suppression_keys(context_module: Any = otel_context) -> tuple[str, ...]:
    """The context keys that, set to a true value, ask instrumentations to record
    nothing: the API's ``_SUPPRESS_INSTRUMENTATION_KEY`` (when it is still a string) and
    the plain name contrib's ``suppress_instrumentation()`` sets beside it."""
    key = getattr(context_module, "_SUPPRESS_INSTRUMENTATION_KEY", None)
    if isinstance(key, str) and key != PLAIN_SUPPRESSION_KEY:
        return (key, PLAIN_SUPPRESSION_KEY)
    return (PLAIN_SUPPRESSION_KEY,)


#: The keys :func:`instrumentation_suppressed` reads.
suppression_keys: tuple[str, ...] = find_suppression_keys()


def instrumentation_suppressed() -> bool:
    """Whether the current OpenTelemetry context asks instrumentations to record nothing
    (``with suppress_instrumentation():``, as an exporter does around its own I/O)."""
    current = get_current()
    return any(current.get(key) for key in suppression_keys)
