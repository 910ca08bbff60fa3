"""Offline checks of the KServe manifests (deploy/kserve): the ServingRuntime against KServe's own
CRD schema and the InferenceServices against KServe's published v1beta1 definitions (copies in
tests/data/kserve, see its SOURCE.md), every Kubernetes part of them against the Kubernetes API
schema, and the InferenceServices consistent with the runtime and the service."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.config import Settings
from tests.conftest import ROOT

KSERVE = ROOT / "deploy" / "kserve"
CRD = ROOT / "tests" / "data" / "kserve" / "serving.kserve.io_servingruntimes.yaml"
# KServe's published OpenAPI definitions of the InferenceService down to the model spec (an excerpt).
V1BETA1 = ROOT / "tests" / "data" / "kserve" / "v1beta1-definitions.json"
# What an InferenceService's predictor.model adds to a Kubernetes container (KServe's ModelSpec).
MODEL_FIELDS = {"modelFormat", "runtime", "protocolVersion", "storageUri", "storage"}


def documents(name: str) -> list[dict]:
    return list(yaml.safe_load_all((KSERVE / name).read_text()))


def runtime() -> dict:
    (doc,) = documents("servingruntime.yaml")
    return doc


def strict(value: Any, schema: dict, where: str) -> list[str]:
    """Fields the schema does not declare (what ``kubectl apply --validate=strict`` refuses)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    problems: list[str] = []
    if isinstance(value, dict):
        declared = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if declared is not None:
                if key not in declared:
                    problems.append(f"{where}.{key}: not a field of the schema")
                else:
                    problems += strict(item, declared[key], f"{where}.{key}")
            elif isinstance(extra, dict):
                problems += strict(item, extra, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            problems += strict(item, schema.get("items", {}), f"{where}[{i}]")
    return problems


def crd_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "ServingRuntime"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return version["schema"]["openAPIV3Schema"]


def v1beta1(value: Any, schema: dict, where: str, definitions: dict) -> list[str]:
    """Fields KServe's v1beta1 definitions do not declare, and required ones missing. Kubernetes
    types they point to (metadata, env, resources) are left to the Kubernetes schema check."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        if name not in definitions["definitions"]:
            assert name in definitions["kubernetes_refs"], f"{where}: {name} is not in the excerpt"
            return []
        schema = definitions["definitions"][name]
    problems: list[str] = []
    if isinstance(value, dict) and "properties" in schema:
        problems += [f"{where}.{key}: required" for key in schema.get("required", []) if key not in value]
        for key, item in value.items():
            if key not in schema["properties"]:
                problems.append(f"{where}.{key}: not a field of the schema")
            else:
                problems += v1beta1(item, schema["properties"][key], f"{where}.{key}", definitions)
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            problems += v1beta1(item, schema["items"], f"{where}[{i}]", definitions)
    return problems


def pod(spec: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": spec}


def test_the_serving_runtime_is_valid_against_kserves_crd_schema() -> None:
    schema = crd_schema()
    doc = runtime()
    jsonschema.validate(doc, schema)
    assert strict(doc, schema, "ServingRuntime") == []
    # the check refuses what the CRD does not know
    wrong = {**doc, "spec": {**doc["spec"], "modelFormats": []}}
    assert strict(wrong, schema, "x") == ["x.spec.modelFormats: not a field of the schema"]


def test_the_serving_runtimes_pod_parts_are_valid_kubernetes() -> None:
    spec = runtime()["spec"]
    kubernetes_validate.validate(pod({k: spec[k] for k in ("containers", "volumes")}), "1.30", strict=True)


def test_the_runtime_runs_the_v2_protocol_on_the_port_it_probes_with_settings_that_exist() -> None:
    spec = runtime()["spec"]
    assert spec["protocolVersions"] == ["v2"] and [f["name"] for f in spec["supportedModelFormats"]] == ["onnx"]
    (container,) = spec["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    port = int(env["NEUROSERVE_PORT"])
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": port}
    assert env["NEUROSERVE_REPOSITORY"] == "/mnt/models"  # where KServe's storage initializer puts storageUri
    security = container["securityContext"]  # as the plain Deployment: non-root, read-only, no capabilities
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["capabilities"]["drop"] == ["ALL"]
    fields = set(Settings.model_fields)
    for name in env:
        assert name.startswith("NEUROSERVE_") and name.removeprefix("NEUROSERVE_").lower() in fields, name


def test_the_inference_services_are_valid_against_kserves_v1beta1_definitions() -> None:
    definitions = json.loads(V1BETA1.read_text())
    root = {"$ref": "#/definitions/v1beta1.InferenceService"}
    for service in documents("inferenceservice.yaml"):
        assert v1beta1(service, root, service["metadata"]["name"], definitions) == []
    # the check refuses what the definitions do not know, and misses nothing required
    wrong = {"spec": {"predictor": {"minReplica": 1, "model": {"runtime": "neuroserve"}}}}
    assert v1beta1(wrong, root, "x", definitions) == [
        "x.spec.predictor.minReplica: not a field of the schema",
        "x.spec.predictor.model.modelFormat: required",
    ]


@pytest.mark.parametrize("index", [0, 1])
def test_each_inference_service_uses_the_runtime_and_its_model_spec_is_a_valid_container(index: int) -> None:
    service = documents("inferenceservice.yaml")[index]
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    model = service["spec"]["predictor"]["model"]
    spec = runtime()["spec"]
    assert model["runtime"] == runtime()["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in spec["supportedModelFormats"]}
    assert model["protocolVersion"] in spec["protocolVersions"]
    kubernetes_part = {k: v for k, v in model.items() if k not in MODEL_FIELDS}
    container = {"name": "kserve-container", "image": "neuroserve", **kubernetes_part}
    kubernetes_validate.validate(pod({"containers": [container]}), "1.30", strict=True)
    if "storageUri" in model:
        (claim,) = documents("pvc.yaml")
        kubernetes_validate.validate(claim, "1.30", strict=True)
        assert model["storageUri"].startswith(f"pvc://{claim['metadata']['name']}/")
    else:  # the image's own repository
        assert {"name": "NEUROSERVE_REPOSITORY", "value": "/models"} in model["env"]
        assert "COPY models /models" in (ROOT / "Dockerfile").read_text()
