"""Registration while serving: a call racing ``replace_service``, a sub-service
registration or ``register_method_middleware`` sees the old or the new registration,
and once the registration has returned every call sees the new one: no thread can
leave a stale resolution (or a fast path that skips new middleware) cached behind.

Run with ``sys.setswitchinterval(1e-6)`` so that threads switch inside the DAL's
bookkeeping as often as CPython allows.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from polydatum import DataManager, Service

ROUNDS = 150
WORKERS = 4


class Books(Service):
    def __init__(self, version: int) -> None:
        super().__init__()
        self.version_number = version

    def version(self) -> int:
        return self.version_number


@pytest.fixture
def fast_switching() -> Iterator[None]:
    saved = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(saved)


class Traffic:
    """Worker threads calling the DAL until paused; they hold at :meth:`pause`.

    One condition guards the pause: a worker counts itself held and waits for the
    next resume generation under the same lock, so a resume followed at once by the
    next pause can never be missed (with an Event and a semaphore it could: a worker
    that had released but not yet started waiting slept through both).
    """

    def __init__(self, dm: DataManager, call: Callable[[Any], Any]) -> None:
        self.dm = dm
        self.call = call
        self.cond = threading.Condition()
        self.pausing = False
        self.generation = 0
        self.held = 0
        self.stopped = False
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._work) for _ in range(WORKERS)]
        for thread in self.threads:
            thread.start()

    def _work(self) -> None:
        while True:
            with self.cond:
                if self.stopped:
                    return
                if self.pausing:
                    self.held += 1
                    self.cond.notify_all()
                    generation = self.generation
                    self.cond.wait_for(lambda g=generation: self.generation != g or self.stopped)
                    continue
            try:
                with self.dm.dal() as dal:
                    for _ in range(20):
                        self.call(dal)
            except BaseException as error:
                with self.cond:
                    self.errors.append(error)
                    self.cond.notify_all()
                return

    def pause(self) -> None:
        with self.cond:
            self.pausing = True
            self.held = 0
            # Bounded: a worker that never reaches its pause point fails the test
            # instead of hanging the run.
            paused = self.cond.wait_for(lambda: self.held + len(self.errors) == WORKERS, timeout=60)
            assert paused, f"workers never paused: {self.held} held, errors {self.errors}"
            assert self.errors == []

    def resume(self) -> None:
        with self.cond:
            self.pausing = False
            self.generation += 1
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        for thread in self.threads:
            thread.join()


def every_way_of_calling(dal: Any) -> list[int]:
    return [dal.books.version(), dal["books.version"](), dal.books.version()]


def test_replace_service_while_serving(fast_switching: None) -> None:
    dm = DataManager()
    dm.register_services(books=Books(0))
    traffic = Traffic(dm, every_way_of_calling)
    try:
        for version in range(1, ROUNDS + 1):
            dm.replace_service("books", Books(version))  # while the workers call
            traffic.pause()
            with dm.dal() as dal:
                assert every_way_of_calling(dal) == [version] * 3
            traffic.resume()
    finally:
        traffic.stop()
    assert traffic.errors == []


def test_sub_service_registration_while_serving(fast_switching: None) -> None:
    class Shelf(Service):
        pass

    dm = DataManager()
    shelf = Shelf()
    dm.register_services(shelf=shelf)
    shelf.register_services(books=Books(0))

    def call(dal: Any) -> list[int]:
        return [dal.shelf.books.version(), dal["shelf.books.version"]()]

    traffic = Traffic(dm, call)
    try:
        for version in range(1, ROUNDS + 1):
            replacement = Shelf()
            replacement.register_services(books=Books(version))
            dm.replace_service("shelf", replacement)
            traffic.pause()
            with dm.dal() as dal:
                assert call(dal) == [version, version]
            traffic.resume()
    finally:
        traffic.stop()
    assert traffic.errors == []


def test_method_middleware_registered_while_serving(fast_switching: None) -> None:
    dm = DataManager()
    dm.register_services(books=Books(7))
    traffic = Traffic(dm, every_way_of_calling)
    seen: list[int] = []
    try:
        for number in range(1, 101):  # each call runs through all of them: keep it shallow

            def counting(request: Any, handler: Any, number: int = number) -> Any:
                if threading.current_thread() is threading.main_thread():
                    seen.append(number)
                return handler(request)

            dm.register_method_middleware(counting)  # while the workers call
            traffic.pause()
            seen.clear()
            with dm.dal() as dal:
                assert every_way_of_calling(dal) == [7, 7, 7]
            # each of the three calls ran through every middleware registered so far
            assert seen == [n for _ in range(3) for n in range(1, number + 1)]
            traffic.resume()
    finally:
        traffic.stop()
    assert traffic.errors == []


# --------------------------------------------------------- the interleavings, exactly
#
# The threaded tests above may or may not hit the few instructions where a registration
# and a call interleave. These make the registration happen at exactly that point, from
# inside the call's own bookkeeping (as another thread could at any instruction).


class Interleaved(Books):
    """A service whose method lookup runs ``during_lookup`` once: a registration that
    lands while the DAL resolves a call against the old registration."""

    during_lookup: Callable[[], None] | None = None

    def __getattribute__(self, name: str) -> Any:
        hook = type(self).during_lookup
        if name == "version" and hook is not None:
            type(self).during_lookup = None
            hook()
        return super().__getattribute__(name)


def test_a_replacement_during_resolution_is_never_cached_as_the_old_one() -> None:
    dm = DataManager()
    old = Interleaved(1)
    dm.register_services(books=old)
    with dm.dal() as dal:
        Interleaved.during_lookup = lambda: dm.replace_service("books", Books(2))
        assert dal.books.version() == 1  # resolved, and called, before the replacement
        assert Interleaved.during_lookup is None
        assert every_way_of_calling(dal) == [2, 2, 2]
    with dm.dal() as dal:
        assert every_way_of_calling(dal) == [2, 2, 2]


class CallsWhileRegistered:
    """A method middleware whose ``__call__`` is looked up while it is being
    registered (to see whether it is async) and then makes a DAL call: a call that
    lands while the DAL rebuilds its chain."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.pending: Callable[[], Any] | None = call
        self.calls = 0

    def _handle(self, request: Any, handler: Any) -> Any:
        self.calls += 1
        return handler(request)

    @property
    def __call__(self) -> Callable[..., Any]:  # type: ignore[override]
        pending, self.pending = self.pending, None
        if pending is not None:
            pending()
        return self._handle


def test_a_call_during_middleware_registration_never_skips_it_afterwards() -> None:
    dm = DataManager()
    dm.register_services(books=Books(5))
    with dm.dal() as dal:
        assert dal.books.version() == 5  # the command now has a fast path
        middleware = CallsWhileRegistered(lambda: dal.books.version())
        dm.register_method_middleware(middleware)
        assert middleware.pending is None  # the call did land during registration
        calls = middleware.calls
        assert every_way_of_calling(dal) == [5, 5, 5]
        assert middleware.calls == calls + 3  # every call after it runs through it
