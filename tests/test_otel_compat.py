"""polydatum.compat: every read of OpenTelemetry's and structlog's private state gives
the public API's answers, gives way to the public API when the private name is gone or
of another shape, and is covered by an upper version bound (issue 14, point 4).

The private names stay *read* here (tests may); stand-ins (``SimpleNamespace``) take
their place where removing the real name would break the library itself.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.context.context import Context
from opentelemetry.metrics import _internal as metrics_internal
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import propagation
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from polydatum import DataManager, Service, compat, telemetry
from polydatum.context import DataAccessContext
from polydatum.testing import TelemetryCapture

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "polydatum"

STRUCTLOG_FIELDS = (
    "is_configured",
    "default_wrapper_class",
    "default_processors",
    "default_context_class",
    "logger_factory",
)


def a_span() -> trace.Span:
    return trace.NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)


# ------------------------------------------------------------------------ structlog


def test_structlog_config_is_structlogs_own_and_agrees_with_the_public_api() -> None:
    """Reset, configured, reconfigured, reset: the same objects through both paths."""
    assert compat.structlog_config is structlog._config._CONFIG  # the fast path is in use
    public = compat.PublicStructlogConfig()
    info = structlog.make_filtering_bound_logger(logging.INFO)
    warning = structlog.make_filtering_bound_logger(logging.WARNING)
    processors = [structlog.processors.JSONRenderer()]
    factory = structlog.PrintLoggerFactory(io.StringIO())
    structlog.reset_defaults()
    default_wrapper = structlog.get_config()["wrapper_class"]
    states: list[tuple[str, Callable[[], None], bool]] = [
        ("reset", structlog.reset_defaults, False),
        (
            "configured",
            lambda: structlog.configure(
                processors=processors,
                wrapper_class=info,
                logger_factory=factory,
                context_class=dict,
            ),
            True,
        ),
        ("reconfigured", lambda: structlog.configure(wrapper_class=warning), True),
        ("reset again", structlog.reset_defaults, False),
    ]
    wrappers = []
    for state, apply, configured in states:
        apply()
        for name in STRUCTLOG_FIELDS:
            fast, slow = getattr(compat.structlog_config, name), getattr(public, name)
            assert fast is slow, (state, name)
        assert public.is_configured is configured
        wrappers.append(public.default_wrapper_class)
    assert wrappers == [default_wrapper, info, warning, default_wrapper]
    assert public.default_processors is not processors  # reset replaced them


def test_structlog_config_falls_back_to_the_public_api_without_its_internals() -> None:
    assert compat.find_structlog_config(structlog._config) is structlog._config._CONFIG
    stale = SimpleNamespace(**{name: object() for name in STRUCTLOG_FIELDS})
    for stand_in in (
        None,  # structlog._config is gone
        SimpleNamespace(),  # _CONFIG is gone
        SimpleNamespace(_CONFIG={"is_configured": False}),  # another shape
        SimpleNamespace(_CONFIG=stale),  # the right shape, not what structlog uses
    ):
        assert type(compat.find_structlog_config(stand_in)) is compat.PublicStructlogConfig


def canonical_lines(level: int | None) -> list[str]:
    """The canonical lines of two contexts with structlog configured at ``level``
    (``None``: not configured, which prints to stdout: captured as nothing here)."""
    out = io.StringIO()
    if level is None:
        structlog.reset_defaults()
    else:
        telemetry.configure_logging(json_output=True, level=level, stream=out)
    dm = DataManager()
    for _ in range(2):
        with dm.context():
            pass
    return [json.loads(line)["event"] for line in out.getvalue().splitlines()]


def test_telemetry_logs_the_same_through_the_structlog_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """INFO on, WARNING, unconfigured, INFO again: the same lines on either path."""
    levels = [logging.INFO, logging.WARNING, None, logging.INFO]
    expected = [["polydatum.context"] * 2, [], [], ["polydatum.context"] * 2]
    assert [canonical_lines(level) for level in levels] == expected
    monkeypatch.setattr(telemetry, "_STRUCTLOG_CONFIG", compat.PublicStructlogConfig())
    assert [canonical_lines(level) for level in levels] == expected


# ------------------------------------------------------------------------ providers


@pytest.fixture
def providers(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Any, Any], None]]:
    """Set the global providers as ``set_*_provider`` does (and put them back after):
    OpenTelemetry lets a process set each once, so a test cannot use the API for it."""
    for variable in ("OTEL_PYTHON_TRACER_PROVIDER", "OTEL_PYTHON_METER_PROVIDER"):
        monkeypatch.delenv(variable, raising=False)

    def set_globals(tracer_provider: Any, meter_provider: Any) -> None:
        monkeypatch.setattr(trace, "_TRACER_PROVIDER", tracer_provider)
        monkeypatch.setattr(metrics_internal, "_METER_PROVIDER", meter_provider)

    set_globals(None, None)
    yield set_globals


def provider_states() -> list[tuple[Any, Any]]:
    tracers = [None, TracerProvider(), trace.NoOpTracerProvider()]
    meters = [None, MeterProvider(), otel_metrics.NoOpMeterProvider()]
    return [(t, m) for t in tracers for m in meters]


def test_provider_checks_agree_with_the_public_api(
    providers: Callable[[Any, Any], None],
) -> None:
    # The fast path is in use (the public functions are the fallback).
    assert compat.global_tracer_provider_set is not compat.public_tracer_provider_set
    assert compat.global_meter_provider_set is not compat.public_meter_provider_set
    public_unset = compat.find_provider_checks(SimpleNamespace(), SimpleNamespace())[2]
    answers = []
    for tracer_provider, meter_provider in provider_states():
        providers(tracer_provider, meter_provider)
        tracer_set, meter_set = tracer_provider is not None, meter_provider is not None
        assert compat.global_tracer_provider_set() is tracer_set
        assert compat.public_tracer_provider_set() is tracer_set
        assert compat.global_meter_provider_set() is meter_set
        assert compat.public_meter_provider_set() is meter_set
        assert compat.global_providers_unset() is public_unset()
        answers.append(compat.global_providers_unset())
    assert answers == [True] + [False] * 8


def test_provider_checks_fall_back_without_their_internals(
    providers: Callable[[Any, Any], None],
) -> None:
    public = (compat.public_tracer_provider_set, compat.public_meter_provider_set)
    for trace_state, metrics_state in [
        (None, None),  # the modules are gone
        (SimpleNamespace(), SimpleNamespace()),  # the names are gone
        (SimpleNamespace(_TRACER_PROVIDER="?"), SimpleNamespace(_METER_PROVIDER=42)),  # shape
    ]:
        tracer_set, meter_set, unset = compat.find_provider_checks(trace_state, metrics_state)
        assert (tracer_set, meter_set) == public
        for tracer_provider, meter_provider in provider_states():
            providers(tracer_provider, meter_provider)
            assert tracer_set() is (tracer_provider is not None)
            assert meter_set() is (meter_provider is not None)
            assert unset() is (tracer_provider is None and meter_provider is None)

    # One found, one not: each check is chosen on its own.
    tracer_set, meter_set, unset = compat.find_provider_checks(trace, SimpleNamespace())
    assert tracer_set is not compat.public_tracer_provider_set
    assert meter_set is compat.public_meter_provider_set
    providers(None, MeterProvider())
    assert (tracer_set(), meter_set(), unset()) == (False, True, False)
    providers(None, None)
    assert (tracer_set(), meter_set(), unset()) == (False, False, True)

    # The fast path reads the holder it was given.
    held_tracer = SimpleNamespace(_TRACER_PROVIDER=None)
    held_meter = SimpleNamespace(_METER_PROVIDER=None)
    tracer_set, meter_set, unset = compat.find_provider_checks(held_tracer, held_meter)
    assert (tracer_set(), meter_set(), unset()) == (False, False, True)
    held_tracer._TRACER_PROVIDER = TracerProvider()
    assert (tracer_set(), meter_set(), unset()) == (True, False, False)
    held_meter._METER_PROVIDER = MeterProvider()
    assert (tracer_set(), meter_set(), unset()) == (True, True, False)


def test_provider_checks_follow_the_real_set_provider_calls() -> None:
    """In a fresh interpreter, through ``set_tracer_provider`` / ``set_meter_provider``
    themselves: the fast reads see what the public API sees."""
    script = textwrap.dedent(
        """
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.trace import TracerProvider
        from polydatum import compat

        def state():
            return [
                compat.global_tracer_provider_set(), compat.public_tracer_provider_set(),
                compat.global_meter_provider_set(), compat.public_meter_provider_set(),
                compat.global_providers_unset(),
            ]

        print(state())
        trace.set_tracer_provider(TracerProvider())
        print(state())
        metrics.set_meter_provider(MeterProvider())
        print(state())
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True, text=True, check=True, timeout=60, cwd=ROOT, env=env,
    )  # fmt: skip
    assert out.stdout.splitlines() == [
        "[False, False, False, False, True]",
        "[True, True, False, False, False]",
        "[True, True, True, True, False]",
    ]


class Users(Service):
    def get(self, uid: int) -> int:
        return uid


def test_the_idle_decision_is_the_same_through_the_provider_fallback(
    providers: Callable[[Any, Any], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A context with structlog quiet records only when a global provider is set."""
    telemetry.configure_logging(level=logging.WARNING, stream=io.StringIO())
    dm = DataManager()
    recorded: list[bool] = []

    def records() -> bool:
        with dm.context() as ctx:
            return ctx._telemetry is not None

    fallback = compat.find_provider_checks(None, None)
    for checks in (compat.find_provider_checks(), fallback):
        monkeypatch.setattr(telemetry, "_global_tracer_provider_set", checks[0])
        monkeypatch.setattr(telemetry, "_global_meter_provider_set", checks[1])
        monkeypatch.setattr(telemetry, "_global_providers_unset", checks[2])
        for tracer_provider, meter_provider in [(None, None), (TracerProvider(), None)]:
            providers(tracer_provider, meter_provider)
            recorded.append(records())
    assert recorded == [False, True, False, True]


# -------------------------------------------------------------- the current context


def test_context_functions_are_the_runtime_context_variable_and_agree_with_the_api() -> None:
    var = compat.find_context_var()
    assert var is otel_context._RUNTIME_CONTEXT._current_context  # the fast path is in use
    assert (compat.attach, compat.detach, compat.get_current) == (var.set, var.reset, var.get)
    assert compat.context_functions(None) == (
        otel_context.attach,
        otel_context.detach,
        otel_context.get_current,
    )
    span = a_span()
    for attach, detach, get_current in (
        compat.context_functions(var),
        compat.context_functions(None),
    ):
        built = trace.set_span_in_context(span)
        token = attach(built)
        assert get_current() is built
        assert otel_context.get_current() is built
        assert trace.get_current_span() is span
        detach(token)
        assert trace.get_current_span() is trace.INVALID_SPAN
    # The tokens are the same kind: attached one way, detached the other.
    token = compat.attach(trace.set_span_in_context(span))
    otel_context.detach(token)
    assert trace.get_current_span() is trace.INVALID_SPAN
    token = otel_context.attach(trace.set_span_in_context(span))
    compat.detach(token)
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_context_functions_fall_back_without_the_runtime_context_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class OtherRuntime:  # an OTEL_PYTHON_CONTEXT that is not the contextvars one
        _current_context = object()

    assert compat.find_context_var(SimpleNamespace()) is None  # _RUNTIME_CONTEXT gone
    with monkeypatch.context() as patch:
        patch.setattr(otel_context, "_RUNTIME_CONTEXT", OtherRuntime())
        assert compat.find_context_var() is None
    with monkeypatch.context() as patch:
        patch.delattr(otel_context, "_RUNTIME_CONTEXT")
        assert compat.find_context_var() is None
    with monkeypatch.context() as patch:  # the right runtime, its variable kept otherwise
        patch.setattr(otel_context._RUNTIME_CONTEXT, "_current_context", object())
        assert compat.find_context_var() is None
    # ... and without the variable the API's functions are used (they agree: above).
    attach, detach, get_current = compat.context_functions(compat.find_context_var(None))
    assert (attach, detach, get_current) == (
        otel_context.attach,
        otel_context.detach,
        otel_context.get_current,
    )
    span = a_span()
    token = attach(trace.set_span_in_context(span))
    assert trace.get_current_span(get_current()) is span
    detach(token)
    assert trace.get_current_span() is trace.INVALID_SPAN


# --------------------------------------------------------------- the current span


def test_set_span_in_context_matches_the_api() -> None:
    """(Moved from test_telemetry.py, with its assertions.)"""
    assert compat.set_span_in_context is not trace.set_span_in_context  # fast path in use
    assert telemetry._in_context is compat.set_span_in_context
    assert telemetry._attach is compat.attach and telemetry._detach is compat.detach
    span = a_span()
    parent = otel_context.set_value("polydatum-test-key", 1, Context())
    built = compat.set_span_in_context(span, parent)
    assert built == trace.set_span_in_context(span, parent)
    assert trace.get_current_span(built) is span
    assert built["polydatum-test-key"] == 1
    token = telemetry._attach(built)
    assert trace.get_current_span() is span
    # With no context given: a copy of the current one, as the API makes.
    inner = a_span()
    nested = compat.set_span_in_context(inner)
    assert nested == trace.set_span_in_context(inner)
    assert trace.get_current_span(nested) is inner
    assert nested["polydatum-test-key"] == 1
    telemetry._detach(token)
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_set_span_in_context_falls_back_without_the_span_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with monkeypatch.context() as patch:
        patch.delattr(propagation, "_SPAN_KEY")
        assert compat.build_set_span_in_context() is trace.set_span_in_context
    for stand_in in (
        SimpleNamespace(),  # gone
        SimpleNamespace(_SPAN_KEY=42),  # another shape
        # A string, but not the key the API reads (that one has a uuid after the name):
        # the probe at build time finds no span under it.
        SimpleNamespace(_SPAN_KEY=propagation.SPAN_KEY),
    ):
        assert compat.build_set_span_in_context(key_holder=stand_in) is trace.set_span_in_context
    real = SimpleNamespace(_SPAN_KEY=propagation._SPAN_KEY)
    assert compat.build_set_span_in_context(key_holder=real) is not trace.set_span_in_context
    # The current context comes from the function given (default: compat.get_current).
    base = otel_context.set_value("polydatum-test-key", 2, Context())
    in_context = compat.build_set_span_in_context(lambda: base, key_holder=real)
    span = a_span()
    assert in_context(span) == trace.set_span_in_context(span, base)


def test_telemetry_traces_the_same_through_the_otel_fallbacks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same span tree with the runtime-context and span-key shortcuts, and without."""

    def middleware(ctx: DataAccessContext) -> Iterator[None]:
        yield

    def db(ctx: DataAccessContext) -> Iterator[str]:
        yield "db"

    def traced() -> list[tuple[str, list[Any]]]:
        with TelemetryCapture() as cap:
            dm = cap.data_manager()
            dm.register_services(users=Users())
            dm.register_context_middleware(middleware)
            dm.register_resources(db=db)
            with dm.context() as ctx:
                assert ctx.dal.users.get(3) == 3
                assert ctx.db == "db"
                assert trace.get_current_span().is_recording()
            assert trace.get_current_span() is trace.INVALID_SPAN
            return cap.tree()

    fast = traced()
    monkeypatch.setattr(telemetry, "_attach", otel_context.attach)
    monkeypatch.setattr(telemetry, "_detach", otel_context.detach)
    monkeypatch.setattr(telemetry, "_in_context", trace.set_span_in_context)
    assert traced() == fast
    assert fast == [
        (
            "polydatum.context",
            [
                ("polydatum.middleware.setup middleware", []),
                ("users.get", []),
                ("polydatum.resource.setup db", []),
                ("polydatum.middleware.teardown middleware", []),
                ("polydatum.resource.teardown db", []),
            ],
        )
    ]


# ------------------------------------------------------------------- the boundaries


def imported_modules(path: Path) -> set[str]:
    """The absolute modules a file imports, including ``_module("...")`` look-ups."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            for alias in node.names:  # ``from opentelemetry import trace``: a module
                if _is_module(f"{node.module}.{alias.name}"):
                    found.add(f"{node.module}.{alias.name}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "_module"
            and isinstance(node.args[0], ast.Constant)
        ):
            found.add(node.args[0].value)
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def distribution_of(module: str) -> str | None:
    """The installed distribution that holds ``module``'s file (``None``: a namespace
    package such as ``opentelemetry``, held by none)."""
    filename = importlib.import_module(module).__file__
    if filename is None:
        return None
    file = Path(filename).resolve()
    top = module.partition(".")[0]
    for name in importlib.metadata.packages_distributions().get(top, []):
        dist = importlib.metadata.distribution(name)
        if any(Path(str(dist.locate_file(f))).resolve() == file for f in dist.files or ()):
            return str(canonicalize_name(dist.metadata["Name"]))
    raise AssertionError(f"no installed distribution holds {module} ({file})")


def test_compat_imports_only_the_standard_library_opentelemetry_and_structlog() -> None:
    modules = imported_modules(PACKAGE / "compat.py")
    tops = {m.partition(".")[0] for m in modules} - set(sys.stdlib_module_names)
    assert tops == {"opentelemetry", "structlog"}
    assert "structlog._config" in modules
    assert "opentelemetry.metrics._internal" in modules


def test_every_library_compat_reads_has_an_upper_bound() -> None:
    """compat.py relies on private names: each library it imports is capped in
    pyproject.toml's dependencies, and the installed version is inside the range."""
    outside = {
        m for m in imported_modules(PACKAGE / "compat.py")
        if m.partition(".")[0] not in sys.stdlib_module_names
    }  # fmt: skip
    libraries = {distribution_of(m) for m in outside} - {None}
    assert libraries == {"opentelemetry-api", "structlog"}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = {
        str(canonicalize_name(r.name)): r for r in map(Requirement, project["dependencies"])
    }
    for library in sorted(libraries):
        assert library in requirements, f"{library} is not a dependency"
        specifier = requirements[library].specifier
        capped = [s for s in specifier if s.operator in ("<", "<=", "==", "~=", "===")]
        assert capped, f"{library}: no upper bound in {specifier!s}"
        installed = importlib.metadata.version(library)
        assert specifier.contains(installed, prereleases=True), (library, installed)


LIBRARIES = ("opentelemetry", "structlog")
#: The private names compat.py reads: flagged anywhere else, whatever they are read on.
PRIVATE_NAMES = frozenset(
    {"_CONFIG", "_RUNTIME_CONTEXT", "_current_context", "_SPAN_KEY", "_TRACER_PROVIDER",
     "_METER_PROVIDER"}
)  # fmt: skip
#: Strings that look like private module paths but are logger names: the SDK's and
#: exporters' loggers that polydatum.telemetry.limit_export_warnings filters (not read).
LOGGER_NAMES = frozenset(telemetry.EXPORT_LOGGERS)


def _library_names(tree: ast.Module) -> set[str]:
    """The names a file binds by importing from OpenTelemetry or structlog."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.partition(".")[0] in LIBRARIES:
                    names.add(alias.asname or alias.name.partition(".")[0])
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.partition(".")[0] in LIBRARIES
        ):
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_path(path: str) -> bool:
    """A dotted path into OpenTelemetry or structlog with a private part."""
    parts = path.split(".")
    return parts[0] in LIBRARIES and any(map(_private, parts))


def _root_name(node: ast.expr) -> str | None:
    """The name an expression starts from: ``a`` of ``a.b.c`` or ``getattr(a.b, "c")``."""
    while True:
        if isinstance(node, ast.Attribute):
            node = node.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
            node = node.args[0]
        else:
            return node.id if isinstance(node, ast.Name) else None


def private_reads(path: Path) -> list[str]:
    """The ``_``-names of OpenTelemetry or structlog a file imports or reads: private
    imports, private attributes of what it imported from them, ``getattr``-style reads
    of those, any read of a name compat.py reads, private module paths as strings."""
    tree = ast.parse(path.read_text())
    bound = _library_names(tree)
    found: list[str] = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if _private_path(node.module) or any(
                _private_path(f"{node.module}.{alias.name}") for alias in node.names
            ):
                found.append(f"{where} {ast.unparse(node)}")
        elif isinstance(node, ast.Import):
            if any(_private_path(alias.name) for alias in node.names):
                found.append(f"{where} {ast.unparse(node)}")
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            if _root_name(node.value) in bound or node.attr in PRIVATE_NAMES:
                found.append(f"{where} {ast.unparse(node)}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            if text in PRIVATE_NAMES or (_private_path(text) and text not in LOGGER_NAMES):
                found.append(f"{where} {text!r}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _private(node.args[1].value)
            and _root_name(node.args[0]) in bound
        ):
            found.append(f"{where} {ast.unparse(node)}")
    return found


def test_the_private_read_finder_finds_each_kind_of_read(tmp_path: Path) -> None:
    """What telemetry.py read before compat.py existed, and the forms around it."""
    source = tmp_path / "old.py"
    source.write_text(
        textwrap.dedent(
            """
            import structlog
            import structlog._config
            from opentelemetry import context as otel_context
            from opentelemetry import trace
            from opentelemetry.metrics import _internal as _metrics_internal
            from opentelemetry.trace import _SPAN_KEY

            a = getattr(structlog._config, "_CONFIG", None)
            b = getattr(otel_context, "_RUNTIME_CONTEXT", None)
            c = getattr(getattr(trace, "propagation", None), "_SPAN_KEY", None)
            d = trace._TRACER_PROVIDER is None and _metrics_internal._METER_PROVIDER is None
            e = holder._TRACER_PROVIDER, importlib.import_module("opentelemetry.trace._x")
            f = self._private, trace.get_tracer_provider(), getattr(self, "_x"), trace.__name__
            g = "opentelemetry.sdk._shared_internal", "opentelemetry.trace", "_private"
            """
        )
    )
    found = [r.split(" ", 1)[1] for r in private_reads(source)]
    assert sorted(found) == sorted(
        [
            "import structlog._config",
            "from opentelemetry.metrics import _internal as _metrics_internal",
            "from opentelemetry.trace import _SPAN_KEY",
            "getattr(structlog._config, '_CONFIG', None)",
            "structlog._config",
            "'_CONFIG'",
            "getattr(otel_context, '_RUNTIME_CONTEXT', None)",
            "'_RUNTIME_CONTEXT'",
            "getattr(getattr(trace, 'propagation', None), '_SPAN_KEY', None)",
            "'_SPAN_KEY'",
            "trace._TRACER_PROVIDER",
            "_metrics_internal._METER_PROVIDER",
            "holder._TRACER_PROVIDER",
            "'opentelemetry.trace._x'",
        ]
    )


def test_only_compat_reads_the_libraries_private_names() -> None:
    reads = {
        str(path.relative_to(ROOT)): private_reads(path)
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "compat.py"
    }
    assert {path: found for path, found in reads.items() if found} == {}
    # compat.py reads every one of them, and so does the finder.
    in_compat = " ".join(private_reads(PACKAGE / "compat.py"))
    assert [name for name in sorted(PRIVATE_NAMES) if name not in in_compat] == []
    assert "'structlog._config'" in in_compat
    assert "'opentelemetry.metrics._internal'" in in_compat
