"""The demo: a small bookstore on polydatum and the ``polydatum demo`` command.

``polydatum demo`` (or ``python -m polydatum.demo``) runs :mod:`polydatum.demo.app`
for a number of requests and prints what polydatum recorded; see
:mod:`polydatum.demo.cli`. :func:`run` is the same from Python.
"""

from polydatum.demo.runner import DemoConfig, DemoError, DemoResult, run

__all__ = ["DemoConfig", "DemoError", "DemoResult", "run"]
