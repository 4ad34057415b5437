"""An independent reference model of the context lifecycle (DESIGN.md §2).

Written from the design text, not from polydatum's code: given a :class:`Scenario`
(which middleware and resources exist, what each one does at each step, where
resources are created and how the ``with`` block ends) :func:`predict` says what
must happen, as plain data:

* the order in which generators run (setup, teardown) and the exception each one
  sees thrown in at teardown;
* the exception that escapes the ``with`` block (or none);
* the resource teardown errors that are suppressed and recorded, in order;
* every span, with its parent, status, ``polydatum.outcome`` and ``error.type``.

The semantics, restated as the model applies them:

1. Middleware set up in registration order. A middleware creating a resource does so
   inside its own step; if the creation fails, the middleware step fails with it.
2. A middleware failing at setup (raising, or returning without yielding:
   ``MiddlewareSetupException``) aborts the context: the middleware already set up
   are torn down with that error, then the resources created so far, and the error
   propagates -- or what a middleware replaced it with. If middleware suppressed it
   the original still propagates (there is no context to run the block in).
3. Otherwise the block runs; its error (or none) is thrown into each middleware on
   teardown, innermost first. Each one lets it through, suppresses it (the block
   then completes normally), replaces it, or yields twice (a ``RuntimeError`` that
   replaces it). A middleware may create resources while tearing down.
4. Resources are torn down last, most recently created first, each seeing the error
   as it stands after middleware teardown. A resource whose setup failed is not torn
   down. What a resource raises while tearing down (or a second yield, a
   ``RuntimeError``) is suppressed and recorded; the exception thrown in and re-raised
   unchanged is not an error of the resource. A ``BaseException`` that is no
   ``Exception`` (KeyboardInterrupt, a cancellation) a resource raises is recorded
   too, and then raised at exit -- the first one -- unless the block already ends
   with such an exception: an interrupt is never swallowed.
5. Under ``teardown_errors="raise"`` the recorded errors that are ``Exception``s are
   raised at exit as a ``TeardownErrors`` group whose ``__cause__`` is the error the
   block would otherwise have raised -- unless that is a ``BaseException`` that is no
   ``Exception``: it is raised as itself (the group attached to it), so that
   ``except Exception`` never catches an interrupt and a cancelled task ends cancelled.
6. Spans: every middleware/resource step is a span; setup spans of middleware and
   teardown spans hang under the context span, a resource setup span under whatever
   step was running when the resource was created. A step is ERROR only when it
   originated an exception; one that let the context's error pass is UNSET with
   ``polydatum.outcome = "propagated"``. The context span is ERROR only when an
   exception escapes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

FaultKind = Literal["error", "hostile", "interrupt", "cancel"]
#: A span processor that raises in ``on_start`` or ``on_end`` while the scenario runs
#: (it is the last processor: the exporter and the span tracker have seen the span).
ProcessorFault = Literal["none", "on_start", "on_end"]
CONTEXT_SPAN = "polydatum.context"


class InjectedError(Exception):
    """An ordinary application error injected by a scenario."""


class HostileError(InjectedError):
    """An application error that is hostile to whoever records it: its ``__str__``
    raises (one that formats ``None`` is enough) and its ``__cause__`` is itself, a cycle
    a naive walk of the chain never leaves. To the lifecycle it is an ordinary error."""

    def __init__(self, label: str) -> None:
        super().__init__(label)
        self.label = label
        self.__cause__ = self

    def __str__(self) -> str:
        raise TypeError("unsupported format string passed to NoneType.__format__")


class InjectedInterrupt(KeyboardInterrupt):
    """A ``KeyboardInterrupt`` injected by a scenario (a subclass, so a test runner's
    own Ctrl-C handling can never be confused with it)."""


@dataclass(frozen=True)
class MiddlewareSpec:
    """One context middleware and what it does at each step."""

    is_async: bool
    setup_creates: tuple[str, ...] = ()
    setup: Literal["ok", "raise", "never_yield"] = "ok"
    setup_fault: FaultKind = "error"
    teardown_creates: tuple[str, ...] = ()
    teardown: Literal["pass", "suppress", "replace", "twice"] = "pass"
    teardown_fault: FaultKind = "error"


@dataclass(frozen=True)
class ResourceSpec:
    """One resource and what it does at each step."""

    name: str
    is_async: bool
    setup: Literal["ok", "raise", "never_yield"] = "ok"
    setup_fault: FaultKind = "error"
    teardown: Literal["pass", "suppress", "raise", "twice"] = "pass"
    teardown_fault: FaultKind = "error"


@dataclass(frozen=True)
class Scenario:
    """A DataManager, a context on it and how its ``with`` block behaves."""

    is_async: bool
    middleware: tuple[MiddlewareSpec, ...]
    resources: tuple[ResourceSpec, ...]
    block_creates: tuple[str, ...] = ()
    block_end: Literal["ok", "raise"] = "ok"
    block_fault: FaultKind = "error"
    policy: Literal["record", "raise"] = "record"
    telemetry: bool = True
    nested: bool = False  # run inside an outer, unrelated context
    processor: ProcessorFault = "none"  # the lifecycle's semantics do not depend on it

    def resource(self, name: str) -> ResourceSpec:
        return next(r for r in self.resources if r.name == name)


@dataclass(frozen=True)
class Err:
    """An exception the model expects: an injected one (``label`` names the exact
    instance) or one the framework makes (``type_name`` and ``message``)."""

    label: str | None = None
    kind: FaultKind | None = None
    type_name: str | None = None
    message: str | None = None
    members: tuple[Err, ...] = ()  # for TeardownErrors
    cause: Err | None = None

    @property
    def is_exception(self) -> bool:
        """Whether it is an ``Exception`` (not only a ``BaseException``)."""
        if self.kind is not None:
            return self.kind in ("error", "hostile")
        return True


def fault(label: str, kind: FaultKind) -> Err:
    return Err(label=label, kind=kind)


def framework(type_name: str, message: str) -> Err:
    return Err(type_name=type_name, message=message)


@dataclass(frozen=True)
class SpanSpec:
    """A span the model expects; ``outcome``/``seen`` are only set on teardown spans."""

    name: str
    parent: str | None
    status: Literal["UNSET", "ERROR"]
    error: Err | None = None
    outcome: str | None = None
    seen: Err | None = None


@dataclass
class Expected:
    """Everything :func:`predict` says about one scenario."""

    events: list[tuple[object, ...]] = field(default_factory=list)
    escaped: Err | None = None
    recorded: list[tuple[str, Err]] = field(default_factory=list)
    spans: list[SpanSpec] = field(default_factory=list)
    suppressed: Err | None = None  # the block's error, when middleware suppressed it


def _twice(kind: str, name: str) -> Err:
    return framework(
        "RuntimeError",
        f"{kind.capitalize()} {name!r} yielded more than once; "
        f"a {kind} generator must yield exactly once.",
    )


class _Model:
    def __init__(self, scenario: Scenario) -> None:
        self.s = scenario
        self.out = Expected()
        self.created: set[str] = set()
        self.resource_stack: list[str] = []
        self.middleware_stack: list[int] = []
        self.attempts: Counter[str] = Counter()

    def span(self, spec: SpanSpec) -> None:
        self.out.spans.append(spec)

    def create(self, name: str, parent: str) -> Err | None:
        """Access resource ``name`` from a step whose span is ``parent``."""
        if name in self.created:
            return None
        spec = self.s.resource(name)
        attempt = self.attempts[name]
        self.attempts[name] += 1
        self.out.events.append(("res.setup", name))
        error: Err | None = None
        if spec.setup == "raise":
            error = fault(f"{name}.setup#{attempt}", spec.setup_fault)
        elif spec.setup == "never_yield":
            error = framework(
                "polydatum.errors.ResourceSetupException",
                f"Resource {name} did not yield on setup.",
            )
        else:
            self.created.add(name)
            self.resource_stack.append(name)
        self.span(
            SpanSpec(
                f"polydatum.resource.setup {name}", parent, "ERROR" if error else "UNSET", error
            )
        )
        return error

    def create_all(self, names: tuple[str, ...], parent: str) -> Err | None:
        for name in names:
            error = self.create(name, parent)
            if error is not None:
                return error
        return None

    def run(self) -> Expected:
        s = self.s
        for i, mw in enumerate(s.middleware):
            self.out.events.append(("mw.setup", i))
            span = f"polydatum.middleware.setup mw{i}"
            error = self.create_all(mw.setup_creates, span)
            if error is None and mw.setup == "raise":
                error = fault(f"mw{i}.setup", mw.setup_fault)
            elif error is None and mw.setup == "never_yield":
                error = framework(
                    "polydatum.errors.MiddlewareSetupException",
                    f"Middleware mw{i} did not yield on setup.",
                )
            self.span(SpanSpec(span, CONTEXT_SPAN, "ERROR" if error else "UNSET", error))
            if error is not None:
                final = self.teardown(error)
                self.finish(final if final is not None else error, None)
                return self.out
            self.middleware_stack.append(i)
        error = self.create_all(s.block_creates, CONTEXT_SPAN)
        if error is None and s.block_end == "raise":
            error = fault("block", s.block_fault)
        final = self.teardown(error)
        self.finish(final, error if final is None else None)
        return self.out

    def teardown(self, exc: Err | None) -> Err | None:
        s = self.s
        while self.middleware_stack:
            i = self.middleware_stack.pop()
            mw = s.middleware[i]
            self.out.events.append(("mw.teardown", i, exc))
            span = f"polydatum.middleware.teardown mw{i}"
            seen = exc
            error = self.create_all(mw.teardown_creates, span)
            outcome: str | None
            if error is not None:
                exc, outcome = error, "raised"
            elif mw.teardown == "pass":
                outcome = "propagated" if exc is not None else "ok"
            elif mw.teardown == "suppress":
                outcome = "suppressed" if exc is not None else "ok"
                exc = None
            elif mw.teardown == "replace":
                exc = error = fault(f"mw{i}.teardown", mw.teardown_fault)
                outcome = "raised"
            else:
                exc = error = _twice("middleware", f"mw{i}")
                outcome = "raised"
            self.span(
                SpanSpec(
                    span,
                    CONTEXT_SPAN,
                    "ERROR" if error is not None else "UNSET",
                    error,
                    outcome,
                    seen,
                )
            )
        while self.resource_stack:
            name = self.resource_stack.pop()
            spec = s.resource(name)
            self.out.events.append(("res.teardown", name, exc))
            error = None
            if spec.teardown == "pass":
                outcome = "propagated" if exc is not None else "ok"
            elif spec.teardown == "suppress":
                outcome = "suppressed" if exc is not None else "ok"
            elif spec.teardown == "raise":
                error = fault(f"{name}.teardown", spec.teardown_fault)
                outcome = "raised"
            else:
                error = _twice("resource", name)
                outcome = "raised"
            if error is not None:
                self.out.recorded.append((name, error))
            self.span(
                SpanSpec(
                    f"polydatum.resource.teardown {name}",
                    CONTEXT_SPAN,
                    "ERROR" if error is not None else "UNSET",
                    error,
                    outcome,
                    exc,
                )
            )
        return exc

    def finish(self, final: Err | None, suppressed: Err | None) -> None:
        interrupts = [e for _, e in self.out.recorded if not e.is_exception]
        if interrupts and (final is None or final.is_exception):
            final = interrupts[0]  # rule 4: an interrupt is never swallowed
            suppressed = None
        grouped = tuple(e for _, e in self.out.recorded if e.is_exception)
        if self.s.policy == "raise" and grouped and (final is None or final.is_exception):
            final = Err(
                type_name="polydatum.errors.TeardownErrors",
                message=f"{len(self.out.recorded)} resource(s) failed to tear down",
                members=grouped,
                cause=final,
            )
            suppressed = None
        self.out.escaped = final
        self.out.suppressed = suppressed
        self.span(
            SpanSpec(CONTEXT_SPAN, "scenario", "ERROR" if final is not None else "UNSET", final)
        )


def predict(scenario: Scenario) -> Expected:
    """What the semantics of DESIGN.md §2 say must happen in ``scenario``."""
    return _Model(scenario).run()
