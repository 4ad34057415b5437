"""The Grafana dashboard as code: the committed JSON is what the builder generates."""

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


@pytest.fixture(scope="module")
def model() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DASHBOARDS / "polydatum-overview.json").read_text())
    return data


def test_regenerating_gives_the_same_bytes(build: ModuleType) -> None:
    committed = (DASHBOARDS / "polydatum-overview.json").read_bytes()
    assert build.render().encode("utf-8") == committed
    assert build.main(["--check"]) == 0


def test_pinned_grafana_11_flavour() -> None:
    version = metadata.version("grafana-foundation-sdk")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = pyproject["project"]["optional-dependencies"]["dashboards"]
    assert pins == [f"grafana-foundation-sdk=={version}"]
    assert version.endswith("!11.6.0")


def test_reads_from_health_to_culprit(model: dict[str, Any]) -> None:
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


def test_datasources_are_variables_never_inputs(model: dict[str, Any]) -> None:
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


def test_traceql_panels(model: dict[str, Any]) -> None:
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


def test_provisioning_matches_the_dashboard(model: dict[str, Any]) -> None:
    datasources = (DASHBOARDS / "provisioning" / "datasources" / "polydatum.yaml").read_text()
    assert re.findall(r"^\s+uid: (\S+)$", datasources, re.M) == ["prometheus", "tempo"]
    variables = {v["name"]: v["current"]["value"] for v in model["templating"]["list"]}
    assert (variables["datasource"], variables["tempo"]) == ("prometheus", "tempo")
    providers = (DASHBOARDS / "provisioning" / "dashboards" / "polydatum.yaml").read_text()
    assert "type: file" in providers
    assert "path: /var/lib/grafana/dashboards/polydatum" in providers
    compose = (ROOT / "instrumentation" / "docker-compose.yml").read_text()
    assert "../dashboards:/var/lib/grafana/dashboards/polydatum:ro" in compose
