"""The terminal waterfall: one context's span tree, in time order, with duration bars.

Debugging middleware order needs no tracing backend: the spans polydatum records for
one context (middleware setups, lazy resource setups where they happened, service
calls nested, middleware teardowns in reverse, resource teardowns) are drawn as a
tree with a bar per step on a shared time axis. Failed steps are marked ``✗``,
suppressed resource teardown errors ``⚠``, and an *exception path* under the tree
says where the exception was raised and what each middleware did with it (let it
through, suppressed it, replaced it) -- read from the ``polydatum.outcome`` and
``polydatum.exception.seen`` attributes of the teardown spans.

Used by ``polydatum demo`` and by ``polydatum trace MODULE:ATTR 'service.method(args)'``
(registered here through :func:`register_cli`), which runs one call in a fresh
context of the user's DataManager and prints its waterfall.

Input is any span objects with the OpenTelemetry SDK's ``ReadableSpan`` shape or the
:class:`polydatum.testing.SpanRecord` shape. Output goes through ``rich``: coloured on a
terminal, plain text (no escape codes) when written to a file or a pipe, so the same
picture can be pasted into a bug report. Needs the ``cli`` extra (``rich``).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import inspect
import io
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from polydatum.errors import DalMethodError
from polydatum.middleware import resolve_path

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

__all__ = [
    "Step",
    "build_steps",
    "contexts",
    "emit",
    "exception_path",
    "format_duration",
    "needs_asyncio",
    "parse_call",
    "print_waterfall",
    "register_cli",
    "render",
    "render_text",
    "run_trace",
    "to_dict",
]

#: Width used for plain (non-terminal) output when no width is given.
PLAIN_WIDTH = 120


# ------------------------------------------------------------------------ the model


@dataclass
class Step:
    """One span of the waterfall, reduced to what is drawn."""

    name: str
    span_id: int
    parent_id: int | None
    start: int  # ns since the epoch
    end: int
    attributes: Mapping[str, Any]
    failed: bool
    exception: tuple[str, str] | None = None  # (type, message) of the exception event
    children: list[Step] = field(default_factory=list)

    @property
    def duration_ns(self) -> int:
        return max(0, self.end - self.start)

    @property
    def kind(self) -> str:
        """``context``, ``middleware``, ``resource``, ``service`` or ``other``."""
        if self.name == "polydatum.context":
            return "context"
        if self.name.startswith("polydatum.middleware."):
            return "middleware"
        if self.name.startswith("polydatum.resource."):
            return "resource"
        if "polydatum.service.path" in self.attributes:
            return "service"
        return "other"

    @property
    def phase(self) -> str | None:
        """``setup`` or ``teardown`` for middleware and resource steps."""
        if self.kind in ("middleware", "resource"):
            return self.name.split(" ", 1)[0].rsplit(".", 1)[1]
        return None

    @property
    def step_name(self) -> str:
        """The middleware/resource name, the service path, or the span name."""
        if self.kind == "middleware":
            return str(self.attributes.get("polydatum.middleware.name", self.name))
        if self.kind == "resource":
            return str(self.attributes.get("polydatum.resource.name", self.name))
        return self.name

    @property
    def error_type(self) -> str | None:
        value = self.attributes.get("error.type")
        return str(value) if value is not None else None

    def walk(self) -> Iterable[tuple[int, Step]]:
        """``(depth, step)`` for this step and its descendants, depth-first in time order."""
        stack: list[tuple[int, Step]] = [(0, self)]
        while stack:
            depth, step = stack.pop()
            yield depth, step
            stack.extend((depth + 1, c) for c in reversed(step.children))


def _exception_of(span: Any) -> tuple[str, str] | None:
    for event in getattr(span, "events", ()) or ():
        if isinstance(event, str):  # SpanRecord keeps event names only
            continue
        if event.name == "exception":
            attrs = event.attributes or {}
            return (str(attrs.get("exception.type", "")), str(attrs.get("exception.message", "")))
    # An exception is recorded once, on the span it came out of; the spans it propagated
    # through say it by their status (the message) and ``error.type``.
    description = getattr(getattr(span, "status", None), "description", None)
    if description:
        attrs = getattr(span, "attributes", None) or {}
        return (str(attrs.get("error.type", "")), str(description))
    return None


def _to_step(span: Any) -> Step:
    if hasattr(span, "span_id"):  # polydatum.testing.SpanRecord
        return Step(
            name=span.name,
            span_id=span.span_id,
            parent_id=span.parent_id,
            start=span.start,
            end=span.end,
            attributes=dict(span.attributes),
            failed=span.status == "ERROR",
            exception=_exception_of(span),
        )
    parent = getattr(span, "parent", None)
    return Step(
        name=span.name,
        span_id=span.context.span_id,
        parent_id=parent.span_id if parent is not None else None,
        start=span.start_time or 0,
        end=span.end_time or span.start_time or 0,
        attributes=dict(span.attributes or {}),
        failed=span.status.status_code.name == "ERROR",
        exception=_exception_of(span),
    )


def build_steps(spans: Iterable[Any]) -> list[Step]:
    """Build the span forest: roots (usually ``polydatum.context`` spans) in start order.

    A span whose parent is not among ``spans`` becomes a root; children are sorted by
    start time.
    """
    steps = [_to_step(s) for s in spans]
    by_id = {s.span_id: s for s in steps}
    roots: list[Step] = []
    for step in sorted(steps, key=lambda s: (s.start, s.end)):
        parent = by_id.get(step.parent_id) if step.parent_id is not None else None
        if parent is None or parent is step:
            roots.append(step)
        else:
            parent.children.append(step)
    return roots


def contexts(spans: Iterable[Any]) -> list[Step]:
    """Every ``polydatum.context`` step of ``spans`` (wherever it is nested), in start order."""
    found: list[Step] = []
    for root in build_steps(spans):
        found.extend(s for _, s in root.walk() if s.kind == "context")
    return sorted(found, key=lambda s: s.start)


# ---------------------------------------------------------------------- formatting


def format_duration(ns: int) -> str:
    """A duration for people: ``850 µs``, ``12.4 ms``, ``1.25 s``."""
    if ns < 1_000_000:
        return f"{ns / 1000:.0f} µs"
    if ns < 1_000_000_000:
        ms = ns / 1_000_000
        return f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms"
    return f"{ns / 1e9:.2f} s"


def _short_type(error_type: str) -> str:
    return error_type.rsplit(".", 1)[-1]


def _label(step: Step) -> tuple[str, str]:
    """``(name, dim suffix)`` shown in the tree column."""
    kind = step.kind
    if kind == "context":
        return "context", f" {step.attributes.get('polydatum.context.id', '')}"
    if kind in ("middleware", "resource"):
        return step.step_name, f" · {kind} {step.phase}"
    return step.name, ""


def _note(step: Step) -> tuple[str, str]:
    """``(text, style)`` of the note column: what happened to the exception at this step."""
    attrs = step.attributes
    kind = step.kind
    if kind == "context":
        parts = []
        if step.failed and step.error_type:
            parts.append(f"✗ raised {_short_type(step.error_type)}")
        suppressed = attrs.get("polydatum.suppressed_error.type")
        if suppressed:
            parts.append(f"{_short_type(str(suppressed))} suppressed by middleware")
        count = attrs.get("polydatum.teardown_errors")
        if count:
            plural = "s" if count != 1 else ""
            parts.append(f"⚠ {count} teardown error{plural} suppressed")
        style = "red" if step.failed else ("yellow" if parts else "green")
        return ("; ".join(parts) if parts else "ok"), style
    seen = attrs.get("polydatum.exception.seen")
    outcome = attrs.get("polydatum.outcome")
    if kind == "resource" and step.phase == "teardown" and outcome == "raised":
        return f"⚠ suppressed {_describe_exception(step, one_line=True)}", "yellow"
    if kind == "middleware" and step.phase == "teardown" and seen:
        seen_s = _short_type(str(seen))
        if outcome == "suppressed":
            return f"{seen_s} → suppressed", "yellow"
        if outcome == "raised":
            return f"{seen_s} → replaced: {_describe_exception(step, one_line=True)}", "red"
        return f"{seen_s} → passed on", "dim"
    if step.failed:
        return f"✗ {_describe_exception(step, one_line=True)}", "red"
    if seen:
        return f"saw {_short_type(str(seen))}", "dim"
    return "", ""


def _describe_exception(step: Step, *, one_line: bool = False) -> str:
    """``Type: message``; with ``one_line``, only the message's first line (a table cell:
    SQLAlchemy's messages, for one, go on with the SQL and its parameters)."""
    etype = step.error_type or (step.exception[0] if step.exception else "error")
    message = step.exception[1] if step.exception else ""
    if one_line and "\n" in message:
        message = message.split("\n", 1)[0].rstrip() + " …"
    short = _short_type(etype)
    return f"{short}: {message}" if message else short


def _indented(text: str, indent: int) -> str:
    """``text`` with its continuation lines indented by ``indent`` spaces."""
    return text.replace("\n", "\n" + " " * indent)


def exception_path(context: Step) -> list[str]:
    """The exception's path through one context, one sentence per step, in time order.

    Empty when no exception was raised (suppressed resource teardown errors are listed
    separately, see :func:`teardown_errors`).
    """
    lines: list[str] = []
    ordered = sorted((s for _, s in context.walk() if s is not context), key=lambda s: s.end)
    for step in ordered:
        attrs = step.attributes
        seen = attrs.get("polydatum.exception.seen")
        outcome = attrs.get("polydatum.outcome")
        kind, phase = step.kind, step.phase
        if kind == "middleware" and phase == "teardown":
            if seen is None and outcome != "raised":
                continue
            who = f"middleware {step.step_name}"
            seen_s = _short_type(str(seen)) if seen else None
            if outcome == "suppressed":
                lines.append(f"{who} saw {seen_s} and suppressed it")
            elif outcome == "raised" and seen_s:
                lines.append(f"{who} saw {seen_s} and replaced it with {_describe_exception(step)}")
            elif outcome == "raised":
                lines.append(f"{who} raised {_describe_exception(step)} while tearing down")
            else:
                lines.append(f"{who} saw {seen_s} and let it through")
        elif kind == "resource" and phase == "teardown":
            if seen is not None:
                lines.append(f"resource {step.step_name} saw {_short_type(str(seen))} on teardown")
        elif step.failed and step.exception is not None:
            # Where an exception originated: a service call, a setup step, a SQL span.
            # A parent that merely re-raises its child's exception is not repeated.
            child_same = any(c.failed and c.exception == step.exception for c in step.children)
            if child_same:
                continue
            where = f"{kind} {step.step_name} {phase}" if phase else step.step_name
            lines.append(f"{where} raised {_describe_exception(step)}")
    if not lines:
        return []
    attrs = context.attributes
    if context.failed and context.error_type:
        lines.append(f"→ {_describe_exception(context)} raised out of the context")
    elif attrs.get("polydatum.suppressed_error.type"):
        lines.append("→ suppressed: the with block completed normally")
    return lines


def teardown_errors(context: Step) -> list[str]:
    """The suppressed resource teardown errors of one context: ``resource: Type: message``."""
    return [
        f"{s.step_name}: {_describe_exception(s)}"
        for _, s in context.walk()
        if s.kind == "resource"
        and s.phase == "teardown"
        and s.attributes.get("polydatum.outcome") == "raised"
    ]


# ---------------------------------------------------------------------- rendering

_KIND_STYLE = {
    "context": "bold",
    "middleware": "cyan",
    "resource": "magenta",
    "service": "green",
    "other": "blue",
}
_LABEL_MAX = 46
_DURATION_W = 9


def _bar(step: Step, origin: int, total: int, width: int) -> tuple[str, int, int]:
    """The bar text of ``width`` cells and the [first, last) cells it fills."""
    if total <= 0:
        first, last = 0, width
    else:
        first = min(width - 1, int((step.start - origin) * width / total))
        last = round((step.end - origin) * width / total)
        last = max(first + 1, min(width, last))
    return " " * first + "█" * (last - first) + " " * (width - last), first, last


def render(context: Step, *, width: int = PLAIN_WIDTH) -> RenderableType:
    """A rich renderable of one context's waterfall (tree, bars, notes, exception path)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    rows = list(context.walk())
    origin, total = context.start, context.duration_ns
    # Tree prefixes (├─ └─ │) computed from each step's position among its siblings.
    prefixes: dict[int, str] = {context.span_id: ""}
    for _, step in rows:
        base = prefixes[step.span_id]
        stem = base.replace("├─ ", "│  ").replace("└─ ", "   ")
        for i, child in enumerate(step.children):
            is_last = i == len(step.children) - 1
            prefixes[child.span_id] = stem + ("└─ " if is_last else "├─ ")

    labels: list[Text] = []
    for _, step in rows:
        name, suffix = _label(step)
        text = Text()
        text.append(prefixes[step.span_id], style="dim")
        name_style = "bold red" if step.failed else _KIND_STYLE[step.kind]
        text.append(name, style=name_style)
        text.append(suffix, style="dim")
        if len(text) > _LABEL_MAX:
            text.truncate(_LABEL_MAX - 1)
            text.append("…")
        labels.append(text)
    notes = [_note(step) for _, step in rows]
    # Fixed column widths that add up to ``width``: the bar gets at least 40% of it,
    # notes are cut with an ellipsis beyond that (the exception path below is complete).
    label_w = max(len(t) for t in labels)
    fixed = label_w + _DURATION_W + 3  # three one-cell gaps between four columns
    min_bar = max(16, int(width * 0.35))
    note_w = max(2, min(max((len(n) for n, _ in notes), default=0), width - fixed - min_bar))
    bar_w = max(16, width - fixed - note_w)

    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True, width=label_w)
    grid.add_column(no_wrap=True, width=bar_w)
    grid.add_column(justify="right", no_wrap=True, width=_DURATION_W)
    grid.add_column(no_wrap=True, overflow="ellipsis", width=note_w)
    axis = Text("0", style="dim")
    axis.append(format_duration(total).rjust(bar_w - 1), style="dim")
    grid.add_row(Text(""), axis, Text(""), Text(""))
    for (_, step), label, (note, note_style) in zip(rows, labels, notes, strict=True):
        bar_text, first, last = _bar(step, origin, total, bar_w)
        if step.failed:
            bar_style = "red"
        elif note_style == "yellow":
            bar_style = "yellow"
        else:
            bar_style = _KIND_STYLE[step.kind] if step.kind != "context" else "white"
        bar = Text(" " * first)
        bar.append(bar_text[first:last], style=bar_style)
        bar.append(" " * (bar_w - last))
        grid.add_row(
            label, bar, Text(format_duration(step.duration_ns), style="dim"), Text(note, note_style)
        )

    parts: list[Any] = [grid]
    path = exception_path(context)
    if path:
        parts += [Text(""), Text("Exception path", style="bold")]
        final_style = "bold red" if context.failed else "bold yellow"
        for i, line in enumerate(path, 1):
            if line.startswith("→"):
                parts.append(Text(f"  {_indented(line, 4)}", style=final_style))
            else:
                number = f"  {i}. "
                parts.append(Text(number + _indented(line, len(number))))
    errors = teardown_errors(context)
    if errors:
        parts += [Text(""), Text("Suppressed teardown errors", style="bold yellow")]
        parts += [Text(f"  ⚠ {_indented(line, 4)}", style="yellow") for line in errors]
    return Group(*parts)


def _console(file: IO[str] | None, width: int | None, color: bool | None) -> Console:
    from rich.console import Console

    stream = file if file is not None else sys.stdout
    is_tty = bool(getattr(stream, "isatty", lambda: False)())
    terminal = is_tty if color is None else color
    return Console(
        file=stream,
        width=width or (None if is_tty else PLAIN_WIDTH),
        force_terminal=terminal,
        no_color=not terminal,
        highlight=False,
        emoji=False,
        soft_wrap=False,
    )


def emit(
    renderables: Sequence[Any],
    *,
    file: IO[str] | None = None,
    width: int | None = None,
    color: bool | None = None,
) -> None:
    """Print rich renderables: styled on a terminal; plain, right-trimmed text otherwise.

    ``renderables`` may contain callables ``f(width) -> renderable`` for layouts that
    depend on the final width (the waterfall's bars).
    """
    stream = file if file is not None else sys.stdout
    console = _console(stream, width, color)
    plain = not console.is_terminal
    if plain:
        buffer = io.StringIO()
        console = _console(buffer, console.width, False)
    for item in renderables:
        console.print(item(console.width) if callable(item) else item)
    if plain:
        text = "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())
        stream.write(text + "\n")
        stream.flush()


def print_waterfall(
    context: Step,
    *,
    file: IO[str] | None = None,
    width: int | None = None,
    color: bool | None = None,
    title: str | None = None,
) -> None:
    """Print one context's waterfall: coloured on a terminal, plain text otherwise."""
    from rich.text import Text

    items: list[Any] = [Text(title, style="bold")] if title else []
    items.append(lambda w: render(context, width=w))
    emit(items, file=file, width=width, color=color)


def render_text(context: Step, *, width: int = PLAIN_WIDTH, title: str | None = None) -> str:
    """One context's waterfall as plain text (no escape codes): for files and bug reports."""
    buffer = io.StringIO()
    print_waterfall(context, file=buffer, width=width, color=False, title=title)
    return buffer.getvalue()


def to_dict(context: Step) -> dict[str, Any]:
    """One context's waterfall as JSON-ready data (offsets and durations in microseconds)."""

    def node(step: Step) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": step.name,
            "kind": step.kind,
            "offset_us": round((step.start - context.start) / 1000, 1),
            "duration_us": round(step.duration_ns / 1000, 1),
            "failed": step.failed,
        }
        if step.phase:
            out["phase"] = step.phase
        for key in ("polydatum.outcome", "polydatum.exception.seen", "error.type"):
            if key in step.attributes:
                out[key] = step.attributes[key]
        if step.children:
            out["children"] = [node(c) for c in step.children]
        return out

    return {
        **node(context),
        "context_id": context.attributes.get("polydatum.context.id"),
        "exception_path": exception_path(context),
        "teardown_errors": teardown_errors(context),
    }


# ------------------------------------------------------------------ polydatum trace


class CallSpecError(ValueError):
    """A ``service.method(args)`` expression that cannot be used (with what to write)."""


def parse_call(expression: str) -> tuple[str, list[Any], dict[str, Any]]:
    """Parse ``'catalog.books.get(42, fields=["title"])'`` into path, args and kwargs.

    Arguments must be Python literals (numbers, strings, lists, dicts, ``None``...):
    they are read with :func:`ast.literal_eval`, never executed.
    """
    example = "write it as service.method(args), e.g. 'users.profile.get(42)'"
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as error:
        raise CallSpecError(f"cannot parse {expression!r}: {error.msg}; {example}") from None
    call = tree.body
    if not isinstance(call, ast.Call):
        raise CallSpecError(f"{expression!r} is not a call; {example}")
    parts: list[str] = []
    node: ast.expr = call.func
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise CallSpecError(f"{expression!r} does not call a dotted service path; {example}")
    parts.append(node.id)
    path = ".".join(reversed(parts))
    path = path.removeprefix("dal.")
    if "." not in path:
        raise CallSpecError(f"{path!r} names no method; {example}")
    try:
        args = [ast.literal_eval(a) for a in call.args]
        kwargs: dict[str, Any] = {}
        for kw in call.keywords:
            if kw.arg is None:
                raise CallSpecError(f"**kwargs is not supported in {expression!r}")
            kwargs[kw.arg] = ast.literal_eval(kw.value)
    except ValueError:
        raise CallSpecError(
            f"the arguments of {expression!r} must be Python literals "
            "(numbers, strings, lists, dicts, True/False/None)"
        ) from None
    return path, args, kwargs


def _capture_provider(dm: Any) -> Any:
    """An in-memory span exporter receiving every span ``dm``'s contexts record.

    Adds a processor to the SDK provider the DataManager uses (explicit or global), so
    the application's own exporters still get the spans; when none is configured,
    installs an SDK provider as the global one (this is a command-line process).
    """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    telemetry = dm.telemetry
    provider = telemetry.tracer_provider
    if provider is None:
        provider = trace.get_tracer_provider()
    if not hasattr(provider, "add_span_processor"):
        provider = TracerProvider()
        if telemetry.tracer_provider is None and isinstance(
            trace.get_tracer_provider(), trace.ProxyTracerProvider
        ):
            trace.set_tracer_provider(provider)
        else:
            telemetry.tracer_provider = provider
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def _quiet_logging() -> None:
    """Keep structlog's per-error tracebacks out of the picture (unless the app set it up)."""
    import logging

    import structlog

    if not structlog.is_configured():
        structlog.configure(
            wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        )


def needs_asyncio(dm: Any, path: str) -> bool:
    """Whether a call of ``path`` must run in an ``async with`` context, as the
    application runs it: an async resource or context middleware is registered, or the
    method is ``async def``. A path that does not resolve runs sync (and fails there)."""
    registrations = [
        *getattr(dm, "resource_registrations", {}).values(),
        *(getattr(dm, "context_middleware", None) or ()),
    ]
    if any(getattr(registration, "is_async", False) for registration in registrations):
        return True
    try:
        return resolve_path(dm.get_dal().services, tuple(path.split("."))).is_async
    except DalMethodError:
        return False


def run_trace(
    dm: Any, expression: str, meta: Mapping[str, Any] | None = None
) -> tuple[Step | None, Any, BaseException | None]:
    """Run ``expression`` in a fresh context of ``dm``: ``(context step, result, error)``."""
    path, args, kwargs = parse_call(expression)
    exporter = _capture_provider(dm)
    result: Any = None
    error: BaseException | None = None

    async def call_in_async_context() -> Any:
        async with dm.dal(dict(meta or {})) as dal:
            called = dal[path](*args, **kwargs)
            return (await called) if inspect.isawaitable(called) else called

    try:
        if needs_asyncio(dm, path):
            result = asyncio.run(call_in_async_context())
        else:
            with dm.dal(dict(meta or {})) as dal:
                result = dal[path](*args, **kwargs)
    except Exception as raised:
        error = raised
    found = contexts(exporter.get_finished_spans())
    return (found[-1] if found else None), result, error


def _parse_meta(items: Sequence[str]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CallSpecError(f"--meta expects KEY=VALUE, got {item!r}")
        try:
            meta[key] = json.loads(value)
        except ValueError:
            meta[key] = value
    return meta


def cmd_trace(args: argparse.Namespace) -> int:
    from polydatum.cli import CliError, load_data_manager

    dm = load_data_manager(args.target)
    try:
        meta = _parse_meta(args.meta)
        parse_call(args.call)
    except CallSpecError as problem:
        raise CliError(str(problem)) from None
    try:
        import opentelemetry.sdk.trace  # noqa: F401 - the spans are captured with the SDK
    except ImportError:
        raise CliError(
            "polydatum trace needs the OpenTelemetry SDK, which is not installed: "
            "pip install 'polydatum[cli,sdk]'"
        ) from None
    _quiet_logging()
    step, result, error = run_trace(dm, args.call, meta)
    if step is None:
        raise CliError(
            "no polydatum.context span was recorded: telemetry is disabled "
            "(OTEL_PYTHON_DISABLED_INSTRUMENTATIONS contains polydatum?)"
        )
    if args.json:
        out = to_dict(step)
        out["result"] = repr(result) if error is None else None
        out["error"] = None if error is None else f"{type(error).__name__}: {error}"
        print(json.dumps(out, indent=2, default=str))
    else:
        from rich.text import Text

        outcome = (
            Text(f"result: {result!r}"[:2000], style="green")
            if error is None
            else Text(f"raised: {type(error).__name__}: {error}", style="bold red")
        )
        emit(
            [
                Text(f"polydatum trace · {args.call}", style="bold"),
                lambda w: render(step, width=w),
                outcome,
            ],
            width=args.width,
        )
    return 0 if error is None else 1


def register_cli(subparsers: Any) -> None:
    """Add ``polydatum trace`` to the ``polydatum`` command (see :mod:`polydatum.cli`)."""
    from polydatum.cli import TARGET_HELP

    p = subparsers.add_parser(
        "trace",
        help="run one DAL call in a fresh context and print its waterfall",
        description="Import a DataManager, run one service call inside a fresh context "
        "and draw that context's spans: middleware setup and teardown, lazy resource "
        "setups, nested service calls, and what happened to any exception.",
    )
    p.add_argument("target", help=TARGET_HELP)
    p.add_argument("call", help="the call, e.g. 'users.profile.get(42)' (literal arguments)")
    p.add_argument(
        "--meta",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="context meta (repeatable; VALUE is JSON or a string), e.g. --meta user=alice",
    )
    p.add_argument("--json", action="store_true", help="machine-readable span tree")
    p.add_argument("--width", type=int, default=None, help="output width in columns")
    p.set_defaults(func=cmd_trace)
