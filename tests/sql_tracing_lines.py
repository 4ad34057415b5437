"""The exact lines polydatum says about SQL statement spans in this environment.

Built from the installed versions: ``opentelemetry-instrumentation-sqlalchemy``, the
range it declares, and SQLAlchemy (2.1 under the ``test`` extra, beyond that range).
"""

from __future__ import annotations

from importlib import metadata

import sqlalchemy
from opentelemetry.instrumentation.dependencies import get_dependency_conflicts
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

from polydatum.sql_engine import STATEMENT_TRACING_TESTED

CONTRIB_NAME = "opentelemetry-instrumentation-sqlalchemy"
CONTRIB = f"{CONTRIB_NAME} {metadata.version(CONTRIB_NAME)}"
INSTALLED = f"SQLAlchemy {sqlalchemy.__version__}"
DECLARED = " and ".join(SQLAlchemyInstrumentor().instrumentation_dependencies())
#: Whether this SQLAlchemy is outside the range contrib declares (2.1 and contrib 0.66b1).
OUTSIDE_CONTRIB = get_dependency_conflicts([DECLARED]) is not None

OLD_NAMES = "db.system, db.name, db.statement, net.peer.name, net.peer.port"
STABLE_NAMES = "db.system.name, db.namespace, db.query.text, server.address, server.port"
ADVICE = (
    "; for the stable names polydatum's spans follow, set "
    "OTEL_SEMCONV_STABILITY_OPT_IN=database,http before the first instrumentation runs"
)
ALREADY = (
    f"{CONTRIB} already traces this engine, to the tracer provider it was given "
    f"(SQLAlchemyInstrumentor().instrument(), as opentelemetry-instrument calls it)"
)
NOT_INSTALLED = (
    "SQL statement spans: off (opentelemetry-instrumentation-sqlalchemy is not installed: "
    "pip install 'polydatum[sql-tracing]')"
)
DISABLED = (
    "SQL statement spans: off (OTEL_PYTHON_DISABLED_INSTRUMENTATIONS turns the sqlalchemy one off)"
)


def on_reason() -> str:
    """The reason given when polydatum traced an engine itself."""
    reason = f"{CONTRIB}, {INSTALLED}"
    if OUTSIDE_CONTRIB:
        reason += (
            f", which is outside the {DECLARED!r} contrib declares but within the "
            f"sqlalchemy{STATEMENT_TRACING_TESTED} polydatum tests it with"
        )
    return reason


def on_line(*, stable: bool, reason: str | None = None) -> str:
    names, advice = (STABLE_NAMES, "") if stable else (OLD_NAMES, ADVICE)
    return f"SQL statement spans: on ({reason or on_reason()}); their attributes: {names}{advice}"


def conflict_line(tested: str) -> str:
    return (
        f"SQL statement spans: off (version conflict: {CONTRIB} instruments {DECLARED!r} "
        f"and polydatum has tested it with sqlalchemy{tested} only; {INSTALLED} is installed)"
    )
