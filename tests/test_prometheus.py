"""The dashboards and rules, verified against a real Prometheus scraping ``polydatum demo``.

Starts ``polydatum demo --prometheus-port`` and a ``prometheus`` server on loopback
(scrape and rule evaluation every second, temporary data directory), waits for data,
then runs every PromQL expression of every dashboard panel and every recording and
alert rule through the HTTP API. ``promtool`` checks the configuration, the rules,
the rule unit tests and the exposition. Every process started here is stopped here.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import require_binary

ROOT = Path(__file__).resolve().parent.parent
INSTRUMENTATION = ROOT / "instrumentation" / "prometheus"
RULES = INSTRUMENTATION / "rules" / "polydatum.rules.yml"
RULE_TESTS = INSTRUMENTATION / "tests" / "polydatum.rules.test.yml"
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
# A dashboard tagged "spanmetrics" reads the series the collector's spanmetrics connector
# derives from spans, which `polydatum demo --prometheus-port` does not serve (no
# collector here): tests/test_spanmetrics_dashboard.py evaluates its queries instead.
SPANMETRICS_DASHBOARDS = [
    p for p in DASHBOARDS if "spanmetrics" in json.loads(p.read_text(encoding="utf-8"))["tags"]
]
SDK_DASHBOARDS = [p for p in DASHBOARDS if p not in SPANMETRICS_DASHBOARDS]

pytestmark = pytest.mark.prometheus

# What Grafana substitutes in the dashboards' queries (the job variable is "All").
GRAFANA_VARIABLES = {
    "$__rate_interval": "30s",
    "$__range": "5m",
    '"$job"': '".*"',
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def stop(process: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


class Stack:
    def __init__(self, prometheus_url: str, metrics_url: str, demo: subprocess.Popen[str]):
        self.prometheus_url = prometheus_url
        self.metrics_url = metrics_url
        self.demo = demo

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = get_json(url)
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def rules(self) -> list[dict[str, Any]]:
        body = get_json(f"{self.prometheus_url}/api/v1/rules")
        return [rule for group in body["data"]["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = require_binary("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    demo_port, prom_port = free_port(), free_port()
    demo = subprocess.Popen(
        [
            sys.executable, "-c", "import sys; from polydatum.cli import main; sys.exit(main())",
            "demo", "--requests", "100", "--prometheus-port", str(demo_port),
            "--duration", "90", "--rate", "40", "--json",
            "--database-url", f"sqlite:///{tmp / 'demo.db'}",
        ],
        cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # The committed rules, evaluated every second instead of every 30 s.
    rules = tmp / "polydatum.rules.yml"
    rules.write_text(RULES.read_text().replace("    interval: 30s\n", "    interval: 1s\n"))
    assert "    interval: 1s\n" in rules.read_text()
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {rules}\n"
        "scrape_configs:\n  - job_name: polydatum-demo\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{demo_port}']\n"
    )
    server = subprocess.Popen(
        [
            prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    s = Stack(f"http://127.0.0.1:{prom_port}", f"http://127.0.0.1:{demo_port}/metrics", demo)
    try:
        deadline = time.monotonic() + 60
        ready = False
        while time.monotonic() < deadline:
            for process, name in ((demo, "demo"), (server, "prometheus")):
                if process.poll() is not None:
                    _, err = process.communicate()
                    pytest.fail(f"{name} exited early ({process.returncode}): {err[-2000:]}")
            try:
                ready = bool(
                    s.query("job_resource_error:polydatum_resource_teardown_errors:rate5m")
                ) and bool(s.query("sum(rate(polydatum_context_duration_seconds_count[30s]))"))
            except OSError:
                ready = False
            if ready:
                break
            time.sleep(0.5)
        assert ready, "Prometheus never got polydatum's metrics and rule results"
        time.sleep(2)  # a few more scrapes and evaluations for every rule
        yield s
    finally:
        stop(server)
        stop(demo, signal.SIGINT)


def dashboard_queries() -> list[tuple[str, str, str]]:
    out = []
    for path in SDK_DASHBOARDS:
        model = json.loads(path.read_text(encoding="utf-8"))
        for panel in model["panels"]:
            for target in panel.get("targets", []):
                if "expr" in target:
                    out.append((path.name, panel["title"], target["expr"]))
    return out


def test_the_dashboards_have_queries() -> None:
    assert [p.name for p in SDK_DASHBOARDS] == ["polydatum-overview.json"]
    assert [p.name for p in SPANMETRICS_DASHBOARDS] == ["polydatum-spans.json"]
    queries = dashboard_queries()
    assert len(queries) == 24
    assert all("${DS_" not in expr for _, _, expr in queries)


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    empty = []
    for dashboard, title, expr in dashboard_queries():
        concrete = expr
        for variable, value in GRAFANA_VARIABLES.items():
            concrete = concrete.replace(variable, value)
        assert "$" not in concrete, concrete
        if not stack.query(concrete):
            empty.append(f"{dashboard} / {title}: {concrete}")
    assert empty == []


ALERT = re.compile(r"^(?P<lhs>.+?)\s*(?P<op>>|<)\s*(?P<threshold>[0-9.eE+-]+)\s*$", re.S)


def _key(sample: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(sample["metric"].items()))


def test_every_rule_is_loaded_healthy_and_returns_data(stack: Stack) -> None:
    rules = stack.rules()
    assert sorted(r["name"] for r in rules if r["type"] == "recording") == [
        "job:polydatum_context_duration_seconds:p99_5m",
        "job:polydatum_context_errors:ratio_rate5m",
        "job:polydatum_contexts:rate5m",
        "job_middleware_phase:polydatum_middleware_duration_seconds:p99_5m",
        "job_resource_error:polydatum_resource_teardown_errors:rate5m",
        "job_resource_phase:polydatum_resource_duration_seconds:p99_5m",
        "job_service:polydatum_service_duration_seconds:p99_5m",
    ]
    assert sorted(r["name"] for r in rules if r["type"] == "alerting") == [
        "PolydatumContextErrorRatioHigh",
        "PolydatumContextsLeaking",
        "PolydatumMiddlewarePhaseSlow",
        "PolydatumTeardownErrors",
    ]
    for rule in rules:
        assert rule["health"] == "ok", rule
        if rule["type"] == "recording":
            assert stack.query(rule["query"]), rule["name"]
            assert stack.query(rule["name"]), rule["name"]
            continue
        # Alerts are `<query> > <threshold>`: the query must return data, and the
        # alert's result must be exactly the samples beyond the threshold.
        match = ALERT.match(rule["query"])
        assert match, rule["query"]
        lhs = stack.query(match["lhs"])
        assert lhs, rule["name"]
        threshold = float(match["threshold"])
        above = {
            _key(s) for s in lhs if (float(s["value"][1]) > threshold if match["op"] == ">" else 0)
        }
        assert {_key(s) for s in stack.query(rule["query"])} == above, rule["name"]


def test_the_teardown_error_alert_is_pending(stack: Stack) -> None:
    """The demo's cache fails now and then: the alert waits out its `for: 10m`."""
    # The alert fires once the 5m rate is above zero, i.e. once two scrapes have seen
    # the error counter grow; on a loaded machine the demo may not have failed twice
    # yet when the stack is ready, so give it (it keeps running) a little time.
    deadline = time.monotonic() + 30
    while True:
        (rule,) = [r for r in stack.rules() if r["name"] == "PolydatumTeardownErrors"]
        if rule["state"] == "pending" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert rule["state"] == "pending"
    assert {
        (a["labels"]["polydatum_resource_name"], a["labels"]["error_type"], a["state"])
        for a in rule["alerts"]
    } == {("cache", "polydatum.demo.app.CacheFlushError", "pending")}


def test_metric_names_and_buckets(stack: Stack) -> None:
    names = {s["metric"]["__name__"] for s in stack.query('{__name__=~"polydatum_.*"}')}
    assert {
        "polydatum_context_active",
        "polydatum_context_duration_seconds_bucket",
        "polydatum_context_duration_seconds_count",
        "polydatum_context_duration_seconds_sum",
        "polydatum_middleware_duration_seconds_bucket",
        "polydatum_resource_duration_seconds_bucket",
        "polydatum_service_duration_seconds_bucket",
        "polydatum_resource_teardown_errors_total",
    } <= names
    buckets = stack.query(
        'polydatum_middleware_duration_seconds_bucket{polydatum_middleware_name="auth",'
        'polydatum_phase="setup"}'
    )
    assert sorted({float(s["metric"]["le"]) for s in buckets}) == [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
        0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"),
    ]  # fmt: skip
    # Sub-millisecond phases resolve: most auth setups land in the first buckets.
    fast = stack.query(
        'sum(polydatum_middleware_duration_seconds_bucket{polydatum_middleware_name="auth",'
        'polydatum_phase="setup",le="0.001"}) / sum(polydatum_middleware_duration_seconds_count'
        '{polydatum_middleware_name="auth",polydatum_phase="setup"})'
    )
    assert float(fast[0]["value"][1]) > 0.5


def test_exposition_passes_promtool_check_metrics(stack: Stack) -> None:
    promtool = require_binary("promtool")
    with urllib.request.urlopen(stack.metrics_url, timeout=10) as response:
        exposition = response.read()
    assert b"polydatum_resource_teardown_errors_total{" in exposition
    done = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_check_config_and_rules() -> None:
    promtool = require_binary("promtool")
    config = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(INSTRUMENTATION / "prometheus.yml")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert config.returncode == 0, config.stdout + config.stderr
    rules = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=30
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 11 rules found" in rules.stdout


def test_promtool_rule_unit_tests() -> None:
    promtool = require_binary("promtool")
    done = subprocess.run(
        [promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("SUCCESS")


# ------------------------------------------------ the rest of the stack's configuration


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_compose_mounts_files_that_exist() -> None:
    compose_file = ROOT / "instrumentation" / "docker-compose.yml"
    compose = load_yaml(compose_file)
    assert sorted(compose["services"]) == ["grafana", "otel-collector", "prometheus", "tempo"]
    for name, service in compose["services"].items():
        assert ":" in service["image"] and not service["image"].endswith(":latest"), name
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (compose_file.parent / source).exists(), f"{name}: {volume}"
    grafana = compose["services"]["grafana"]
    assert grafana["image"].startswith("grafana/grafana:11.")
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/var/lib/grafana/dashboards/polydatum/polydatum-overview.json"


def test_collector_pipelines_use_defined_components() -> None:
    config = load_yaml(ROOT / "instrumentation" / "collector" / "otel-collector.yaml")
    pipelines = config["service"]["pipelines"]
    assert pipelines["traces"]["exporters"] == ["otlp/tempo", "spanmetrics"]
    assert pipelines["metrics"]["receivers"] == ["otlp", "spanmetrics"]
    for pipeline in pipelines.values():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind] or component in config["connectors"], component
    dimensions = [d["name"] for d in config["connectors"]["spanmetrics"]["dimensions"]]
    assert dimensions == [
        "polydatum.middleware.name",
        "polydatum.resource.name",
        "polydatum.service.path",
        "polydatum.outcome",
        "polydatum.exception.seen",
        "error.type",
    ]
    assert config["connectors"]["spanmetrics"]["events"] == {
        "enabled": True,
        "dimensions": [{"name": "exception.type"}],
    }
    # The collector's Prometheus exporter is what the Prometheus config scrapes.
    assert config["exporters"]["prometheus"]["endpoint"] == "0.0.0.0:8889"
    scrape = load_yaml(INSTRUMENTATION / "prometheus.yml")["scrape_configs"]
    assert scrape[0]["static_configs"] == [{"targets": ["otel-collector:8889"]}]


def test_tempo_receives_what_the_collector_sends() -> None:
    tempo = load_yaml(ROOT / "instrumentation" / "tempo" / "tempo.yaml")
    collector = load_yaml(ROOT / "instrumentation" / "collector" / "otel-collector.yaml")
    grpc = tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert grpc.endswith(":4317")
    assert collector["exporters"]["otlp/tempo"]["endpoint"] == "tempo:4317"
    assert tempo["server"]["http_listen_port"] == 3200
    datasources = load_yaml(ROOT / "dashboards" / "provisioning" / "datasources" / "polydatum.yaml")
    urls = {d["uid"]: d["url"] for d in datasources["datasources"]}
    assert urls == {"prometheus": "http://prometheus:9090", "tempo": "http://tempo:3200"}
