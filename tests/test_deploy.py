"""deploy/: everything an operator runs besides the gateway, checked offline.

- Prometheus: `promtool` checks the rules and the scrape config and runs the alerts' unit tests
  (deploy/prometheus/alerts_test.yml); every metric the rules and the dashboard name is one the
  gateway exports (a running gateway is asked), every recording rule they name exists.
- Grafana: the dashboard is well formed, every panel queries the gateway, every query parses.
- Kubernetes: every manifest validates against the Kubernetes JSON schemas (kubernetes-validate),
  the ServiceMonitor (a CRD) structurally; the objects agree with each other and with the config
  they carry (ports, probes, shutdown timing, mounted key files).
- docker compose, the Dockerfile and both embedded gateway configs, which pass the gateway's own
  validation (`parse_settings`, then `gateway check-config` with generated keys in tmp_path).

Needs `promtool` (Debian package `prometheus`) and the PyPI package `kubernetes-validate`; when
either is missing the tests fail, naming it.
"""

from __future__ import annotations

import http.client
import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.config.settings import LoadedConfig, parse_settings, read_yaml
from tests.conftest import eventually_sync

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
KUBERNETES = DEPLOY / "kubernetes"

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
}
DECISIONS = {"verified", "anonymous", "rejected", "would_reject", "disabled"}
ALERT_JOB = "gateway"  # the `job` the alerts select: the scrape job / Kubernetes Service name
K8S_VERSIONS = ("1.29", "latest")

_METRIC_NAME = re.compile(r"\b(gateway_[a-z0-9_]+)")
_RECORDING_NAME = re.compile(r"\b(gateway:[a-z0-9_:]+)")


# --- helpers -----------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


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


def run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{output}"
    return output


def public_key_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def clean_env(**extra: str) -> dict[str, str]:
    """No inherited variable may leak into `${NAME}` substitution."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **extra}


def validate_gateway_config(
    text: str, tmp_path: Path, key_files: dict[str, bytes], env: dict[str, str]
) -> LoadedConfig:
    """Schema (parse_settings), then the whole of `gateway check-config` (keys included) on a
    copy in tmp_path with `key_files` written beside it."""
    config = tmp_path / "gateway.yaml"
    config.write_text(text, encoding="utf-8")
    loaded = parse_settings(read_yaml(config), config, env)
    for relative, content in key_files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(content)
    output = run(sys.executable, "-m", "gateway", "check-config", "-c", str(config), env=env)
    assert "warning" not in output.lower(), output
    return loaded


def pem_files(loaded: LoadedConfig) -> set[str]:
    settings = loaded.settings
    projects = [settings.defaults, *settings.projects.values()]
    return {key.pem_file for p in projects for key in p.keys if key.pem_file is not None}


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: it comes with the Debian package `prometheus` "
            "(apt-get install -y prometheus)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def kubernetes_validate() -> ModuleType:
    try:
        return importlib.import_module("kubernetes_validate")
    except ImportError:
        pytest.fail(
            "kubernetes_validate is not installed: pip install the PyPI package "
            "`kubernetes-validate` (a dev dependency)",
            pytrace=False,
        )


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
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        admin_port = probe.getsockname()[1]
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
    assert {"**", "!pyproject.toml", "!README.md", "!gateway/"} <= set(ignore)


# --- Kubernetes --------------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    """kind → the object, for every manifest kustomization.yaml lists (one object each)."""
    out: dict[str, dict[str, Any]] = {}
    for name in load_yaml(KUBERNETES / "kustomization.yaml")["resources"]:
        (doc,) = load_yaml_all(KUBERNETES / name)
        assert doc["kind"] not in out
        out[doc["kind"]] = doc
    return out


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(KUBERNETES / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    on_disk = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    assert set(manifests()) == {
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
    }


@pytest.mark.parametrize(
    "name", sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
)
def test_manifest_validates_against_kubernetes_schemas(
    name: str, kubernetes_validate: ModuleType
) -> None:
    for doc in load_yaml_all(KUBERNETES / name):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: test_servicemonitor_scrapes_the_admin_port
        for version in K8S_VERSIONS:
            wanted = kubernetes_validate.latest_version() if version == "latest" else version
            problem = None
            try:
                kubernetes_validate.validate(doc, wanted, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problem = f"{'/'.join(str(p) for p in exc.path)}: {exc.message}"
            assert problem is None, f"{name} ({doc['kind']}), Kubernetes {wanted}: {problem}"


def pod_labels(objects: dict[str, dict[str, Any]]) -> dict[str, str]:
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert isinstance(labels, dict)
    return labels


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_servicemonitor_scrapes_the_admin_port() -> None:
    objects = manifests()
    monitor, service = objects["ServiceMonitor"], objects["Service"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"]
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "admin"
    assert endpoint["path"] == "/metrics"
    assert endpoint.get("scheme", "http") == "http"
    for duration in ("interval", "scrapeTimeout"):
        assert re.fullmatch(r"\d+s", endpoint[duration])
    assert int(endpoint["scrapeTimeout"][:-1]) <= int(endpoint["interval"][:-1])
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["admin"]["port"] == 9090
    assert ports["http"]["port"] == 8080
    # Without jobLabel the operator names the job after the Service: what the alerts select.
    assert "jobLabel" not in monitor["spec"]
    assert service["metadata"]["name"] == ALERT_JOB


def embedded_config(objects: dict[str, dict[str, Any]]) -> str:
    text = objects["ConfigMap"]["data"]["gateway.yaml"]
    assert isinstance(text, str)
    return text


def test_the_network_policy_opens_the_admin_port_only_to_the_monitoring_namespace() -> None:
    objects = manifests()
    policy = objects["NetworkPolicy"]["spec"]
    assert selects(policy["podSelector"]["matchLabels"], pod_labels(objects))
    assert policy["policyTypes"] == ["Ingress"]
    rules = {tuple(p["port"] for p in rule["ports"]): rule for rule in policy["ingress"]}
    assert set(rules) == {("http",), ("admin",)}
    assert "from" not in rules["http",]  # SDK traffic: whatever reaches the Service
    (source,) = rules["admin",]["from"]
    assert source == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    }
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert {p["name"] for p in container["ports"]} == {"http", "admin"}  # the names it opens


def test_kubernetes_objects_agree_with_each_other_and_the_config() -> None:
    objects = manifests()
    deployment, service = objects["Deployment"], objects["Service"]
    labels = pod_labels(objects)
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert selects(spec["selector"]["matchLabels"], labels)
    assert selects(service["spec"]["selector"], labels)
    assert selects(objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], labels)
    assert objects["PodDisruptionBudget"]["apiVersion"] == "policy/v1"
    hpa = objects["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] == spec["replicas"] <= hpa["spec"]["maxReplicas"]

    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["run", "-c", "/etc/gateway/gateway.yaml"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])  # the HPA needs cpu
    assert "memory" in container["resources"]["limits"]

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]

    # The config's listeners are the container's ports.
    settings = parse_settings(
        yaml.safe_load(embedded_config(objects)),
        Path("/etc/gateway/x"),
        {"REDIS_URL": "redis://redis:6379/0", "ADMIN_TOKEN": "a-token-of-sixteen-or-more"},
    ).settings
    assert ports == {"http": port_of(settings.listen), "admin": port_of(settings.admin_listen)}
    assert settings.admin_listen.startswith("0.0.0.0:")  # probes and Prometheus reach it
    assert settings.admin_token == "a-token-of-sixteen-or-more"  # reload and /-/config guarded
    assert settings.workers == 1

    # SIGTERM: readiness notices the drain within the drain delay; the kubelet waits out the
    # drain delay and the grace period before SIGKILL.
    shutdown = settings.shutdown
    readiness = container["readinessProbe"]
    assert (
        readiness["periodSeconds"] * readiness["failureThreshold"] <= shutdown.drain_delay_seconds
    )
    budget = pod["terminationGracePeriodSeconds"]
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert budget >= pre_stop + shutdown.drain_delay_seconds + shutdown.grace_seconds + 5


def test_config_and_keys_are_mounted_where_the_config_reads_them() -> None:
    objects = manifests()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/gateway"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    sources = volumes[mounts["/etc/gateway"]["name"]]["projected"]["sources"]
    config_maps = [s["configMap"] for s in sources if "configMap" in s]
    secrets = [s["secret"] for s in sources if "secret" in s]
    assert config_maps == [
        {
            "name": objects["ConfigMap"]["metadata"]["name"],
            "items": [{"key": "gateway.yaml", "path": "gateway.yaml"}],
        }
    ]
    secret = objects["Secret"]
    (projected,) = secrets
    assert projected["name"] == secret["metadata"]["name"]
    assert {item["key"] for item in projected["items"]} <= set(secret["stringData"])
    for variable in container["env"]:
        ref = variable["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    # Every `${NAME}` without a default is set in the container.
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", embedded_config(objects)))
    assert required <= {v["name"] for v in container["env"]}
    # Placeholders, never real key material.
    for key, value in secret["stringData"].items():
        assert "REPLACE_ME" in value, key


def test_kubernetes_gateway_config_passes_validation(tmp_path: Path) -> None:
    objects = manifests()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    secret = objects["Secret"]["stringData"]
    env = clean_env(
        **{v["name"]: secret[v["valueFrom"]["secretKeyRef"]["key"]] for v in container["env"]}
    )
    loaded = parse_settings(
        yaml.safe_load(embedded_config(objects)), tmp_path / "gateway.yaml", env
    )
    # The projected volume lays the Secret's files out under /etc/gateway as the config expects;
    # here each gets a real public key instead of its placeholder.
    (volume,) = [v for v in pod["volumes"] if "projected" in v]
    items = [
        item["path"]
        for source in volume["projected"]["sources"]
        if "secret" in source
        for item in source["secret"]["items"]
    ]
    assert pem_files(loaded) == set(items)
    validate_gateway_config(
        embedded_config(objects), tmp_path, {path: public_key_pem() for path in items}, env
    )
