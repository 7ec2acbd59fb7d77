"""Offline checks of grafana/ and deploy/: dashboards, Prometheus config and rules, compose, Kubernetes.

Needs PyYAML and kubernetes-validate (the dev extra) and promtool (Debian's `prometheus` package);
a missing one fails the test under CI=true and skips it elsewhere.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
K8S = DEPLOY / "kubernetes"
METRIC_NAME = re.compile(r"tokenhub_gateway_[a-z_]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
CONFIG_DIR = "/etc/tokenhub-gateway"
CONFIG_PATH = f"{CONFIG_DIR}/gateway.toml"
K8S_VERSION = "1.29.0"
# Placeholder values for the *_env variables that deploy/config/gateway.toml and the ConfigMap name.
FAKE_ENV = {
    "TOKENHUB_KEY_PRIMARY": "th-placeholder-0000",
    "GATEWAY_ADMIN_TOKEN": "admin-placeholder",
    "GATEWAY_METRICS_TOKEN": "metrics-placeholder",
    "GATEWAY_STORE_URL": "redis://redis:6379/0",
}


def _missing(what: str) -> None:
    message = f"{what} is not installed"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        _missing(f"python package {module}")


def _promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    if exe is None:
        _missing("promtool (Debian package prometheus)")
    result = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def _yaml(path: Path) -> dict:
    return _require("yaml").safe_load(path.read_text())


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in _require("yaml").safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def generate():
    spec = importlib.util.spec_from_file_location("grafana_generate", ROOT / "grafana" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dashboards(generate) -> dict[str, dict]:
    return {name: json.loads((generate.OUT / name).read_text()) for name in generate.DASHBOARDS}


@pytest.fixture(scope="module")
def exposed() -> dict[str, set[str]]:
    """Sample name → label names, for every series gateway/metrics.py can expose."""
    metrics = Metrics(CollectorRegistry())
    labels = {m._name: set(m._labelnames) for m in vars(metrics).values() if hasattr(m, "_labelnames")}
    out = {}
    for family in metrics.registry.collect():
        for suffix in SUFFIXES[family.type]:
            extra = {"le"} if suffix == "_bucket" else set()
            out[family.name + suffix] = labels[family.name] | extra
    return out


def _check_names_and_labels(expr: str, exposed: dict[str, set[str]]) -> None:
    names = set(METRIC_NAME.findall(expr))
    assert names, f"no gateway metric in {expr!r}"
    unknown = names - set(exposed)
    assert not unknown, f"{expr!r} uses metrics that gateway/metrics.py does not expose: {unknown}"
    # Labels in selectors and by/without clauses must belong to a metric of the expression.
    allowed = set().union(*(exposed[n] for n in names)) | {"instance", "job"}
    used = {m.group(1) for sel in re.findall(r"\{([^}]*)\}", expr) for m in re.finditer(r"(\w+)\s*[=!]", sel)}
    for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        used |= {label.strip() for label in clause.split(",") if label.strip()}
    assert used <= allowed, f"{expr!r} uses labels {used - allowed} that its metrics do not have"


# ---- Grafana -----------------------------------------------------------------------------------------


def test_committed_dashboards_match_the_generator(generate):
    for name, build in generate.DASHBOARDS.items():
        committed = (generate.OUT / name).read_text(encoding="utf-8")
        assert committed == generate.render(build), f"{name} is stale: run python grafana/generate.py"


def test_every_panel_has_a_query(dashboards):
    for name, dashboard in dashboards.items():
        assert dashboard["panels"], name
        assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"]), f"{name}: duplicate panel ids"
        for panel in dashboard["panels"]:
            assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), f"{name}: {panel['title']}"


def test_dashboard_queries_use_only_exposed_metrics(generate, exposed):
    for dashboard, title, expr in generate.panel_queries():
        assert "$" not in expr, f"{dashboard} / {title}: unsubstituted variable in {expr!r}"
        _check_names_and_labels(expr, exposed)


def test_every_metric_appears_on_a_dashboard(generate, exposed):
    used = {n for *_, expr in generate.panel_queries() for n in METRIC_NAME.findall(expr)}
    families = {n.removesuffix("_bucket") for n in exposed if not n.endswith(("_sum", "_count"))}
    assert families <= {n.removesuffix("_bucket") for n in used}


def test_dashboard_queries_are_valid_promql(generate, tmp_path):
    rules = [{"record": f"panel:query{i}", "expr": expr} for i, (*_, expr) in enumerate(generate.panel_queries())]
    path = tmp_path / "panels.yml"
    path.write_text(json.dumps({"groups": [{"name": "panels", "rules": rules}]}))  # JSON is YAML
    _promtool("check", "rules", str(path))


def test_dashboards_pick_the_data_source_through_a_variable(dashboards):
    def walk(node, where):
        if isinstance(node, dict):
            ds = node.get("datasource")
            if isinstance(ds, dict):
                assert ds == {"type": "prometheus", "uid": "${datasource}"}, where
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    for name, dashboard in dashboards.items():
        assert "__inputs" not in dashboard, name
        walk(dashboard, name)
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        team = variables["team"]
        assert team["query"] == "label_values(tokenhub_gateway_requests_total, team)"
        assert team["multi"] and team["includeAll"] and team["allValue"] == ".*"


def test_grafana_provisioning_points_at_the_mounted_dashboards():
    source = _yaml(ROOT / "grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "uid" not in source
    provider = _yaml(ROOT / "grafana/provisioning/dashboards/provider.yml")["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


# ---- Prometheus ----------------------------------------------------------------------------------------


def test_prometheus_config_is_valid(tmp_path):
    # promtool insists that credentials_file exists: check a copy that points at a temporary token file.
    config = (PROM / "prometheus.yml").read_text()
    token_path = _yaml(PROM / "prometheus.yml")["scrape_configs"][0]["authorization"]["credentials_file"]
    assert token_path == "/run/secrets/metrics_token"  # where compose mounts the metrics_token secret
    (tmp_path / "metrics_token").write_text("placeholder\n")
    (tmp_path / "prometheus.yml").write_text(config.replace(token_path, str(tmp_path / "metrics_token")))
    shutil.copy(PROM / "alerts.yml", tmp_path / "alerts.yml")
    _promtool("check", "config", "prometheus.yml", cwd=tmp_path)


def test_alert_rules_are_valid():
    _promtool("check", "rules", str(PROM / "alerts.yml"))


def test_alert_rule_unit_tests_pass():
    _promtool("test", "rules", "alerts_test.yml", cwd=PROM)


def test_alert_rules_are_complete_and_use_exposed_metrics(exposed):
    rules = [r for g in _yaml(PROM / "alerts.yml")["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {
        "UpstreamKeyDisabled",
        "AllUpstreamKeysUnusable",
        "TeamBudgetNearlySpent",
        "GatewayHigh5xxRate",
        "GatewayHighOverheadP99",
        "PollerBacklogHigh",
    } <= names
    for rule in rules:
        assert rule.get("for") and rule["labels"].get("severity") in ("warning", "critical"), rule["alert"]
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), rule["alert"]
        if METRIC_NAME.search(rule["expr"]):
            _check_names_and_labels(rule["expr"], exposed)


def test_every_alert_is_tested_firing_and_silent():
    cases = [c for t in _yaml(PROM / "alerts_test.yml")["tests"] for c in t["alert_rule_test"]]
    for rule in (r for g in _yaml(PROM / "alerts.yml")["groups"] for r in g["rules"]):
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']} never shown firing"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']} never shown silent"


# ---- docker compose ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return _yaml(DEPLOY / "docker-compose.yml")


def test_compose_images_are_pinned(compose):
    for name, service in compose["services"].items():
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: image {image!r} is not pinned"


def test_compose_mounts_only_files_of_the_repository(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).resolve().exists(), f"{name}: {source} is not in the repository"
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file(), name


def test_compose_runs_two_gateways_on_redis(compose):
    services = compose["services"]
    published = {services[g]["ports"][0].rsplit(":", 2)[-2] for g in ("gateway-1", "gateway-2")}
    assert published == {"8080", "8081"}
    for gateway in ("gateway-1", "gateway-2"):
        # The directory: a replaced gateway.toml is a new file, which a single-file mount never shows.
        assert f"./config:{CONFIG_DIR}:ro" in services[gateway]["volumes"]
        for var, value in services[gateway]["environment"].items():
            assert value.startswith(f"${{{var}:?") and value.endswith("}"), f"{gateway}: {var} not from the host"
    assert "--appendonly" in services["redis"]["command"]
    assert services["prometheus"]["secrets"] == ["metrics_token"]
    assert compose["secrets"]["metrics_token"] == {"environment": "GATEWAY_METRICS_TOKEN"}


def test_compose_gateway_config_loads():
    from gateway.config import parse_settings

    settings = parse_settings(tomllib.loads((DEPLOY / "config" / "gateway.toml").read_text()), FAKE_ENV)
    assert settings.store.url.reveal() == "redis://redis:6379/0"
    assert settings.server.metrics_token is not None


def test_compose_builds_the_gateway_image_once(compose):
    services = compose["services"]
    gateways = {n: s for n, s in services.items() if n.startswith("gateway-")}
    assert len({s["image"] for s in gateways.values()}) == 1
    builders = [n for n, s in gateways.items() if "build" in s]
    assert builders == ["gateway-1"]
    assert services["gateway-1"]["build"]["args"] == {"BASE_IMAGE": "${BASE_IMAGE:-python:3.11-slim}"}
    # Without a build of its own, gateway-2 must not look for the tag in a registry.
    assert all(gateways[n].get("pull_policy") == "never" for n in gateways if n not in builders)


# ---- Kubernetes ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    """kind → resource, for every file of deploy/kubernetes except kustomization.yaml."""
    docs = [d for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml" for d in _yaml_docs(p)]
    return {d["kind"]: d for d in docs}


def test_kubernetes_manifests_validate(manifests):
    kv = _require("kubernetes_validate")
    for kind, doc in manifests.items():
        if kind == "ServiceMonitor":
            continue
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{kind}: {path}: {exc.message}")


def test_service_monitor_is_well_formed(manifests):
    monitor = manifests["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"] and monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["selector"]["matchLabels"] == manifests["Service"]["spec"]["selector"]


def test_kustomization_lists_the_core_manifests():
    kustomization = _yaml(K8S / "kustomization.yaml")
    resources = kustomization["resources"]
    assert all((K8S / r).is_file() for r in resources)
    kinds = {d["kind"] for r in resources for d in _yaml_docs(K8S / r)}
    assert kinds == {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"}


def test_kubernetes_resources_fit_together(manifests):
    deploy = manifests["Deployment"]
    service = manifests["Service"]
    pdb = manifests["PodDisruptionBudget"]
    pod = deploy["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deploy["spec"]["replicas"] == 2 and pdb["spec"]["minAvailable"] == 1
    for selector in (
        deploy["spec"]["selector"]["matchLabels"],
        service["spec"]["selector"],
        pdb["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"requests", "limits"} <= container["resources"].keys()
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    # The ConfigMap as a directory: the kubelet swaps its files in place; a subPath mount would never change.
    assert not any("subPath" in m for m in container["volumeMounts"])
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert mounts["tmp"] == "/tmp" and "emptyDir" in volumes["tmp"]
    assert f"{mounts['config']}/gateway.toml" == CONFIG_PATH == container["args"][-1]
    assert volumes["config"]["configMap"]["name"] == manifests["ConfigMap"]["metadata"]["name"]
    assert container["envFrom"][0]["secretRef"]["name"] == manifests["Secret"]["metadata"]["name"]
    port = service["spec"]["ports"][0]
    assert port["name"] == "http" and port["port"] == 8080 and port["targetPort"] == "http"
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


def test_kubernetes_secret_is_only_a_template(manifests):
    values = manifests["Secret"]["stringData"]
    assert all("REPLACE_ME" in v for v in values.values())
    assert set(FAKE_ENV) == set(values)


def test_kubernetes_gateway_config_loads(manifests):
    from gateway.config import parse_settings

    text = manifests["ConfigMap"]["data"]["gateway.toml"]
    settings = parse_settings(tomllib.loads(text), FAKE_ENV)
    assert settings.store.url.reveal() == FAKE_ENV["GATEWAY_STORE_URL"]
    (container,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["ports"][0]["containerPort"] == settings.server.port


def test_kustomize_builds():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (optional)")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "kind: Deployment" in result.stdout
