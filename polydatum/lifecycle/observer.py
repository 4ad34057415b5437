"""What the lifecycle tells whoever records it: the observer protocols.

The lifecycle knows nothing of OpenTelemetry, metrics or logs. A DataManager holds an
:class:`ObserverFactory` (polydatum's is :class:`polydatum.telemetry.Telemetry`);
when a context is entered the factory is asked for a :class:`ContextObserver`, or
``None`` when nothing would be recorded -- then the lifecycle runs with no
observer calls at all. mypy checks that polydatum's telemetry implements both
protocols (see the end of :mod:`polydatum.telemetry`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from polydatum.lifecycle.rules import Outcome

__all__ = ["ContextObserver", "ObservedContext", "ObserverFactory", "StepScope"]


class StepScope(Protocol):
    """One step being recorded, as handed out by :meth:`ContextObserver.step_started`.

    ``enter`` runs at the start of the step inside the generator's own
    :class:`contextvars.Context`, so that the step's span is current for the code the
    generator runs. That context is the generator's alone, so nothing needs undoing.
    """

    def enter(self) -> None: ...


class ObservedContext(Protocol):
    """What an observer may read of the context it records."""

    @property
    def id(self) -> str: ...

    @property
    def meta(self) -> Mapping[str, Any]: ...


class ContextObserver(Protocol):
    """The events of one context's lifecycle, in the order they happen."""

    def begin(self) -> None:
        """The context is entered: start recording (the observer was made with no
        effect outside itself, so that losing it to an interruption loses nothing)."""
        ...

    def step_started(
        self,
        kind: str,
        phase: str,
        name: str,
        position: int,
        attributes: Mapping[str, Any] | None = None,
    ) -> StepScope:
        """A middleware or resource ``phase`` ("setup" / "teardown") begins."""
        ...

    def step_finished(
        self,
        scope: Any,
        outcome: Outcome,
        error: BaseException | None,
        seen: BaseException | None,
    ) -> None:
        """It ended: ``error`` is what the step raised, ``seen`` what was thrown in."""
        ...

    def teardown_error(self, resource: str, error: BaseException) -> None:
        """A resource's teardown error was suppressed and recorded."""
        ...

    def call_started(self, path: str, function: str) -> Any:
        """A service call through the DAL begins; returns what ``call_finished`` gets."""
        ...

    def call_finished(self, step: Any, error: BaseException | None) -> None:
        """The service call ended (``error``: what it raised)."""
        ...

    def finish(self, error: BaseException | None, suppressed: BaseException | None) -> None:
        """The context ended with ``error`` (``suppressed``: what middleware swallowed).

        Called again after an interruption; only the first call records, and what it
        made current it undoes even when interrupted itself."""
        ...

    def abandon(self) -> None:
        """The interpreter exits with the context still open."""
        ...


class ObserverFactory(Protocol):
    """Makes the observer of each context (held by the DataManager)."""

    def start(self, ctx: Any) -> ContextObserver | None:
        """The observer of ``ctx``, just entered; ``None`` when nothing would record."""
        ...

    def record_unobserved_teardown_error(
        self, ctx: Any, resource: str, error: BaseException
    ) -> None:
        """A teardown error of a context that has no observer (logged as a warning)."""
        ...
