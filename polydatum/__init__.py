"""polydatum: an observability-first data-access layer.

A :class:`DataManager` registers Services, lazily created Resources and context
Middleware; each request runs in one :class:`~polydatum.context.DataAccessContext`
whose every lifecycle step is an OpenTelemetry span, a metric sample and a structlog
event. The public surface is polydatum 0.9.1's (plus 1.0's method middleware).
"""

from polydatum.context import DataAccessContext, Meta, get_active_context
from polydatum.dal import DataAccessLayer, DataManager, PingResult
from polydatum.lifecycle import State
from polydatum.resources import Resource, ValueResource
from polydatum.services import Service
from polydatum.version import __version__

__all__ = [
    "DataAccessContext",
    "DataAccessLayer",
    "DataManager",
    "Meta",
    "PingResult",
    "Resource",
    "Service",
    "State",
    "ValueResource",
    "__version__",
    "get_active_context",
]
