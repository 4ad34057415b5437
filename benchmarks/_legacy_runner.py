"""The child process of ``bench_core.py``: runs batches of the workloads on command.

It runs under another interpreter (normally the ``.bench-venv-091`` virtualenv with
polydatum 0.9.1 from PyPI, which has the same import name as this checkout), started
with ``python -I`` so that neither the checkout nor ``PYTHONPATH`` shadows the
installed polydatum. The parent drives the rounds, so both processes see the same
machine noise, through a line protocol on stdin/stdout:

=========================  ===============================================
parent sends               child answers
=========================  ===============================================
``hello``                  ``ok {"polydatum": VERSION, "python": VERSION}``
``check SHAPE``            ``ok JSON`` (the result of one request)
``run SHAPE N``            ``ok SECONDS`` (wall time of N requests)
``quit``                   (exits)
=========================  ===============================================

Any failure answers ``err MESSAGE`` and the child keeps serving.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _workloads


def main() -> None:
    from importlib.metadata import version

    from polydatum import DataManager, Service

    runs = {}
    for shape in ("A", "B"):
        dm = _workloads.build(shape, DataManager, Service)
        runs[shape] = _workloads.request(shape, dm)

    out = sys.stdout
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        try:
            command = words[0]
            if command == "quit":
                break
            if command == "hello":
                answer = json.dumps(
                    {"polydatum": version("polydatum"), "python": platform.python_version()}
                )
            elif command == "check":
                answer = json.dumps(runs[words[1]]())
            elif command == "run":
                answer = repr(_workloads.timed_batch(runs[words[1]], int(words[2])))
            else:
                raise ValueError(f"unknown command {command!r}")
            out.write(f"ok {answer}\n")
        except Exception as error:
            detail = traceback.format_exception_only(type(error), error)[-1].strip()
            out.write(f"err {detail}\n")
        out.flush()


if __name__ == "__main__":
    main()
