"""The observability files of docker-compose.yml (issue 14): Prometheus, Grafana and the
OpenTelemetry collector. No Docker here: every file must parse, what it names must exist (compose
services and ports, mounted files, pipeline components), and every metric a dashboard panel
queries must be in a real scrape of the API and of a worker (driven as tests/test_metrics.py does).
"""

# ruff: noqa: F811 - the API tests' fixtures are imported here, and named as parameters

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from temporalio.testing import WorkflowEnvironment

from core.settings import Settings

# the fixtures of the API tests: the app with the real worker, a seeded database
from tests.api.conftest import (  # noqa: F401 - fixtures
    Api,
    app,
    client,
    db_url,
    live_api,
    order_body,
    settings,
    task_queue,
    temporal_env,
    worker,
)
from tests.test_metrics import (
    _wait_for_stage,
    parse,
    worker_scrape,
)

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
PROMETHEUS = ROOT / "deploy/prometheus/prometheus.yml"
DATASOURCES = ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml"
DASHBOARD_PROVIDERS = ROOT / "deploy/grafana/provisioning/dashboards/procflow.yml"
DASHBOARD = ROOT / "deploy/grafana/dashboards/procflow.json"
COLLECTOR = ROOT / "deploy/otel/collector.yml"
YAML_FILES = [PROMETHEUS, DATASOURCES, DASHBOARD_PROVIDERS, COLLECTOR]

# the ports the app services listen on inside the network
API_PORT = 8000
WORKER_METRICS_PORT = 9464


def load(path: Path) -> Any:
    return (
        json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    )


def environment(service: dict[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in (service.get("environment") or {}).items()}


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> repository path of the service's bind mounts (./...)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *_ = str(volume).split(":")
        if source.startswith("."):
            found[target] = ROOT / source
    return found


def in_container(service: str, path: str) -> Path:
    """The repository file a path inside the service's container comes from (a bind mount)."""
    for target, source in sorted(mounts(SERVICES[service]).items(), key=lambda m: -len(m[0])):
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return source / path[len(target) :].lstrip("/")
    raise AssertionError(f"{path} is not mounted into {service}")


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside rows too."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return [p for p in found if p.get("type") != "row"]


def expressions() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in panels(load(DASHBOARD))
        for target in panel.get("targets", [])
    ]


METRIC = re.compile(r"\b(?:procflow|temporal)_\w+")


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (label values in quotes left out)."""
    return set(METRIC.findall(re.sub(r'"[^"]*"', '""', expr)))


# --- every file parses; compose mounts them ------------------------------------------------


@pytest.mark.parametrize("path", [*YAML_FILES, DASHBOARD], ids=lambda p: p.name)
def test_the_file_parses(path: Path) -> None:
    assert isinstance(load(path), dict), path


def test_compose_runs_prometheus_grafana_and_the_collector_on_their_configs() -> None:
    prometheus, grafana, collector = (
        SERVICES[name] for name in ("prometheus", "grafana", "otel-collector")
    )
    assert prometheus["image"].startswith("prom/prometheus:")
    assert grafana["image"].startswith("grafana/grafana:")
    assert re.match(r"otel/opentelemetry-collector(-contrib)?:", collector["image"])
    # each runs the file of this repository it is given
    config = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    assert in_container("prometheus", config.split("=", 1)[1]) == PROMETHEUS
    config = next(a for a in collector["command"] if a.startswith("--config="))
    assert in_container("otel-collector", config.split("=", 1)[1]) == COLLECTOR
    assert in_container("grafana", "/etc/grafana/provisioning") == DATASOURCES.parents[1]
    assert "3000:3000" in grafana["ports"]
    for name in ("prometheus", "grafana", "otel-collector"):
        for source in mounts(SERVICES[name]).values():
            assert source.exists(), f"{name} mounts missing {source}"


def test_grafana_loads_the_dashboard_from_prometheus() -> None:
    (source,) = load(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus"
    url = httpx.URL(source["url"])
    assert url.host == "prometheus" and url.port == 9090
    assert any(str(p).endswith(":9090") for p in SERVICES["prometheus"]["ports"])
    (provider,) = load(DASHBOARD_PROVIDERS)["providers"]
    assert provider["type"] == "file"
    assert in_container("grafana", provider["options"]["path"]) == DASHBOARD.parent
    home = environment(SERVICES["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert in_container("grafana", home) == DASHBOARD
    # every panel queries that data source (by uid, or the default)
    for panel in panels(load(DASHBOARD)):
        for holder in (panel, *panel.get("targets", [])):
            uid = (holder.get("datasource") or {}).get("uid", source["uid"])
            assert uid == source["uid"], panel["title"]


# --- Prometheus scrapes the compose services -------------------------------------------------


def scrape_targets() -> dict[str, set[tuple[str, int]]]:
    """job -> the (host, port) it scrapes, static or from DNS service discovery."""
    jobs: dict[str, set[tuple[str, int]]] = {}
    for job in load(PROMETHEUS)["scrape_configs"]:
        found = jobs.setdefault(job["job_name"], set())
        for sd in job.get("dns_sd_configs", []):
            assert sd.get("type", "SRV") == "A", "compose DNS answers A records"
            found |= {(name, int(sd["port"])) for name in sd["names"]}
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                found.add((host, int(port)))
        assert job.get("metrics_path", "/metrics") == "/metrics"
    return jobs


def test_prometheus_scrapes_the_api_and_the_workers() -> None:
    jobs = scrape_targets()
    assert jobs["api"] == {("api", API_PORT)}
    assert jobs["worker"] == {("worker", WORKER_METRICS_PORT)}
    for targets in jobs.values():
        for host, _port in targets:
            assert host in SERVICES, f"scrape target {host} is no compose service"


def test_the_scraped_ports_are_where_the_services_listen() -> None:
    api, worker = environment(SERVICES["api"]), environment(SERVICES["worker"])
    assert int(api["PROCFLOW_API_PORT"]) == API_PORT
    assert f"--port {API_PORT}" in " ".join(SERVICES["api"]["command"])
    assert api.get("PROCFLOW_METRICS_ENABLED", "true").lower() == "true"
    # reachable from the prometheus container: not bound to the loopback interface
    host, port = worker["PROCFLOW_WORKER_METRICS_ADDRESS"].rsplit(":", 1)
    assert (host, int(port)) == ("0.0.0.0", WORKER_METRICS_PORT)
    assert Settings(worker_metrics_address=worker["PROCFLOW_WORKER_METRICS_ADDRESS"])


# --- the collector receives the traces the app exports --------------------------------------


def test_the_collector_pipeline_names_defined_components() -> None:
    config = load(COLLECTOR)
    service = config["service"]
    for extension in service.get("extensions", []):
        assert extension in config["extensions"], extension
    assert "traces" in service["pipelines"]
    for name, pipeline in service["pipelines"].items():
        assert pipeline["receivers"] and pipeline["exporters"], name
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in (config.get(kind) or {}), f"{name}: {kind} {component}"
    assert "debug" in service["pipelines"]["traces"]["exporters"]
    http = config["receivers"]["otlp"]["protocols"]["http"]
    assert http["endpoint"] == "0.0.0.0:4318"


def test_the_app_exports_its_traces_to_the_collector() -> None:
    for name in ("api", "worker"):
        env = environment(SERVICES[name])
        endpoint = httpx.URL(env["PROCFLOW_OTLP_ENDPOINT"])
        assert (endpoint.host, endpoint.port) == ("otel-collector", 4318), name
        assert endpoint.path == "/v1/traces"  # OTLP/HTTP: the exporter takes the full URL
        assert re.fullmatch(
            r"\$\{PROCFLOW_TRACING_ENABLED:-true\}|true", env["PROCFLOW_TRACING_ENABLED"]
        ), name
        assert Settings(tracing_enabled=True, otlp_endpoint=str(endpoint)).otlp_endpoint


# --- every metric a panel queries is in a real scrape ---------------------------------------


def test_the_dashboard_has_the_panels_of_issue_14() -> None:
    exprs = " ".join(expr for _, expr in expressions())
    for metric in (
        "procflow_http_requests_total",
        "procflow_http_request_duration_seconds_bucket",
        "temporal_workflow_task_execution_latency_bucket",
        "procflow_tasks_open",
        "procflow_tasks_overdue",
        "procflow_sla_events",
        "procflow_payments",
        "procflow_outbox_messages",
    ):
        assert re.search(rf"\b{metric}\b", exprs), metric
    assert 'kind="breached"' in exprs
    assert "histogram_quantile(0.95" in exprs
    titles = [panel["title"] for panel in panels(load(DASHBOARD))]
    assert len(titles) == len(set(titles))
    ids = [panel["id"] for panel in panels(load(DASHBOARD))]
    assert len(ids) == len(set(ids))


def test_metric_names_are_read_from_selectors_not_label_values() -> None:
    assert metric_names('sum by (le) (rate(procflow_a_bucket{x="procflow_b"}[5m]))') == {
        "procflow_a_bucket"
    }


def queryable(text: str) -> dict[str, set[str]]:
    """Every series name Prometheus stores from a scrape -> its label names: the samples, and
    the names a family with no sample yet would have (a counter's _total, a histogram's
    _bucket/_sum/_count, a gauge's own name); nothing else (a counter's bare name is none)."""
    families, samples = parse(text)
    names: dict[str, set[str]] = {}
    for name, labels in samples:
        names.setdefault(name, set()).update(k for k, _ in labels)
    for name, family in families.items():
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_sum", "_count"],
            "summary": ["_sum", "_count", ""],
        }.get(family.type, [""])
        for suffix in suffixes:
            names.setdefault(name + suffix, set())
    return names


async def api_scrape(api: Api) -> str:
    """GET /metrics after an order run to its end and one waiting for its approval."""
    done, waiting = order_body(600_000), order_body(1_200_000)
    r = await api.post("/orders", "alice", json=done)
    assert r.status_code == 201, r.text
    task_id = r.json()["pending_tasks"][0]["task_id"]
    r = await api.post("/orders", "alice", json=waiting)
    assert r.status_code == 201, r.text
    r = await api.post(f"/tasks/{task_id}/decision", "victor", json={"outcome": "approved"})
    assert r.status_code == 200, r.text
    assert (await _wait_for_stage(api, done["order_no"], "closed"))["stage"] == "closed"
    r = await api.http.get("/metrics")
    assert r.status_code == 200, r.text
    return r.text


BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHER = re.compile(r"\{([^}]*)\}")


async def test_every_metric_a_panel_queries_is_in_a_scrape(
    live_api: Api, dev_env: WorkflowEnvironment
) -> None:
    api = queryable(await api_scrape(live_api))
    workers = queryable((await worker_scrape(dev_env))[0])
    assert api.keys().isdisjoint(workers), "the API and the workers export different series"
    assert not {n for n in api if n.startswith("temporal_")}
    assert not {n for n in workers if n.startswith("procflow_")}
    exported = {**api, **workers}
    for title, expr in expressions():
        names = metric_names(expr)
        assert names, f"{title}: {expr} queries no procflow_/temporal_ metric"
        missing = sorted(names - exported.keys())
        assert not missing, f"panel {title!r} queries {missing}, in no scrape"
        # the labels it groups and filters by are on the series (when the scrape has samples)
        labels = set().union(*(exported[n] for n in names))
        if not labels:
            continue
        used = {m.strip() for group in BY.findall(expr) for m in group.split(",") if m.strip()}
        for matchers in MATCHER.findall(expr):
            used |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
        if any(n.endswith("_bucket") for n in names):
            assert "le" in used, f"{title}: a histogram_quantile must keep le"
        assert used <= labels, f"panel {title!r}: labels {sorted(used - labels)} not in {names}"
