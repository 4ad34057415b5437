"""polydatum against the dependency-injection containers users pick instead: svcs, dishka, wireup.

One request, the same for every contender (``_peer_workloads.py``): open a request
scope, lazily create one generator resource with a teardown (a session dict), make one
service call that reads from it, close the scope (the teardown runs). Contenders: a
hand-written floor (the generator stepped by hand), dishka, wireup, svcs, polydatum
without context middleware and polydatum with one trivial generator middleware; and the
straight-line estimate (``_peer_workloads.straight_line``): polydatum's idle bookkeeping
for this one registration written out straight, what a lifecycle generated per
DataManager configuration would cost. All idle: no OpenTelemetry SDK configured,
structlog unconfigured.

    .venv/bin/python benchmarks/bench_peers.py               # ~2 min: instructions + timing
    .venv/bin/python benchmarks/bench_peers.py --json        # the same report as JSON
    .venv/bin/python benchmarks/bench_peers.py --profile     # + where polydatum's opcodes go
    .venv/bin/python benchmarks/bench_peers.py --quick       # seconds; figures meaningless

The peers are the ``bench`` dependency group: ``pip install --group bench``.

Before anything is measured every contender passes a check (``_peer_workloads.check``):
the right result, the session created exactly once per request and torn down when the
scope closes, none created by a scope that makes no call. Then:

* **instructions** (valgrind callgrind, ``bench_instructions.py``'s method and code):
  each contender in its own process, ``n`` and ``3n`` requests after a warm-up, the
  heap frozen with ``gc.freeze()``; the difference over ``2n`` is one request. Each
  child also asserts that it created and tore down exactly one session per request.
* **timing** (``bench_core.py``'s interleaved rounds): every round times one batch per
  contender, in an order rotating per round; median and minimum µs per request, and
  per contender the ratios (of medians, of minimums, paired) to the fastest peer.
* **profile** (``--profile``): Python-level opcodes and calls per request, per function
  (``sys.settrace`` with ``f_trace_opcodes``) and the C functions called
  (``sys.setprofile``): where polydatum's instructions go, which callgrind's per-C-function
  counts of the interpreter do not show.

Ratios are to the fastest of the three peers (dishka, wireup, svcs), per measure.
"""

from __future__ import annotations

import argparse
import dis
import importlib.metadata
import json
import platform
import shutil
import statistics
import sys
import sysconfig
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

import _peer_workloads as workloads  # noqa: E402
import bench_instructions  # noqa: E402

WARMUP = bench_instructions.WARMUP
LIBRARIES = ("polydatum", *workloads.PEERS)
MISSING_HINT = "install the bench dependency group: .venv/bin/python -m pip install --group bench"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


# ------------------------------------------------------------------------ instructions


def child(contender: str, requests: int) -> None:
    """The measured process: warm-up, frozen heap, ``requests`` requests, then the tally."""
    run = workloads.build(contender).run
    bench_instructions.run_measured(run, requests)
    expected = WARMUP + requests
    tally = workloads.TALLY
    if not tally.created == tally.torn_down == expected:
        raise SystemExit(
            f"{contender}: {tally.created} sessions created, {tally.torn_down} torn down "
            f"in {expected} requests"
        )


def child_command(contender: str) -> Callable[[int], list[str]]:
    script = str(Path(__file__).resolve())
    return lambda n: [sys.executable, script, "--child", contender, str(n)]


def instructions(contenders: Sequence[str], requests: int) -> dict[str, float]:
    """Instructions per request of every contender (callgrind, two contenders at a time)."""

    def one(contender: str) -> float:
        return bench_instructions.per_request_of(child_command(contender), requests)

    return dict(zip(contenders, bench_instructions.in_parallel(one, contenders), strict=True))


# ------------------------------------------------------------------------------ timing


def timing(built: dict[str, workloads.Workload], rounds: int, batch: int) -> dict[str, list[float]]:
    """Seconds per request of every contender, one figure per round (bench_core.measure)."""
    import bench_core

    contenders = [
        bench_core.Contender(name, bench_core.local(w.run), batch) for name, w in built.items()
    ]
    bench_core.measure(contenders, rounds)
    return {c.name: c.per_request for c in contenders}


def timing_summary(per_round: list[float], batch: int) -> dict[str, Any]:
    us = [t * 1e6 for t in per_round]
    return {
        "batch": batch,
        "rounds": len(us),
        "median_us": round(statistics.median(us), 3),
        "min_us": round(min(us), 3),
        "samples_us": [round(u, 3) for u in us],
    }


def timing_ratios(subject: list[float], reference: list[float]) -> dict[str, float]:
    return {
        "median_ratio": round(statistics.median(subject) / statistics.median(reference), 3),
        "min_ratio": round(min(subject) / min(reference), 3),
        "paired_ratio": round(
            statistics.median(a / b for a, b in zip(subject, reference, strict=True)), 3
        ),
    }


# ----------------------------------------------------------------------------- profile

_YIELD_VALUE = dis.opmap["YIELD_VALUE"]
_STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _where(code: CodeType) -> str:
    """``path:line qualname``, the path relative to the checkout, site-packages or stdlib."""
    path = Path(code.co_filename)
    if path.is_relative_to(ROOT) and ".venv" not in path.parts:
        path = path.relative_to(ROOT)
    elif "site-packages" in path.parts:
        path = Path(*path.parts[path.parts.index("site-packages") + 1 :])
    elif path.is_relative_to(_STDLIB):
        path = path.relative_to(_STDLIB)
    return f"{path}:{code.co_firstlineno} {code.co_qualname}"


def profile(workload: workloads.Workload, requests: int) -> dict[str, Any]:
    """Python opcodes and calls per request of ``workload``, by function.

    ``sys.settrace`` with ``f_trace_opcodes`` counts every bytecode instruction a
    function executes (``opcodes``: its own; ``inclusive``: with the functions it
    calls); a generator's resumption is a ``resume``, not a call. ``sys.setprofile``
    counts the C functions each Python function calls (``c_calls``) and which ones.
    Tracing changes the interpreter's speed, not which instructions run.
    """
    for _ in range(WARMUP):
        workload.run()
    own: Counter[CodeType] = Counter()
    inclusive: Counter[CodeType] = Counter()
    calls: Counter[CodeType] = Counter()
    resumes: Counter[CodeType] = Counter()
    c_calls: Counter[CodeType] = Counter()
    c_functions: Counter[str] = Counter()
    suspended: dict[int, FrameType] = {}  # generator frames at a yield (held: ids stay unique)
    stack: list[tuple[CodeType, int]] = []
    total = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal total
        if event == "opcode":
            own[frame.f_code] += 1
            total += 1
        elif event == "return":
            code, at_entry = stack.pop()
            inclusive[code] += total - at_entry
            if code.co_code[frame.f_lasti] == _YIELD_VALUE:
                suspended[id(frame)] = frame
            else:
                suspended.pop(id(frame), None)
        return local

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        if event != "call":
            return None
        code = frame.f_code
        if suspended.pop(id(frame), None) is frame:
            resumes[code] += 1
        else:
            calls[code] += 1
        frame.f_trace_opcodes = True
        stack.append((code, total))
        return local

    def profiler(frame: FrameType, event: str, arg: Any) -> None:
        if event == "c_call" and stack:
            c_calls[frame.f_code] += 1
            c_functions[getattr(arg, "__qualname__", repr(arg))] += 1

    run = workload.run
    sys.setprofile(profiler)
    sys.settrace(tracer)
    try:
        for _ in range(requests):
            run()
    finally:
        sys.settrace(None)
        sys.setprofile(None)
    suspended.clear()
    codes = sorted(set(calls) | set(resumes), key=lambda c: (-own[c], _where(c)))

    def per(value: int) -> float:
        return round(value / requests, 2)

    return {
        "requests": requests,
        "opcodes": per(total),
        "python_calls": per(sum(calls.values())),
        "generator_resumes": per(sum(resumes.values())),
        "c_calls": per(sum(c_calls.values())),
        "functions": [
            {
                "function": _where(code),
                "calls": per(calls[code]),
                "resumes": per(resumes[code]),
                "opcodes": per(own[code]),
                "inclusive_opcodes": per(inclusive[code]),
                "c_calls": per(c_calls[code]),
            }
            for code in codes
        ],
        "c_functions": {name: per(n) for name, n in c_functions.most_common()},
    }


# ------------------------------------------------------------------------------ report


def fastest_peer(figures: dict[str, float]) -> str:
    return min(workloads.PEERS, key=lambda peer: figures[peer])


def render(report: dict[str, Any], top: int) -> str:
    quick = "  [QUICK: figures are not meaningful]" if report["quick"] else ""
    v = report["versions"]
    lines = [
        f"one request (scope, lazy generator resource, one service call, teardown), idle; "
        f"Python {report['python']}{quick}",
        "  " + ", ".join(f"{name} {v[name]}" for name in LIBRARIES),
        "",
        "check (session created once and torn down once per request, lazily): "
        + ", ".join(
            f"{name} {'ok' if c['passed'] else 'FAILED'}" for name, c in report["check"].items()
        ),
    ]
    ins, tim = report["instructions"], report["timing"]
    if ins or tim:
        header = f"{'contender':<26}"
        if ins:
            header += f" {'instructions':>12} {'/ fastest peer':>14} {'/ floor':>8}"
        if tim:
            header += f" {'median µs':>10} {'min µs':>8} {'/ fastest peer (median min paired)':>36}"
        lines += ["", header]
        for name in report["contenders"]:
            row = f"{name:<26}"
            if ins:
                row += (
                    f" {ins['per_request'][name]:>12,} {ins['ratio_to_fastest_peer'][name]:>14.3f}"
                    f" {ins['ratio_to_floor'][name]:>8.2f}"
                )
            if tim:
                t, r = tim["contenders"][name], tim["ratio_to_fastest_peer"][name]
                row += (
                    f" {t['median_us']:>10.2f} {t['min_us']:>8.2f}"
                    f" {r['median_ratio']:>16.3f} {r['min_ratio']:>6.3f} {r['paired_ratio']:>6.3f}"
                )
            lines.append(row)
        notes = []
        if ins:
            notes.append(
                f"instructions: callgrind, n={ins['requests']}, fastest peer {ins['fastest_peer']}"
            )
        if tim:
            notes.append(
                f"timing: {tim['rounds']} interleaved rounds of {tim['batch']} requests, "
                f"fastest peer (median) {tim['fastest_peer']}"
            )
        lines += ["", *notes]
    if report["profile"]:
        lines += ["", f"Python-level profile per request ({WARMUP} warm-up requests first):"]
        lines.append(
            f"  {'contender':<26} {'opcodes':>8} {'py calls':>9} {'resumes':>8} {'C calls':>8}"
        )
        for name, p in report["profile"].items():
            lines.append(
                f"  {name:<26} {p['opcodes']:>8.1f} {p['python_calls']:>9.1f} "
                f"{p['generator_resumes']:>8.1f} {p['c_calls']:>8.1f}"
            )
        for name in (workloads.POLYDATUM, workloads.POLYDATUM_MW):
            p = report["profile"].get(name)
            if p is None:
                continue
            lines += [
                "",
                f"{name}: top {top} functions by own opcodes per request",
                f"  {'opcodes':>8} {'incl.':>8} {'calls':>6} {'resumes':>7} {'C calls':>7}"
                "  function",
            ]
            for f in p["functions"][:top]:
                lines.append(
                    f"  {f['opcodes']:>8.1f} {f['inclusive_opcodes']:>8.1f} {f['calls']:>6.1f} "
                    f"{f['resumes']:>7.1f} {f['c_calls']:>7.1f}  {f['function']}"
                )
            c_top = list(p["c_functions"].items())[:top]
            lines.append("  C functions called: " + ", ".join(f"{n} {k:g}" for n, k in c_top))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="callgrind n (default 200)")
    parser.add_argument("--rounds", type=int, default=21, help="timing rounds (default 21)")
    parser.add_argument(
        "--batch", type=int, default=5000, help="requests per timed batch (default 5000)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--quick", action="store_true", help="tiny run: checks that it works")
    parser.add_argument("--no-instructions", action="store_true", help="skip callgrind")
    parser.add_argument("--no-timing", action="store_true", help="skip the timed rounds")
    parser.add_argument("--profile", action="store_true", help="add the Python-level profile")
    parser.add_argument(
        "--profile-requests", type=int, default=20, help="requests traced (default 20)"
    )
    parser.add_argument("--top", type=int, default=15, help="functions printed per profile")
    parser.add_argument("--child", nargs=2, metavar=("CONTENDER", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.requests = min(args.requests, 2)
        args.rounds = min(args.rounds, 3)
        args.batch = min(args.batch, 50)
        args.profile_requests = min(args.profile_requests, 2)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.child:
        contender, n = args.child
        child(contender, int(n))
        return None
    found = versions()
    missing = [name for name in workloads.PEERS if found[name] is None]
    if missing:
        raise SystemExit(f"not installed: {', '.join(missing)}; {MISSING_HINT}")
    if not args.no_instructions and shutil.which("valgrind") is None:
        raise SystemExit(
            "valgrind is not installed (apt-get install valgrind), or --no-instructions"
        )

    contenders = list(workloads.CONTENDERS)
    built = {name: workloads.build(name) for name in contenders}
    check = {name: workloads.check(w) for name, w in built.items()}
    for name, w in built.items():
        if w.dm is not None:  # polydatum: idle means its contexts record nothing
            import bench_core

            check[name]["recording"] = bench_core.records(w.dm)
            check[name]["passed"] = check[name]["passed"] and not check[name]["recording"]
    failed = [name for name, c in check.items() if not c["passed"]]
    if failed:
        raise SystemExit(f"check failed for {', '.join(failed)}: {json.dumps(check, indent=2)}")
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "versions": found,
        "quick": args.quick,
        "contenders": contenders,
        "peers": list(workloads.PEERS),
        "check": check,
        "instructions": None,
        "timing": None,
        "profile": None,
    }
    if not args.no_instructions:
        log(f"instructions (callgrind, n={args.requests}) ...")
        counts = instructions(contenders, args.requests)
        best = fastest_peer(counts)
        report["instructions"] = {
            "requests": args.requests,
            "warmup": WARMUP,
            "per_request": {name: round(counts[name]) for name in contenders},
            "fastest_peer": best,
            "ratio_to_fastest_peer": {
                name: round(counts[name] / counts[best], 3) for name in contenders
            },
            "ratio_to_floor": {
                name: round(counts[name] / counts[workloads.FLOOR], 3) for name in contenders
            },
        }
    if not args.no_timing:
        log(f"timing ({args.rounds} rounds of {args.batch} requests) ...")
        per_round = timing(built, args.rounds, args.batch)
        medians = {name: statistics.median(t) for name, t in per_round.items()}
        best = fastest_peer(medians)
        report["timing"] = {
            "rounds": args.rounds,
            "batch": args.batch,
            "contenders": {
                name: timing_summary(per_round[name], args.batch) for name in contenders
            },
            "fastest_peer": best,
            "ratio_to_fastest_peer": {
                name: timing_ratios(per_round[name], per_round[best]) for name in contenders
            },
        }
    if args.profile:
        log(f"profile ({args.profile_requests} requests each) ...")
        report["profile"] = {
            name: profile(workloads.build(name), args.profile_requests) for name in contenders
        }
    if args.json:
        print(json.dumps(report, indent=2))
        log(render(report, args.top))
    else:
        print(render(report, args.top))
    return report


if __name__ == "__main__":
    main()
