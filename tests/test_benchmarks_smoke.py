"""The core benchmark still runs: ``benchmarks/bench_core.py --quick --json``.

Speed is never asserted here (that is the benchmark's job, on a quiet machine); this
test checks that the script, its legacy child protocol and its report structure do
not rot. The legacy child runs under this test's own interpreter
(``--legacy-python``), so no virtualenv is created and no network is needed: the
protocol is the same whichever polydatum the child imports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_core.py"

EVERYTHING = "hand-written A (6 spans + 6 metric samples + canonical INFO line)"
STEPS_OFF = "polydatum A, step_metrics=False"
EVERYTHING_STEPS_OFF = (
    "hand-written A, step_metrics=False (6 spans + 2 metric samples + canonical INFO line)"
)
OLD_REFERENCE = "hand-written A (6 spans + 1 INFO line, no metrics: old reference)"
ASPECTS = ["spans", "instruments", "metric_points", "active_during_request", "log_lines"]
INSTRUMENTS = [
    "polydatum.resource.teardown.errors",
    "polydatum.context.duration",
    "polydatum.middleware.duration",
    "polydatum.resource.duration",
    "polydatum.service.duration",
    "polydatum.context.active",
]

SIX_SPANS = [
    ["polydatum.context", None],
    ["polydatum.middleware.setup request_id_middleware", "polydatum.context"],
    ["polydatum.middleware.teardown request_id_middleware", "polydatum.context"],
    ["polydatum.resource.setup db", "users.get"],
    ["polydatum.resource.teardown db", "polydatum.context"],
    ["users.get", "polydatum.context"],
]


def assert_everything_check(check: dict[str, Any]) -> None:
    """Each everything-on reference records what polydatum records (bench_core's check)."""
    assert check["fair"] is True
    assert check["requests"] == 3
    for label, reference, histograms in (
        ("step_metrics=True", EVERYTHING, 6),
        ("step_metrics=False", EVERYTHING_STEPS_OFF, 2),
    ):
        pair = check[label]
        assert pair["reference"] == reference
        assert pair["same"] == dict.fromkeys(ASPECTS, True)
        ours, theirs = pair["polydatum"], pair["handwritten"]
        assert all(ours[aspect] == theirs[aspect] for aspect in ASPECTS)
        assert sorted({(s[0], s[1]) for s in ours["spans"]}) == sorted(map(tuple, SIX_SPANS))
        assert len(ours["spans"]) == 18
        assert [i[1] for i in ours["instruments"]] == INSTRUMENTS
        samples = sum(
            p["count"] for m in ours["metric_points"] for p in m["points"] if "count" in p
        )
        assert samples == 3 * histograms
        assert ours["active_during_request"] == [[1], [1], [1]]
        assert [line["event"] for line in ours["log_lines"]] == ["polydatum.context"] * 3
        assert {line["ids"] for line in ours["log_lines"]} == {"a context span of this run"}


def json_report(script: Path, *options: str, timeout: float) -> Any:
    """Run a benchmark script with ``options`` (which include ``--json``); its report."""
    result = subprocess.run(
        [sys.executable, str(script), *options],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_quick_run_reports_every_condition() -> None:
    report = json_report(
        SCRIPT, "--quick", "--json", "--legacy-python", sys.executable, timeout=120
    )

    assert report["quick"] is True
    assert report["rounds"] == 3
    assert report["legacy"]["interpreter"] == sys.executable
    assert set(report["legacy"]) == {"polydatum", "python", "interpreter"}

    conditions = {c["name"]: c for c in report["conditions"]}
    assert list(conditions) == ["idle", "tracing", "everything"]

    idle = conditions["idle"]
    assert idle["recording"] == {"A": False, "B": False}
    legacy = report["legacy"]["polydatum"]
    assert list(idle["contenders"]) == [
        "polydatum A",
        f"polydatum {legacy} A (child)",
        "polydatum B",
        f"polydatum {legacy} B (child)",
    ]
    assert [(c["subject"], c["reference"], c["target"]) for c in idle["comparisons"]] == [
        ("polydatum A", f"polydatum {legacy} A (child)", 0.6),
        ("polydatum B", f"polydatum {legacy} B (child)", 0.6),
    ]
    assert [
        (c["subject"], c["reference"], c["target"]) for c in conditions["tracing"]["comparisons"]
    ] == [("polydatum A", "hand-written A (6 spans)", 1.0)]
    everything = conditions["everything"]
    assert list(everything["contenders"]) == [
        "polydatum A", EVERYTHING, STEPS_OFF, EVERYTHING_STEPS_OFF, OLD_REFERENCE
    ]  # fmt: skip
    assert [
        (c["subject"], c["reference"], c["target"], c["informational"])
        for c in everything["comparisons"]
    ] == [
        ("polydatum A", EVERYTHING, 1.05, False),
        (STEPS_OFF, EVERYTHING_STEPS_OFF, 1.05, False),
        ("polydatum A", OLD_REFERENCE, 1.3, True),
        (STEPS_OFF, OLD_REFERENCE, 1.3, True),
    ]

    for condition in report["conditions"]:
        for contender in condition["contenders"].values():
            assert set(contender) == {"batch", "rounds", "median_us", "min_us", "samples_us"}
            assert contender["rounds"] == 3
            assert len(contender["samples_us"]) == 3
            assert all(isinstance(s, float) and s > 0 for s in contender["samples_us"])
            assert contender["min_us"] == min(contender["samples_us"])
        for comparison in condition["comparisons"]:
            assert set(comparison) == {
                "subject", "reference", "median_ratio", "min_ratio", "paired_ratio",
                "target", "met", "informational",
            }  # fmt: skip
            assert all(comparison[k] > 0 for k in ("median_ratio", "min_ratio", "paired_ratio"))
            assert comparison["met"] is (comparison["median_ratio"] <= comparison["target"])

    # The hand-written reference records exactly polydatum's span tree for shape A.
    assert report["span_check"] == {"polydatum": SIX_SPANS, "handwritten": SIX_SPANS, "same": True}
    assert_everything_check(report["everything_check"])

    # Memory: correctness, not speed -- no context object outlives its context.
    assert [m["condition"] for m in report["memory"]] == ["idle", "everything"]
    for memory in report["memory"]:
        assert memory["contexts"] == 2000
        assert memory["alive_after_gc"] == 0
        assert memory["alive_without_gc_per_200"] == 0
        assert memory["active_context_left"] is False
        assert memory["limit_bytes"] == 1024 * 1024
        assert isinstance(memory["retained_bytes"], int)


def test_instruction_counts_report_ratios() -> None:
    """``bench_instructions.py`` runs its children under valgrind and reports a ratio.

    Two requests per child and the tracing comparison only (each callgrind run of an
    interpreter that imports the SDK takes seconds); the figures are not asserted.
    """
    report = json_report(
        ROOT / "benchmarks" / "bench_instructions.py",
        *("--conditions", "tracing", "--requests", "2", "--json"),
        timeout=300,
    )
    assert report["requests"] == 2
    assert sorted(report["instructions_per_request"]) == [
        "tracing / hand-written A (6 spans)",
        "tracing / polydatum A",
    ]
    assert all(v > 0 for v in report["instructions_per_request"].values())
    [comparison] = report["comparisons"]
    assert (comparison["condition"], comparison["subject"], comparison["target"]) == (
        "tracing",
        "polydatum A",
        1.0,
    )
    assert comparison["reference"] == "hand-written A (6 spans)"
    assert comparison["met"] == (comparison["ratio"] <= 1.0)


def test_instruction_children_run_every_everything_contender() -> None:
    """Each everything-on contender of ``bench_instructions.py`` runs as its child
    (natively, without valgrind: seconds; the callgrind path is the test above)."""
    for contender in ("polydatum A", STEPS_OFF, EVERYTHING, EVERYTHING_STEPS_OFF, OLD_REFERENCE):
        result = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "bench_instructions.py"),
             "--child", "everything", contender, "2"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )  # fmt: skip
        assert result.returncode == 0, (contender, result.stderr)
