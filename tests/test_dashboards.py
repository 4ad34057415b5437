"""The Grafana dashboards as code: the committed JSON is what the builder generates.

``polydatum-overview.json`` reads polydatum's own metrics, ``polydatum-spans.json`` the
same panels from the collector's spanmetrics series (tests/test_spanmetrics_dashboard.py
checks those series against the collector config and evaluates the queries).
"""

from __future__ import annotations

import importlib.util
import json
import re
import tomllib
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"


@pytest.fixture(scope="module")
def build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("polydatum_dashboards", DASHBOARDS / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FILES = ["polydatum-overview.json", "polydatum-spans.json"]


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DASHBOARDS / name).read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def model() -> dict[str, Any]:
    return load("polydatum-overview.json")


@pytest.fixture(scope="module")
def spans_model() -> dict[str, Any]:
    return load("polydatum-spans.json")


@pytest.fixture(scope="module", params=FILES)
def any_model(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load(request.param)


def test_regenerating_gives_the_same_bytes(build: ModuleType) -> None:
    assert [src.output for src in build.SOURCES] == FILES
    assert sorted(p.name for p in DASHBOARDS.glob("*.json")) == FILES  # none by hand
    for src in build.SOURCES:
        committed = (DASHBOARDS / src.output).read_bytes()
        assert build.render(src).encode("utf-8") == committed, src.output
    assert build.main(["--check"]) == 0


def test_check_fails_on_a_missing_or_stale_dashboard(
    build: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setattr(build, "HERE", tmp_path)
    assert build.main(["--check"]) == 1
    assert build.main([]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == FILES
    assert build.main(["--check"]) == 0
    stale = tmp_path / "polydatum-spans.json"
    stale.write_text(stale.read_text(encoding="utf-8").replace("15s", "5s"), encoding="utf-8")
    capsys.readouterr()
    assert build.main(["--check"]) == 1
    assert capsys.readouterr().err == (
        "polydatum-spans.json is stale: run python dashboards/build.py\n"
    )


def test_pinned_grafana_11_flavour() -> None:
    version = metadata.version("grafana-foundation-sdk")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = pyproject["dependency-groups"]["dashboards"]
    assert pins == [f"grafana-foundation-sdk=={version}"]
    assert version.endswith("!11.6.0")


def test_reads_from_health_to_culprit(any_model: dict[str, Any]) -> None:
    model = any_model
    rows = [p["title"] for p in model["panels"] if p["type"] == "row"]
    assert rows == [
        "Is it healthy?",
        "Service methods",
        "Context middleware",
        "Resources",
        "Suppressed teardown errors",
        "Traces (Tempo)",
    ]
    ys = [p["gridPos"]["y"] for p in model["panels"]]
    assert ys == sorted(ys)
    assert [p["id"] for p in model["panels"]] == list(range(1, len(model["panels"]) + 1))
    assert all(p.get("description") for p in model["panels"] if p["type"] != "row")
    # Each row is filled: panels of one row line up on a 24-column grid.
    for panel in model["panels"]:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
    assert [p["gridPos"]["w"] for p in model["panels"][1:6] if p["type"] == "stat"] in (
        [4, 4, 4, 4, 8],
        [6, 6, 6, 6],
    )


def test_datasources_are_variables_never_inputs(any_model: dict[str, Any]) -> None:
    model = any_model
    text = json.dumps(model)
    assert "${DS_" not in text
    assert "__inputs" not in model
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == (
        "datasource",
        "prometheus",
    )
    assert (variables["tempo"]["type"], variables["tempo"]["query"]) == ("datasource", "tempo")
    for panel in model["panels"]:
        if panel["type"] == "row":
            continue
        refs = {json.dumps(panel["datasource"], sort_keys=True)}
        refs |= {json.dumps(t["datasource"], sort_keys=True) for t in panel["targets"]}
        assert refs in (
            {'{"type": "prometheus", "uid": "${datasource}"}'},
            {'{"type": "tempo", "uid": "${tempo}"}'},
        ), panel["title"]


def test_queries_use_the_exporters_names(model: dict[str, Any]) -> None:
    exprs = [t["expr"] for p in model["panels"] for t in p.get("targets", []) if "expr" in t]
    metrics = set(re.findall(r"\b(polydatum_[a-z_]+)\{", " ".join(exprs)))
    assert metrics == {
        "polydatum_context_active",
        "polydatum_context_duration_seconds_bucket",
        "polydatum_context_duration_seconds_count",
        "polydatum_middleware_duration_seconds_bucket",
        "polydatum_resource_duration_seconds_bucket",
        "polydatum_resource_duration_seconds_count",
        "polydatum_resource_teardown_errors_total",
        "polydatum_service_duration_seconds_bucket",
        "polydatum_service_duration_seconds_count",
    }
    labels = set(re.findall(r"\b(polydatum_[a-z_]+)\b(?!\{)", " ".join(exprs))) - {
        m.removesuffix("{") for m in metrics
    }
    assert labels == {
        "polydatum_middleware_name",
        "polydatum_phase",
        "polydatum_resource_name",
        "polydatum_service_path",
    }
    assert all('job=~"$job"' in e for e in exprs)


def test_the_spans_dashboard_has_the_same_panels(
    model: dict[str, Any], spans_model: dict[str, Any]
) -> None:
    """One copy of each panel: the spans dashboard is the overview minus the panels that
    have no spanmetrics series (Active contexts), and every query is the same PromQL
    around other series (and, for "by phase", the phase read from the span name)."""
    sdk = [p for p in model["panels"] if p["title"] != "Active contexts"]
    assert len(sdk) == len(model["panels"]) - 1
    spans = spans_model["panels"]
    assert [p["title"] for p in spans] == [p["title"] for p in sdk]

    def shape(expr: str) -> str:
        expr = re.sub(r"\b[a-z_]+\{[^}]*\}", "SERIES", expr)
        return re.sub(
            r'label_replace\((rate\(SERIES\[[^\]]+\]\)), "polydatum_phase", "\$1", '
            r'"span_name", "[^"]+"\)',
            r"\1",
            expr,
        )

    def strip(target: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in target.items() if k != "interval"}
        if "expr" in out:
            out["expr"] = shape(out["expr"])
        return out

    for a, b in zip(sdk, spans, strict=True):
        for key in ("type", "description", "fieldConfig", "options", "transformations"):
            if a["title"] == "Suppressed teardown errors / s" and key == "description":
                continue  # says what each source counts
            assert a.get(key) == b.get(key), (a["title"], key)
        assert [strip(t) for t in a.get("targets", [])] == [
            strip(t) for t in b.get("targets", [])
        ], a["title"]


def test_spans_queries_read_only_spanmetrics_series(spans_model: dict[str, Any]) -> None:
    targets = [t for p in spans_model["panels"] for t in p.get("targets", []) if "expr" in t]
    assert len(targets) == 23
    exprs = [t["expr"] for t in targets]
    assert set(re.findall(r"\b([a-z_]+)\{", " ".join(exprs))) == {
        "traces_span_metrics_calls_total",
        "traces_span_metrics_duration_seconds_bucket",
    }
    assert all('service_name=~"$service"' in e for e in exprs)
    assert "polydatum_context_active" not in json.dumps(spans_model)
    # The connector's series change once per flush (15 s): every query steps that far.
    assert {t["interval"] for t in targets} == {"15s"}
    variables = {v["name"]: v for v in spans_model["templating"]["list"]}
    assert variables["service"]["query"] == (
        'label_values(traces_span_metrics_calls_total{span_name="polydatum.context"}, service_name)'
    )
    assert "job" not in variables


def test_the_dashboards_link_to_each_other(
    model: dict[str, Any], spans_model: dict[str, Any]
) -> None:
    assert [(link["title"], link["url"], link["keepTime"]) for link in model["links"]] == [
        ("polydatum — data layer (from spans)", "/d/polydatum-spans", True)
    ]
    assert [(link["title"], link["url"]) for link in spans_model["links"]] == [
        ("polydatum — data layer", "/d/polydatum-overview")
    ]
    assert (model["uid"], spans_model["uid"]) == ("polydatum-overview", "polydatum-spans")
    assert "spanmetrics" in spans_model["tags"] and "spanmetrics" not in model["tags"]


def test_traceql_panels(any_model: dict[str, Any]) -> None:
    model = any_model
    traceql = [
        (p["title"], t["query"])
        for p in model["panels"]
        for t in p.get("targets", [])
        if t.get("queryType") == "traceql"
    ]
    assert traceql == [
        ("Slowest contexts (over $slow)", '{ name = "polydatum.context" && duration > $slow }'),
        (
            "Contexts with suppressed teardown errors",
            '{ name = "polydatum.context" && span.polydatum.teardown_errors > 0 }',
        ),
        ("Failed contexts", '{ name = "polydatum.context" && status = error }'),
    ]


def test_provisioning_matches_the_dashboard(any_model: dict[str, Any]) -> None:
    model = any_model
    datasources = (DASHBOARDS / "provisioning" / "datasources" / "polydatum.yaml").read_text()
    assert re.findall(r"^\s+uid: (\S+)$", datasources, re.M) == ["prometheus", "tempo"]
    variables = {v["name"]: v["current"]["value"] for v in model["templating"]["list"]}
    assert (variables["datasource"], variables["tempo"]) == ("prometheus", "tempo")
    providers = (DASHBOARDS / "provisioning" / "dashboards" / "polydatum.yaml").read_text()
    assert "type: file" in providers
    assert "path: /var/lib/grafana/dashboards/polydatum" in providers
    compose = (ROOT / "instrumentation" / "docker-compose.yml").read_text()
    assert "../dashboards:/var/lib/grafana/dashboards/polydatum:ro" in compose
