"""The peers benchmark still runs: ``benchmarks/bench_peers.py --quick --json --profile``.

svcs, dishka and wireup are the ``bench`` dependency group, which CI does not install
(it runs no benchmark): without them this test skips, saying what to install. Speed is
never asserted; the report's structure is, and that every contender passed its check
(the right result, the session created lazily and torn down once per request).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_peers.py"
PEERS = ["dishka", "wireup", "svcs"]
CONTENDERS = [
    "hand-written floor",
    *PEERS,
    "polydatum",
    "polydatum + 1 middleware",
    "straight-line estimate",
]

MISSING = [name for name in ("svcs", "dishka", "wireup") if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"the bench dependency group is not installed (missing {', '.join(MISSING)}): "
    "pip install --group bench",
)


def test_quick_run_reports_every_contender() -> None:
    valgrind = shutil.which("valgrind") is not None
    options = ["--quick", "--json", "--profile"]
    if not valgrind:
        options.append("--no-instructions")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *options],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    report: Any = json.loads(result.stdout)

    assert report["quick"] is True
    assert report["contenders"] == CONTENDERS
    assert report["peers"] == PEERS
    assert set(report["versions"]) == {"polydatum", *PEERS}
    assert all(isinstance(v, str) for v in report["versions"].values())

    # Every contender did the work: lazily, one session created and torn down per request.
    assert list(report["check"]) == CONTENDERS
    for name, check in report["check"].items():
        assert check["passed"] is True, (name, check)
        assert check["lazy"] is True
        assert check["once_per_request"] is True
        assert check["results"] == ["ada"] * check["requests"]
        assert check["created"] == check["torn_down"] == check["requests"]
    for name in ("polydatum", "polydatum + 1 middleware"):
        assert report["check"][name]["recording"] is False  # idle: no SDK, no logging

    instructions = report["instructions"]
    if valgrind:
        assert instructions["requests"] == 2
        assert list(instructions["per_request"]) == CONTENDERS
        assert all(v > 0 for v in instructions["per_request"].values())
        assert instructions["fastest_peer"] in PEERS
        best = instructions["fastest_peer"]
        assert instructions["ratio_to_fastest_peer"][best] == 1.0
        assert set(instructions["ratio_to_fastest_peer"]) == set(CONTENDERS)
        assert instructions["ratio_to_floor"]["hand-written floor"] == 1.0
    else:
        assert instructions is None

    timing = report["timing"]
    assert timing["rounds"] == 3
    assert list(timing["contenders"]) == CONTENDERS
    for contender in timing["contenders"].values():
        assert set(contender) == {"batch", "rounds", "median_us", "min_us", "samples_us"}
        assert len(contender["samples_us"]) == 3
        assert all(isinstance(s, float) and s > 0 for s in contender["samples_us"])
        assert contender["min_us"] == min(contender["samples_us"])
    assert timing["fastest_peer"] in PEERS
    for ratios in timing["ratio_to_fastest_peer"].values():
        assert set(ratios) == {"median_ratio", "min_ratio", "paired_ratio"}
        assert all(r > 0 for r in ratios.values())
    assert timing["ratio_to_fastest_peer"][timing["fastest_peer"]]["median_ratio"] == 1.0

    profile = report["profile"]
    assert list(profile) == CONTENDERS
    for name, p in profile.items():
        assert p["opcodes"] > 0 and p["python_calls"] > 0, name
        assert p["functions"], name
        assert set(p["functions"][0]) == {
            "function", "calls", "resumes", "opcodes", "inclusive_opcodes", "c_calls",
        }  # fmt: skip
        # The functions' own opcodes add up to the request's.
        assert sum(f["opcodes"] for f in p["functions"]) == pytest.approx(p["opcodes"])
    # polydatum's request runs polydatum's code, and the session generator resumes once.
    functions = {f["function"].split(" ", 1)[1]: f for f in profile["polydatum"]["functions"]}
    assert any(f["function"].startswith("polydatum/") for f in profile["polydatum"]["functions"])
    assert functions["polydatum_db"]["calls"] == 1.0
    assert functions["polydatum_db"]["resumes"] == 1.0
