"""The context lifecycle, read top to bottom in this package.

* :mod:`~polydatum.lifecycle.states` -- the states and the only legal transitions;
* :mod:`~polydatum.lifecycle.rules` -- the exception rules (suppress, replace,
  propagate; what counts as a teardown error) and the lifecycle's error messages;
* :mod:`~polydatum.lifecycle.records` -- registrations (made once) and the records
  of generators in flight;
* :mod:`~polydatum.lifecycle.observer` -- the events the lifecycle reports, as
  protocols the telemetry implements;
* :mod:`~polydatum.lifecycle.core` -- one context's state, beginning and ending;
* :mod:`~polydatum.lifecycle._async_driver` -- the driver: setup, lazy resources,
  teardown, written once; the sync driver is generated from it
  (``scripts/unasync.py``).

:class:`Lifecycle` is both drivers over one core: a context entered with ``with``
runs the sync one, with ``async with`` the async one.
"""

from __future__ import annotations

from polydatum.lifecycle._async_driver import AsyncDriver
from polydatum.lifecycle._sync_driver import SyncDriver
from polydatum.lifecycle.core import (
    CREATING,
    ExcInfo,
    LifecycleHost,
    active_lifecycle,
    add_exit_reporter,
    open_lifecycles,
)
from polydatum.lifecycle.observer import (
    ContextObserver,
    ObservedContext,
    ObserverFactory,
    StepScope,
)
from polydatum.lifecycle.records import (
    Registration,
    StepRecord,
    callable_name,
    middleware_registration,
)
from polydatum.lifecycle.rules import (
    PROPAGATED,
    RAISED,
    RETURNED,
    SUPPRESSED,
    YIELDED,
    Outcome,
    after_middleware_teardown,
    classify,
    is_teardown_error,
)
from polydatum.lifecycle.states import (
    RESOURCE_CREATE_STATES,
    RESOURCE_USE_STATES,
    TRANSITIONS,
    State,
    transition,
)

__all__ = [
    "CREATING",
    "PROPAGATED",
    "RAISED",
    "RESOURCE_CREATE_STATES",
    "RESOURCE_USE_STATES",
    "RETURNED",
    "SUPPRESSED",
    "TRANSITIONS",
    "YIELDED",
    "ContextObserver",
    "ExcInfo",
    "Lifecycle",
    "LifecycleHost",
    "ObservedContext",
    "ObserverFactory",
    "Outcome",
    "Registration",
    "State",
    "StepRecord",
    "StepScope",
    "active_lifecycle",
    "add_exit_reporter",
    "after_middleware_teardown",
    "callable_name",
    "classify",
    "is_teardown_error",
    "middleware_registration",
    "open_lifecycles",
    "transition",
]


class Lifecycle(SyncDriver, AsyncDriver):
    """The lifecycle of one context: ``enter``/``exit``/``resource`` for ``with``,
    ``aenter``/``aexit``/``aresource`` for ``async with``."""
