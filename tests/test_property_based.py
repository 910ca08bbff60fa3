"""Property-based runs (schemathesis) of the Open Inference Protocol's own published REST spec and
of the service's OpenAPI document, against a real server on 127.0.0.1 with the committed models:
no 5xx, no status code the document does not list, no response that breaks its schema."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from bench.harness import neuroserve
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

OIP_SPEC = ROOT.parent / "shared" / "specs" / "open-inference-protocol" / "open_inference_rest.yaml"
SETTINGS = settings(
    max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None
)


def not_a_server_error(ctx, response, case) -> bool | None:  # type: ignore[no-untyped-def]
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}"
    )
    return None


@pytest.fixture(scope="module")
def server():
    with neuroserve(ROOT / "models") as running:
        yield running


def run_every_operation(schema, base_url: str, check) -> list[str]:  # type: ignore[no-untyped-def]
    """Each operation's generated cases through ``check``; the labels of those that failed, with why."""
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @SETTINGS
        def run(case) -> None:  # type: ignore[no-untyped-def]
            check(case, base_url)

        try:
            run()
        except Exception as exc:
            failures.append(f"{operation.label}: {type(exc).__name__}: {str(exc)[:600]}")
    return failures


def test_the_service_answers_as_its_openapi_document_says(server) -> None:  # type: ignore[no-untyped-def]
    schema = schemathesis.openapi.from_url(server.url("/openapi.json"))
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

    def check(case, base_url: str) -> None:  # type: ignore[no-untyped-def]
        case.call_and_validate(base_url=base_url, checks=checks, excluded_checks=[])

    assert run_every_operation(schema, server.url(""), check) == []


def test_with_api_keys_the_service_still_answers_as_documented(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from service.api.auth import add_key

    key = add_key(tmp_path / "keys.json", "schemathesis", ["infer", "metrics", "admin"], None)
    env = {
        "NEUROSERVE_API_KEYS_FILE": str(tmp_path / "keys.json"),
        "NEUROSERVE_CORS_ALLOW_ORIGINS": "https://a.example",
    }
    repo = tmp_path / "models"
    for model in ("mnist", "sentiment", "rating"):
        (repo / model).parent.mkdir(parents=True, exist_ok=True)
        (repo / model).symlink_to(ROOT / "models" / model)
    with neuroserve(repo, **env) as keyed:
        schema = schemathesis.openapi.from_url(keyed.url("/openapi.json"))
        checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

        def check(case, base_url: str) -> None:  # type: ignore[no-untyped-def]
            case.call_and_validate(base_url=base_url, headers={"X-API-Key": key}, checks=checks, excluded_checks=[])

        assert run_every_operation(schema, keyed.url(""), check) == []


def published_protocol(models: dict[str, str]):  # type: ignore[no-untyped-def]
    """The protocol's spec as published, its path templates made OpenAPI's (``${MODEL_NAME}`` ->
    ``{MODEL_NAME}``, as its SOURCE.md says) and the model and version pinned to served ones, so that
    the generated cases reach models instead of 404s."""
    import yaml

    text = OIP_SPEC.read_text(encoding="utf-8").replace("${MODEL_NAME}", "{MODEL_NAME}")
    raw = yaml.safe_load(text.replace("${MODEL_VERSION}", "{MODEL_VERSION}"))
    for item in raw["paths"].values():
        for parameter in item.get("parameters", []):
            if parameter["name"] == "MODEL_NAME":
                parameter["schema"] = {"type": "string", "enum": sorted(models)}
            elif parameter["name"] == "MODEL_VERSION":
                parameter["schema"] = {"type": "string", "enum": sorted(set(models.values()))}
    return schemathesis.openapi.from_dict(raw)


def test_the_service_answers_the_published_protocol(server) -> None:  # type: ignore[no-untyped-def]
    if not OIP_SPEC.is_file():
        pytest.skip(f"the protocol's spec is not at {OIP_SPEC}")
    schema = published_protocol({"mnist": "1", "rating": "1"})
    paths = {result.ok().path for result in schema.get_all_operations()}
    assert "/v2/models/{MODEL_NAME}/versions/{MODEL_VERSION}/infer" in paths
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    reached: list[str] = []

    def check(case, base_url: str) -> None:  # type: ignore[no-untyped-def]
        response = case.call_and_validate(base_url=base_url, checks=checks, excluded_checks=[])
        reached.append(f"{case.method} {case.formatted_path} {response.status_code}")

    assert run_every_operation(schema, server.url(""), check) == []
    # The cases reached served models: metadata and readiness answered 200, inference answered.
    assert any(r.startswith("GET /v2/models/mnist/versions/1 ") and r.endswith(" 200") for r in reached), reached
    assert any(r.startswith("POST /v2/models/rating/versions/1/infer ") for r in reached), reached
    # Generated bodies are rarely a tensor a model takes: one that is, checked against the spec's
    # inference_response schema too.
    infer = next(result.ok() for result in schema.get_all_operations() if result.ok().path.endswith("/infer"))
    tensor = {"name": "image", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": [0.5] * (2 * 784)}
    case = infer.Case(path_parameters={"MODEL_NAME": "mnist", "MODEL_VERSION": "1"}, body={"inputs": [tensor]})
    response = case.call_and_validate(base_url=server.url(""), checks=checks, excluded_checks=[])
    assert response.status_code == 200 and response.json()["outputs"][0]["shape"][0] == 2, response.text
