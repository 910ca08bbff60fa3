"""The wire contract has one source of truth: every endpoint's JSON, success or error, validates
against the schema the served OpenAPI document gives for that path, method and status, and the
error table (OpenAPI and README) is the classes of ``service/errors.py``."""

from __future__ import annotations

import io
import re

import jsonschema
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.api.schemas import SEVEN_PNG_BASE64
from service.config import Settings
from service.errors import wire_errors
from tests.conftest import ROOT

TASK_ROUTES = [
    ("/v1/image-classification", "post"),
    ("/v1/object-detection", "post"),
    ("/v1/sentiment", "post"),
    ("/v1/rating", "post"),
    ("/v1/recommendations", "post"),
    ("/v1/translation", "post"),
]


def seven_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (28, 28), 255).save(buffer, "PNG")
    return buffer.getvalue()


# (method, path template, url, request kwargs, expected status)
CASES = [
    ("get", "/v2/health/live", "/v2/health/live", {}, 200),
    ("get", "/v2/health/ready", "/v2/health/ready", {}, 200),
    ("get", "/v2", "/v2", {}, 200),
    ("get", "/v2/models", "/v2/models", {}, 200),
    ("post", "/v2/repository/index", "/v2/repository/index", {}, 200),
    ("get", "/v2/models/{model}", "/v2/models/mnist", {}, 200),
    ("get", "/v2/models/{model}", "/v2/models/nope", {}, 404),
    ("get", "/v2/models/{model}/versions/{version}", "/v2/models/rating/versions/1", {}, 200),
    ("get", "/v2/models/{model}/ready", "/v2/models/sentiment/ready", {}, 200),
    ("get", "/v2/models/{model}/versions/{version}/ready", "/v2/models/mnist/versions/1/ready", {}, 200),
    (
        "post",
        "/v2/models/{model}/infer",
        "/v2/models/mnist/infer",
        {
            "json": {
                "id": "1",
                "inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}],
            }
        },
        200,
    ),
    ("post", "/v2/models/{model}/infer", "/v2/models/mnist/infer", {"json": {"inputs": [{"name": "x"}]}}, 400),
    ("post", "/v2/models/{model}/infer", "/v2/models/mnist/infer", {"content": b"{not json"}, 400),
    ("post", "/v1/image-classification", "/v1/image-classification", {"json": {"images": [SEVEN_PNG_BASE64]}}, 200),
    (
        "post",
        "/v1/image-classification",
        "/v1/image-classification",
        {"files": [("files", ("a.png", seven_png()))]},
        200,
    ),
    ("post", "/v1/image-classification", "/v1/image-classification", {"json": {"images": ["AAAA"]}}, 415),
    ("post", "/v1/image-classification", "/v1/image-classification", {"json": {"images": ["%%%"]}}, 400),
    ("post", "/v1/image-classification", "/v1/image-classification", {"json": {"images": []}}, 422),
    (
        "post",
        "/v1/image-classification",
        "/v1/image-classification",
        {"content": b"x", "headers": {"content-type": "text/plain"}},
        415,
    ),
    (
        "post",
        "/v1/image-classification",
        "/v1/image-classification",
        {"json": {"images": [SEVEN_PNG_BASE64], "model": "nope"}},
        404,
    ),
    ("post", "/v1/object-detection", "/v1/object-detection", {"json": {"images": [SEVEN_PNG_BASE64]}}, 200),
    ("post", "/v1/sentiment", "/v1/sentiment", {"json": {"texts": ["Great film.", "房间干净，服务热情。"]}}, 200),
    ("post", "/v1/sentiment", "/v1/sentiment", {"json": {"texts": ["x" * 30_000]}}, 413),
    (
        "post",
        "/v1/rating",
        "/v1/rating",
        {"json": {"pairs": [{"user_id": 1, "item_id": "1"}, {"user_id": "99999", "item_id": 1}]}},
        200,
    ),
    ("post", "/v1/rating", "/v1/rating", {"json": {"pairs": [{"user_id": "abc", "item_id": "1"}]}}, 400),
    ("post", "/v1/recommendations", "/v1/recommendations", {"json": {"user_id": "1", "k": 3}}, 200),
    ("post", "/v1/recommendations", "/v1/recommendations", {"json": {"user_id": "999999", "k": 3}}, 200),
    ("post", "/v1/translation", "/v1/translation", {"json": {"texts": ["Good morning!"], "beam_size": 2}}, 200),
    ("post", "/v1/translation", "/v1/translation", {"json": {"texts": ["你好"]}}, 400),
    ("post", "/v1/translation", "/v1/translation", {"json": {"texts": ["Hi"], "beam_size": 99}}, 422),
]


@pytest.fixture(scope="module")
def openapi(client: TestClient) -> dict:
    return client.get("/openapi.json").json()


def check_against_schema(openapi: dict, method: str, template: str, status: int, body: object) -> None:
    responses = openapi["paths"][template][method]["responses"]
    assert str(status) in responses, (
        f"{method.upper()} {template} answered {status}, not documented: {sorted(responses)}"
    )
    schema = responses[str(status)]["content"]["application/json"]["schema"]
    jsonschema.validate(body, {**schema, "components": openapi["components"]})


@pytest.mark.parametrize(
    ("method", "template", "url", "kwargs", "status"), CASES, ids=[f"{c[0]} {c[2]} {c[4]}" for c in CASES]
)
def test_every_endpoint_answers_what_its_openapi_document_says(
    client: TestClient, openapi: dict, method: str, template: str, url: str, kwargs: dict, status: int
) -> None:
    response = getattr(client, method)(url, **kwargs)
    assert response.status_code == status, response.text
    check_against_schema(openapi, method, template, status, response.json())


def test_framework_errors_use_the_error_schema(client: TestClient, openapi: dict) -> None:
    error = {**openapi["components"]["schemas"]["ErrorResponse"], "components": openapi["components"]}
    for response, error_type in (
        (client.get("/no/such/route"), "not_found"),
        (client.delete("/v1/sentiment"), "method_not_allowed"),
    ):
        jsonschema.validate(response.json(), error)
        assert response.json()["error_type"] == error_type


def test_the_error_table_is_the_classes_of_errors_py(openapi: dict) -> None:
    table = wire_errors()
    every_type = sorted(cls.error_type for classes in table.values() for cls in classes)
    assert sorted(openapi["components"]["schemas"]["ErrorResponse"]["properties"]["error_type"]["enum"]) == every_type
    for path, method in TASK_ROUTES:
        responses = openapi["paths"][path][method]["responses"]
        for status, classes in table.items():
            examples = responses[str(status)]["content"]["application/json"]["examples"]
            assert sorted(examples) == sorted(cls.error_type for cls in classes), (path, status)
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| (\d{3}) \| (.+?) \|", readme, flags=re.M))
    for status, classes in table.items():
        documented = set(re.findall(r"`([a-z_]+)`", rows.get(str(status), "")))
        assert documented == {cls.error_type for cls in classes}, f"README errors table, status {status}"


def test_timings_resolve_below_a_millisecond(client: TestClient) -> None:
    # The event loop's clock has 1 ms resolution under uvloop: timings from it are whole milliseconds.
    values = []
    for _ in range(10):
        response = client.post("/v1/image-classification", json={"images": [SEVEN_PNG_BASE64]})
        values += [float(response.headers["x-inference-time-ms"]), float(response.headers["x-queue-time-ms"])]
    assert any(v != round(v) for v in values), values


def test_the_openapi_document_states_bounds_as_json_schema_does() -> None:
    # Bounds on a float-or-int union came out as "ge"/"le" keys, which JSON Schema and every client
    # generator ignore: a client read temperature as unbounded and got a 400 for 3.
    document = create_app(Settings(repository=ROOT / "models")).openapi()
    found: list[str] = []

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("ge", "le", "gt", "lt") and isinstance(value, int | float):
                    found.append(f"{where}.{key}")
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    walk(document, "")
    assert found == []
    body = document["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    temperature = body["properties"]["temperature"]
    assert {"type": "number", "minimum": 0, "maximum": 2} in temperature["anyOf"]


def test_the_binary_tensor_extension_is_in_the_openapi_document() -> None:
    # Served (octet-stream bodies in and out, the header's length in Inference-Header-Content-Length)
    # but documented as JSON only: schema-driven clients and fuzzers never saw it.
    document = create_app(Settings(repository=ROOT / "models")).openapi()
    for path in ("/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer"):
        operation = document["paths"][path]["post"]
        assert "application/octet-stream" in operation["requestBody"]["content"]
        assert "application/octet-stream" in operation["responses"]["200"]["content"]
        assert "Inference-Header-Content-Length" in [p["name"] for p in operation["parameters"]]
