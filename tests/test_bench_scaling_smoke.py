"""The scaling benchmark still runs: ``benchmarks/bench_scaling.py --quick --json``.

Structure only, never speed (that is the benchmark's job, on a quiet machine): every
point of the instruction part is counted under callgrind (quick mode: sizes 1 and 2,
idle only, the n/3n method of bench_instructions.py: 8 callgrind runs of an
interpreter importing polydatum and the SDK, most of this test's ~40 s), every axis
gets its line, and the throughput part reports contexts/s of 8 threads and 1,000
asyncio tasks against a single thread and task, idle and traced, for polydatum and
for the hand-written control. The traced child runs natively in the second test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_scaling.py"

AXES = ["middleware", "resources", "calls"]
MODES = ["idle", "traced"]


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_quick_run_reports_both_parts() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)

    assert report["quick"] is True
    assert report["modes"] == MODES
    assert set(report) == {"polydatum", "python", "quick", "modes", "instructions", "throughput"}

    part = report["instructions"]
    assert part["modes"] == ["idle"]  # --quick: the first mode only
    assert part["sizes"] == [1, 2]
    # One point per distinct workload and mode: (1, 1, 1) is shared by the three axes.
    workloads = [(1, 1, 1), (1, 1, 2), (1, 2, 1), (2, 1, 1)]
    assert [(p["mode"], (p["middleware"], p["resources"], p["calls"])) for p in part["points"]] == [
        ("idle", workload) for workload in workloads
    ]
    for point in part["points"]:
        assert point["requests"] == 2
        assert isinstance(point["instructions_per_context"], int)
        assert point["instructions_per_context"] > 0
    counts = {
        (p["mode"], p["middleware"], p["resources"], p["calls"]): p["instructions_per_context"]
        for p in part["points"]
    }
    assert [(a["mode"], a["axis"]) for a in part["axes"]] == [("idle", a) for a in AXES]
    for axis in part["axes"]:
        assert set(axis) == {
            "mode", "axis", "spans_per_step", "sizes", "instructions", "slope", "intercept",
            "r2", "residuals", "max_residual_pct", "steps", "growth",
        }  # fmt: skip
        assert axis["sizes"] == [1, 2]
        assert axis["spans_per_step"] == 0  # idle: no spans
        # The axis' figures are the points' (the others held at 1).
        one, two = (tuple(size if name == axis["axis"] else 1 for name in AXES) for size in (1, 2))
        assert axis["instructions"] == [counts[axis["mode"], *one], counts[axis["mode"], *two]]
        # Two points: the line goes through both; its slope is the one step between them.
        [step] = axis["steps"]
        assert (step["from"], step["to"]) == (1, 2)
        assert abs(axis["slope"] - step["per_step"]) <= 1
        assert abs(axis["intercept"] + axis["slope"] - axis["instructions"][0]) <= 2
        assert len(axis["residuals"]) == 2
        assert isinstance(axis["max_residual_pct"], float)

    part = report["throughput"]
    assert part["rounds"] == 2
    assert isinstance(part["cpus"], int) and part["cpus"] >= 1
    assert [(r["mode"], r["kind"], r["workers"]) for r in part["results"]] == [
        (mode, kind, workers)
        for mode in MODES
        for kind, workers in (("threads", 8), ("asyncio", 1000))
    ]
    for r in part["results"]:
        single = "1 thread" if r["kind"] == "threads" else "1 task"
        many = "8 threads" if r["kind"] == "threads" else "1000 tasks"
        assert set(r) == {"mode", "kind", "workers", "contexts_per_batch", "polydatum", "control"}
        assert r["contexts_per_batch"] % r["workers"] == 0
        for who in ("polydatum", "control"):
            x = r[who]
            assert set(x) == {
                "baseline",
                "concurrent",
                "ratio_of_medians",
                "paired_ratio",
                "extra_us",
            }
            assert (x["baseline"]["runner"], x["concurrent"]["runner"]) == (single, many)
            for side in (x["baseline"], x["concurrent"]):
                assert set(side) == {"runner", "median_cps", "max_cps", "samples_cps"}
                assert len(side["samples_cps"]) == 2
                assert all(isinstance(s, int) and s > 0 for s in side["samples_cps"])
                assert side["max_cps"] == max(side["samples_cps"])
            assert x["ratio_of_medians"] > 0 and x["paired_ratio"] > 0
            assert isinstance(x["extra_us"], float)


def test_children_run_every_mode_natively() -> None:
    """The callgrind child of each mode runs by itself (seconds, no valgrind)."""
    for mode in MODES:
        for workload in ("3 1 1", "1 3 1", "1 1 3"):
            result = subprocess.run(
                [sys.executable, str(SCRIPT), "--child", mode, *workload.split(), "2", "2"],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=ROOT,
            )
            assert result.returncode == 0, (mode, workload, result.stderr)
