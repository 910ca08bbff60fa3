"""Offline checks of the deployment files: Kubernetes manifests against the API schemas, the compose
stack, nginx and the monitoring profile consistent with each other and with the service's settings,
and the GPU image in step with the CPU one. (`deploy/ci-stack.sh` runs the stack for real in CI.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from service.config import Settings
from tests.conftest import ROOT

K8S = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
REPLICAS = sorted(name for name in COMPOSE["services"] if re.fullmatch(r"neuroserve-\d+", name))


@pytest.mark.parametrize("path", K8S, ids=[p.name for p in K8S])
def test_kubernetes_manifest_is_valid_against_the_api_schema(path: Path) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, "1.30", strict=True)


def test_kubernetes_deployments_probe_the_v2_health_endpoints_and_set_resources() -> None:
    kinds = {}
    for path in K8S:
        for doc in yaml.safe_load_all(path.read_text()):
            kinds.setdefault(doc["kind"], []).append(doc)
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= set(kinds)
    assert len(kinds["Deployment"]) == 3  # CPU, GPU, and the face gallery's single writer
    for deployment in kinds["Deployment"]:
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert container["resources"]["requests"] and container["resources"]["limits"]
    gallery = next(d for d in kinds["Deployment"] if d["metadata"]["name"].endswith("gallery"))
    assert gallery["spec"]["replicas"] == 1 and gallery["spec"]["strategy"]["type"] == "Recreate"
    volumes = {v["name"]: v for v in gallery["spec"]["template"]["spec"]["volumes"]}
    assert volumes["gallery"]["persistentVolumeClaim"]["claimName"] == "neuroserve-gallery"
    (ingress,) = kinds["Ingress"]
    routed = {p["path"]: p["backend"]["service"]["name"] for p in ingress["spec"]["rules"][0]["http"]["paths"]}
    assert routed == {
        "/v1/faces": "neuroserve-gallery",
        "/v1/face-identification": "neuroserve-gallery",
        "/": "neuroserve",
    }
    gpu = next(d for d in kinds["Deployment"] if d["metadata"]["name"].endswith("gpu"))
    assert gpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # Every Deployment's pods are behind some Service (the GPU pods were behind none).
    for deployment in kinds["Deployment"]:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert any(
            all(labels.get(k) == v for k, v in service["spec"]["selector"].items()) for service in kinds["Service"]
        ), deployment["metadata"]["name"]


def test_compose_replicas_are_health_gated_limited_and_read_only() -> None:
    assert len(REPLICAS) >= 2
    nginx = COMPOSE["services"]["nginx"]
    for name in REPLICAS:
        service = COMPOSE["services"][name]
        assert "/v2/health/ready" in " ".join(service["healthcheck"]["test"])
        assert service["deploy"]["resources"]["limits"]["memory"]
        assert service["deploy"]["resources"]["limits"]["cpus"]
        assert "./models:/models:ro" in service["volumes"]
        assert "gallery:/data" in service["volumes"]  # one face gallery file for every replica
        assert service["stop_signal"] == "SIGTERM"
        assert nginx["depends_on"][name] == {"condition": "service_healthy"}
    gpu = COMPOSE["services"]["neuroserve-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for pulled in ("prometheus", "grafana"):  # only images built here may run outside a profile
        assert COMPOSE["services"][pulled]["profiles"] == ["monitoring"]


def test_nginx_balances_every_replica_with_the_service_body_limit() -> None:
    conf = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
    upstreams = re.findall(r"server (neuroserve-\d+):8000", conf)
    assert sorted(upstreams) == REPLICAS
    size = re.search(r"client_max_body_size (\d+)m;", conf)
    assert size and int(size.group(1)) * 1024 * 1024 == Settings().max_request_bytes
    assert "proxy_next_upstream error timeout http_502 http_503 non_idempotent;" in conf
    assert "keepalive" in conf


def test_monitoring_profile_scrapes_every_replica_and_dashboard_has_the_panels() -> None:
    prometheus = yaml.safe_load((ROOT / "deploy" / "monitoring" / "prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(t.split(":")[0] for t in targets) == REPLICAS
    dashboard = json.loads((ROOT / "deploy" / "monitoring" / "grafana" / "dashboards" / "neuroserve.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in (
        "neuroserve_model_requests_total",
        "neuroserve_model_request_duration_seconds_bucket",
        "neuroserve_queue_duration_seconds_bucket",
        "neuroserve_batch_size_sum",
        'outcome!="ok"',
    ):
        assert metric in exprs, metric


def _instructions(path: Path) -> dict[str, list[str]]:
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.setdefault(word, []).append(rest.strip())
    return out


def test_gpu_image_is_in_step_with_the_cpu_image() -> None:
    cpu, gpu = _instructions(ROOT / "Dockerfile"), _instructions(ROOT / "Dockerfile.gpu")
    for word in ("USER", "EXPOSE", "STOPSIGNAL", "CMD"):
        assert cpu[word] == gpu[word], word
    assert cpu["HEALTHCHECK"][0].split("CMD", 1)[1] == gpu["HEALTHCHECK"][0].split("CMD", 1)[1]
    env_keys = lambda d: set(re.findall(r"(\w+)=", " ".join(d["ENV"])))  # noqa: E731
    assert env_keys(cpu) <= env_keys(gpu)
    assert any("onnxruntime-gpu" in run for run in gpu["RUN"])
    assert cpu["COPY"][-1] == gpu["COPY"][-1] == "models /models"
    for dockerfile in ("Dockerfile", "Dockerfile.gpu", "deploy/nginx/Dockerfile"):
        text = (ROOT / dockerfile).read_text()
        assert "# syntax=" not in text and "--mount" not in text  # the classic builder runs in CI


def test_the_keys_override_gives_every_replica_the_keys_secret_and_cors() -> None:
    override = yaml.safe_load((ROOT / "deploy" / "compose.keys.yml").read_text())
    replicas = {name for name in COMPOSE["services"] if name.startswith("neuroserve-") and name != "neuroserve-gpu"}
    assert set(override["services"]) == replicas
    for service in override["services"].values():
        assert service["environment"]["NEUROSERVE_API_KEYS_FILE"] == "/run/secrets/neuroserve_keys"
        assert "NEUROSERVE_CORS_ALLOW_ORIGINS" in service["environment"]
        assert service["secrets"] == ["neuroserve_keys"]
    assert "file" in override["secrets"]["neuroserve_keys"]
