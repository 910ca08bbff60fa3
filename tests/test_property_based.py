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


def test_the_service_answers_the_published_protocol(server) -> None:  # type: ignore[no-untyped-def]
    if not OIP_SPEC.is_file():
        pytest.skip(f"the protocol's spec is not at {OIP_SPEC}")
    schema = schemathesis.openapi.from_path(OIP_SPEC)

    def check(case, base_url: str) -> None:  # type: ignore[no-untyped-def]
        response = case.call(base_url=base_url)
        not_a_server_error(None, response, case)
        content_type = response.headers.get("content-type") or [""]
        content_type = content_type[0] if isinstance(content_type, list) else content_type
        assert content_type.startswith("application/json"), response.headers

    assert run_every_operation(schema, server.url(""), check) == []
