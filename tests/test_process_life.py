"""Process life: interpreter exit with a context open, and ``os.fork()`` (gunicorn preload).

Each test runs a small program in a subprocess with a real SDK ``BatchSpanProcessor``
writing span names to a file, and states exactly what happens:

* **Exit with a context open.** Steps that finished (a resource's setup span) are
  exported by the SDK's exit-time flush; polydatum ends the open context's own span
  at exit (ERROR, ``polydatum.abandoned``) so it is exported too, and logs one
  ``polydatum.context.open_at_exit`` warning. Its resources are not torn down:
  polydatum does not run user teardown code at interpreter exit.
* **Fork after preload.** A DataManager built before ``os.fork()`` works in the
  child: the SDK's batch processor restarts its worker after the fork, and every
  span of a context run in the child is exported by the child at its exit, in a
  trace of its own. The parent's exports are unaffected.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PRELUDE = textwrap.dedent(
    """
    import os, sys
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor, SpanExporter, SpanExportResult,
    )
    from polydatum import DataManager, Service

    OUT = sys.argv[1]

    class FileExporter(SpanExporter):
        def export(self, spans):
            with open(f"{OUT}.{os.getpid()}", "a") as out:
                for s in spans:
                    parent = s.parent.span_id if s.parent else 0
                    out.write(f"{s.name}|{s.context.trace_id:x}|{parent:x}|{s.context.span_id:x}\\n")
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(FileExporter()))

    def res(ctx):
        try:
            yield 1
        finally:
            print(f"teardown res in {os.getpid()}", flush=True)

    class Work(Service):
        def run(self):
            return self._ctx.res

    dm = DataManager(tracer_provider=provider)
    dm.register_services(work=Work())
    dm.register_resources(res=res)
    """
)


def run_program(tmp_path: Path, body: str) -> tuple[str, dict[int, list[list[str]]]]:
    script = tmp_path / "program.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    out = tmp_path / "spans"
    proc = subprocess.run(
        [sys.executable, str(script), str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert proc.returncode == 0, proc.stderr
    exported: dict[int, list[list[str]]] = {}
    for path in tmp_path.glob("spans.*"):
        pid = int(path.suffix[1:])
        exported[pid] = [line.split("|") for line in path.read_text().splitlines()]
    return proc.stdout, exported


def test_exit_with_a_context_open(tmp_path: Path) -> None:
    stdout, exported = run_program(
        tmp_path,
        """
        import logging
        logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(name)s %(message)s")
        with dm.dal() as dal:
            dal.work.run()
        ctx = dm.context()
        ctx.__enter__()
        ctx.dal.work.run()
        print(f"exiting {os.getpid()}", flush=True)
        """,
    )
    ((pid, spans),) = exported.items()
    lines = stdout.splitlines()
    assert lines[:2] == [f"teardown res in {pid}", f"exiting {pid}"]
    # Not silent: one warning names the open context (to the stdlib logger "polydatum",
    # shown where the application's logging configuration says).
    assert lines[2].startswith("WARNING polydatum event='polydatum.context.open_at_exit'")
    assert len(lines) == 3
    assert "polydatum.context.open_at_exit" in lines[2]
    assert "count=1" in lines[2]
    assert "states=['active']" in lines[2]
    assert "teardown res" not in lines[2:]  # its resources were not torn down
    names = [s[0] for s in spans]
    # The finished context: all its spans. The open one: its finished steps, and its
    # own span, ended at exit (ERROR, polydatum.abandoned) so that nothing is orphaned.
    assert sorted(names) == sorted(
        [
            "polydatum.resource.setup res",
            "work.run",
            "polydatum.resource.teardown res",
            "polydatum.context",
            "polydatum.resource.setup res",
            "work.run",
            "polydatum.context",
        ]
    )
    exported_ids = {s[3] for s in spans}
    orphans = [s[0] for s in spans if s[2] != "0" and s[2] not in exported_ids]
    assert orphans == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork() is POSIX only")
def test_fork_after_preload(tmp_path: Path) -> None:
    stdout, exported = run_program(
        tmp_path,
        """
        with dm.dal() as dal:  # preload: the master uses the DataManager once
            dal.work.run()
        pid = os.fork()
        if pid == 0:
            for _ in range(2):
                with dm.dal() as dal:
                    dal.work.run()
            sys.exit(0)  # a normal exit: the SDK flushes at exit
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        print(f"child {pid}", flush=True)
        """,
    )
    child = int(stdout.splitlines()[-1].split()[1])
    parent = next(p for p in exported if p != child)
    assert sorted(exported) == sorted([parent, child])
    per_context = [
        "polydatum.context",
        "polydatum.resource.setup res",
        "polydatum.resource.teardown res",
        "work.run",
    ]
    assert sorted(s[0] for s in exported[parent]) == per_context
    assert sorted(s[0] for s in exported[child]) == sorted(per_context * 2)
    # two complete traces in the child, none shared with the parent
    child_traces = {s[1] for s in exported[child]}
    assert len(child_traces) == 2
    assert not child_traces & {s[1] for s in exported[parent]}
    ids = {s[3] for s in exported[child]}
    assert all(s[2] == "0" or s[2] in ids for s in exported[child])
    assert stdout.count(f"teardown res in {child}") == 2
