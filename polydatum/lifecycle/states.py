"""The states of a context and the only transitions between them.

============================  ===================  ===========================
state                         event                next state
============================  ===================  ===========================
``created``                   ``enter``            ``setting_up``
``setting_up``                ``setup_done``       ``active``
``setting_up``                ``setup_failed``     ``tearing_down_middleware``
``active``                    ``exit``             ``tearing_down_middleware``
``tearing_down_middleware``   ``middleware_done``  ``tearing_down_resources``
``tearing_down_resources``    ``resources_done``   ``exited``
any other but ``exited``      ``abort``            ``exited``
============================  ===================  ===========================

The table is :data:`TRANSITIONS`. Every state change of a context is looked up in
it: through :func:`transition`, or through the per-event views that the driver reads,
``on_exit(state) or transition(state, "exit")`` -- one look-up when the table allows
the step, and :func:`transition`'s error (naming the state and what to do) when it
does not.

Resources may be *created* while the context sets up, is active, or tears its
middleware down (a middleware's teardown may need one), and *used* until resources
are torn down (:data:`RESOURCE_CREATE_STATES`, :data:`RESOURCE_USE_STATES`).
"""

from __future__ import annotations

import enum

from polydatum.errors import ContextStateError

__all__ = [
    "ON_ABORT",
    "ON_ENTER",
    "ON_EXIT",
    "ON_MIDDLEWARE_DONE",
    "ON_RESOURCES_DONE",
    "ON_SETUP_DONE",
    "ON_SETUP_FAILED",
    "RESOURCE_CREATE_STATES",
    "RESOURCE_USE_STATES",
    "TRANSITIONS",
    "State",
    "on_abort",
    "on_enter",
    "on_exit",
    "on_middleware_done",
    "on_resources_done",
    "on_setup_done",
    "on_setup_failed",
    "transition",
]


class State(enum.Enum):
    """The states of one context, in the order a successful context visits them."""

    CREATED = "created"
    SETTING_UP = "setting_up"
    ACTIVE = "active"
    TEARING_DOWN_MIDDLEWARE = "tearing_down_middleware"
    TEARING_DOWN_RESOURCES = "tearing_down_resources"
    EXITED = "exited"

    # Each state is looked up in the transition table about six times per context;
    # members are singletons, so identity hashing gives the same answers as Enum's
    # hash of the name, without running Python code (benchmarks/README.md, "Why
    # the core looks the way it does").
    __hash__ = object.__hash__


#: ``(state, event) -> next state``: every legal transition, and nothing else.
TRANSITIONS: dict[tuple[State, str], State] = {
    (State.CREATED, "enter"): State.SETTING_UP,
    (State.SETTING_UP, "setup_done"): State.ACTIVE,
    (State.SETTING_UP, "setup_failed"): State.TEARING_DOWN_MIDDLEWARE,
    (State.ACTIVE, "exit"): State.TEARING_DOWN_MIDDLEWARE,
    (State.TEARING_DOWN_MIDDLEWARE, "middleware_done"): State.TEARING_DOWN_RESOURCES,
    (State.TEARING_DOWN_RESOURCES, "resources_done"): State.EXITED,
    # The lifecycle's own bookkeeping was interrupted (a KeyboardInterrupt or a
    # cancellation between two steps): what is left is closed, and the context ends.
    (State.CREATED, "abort"): State.EXITED,
    (State.SETTING_UP, "abort"): State.EXITED,
    (State.ACTIVE, "abort"): State.EXITED,
    (State.TEARING_DOWN_MIDDLEWARE, "abort"): State.EXITED,
    (State.TEARING_DOWN_RESOURCES, "abort"): State.EXITED,
}

#: States in which a resource not yet created may be set up on first access.
RESOURCE_CREATE_STATES = frozenset({State.SETTING_UP, State.ACTIVE, State.TEARING_DOWN_MIDDLEWARE})
#: States in which an already-created resource may be used.
RESOURCE_USE_STATES = RESOURCE_CREATE_STATES | {State.TEARING_DOWN_RESOURCES}

_ADVICE: dict[tuple[State, str], str] = {
    (State.ACTIVE, "enter"): "a context is single-use and this one is already entered; "
    "call dm.context() again for a new one",
    (State.SETTING_UP, "enter"): "a context is single-use and this one is already entered; "
    "call dm.context() again for a new one",
    (State.EXITED, "enter"): "a context is single-use; call dm.context() again for a new one",
    (State.CREATED, "exit"): "it was never entered; use `with dm.context() as ctx:` "
    "(or `async with`) so that enter and exit pair up",
    (State.EXITED, "exit"): "it has already exited; exit a context exactly once",
}


def _on(event: str) -> dict[State, State]:
    return {state: target for (state, e), target in TRANSITIONS.items() if e == event}


#: :data:`TRANSITIONS` seen one event at a time (derived from it, never edited).
ON_ENTER = _on("enter")
ON_SETUP_DONE = _on("setup_done")
ON_SETUP_FAILED = _on("setup_failed")
ON_EXIT = _on("exit")
ON_MIDDLEWARE_DONE = _on("middleware_done")
ON_RESOURCES_DONE = _on("resources_done")
ON_ABORT = _on("abort")

# ``on_exit(state)``: the state after ``exit`` from ``state``, or ``None`` when the
# table forbids it (then :func:`transition` raises the error). The views' look-ups
# as plain names: a method called on an imported name (``ON_EXIT.get(state)`` in the
# driver) makes and frees a bound-method object per call on CPython 3.11
# (benchmarks/README.md).
on_enter = ON_ENTER.get
on_setup_done = ON_SETUP_DONE.get
on_setup_failed = ON_SETUP_FAILED.get
on_exit = ON_EXIT.get
on_middleware_done = ON_MIDDLEWARE_DONE.get
on_resources_done = ON_RESOURCES_DONE.get
on_abort = ON_ABORT.get


def transition(state: State, event: str) -> State:
    """The state after ``event``; :class:`ContextStateError` if the table forbids it."""
    target = TRANSITIONS.get((state, event))
    if target is not None:
        return target
    advice = _ADVICE.get((state, event))
    if advice is None:
        # "abort" is the lifecycle's own way out, never advice.
        allowed = sorted(e for (s, e) in TRANSITIONS if s is state and e != "abort") or ["none"]
        advice = f"events allowed in this state: {', '.join(allowed)}"
    raise ContextStateError(
        f"Cannot {event.replace('_', ' ')} a context in state '{state.value}': {advice}."
    )
