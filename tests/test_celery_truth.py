"""The randomized end-to-end truth test of the Celery integration: what the database
holds after a real worker ran a few hundred tasks with faults.

A real worker (prefork, two children) on RabbitMQ runs ``truth.run(key, fault)`` (see
``tests/_celery_truth_app.py``) on a DataManager made by ``configure_sql``, sync and
async, on SQLite and on the PostgreSQL server. The worker's master checks the database
(``dm.ping()``) before it forks its children, as applications do at startup, so each
child starts from a parent whose pool holds a connection. Each task writes its note, then does
what its fault -- chosen at random per task -- says: nothing; a note whose deferred
foreign key fails at COMMIT; raise; raise an error a middleware suppresses; a failing
statement whose error the middleware suppresses (an aborted transaction, which
must not commit); use a resource whose teardown fails (suppressed); retry once and
succeed; retry until ``max_retries`` is exceeded.

The oracle (DESIGN §2): afterwards the table holds exactly the notes of the tasks whose
final state is SUCCESS -- written by the attempt that succeeded -- and none of the
others. Mismatches are reported with the seed (``POLYDATUM_TRUTH_SEED`` replays a run,
``POLYDATUM_CELERY_TRUTH_TASKS`` changes the number of tasks) and must be 0. Each
task's final state is also checked against what its fault must give, so that a fault
that silently stopped happening cannot make the oracle pass vacuously.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from sqlalchemy import create_engine, text

from polydatum.errors import CommitError
from polydatum.sql import TransactionAbortedError
from tests import _celery_truth_app as truth
from tests._celery_worker import celery_worker
from tests.sql_backends import Backend
from tests.sql_backends import backend as backend  # the fixture: SQLite and PostgreSQL

#: Tasks per run (per backend and flavour).
TASKS = int(os.environ.get("POLYDATUM_CELERY_TRUTH_TASKS", "120"))


#: The final state a task with each fault must reach, and the type of its error.
EXPECTED: dict[str, tuple[str, type[BaseException] | None]] = {
    "ok": ("SUCCESS", None),
    "commit": ("FAILURE", CommitError),
    "raise": ("FAILURE", ValueError),
    "suppressed": ("SUCCESS", None),
    # A caught failed statement: PostgreSQL aborted the transaction, and polydatum
    # refuses to commit the rest on SQLite too (one behaviour on every backend).
    "aborted": ("FAILURE", TransactionAbortedError),
    "teardown": ("SUCCESS", None),
    "retry": ("SUCCESS", None),
    "retry_exhausted": ("FAILURE", ValueError),
}


def create_tables(url: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in truth.SCHEMA:
                conn.execute(text(statement))
    finally:
        engine.dispose()


def read_notes(url: str) -> dict[str, int]:
    """Every note (key: the attempt that wrote it), read with a fresh engine."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT key, attempt FROM notes"))
            return {key: attempt for key, attempt in rows}
    finally:
        engine.dispose()


class Outcome(NamedTuple):
    """A task's final state and, for FAILURE, its error's type and text."""

    state: str
    error: type[BaseException] | None
    text: str


def final_state(result: Any, deadline: float) -> Outcome:
    """The task's final outcome, waiting until it has one."""
    result.get(timeout=max(1.0, deadline - time.monotonic()), propagate=False)
    if result.state != "FAILURE":
        return Outcome(result.state, None, "")
    return Outcome(result.state, type(result.result), f"{result.result!r:.300}")


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_task_acknowledged_as_succeeded_has_its_effects_and_a_failed_one_none(
    backend: Backend, flavour: str, tmp_path: Path
) -> None:
    seed = int(os.environ.get("POLYDATUM_TRUTH_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    faults = [rng.choice(truth.FAULTS) for _ in range(TASKS)]
    keys = [f"{fault}-{i}" for i, fault in enumerate(faults)]
    create_tables(backend.url)
    env = {"POLYDATUM_CELERY_DB_URL": backend.url, "POLYDATUM_CELERY_FLAVOUR": flavour}
    started = time.monotonic()
    with celery_worker(
        tmp_path,
        instrument=False,
        app="tests._celery_truth_app",
        pool=("-P", "prefork", "-c", "2"),
        env=env,
    ) as worker:
        app, _, task = truth.build(worker.queue, backend.url, flavour)
        try:
            results = [task.apply_async((k, f)) for k, f in zip(keys, faults, strict=True)]
            deadline = time.monotonic() + 120
            outcomes = [final_state(r, deadline) for r in results]
        finally:
            app.close()
    elapsed = time.monotonic() - started
    notes = read_notes(backend.url)

    succeeded = {  # key: the attempt that must have written its note
        k: 1 if f == "retry" else 0
        for k, f, outcome in zip(keys, faults, outcomes, strict=True)
        if outcome.state == "SUCCESS"
    }
    mismatches = [
        f"{k}: final state SUCCESS, but the database has no note"
        for k in succeeded
        if k not in notes
    ]
    mismatches += [
        f"{k}: final state {outcome.state}, but its note is in the database"
        for k, outcome in zip(keys, outcomes, strict=True)
        if outcome.state != "SUCCESS" and k in notes
    ]
    mismatches += [
        f"{k}: the note was written by attempt {notes[k]}, the task succeeded at {attempt}"
        for k, attempt in succeeded.items()
        if k in notes and notes[k] != attempt
    ]
    mismatches += [f"{k}: a note no task wrote" for k in notes if k not in keys]
    wrong_outcomes = [
        f"{k}: {outcome.state} {outcome.text} (expected {expected[0]} "
        f"{expected[1].__name__ if expected[1] else ''})"
        for k, f, outcome in zip(keys, faults, outcomes, strict=True)
        if (outcome.state, outcome.error) != (expected := EXPECTED[f])
    ]
    summary = (
        f"seed={seed} backend={backend.name} flavour={flavour} tasks={TASKS} "
        f"succeeded={len(succeeded)} notes={len(notes)} mismatches={len(mismatches)} "
        f"wrong outcomes={len(wrong_outcomes)} in {elapsed:.1f}s; "
        f"faults={dict(sorted(Counter(faults).items()))}"
    )
    print(summary)
    assert mismatches == [], f"{summary}\n" + "\n".join(mismatches)
    assert wrong_outcomes == [], f"{summary}\n" + "\n".join(wrong_outcomes)
    assert worker.process.returncode == 0, worker.output()
