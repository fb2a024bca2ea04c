"""deploy/: everything an operator runs besides the gateway, checked offline.

- Prometheus: `promtool` checks the rules and the scrape config and runs the alerts' unit tests
  (deploy/prometheus/alerts_test.yml); every metric the rules and the dashboard name is one the
  gateway exports (a running gateway is asked), every recording rule they name exists.
- Grafana: the dashboard is well formed, every panel queries the gateway, every query parses.
- docker compose: the file against the Compose Specification's JSON schema (check-jsonschema
  carries it, so no Docker is needed), images pinned to exact versions, its parts consistent.
- The Dockerfile, and the compose gateway config, which passes the gateway's own validation
  (`parse_settings`, then `gateway check-config` with generated keys in tmp_path).

Kubernetes is tests/test_kubernetes.py. Needs `promtool` (Debian package `prometheus`); when it
is missing the tests fail, naming it.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from gateway.config.settings import parse_settings
from tests.conftest import eventually_sync, free_port
from tests.deploy_files import (
    DEPLOY,
    GRAFANA,
    PROMETHEUS,
    ROOT,
    clean_env,
    load_yaml,
    pem_files,
    promtool,
    public_key_pem,
    run,
    validate_gateway_config,
)

__all__ = ["promtool"]  # a fixture

# The documented metrics plus the extras the gateway exports: name → Prometheus type.
METRICS = {
    "gateway_requests_total": "counter",
    "gateway_auth_decisions_total": "counter",
    "gateway_request_duration_seconds": "histogram",
    "gateway_upstream_duration_seconds": "histogram",
    "gateway_upstream_errors_total": "counter",
    "gateway_session_limited_total": "counter",
    "gateway_failure_counter_errors_total": "counter",
    "gateway_config_reloads_total": "counter",
    "gateway_auth_key_uses_total": "counter",
    "gateway_verified_token_cache_total": "counter",
    "gateway_keys_loaded": "gauge",
    "gateway_jwks_fetches_total": "counter",
    "gateway_requests_in_flight": "gauge",
    "gateway_failure_counter_duration_seconds": "histogram",
    "gateway_build_info": "gauge",
    "gateway_access_log_dropped_lines_total": "counter",
}
DECISIONS = {"verified", "anonymous", "rejected", "would_reject", "disabled"}
ALERT_JOB = "gateway"  # the `job` the alerts select: the scrape job / Kubernetes Service name

_METRIC_NAME = re.compile(r"\b(gateway_[a-z0-9_]+)")
_RECORDING_NAME = re.compile(r"\b(gateway:[a-z0-9_:]+)")


# --- helpers -----------------------------------------------------------------------------------


def rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in load_yaml(path)["groups"] for rule in group["rules"]]


def recording_rule_names() -> set[str]:
    return {rule["record"] for rule in rules(PROMETHEUS / "recording.yml")}


def metric_names(expr: str) -> set[str]:
    """The gateway metric families an expression names (`_bucket` etc. folded away)."""
    names = set()
    for found in _METRIC_NAME.findall(expr):
        family = found
        for suffix in ("_bucket", "_count", "_sum"):
            base = found.removesuffix(suffix)
            if base != found and METRICS.get(base) == "histogram":
                family = base
        names.add(family)
    return names


# --- Prometheus --------------------------------------------------------------------------------


def test_rules_pass_promtool_check(promtool: str) -> None:
    run(promtool, "check", "rules", "recording.yml", "alerts.yml", cwd=PROMETHEUS)


def test_alert_unit_tests_pass(promtool: str) -> None:
    output = run(promtool, "test", "rules", "alerts_test.yml", cwd=PROMETHEUS)
    assert "SUCCESS" in output


def test_prometheus_config_passes_promtool_check(promtool: str) -> None:
    run(promtool, "check", "config", "prometheus.yml", cwd=PROMETHEUS)
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    assert set(config["rule_files"]) == {"alerts.yml", "recording.yml"}
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == ALERT_JOB]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["gateway:9090"]  # the compose admin listener


def test_every_alert_is_labelled_annotated_and_unit_tested() -> None:
    alerts = rules(PROMETHEUS / "alerts.yml")
    assert all("alert" in rule for rule in alerts)
    names = [rule["alert"] for rule in alerts]
    assert len(names) == len(set(names))
    for rule in alerts:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, rule["alert"]
        assert re.fullmatch(r"README\.md#[a-z0-9-]+", annotations["runbook_url"]), rule["alert"]

    firing: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(PROMETHEUS / "alerts_test.yml")["tests"]:
        for check in case.get("alert_rule_test", []):
            assert check["alertname"] in names, f"test of an unknown alert {check['alertname']}"
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert set(names) - firing == set(), "alerts never shown firing"
    assert set(names) - quiet == set(), "alerts never shown staying quiet"


def test_rules_name_only_exported_metrics_and_defined_recording_rules() -> None:
    recorded = recording_rule_names()
    assert "gateway:would_reject_share:rate5m" in recorded
    for path in (PROMETHEUS / "recording.yml", PROMETHEUS / "alerts.yml"):
        for rule in rules(path):
            expr = rule["expr"]
            assert metric_names(expr) <= set(METRICS), (rule, metric_names(expr) - set(METRICS))
            assert set(_RECORDING_NAME.findall(expr)) <= recorded, rule
            for values in re.findall(r'decision=~?"([^"]*)"', expr):
                assert set(values.split("|")) <= DECISIONS, rule
            for job in re.findall(r'job="([^"]*)"', expr):
                assert job == ALERT_JOB, rule


def test_a_running_gateway_exports_every_metric_the_rules_and_dashboard_use(
    tmp_path: Path,
) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "demo.pem").write_bytes(public_key_pem())
    admin_port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"""
listen: 127.0.0.1:0
admin_listen: 127.0.0.1:{admin_port}
upstream: {{url: "http://127.0.0.1:9"}}
projects:
  demo:
    mode: monitor
    keys: [{{id: demo-1, pem_file: keys/demo.pem}}]
identity: [{{header: X-User-Id}}]
token: [{{header: Authorization, scheme: Bearer}}]
routes:
  - {{name: track, methods: [POST], path: "/track/{{project}}", auth: [sdk_jwt]}}
""",
        encoding="utf-8",
    )
    log = tmp_path / "gateway.log"
    with (
        log.open("wb") as sink,
        subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(config)],
            cwd=ROOT,
            env=clean_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
        ) as process,
    ):
        try:
            text = scrape_metrics(admin_port, process, log)
        finally:
            process.terminate()
            process.wait(timeout=30)
    exported = dict(re.findall(r"^# TYPE (gateway_[a-z0-9_]+) (\w+)$", text, re.MULTILINE))
    missing = {name: kind for name, kind in METRICS.items() if exported.get(name) != kind}
    assert missing == {}, f"not exported with these types: {missing}\n{log.read_text()}"


def scrape_metrics(port: int, process: subprocess.Popen[bytes], log: Path) -> str:
    def scraped() -> str | None:
        assert process.poll() is None, f"the gateway exited:\n{log.read_text()}"
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:  # an OSError: not listening yet
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            return response.read().decode() if response.status == 200 else None
        finally:
            connection.close()

    return eventually_sync(scraped, lambda: f"/metrics:\n{log.read_text()}", 20, interval=0.1)


# --- Grafana -----------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data = json.loads((GRAFANA / "dashboard.json").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def query_panels() -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard()["panels"]) if p["type"] != "row"]


def test_dashboard_is_well_formed() -> None:
    data = dashboard()
    assert 36 <= data["schemaVersion"] <= 41
    assert data["uid"]
    panels = list(all_panels(data["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert 0 < grid["w"] <= 24 - grid["x"], panel["title"]
        if panel["type"] == "row":
            assert not panel.get("targets"), panel["title"]
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    # The provisioned data source is the variable's default.
    provisioned = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")
    (source,) = provisioned["datasources"]
    assert source["type"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == source["uid"]


def test_every_panel_queries_the_gateway() -> None:
    recorded = recording_rule_names()
    seen: set[str] = set()
    for panel in query_panels():
        title = panel["title"]
        assert panel["datasource"] in (
            {"type": "prometheus", "uid": "${datasource}"},
            {"type": "prometheus", "uid": "prometheus"},
        ), title
        assert panel["targets"], title
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), title
        mentions = False
        for target in panel["targets"]:
            expr = target["expr"]
            names = metric_names(expr)
            records = set(_RECORDING_NAME.findall(expr))
            assert names <= set(METRICS), (title, names - set(METRICS))
            assert records <= recorded, (title, records - recorded)
            mentions = mentions or bool(names or records)
            seen |= names | records
        assert mentions, f"{title}: no target queries a gateway metric or recording rule"
    assert set(METRICS) - seen == set(), "metrics missing from the dashboard"
    assert {"gateway:would_reject_share:rate5m", "gateway:auth_rejected_share:rate5m"} <= seen


def test_every_dashboard_query_parses(promtool: str, tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, as a recording rule for promtool."""
    substitutions = {
        "$__rate_interval": "1m",
        "$__interval": "1m",
        "$__range": "1h",
        "$instance": ".*",
        "$project": ".*",
        "$route": ".*",
    }
    exprs = []
    for panel in query_panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in substitutions.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            exprs.append(expr)
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            assert re.fullmatch(
                r"label_values\(gateway_[a-z_]+, [a-z_]+\)", variable["query"]["query"]
            )
    group = {
        "name": "dashboard",
        "rules": [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)],
    }
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [group]}), encoding="utf-8")
    run(promtool, "check", "rules", str(path))


def test_grafana_provisioning_matches_compose() -> None:
    providers = load_yaml(GRAFANA / "provisioning" / "dashboards" / "gateway.yaml")["providers"]
    (provider,) = providers
    compose = load_yaml(DEPLOY / "docker-compose.yml")
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert Path(mounts["./grafana/dashboard.json"]).parent == Path(provider["options"]["path"])
    (source,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]


# --- docker compose and the Dockerfile ---------------------------------------------------------


def compose_services() -> dict[str, Any]:
    services = load_yaml(DEPLOY / "docker-compose.yml")["services"]
    assert isinstance(services, dict)
    return services


def test_compose_file_is_consistent() -> None:
    services = compose_services()
    assert {"gateway", "upstream", "redis", "prometheus", "grafana"} <= set(services)
    for name in ("gateway", "upstream"):
        build = services[name]["build"]
        assert (DEPLOY / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]) == DEPLOY / "Dockerfile"
        assert services[name]["image"] == services["gateway"]["image"]
    assert services["upstream"]["command"] == ["sample-upstream", "--listen", "0.0.0.0:8000"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), volume
    gateway = services["gateway"]
    assert "./gateway.compose.yaml:/etc/gateway/gateway.yaml:ro" in gateway["volumes"]
    assert any(v.endswith(":/etc/prometheus:ro") for v in services["prometheus"]["volumes"])
    # Stopping waits out the drain delay and the grace period.
    settings = parse_settings(
        load_yaml(DEPLOY / "gateway.compose.yaml"), DEPLOY / "gateway.compose.yaml", {}
    ).settings
    stop = int(gateway["stop_grace_period"].removesuffix("s"))
    assert stop > settings.shutdown.drain_delay_seconds + settings.shutdown.grace_seconds
    # The healthcheck snippet at least compiles.
    snippet = services["upstream"]["healthcheck"]["test"][-1]
    compile(snippet, "healthcheck", "exec")


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    checker = Path(sys.executable).parent / "check-jsonschema"
    return subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_compose_file_passes_the_compose_specification_schema(tmp_path: Path) -> None:
    result = check_compose_schema(DEPLOY / "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    # The check can fail: a misspelt key in a copy is refused, naming it.
    broken = load_yaml(DEPLOY / "docker-compose.yml")
    broken["services"]["gateway"]["healthchek"] = {"disable": True}
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(broken), encoding="utf-8")
    result = check_compose_schema(tmp_path / "docker-compose.yml")
    assert result.returncode != 0
    assert "healthchek" in result.stdout + result.stderr


def test_compose_images_are_pinned_to_exact_versions() -> None:
    services = compose_services()
    for name in ("redis", "prometheus", "grafana"):
        image = services[name]["image"]
        _, _, tag = image.partition(":")
        assert re.fullmatch(r"v?\d+\.\d+\.\d+(-[a-z0-9.]+)?", tag), f"{name}: {image}"


def test_compose_gateway_config_passes_validation(tmp_path: Path) -> None:
    text = (DEPLOY / "gateway.compose.yaml").read_text(encoding="utf-8")
    loaded = parse_settings(yaml.safe_load(text), tmp_path / "gateway.yaml", {})
    settings = loaded.settings
    assert settings.listen == "0.0.0.0:8080"
    assert settings.admin_listen == "0.0.0.0:9090"
    assert settings.upstream.url == "http://upstream:8000"
    assert settings.failure_counter.backend == "redis"
    assert settings.failure_counter.redis_url == "redis://redis:6379/0"
    # The compose environment sets the same values the defaults name.
    environment = compose_services()["gateway"]["environment"]
    assert environment == {
        "REDIS_URL": "redis://redis:6379/0",
        "UPSTREAM_URL": settings.upstream.url,
    }
    keys = {path: public_key_pem() for path in pem_files(loaded)}
    assert keys, "the compose config names no key files"
    # The keygen service generates exactly those (into the volume mounted at keys/).
    (generated,) = re.findall(r"for name in ([\w -]+);", compose_services()["keygen"]["command"][0])
    assert {f"keys/{name}.public.pem" for name in generated.split()} == set(keys)
    validate_gateway_config(text, tmp_path, keys, clean_env())


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?$", text, re.MULTILINE)
    assert len(stages) >= 2, "multi-stage: wheels built in one stage, installed in another"
    assert re.search(r"^RUN .*pip wheel .*\.$", text, re.MULTILINE)
    # The compiled build by default, its compiler in the build stage only.
    build_stage, runtime_stage = text.split("\nFROM ${PYTHON_IMAGE}\n")
    assert "ARG GATEWAY_COMPILED=1" in build_stage
    assert "HATCH_BUILD_HOOK_ENABLE_MYPYC=${GATEWAY_COMPILED}" in build_stage
    assert " gcc " in build_stage
    assert "gcc" not in runtime_stage
    assert "--no-index" in text
    (user,) = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert user.split(":")[0] not in {"0", "root"}
    assert re.search(r"^EXPOSE 8080 9090$", text, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["gateway"\]$', text, re.MULTILINE)
    assert re.search(r'^CMD \["run", "-c", "/etc/gateway/gateway.yaml"\]$', text, re.MULTILINE)
    (healthcheck,) = re.findall(r'^\s+CMD \["python", "-c", "(.*)"\]$', text, re.MULTILINE)
    assert "http://127.0.0.1:9090/healthz" in healthcheck
    compile(healthcheck, "HEALTHCHECK", "exec")
    for source in re.findall(r"^COPY (?!--)(.+) \S+$", text, re.MULTILINE):
        for name in source.split():
            assert (ROOT / name).exists(), f"COPY {name}: not in the repository"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["scripts"]["gateway"] == "gateway.tools.cli:main"
    # The Dockerfile-specific ignore file lets through what the build copies.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").split()
    assert {"**", "!pyproject.toml", "!README.md", "!gateway/", "**/*.so"} <= set(ignore)
