"""polydatum 0.9.1's import path for the DataManager and the DataAccessLayer.

They live in :mod:`polydatum.registry` and :mod:`polydatum.access`; applications
written for 0.9.1 import them from here, and keep doing so.
"""

from polydatum.access import DataAccessLayer, MethodMiddleware
from polydatum.registry import DataManager, PingResult

__all__ = ["DataAccessLayer", "DataManager", "MethodMiddleware", "PingResult"]
