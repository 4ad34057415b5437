"""A separate process that uses the safe, for the multi-process tests in test_safe.py.

``python safe_worker.py increment URL NAMESPACE KEY COUNT``
    ``COUNT`` atomic ``safe.update`` increments of ``KEY``; prints ``done`` at the end.
``python safe_worker.py assign URL NAMESPACE COUNT``
    Assigns ``key-<i>`` = ``i`` for ``i`` in ``range(COUNT)``; after each assignment
    *returns* it writes ``key-<i>`` to stdout and flushes, so that the parent knows
    exactly which assignments returned before it killed this process.

It waits for a line on stdin before starting, so that the parent can start every
worker first and release them together.
"""

from __future__ import annotations

import sys

from polydatum.safe import SafeStore


def main(argv: list[str]) -> int:
    command, url, namespace = argv[0], argv[1], argv[2]
    store = SafeStore(url)
    safe = store.safe(namespace)
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    sys.stdin.readline()
    if command == "increment":
        key, count = argv[3], int(argv[4])
        for _ in range(count):
            safe.update(key, lambda n: n + 1, default=0)
        out.write("done\n")
    elif command == "assign":
        for i in range(int(argv[3])):
            key = f"key-{i}"
            safe[key] = i
            out.write(key + "\n")
            out.flush()
        out.write("done\n")
    else:
        raise SystemExit(f"unknown command {command!r}")
    out.flush()
    store.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
