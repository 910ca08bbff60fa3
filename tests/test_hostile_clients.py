"""Hostile and heavy clients: one client's mistake fails only that client, and a request cannot
queue more than the model can take. Traffic stays in-process (127.0.0.1 at most)."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ROOT, make_client, wait_ready

# The committed English sentiment model's vocabulary: one id past it must be refused.
SENTIMENT_VOCAB = (
    int(json.loads((ROOT / "models" / "sentiment" / "model.json").read_text())["inputs"][0]["value_range"][1]) + 1
)


def infer(client: TestClient, model: str, *tensors: dict):
    return client.post(f"/v2/models/{model}/infer", json={"inputs": list(tensors)})


def ints(name: str, values: list, shape: list[int]) -> dict:
    return {"name": name, "datatype": "INT64", "shape": shape, "data": values}


@pytest.mark.parametrize(
    ("model", "tensors", "problem"),
    [
        ("rating", [ints("user", [10**12], [1]), ints("item", [1], [1])], "out of the model's range [0, 609]"),
        ("rating", [ints("user", [0], [1]), ints("item", [-1], [1])], "out of the model's range [0, 9741]"),
        ("sentiment", [ints("input_ids", [], [1, 0]), ints("attention_mask", [], [1, 0])], "axis 1 is empty"),
        (
            "sentiment",
            [ints("input_ids", [5, SENTIMENT_VOCAB], [1, 2]), ints("attention_mask", [1, 1], [1, 2])],
            f"value {SENTIMENT_VOCAB} is out of the model's range [0, {SENTIMENT_VOCAB - 1}]",
        ),
        (
            "sentiment",
            [ints("input_ids", [5] * 300, [1, 300]), ints("attention_mask", [1] * 300, [1, 300])],
            "axis 1 is 300, the model takes at most 256",
        ),
        (
            "translation-en-fr",
            [
                ints("tgt_ids", [1] * 128, [1, 128]),
                {"name": "memory", "datatype": "FP32", "shape": [1, 3, 256], "data": [0.0] * 768},
                ints("src_ids", [5, 6, 7], [1, 3]),
            ],
            "axis 1 is 128, the model takes at most 65",
        ),
        (  # axes the graph names alike must agree: onnxruntime failed inside the graph (a 500)
            "sentiment",
            [ints("input_ids", [5] * 5, [1, 5]), ints("attention_mask", [1] * 7, [1, 7])],
            "input 'attention_mask' axis 1 is 7 but input 'input_ids' axis 1 is 5",
        ),
        (
            "translation-en-fr",
            [
                ints("tgt_ids", [1], [1, 1]),
                {"name": "memory", "datatype": "FP32", "shape": [1, 4, 256], "data": [0.0] * 1024},
                ints("src_ids", [5, 6, 7], [1, 3]),
            ],
            "input 'src_ids' axis 1 is 3 but input 'memory' axis 1 is 4",
        ),
    ],
)
def test_v2_tensors_the_graph_cannot_take_are_a_400_before_they_are_queued(
    client: TestClient, model: str, tensors: list[dict], problem: str
) -> None:
    response = infer(client, model, *tensors)
    assert response.status_code == 400, response.text
    assert response.json()["error_type"] == "invalid_tensor" and problem in response.json()["error"]


def test_a_huge_declared_tensor_is_refused_before_it_is_built(client: TestClient) -> None:
    tensor = {"name": "image", "datatype": "FP32", "shape": [20_000, 1, 28, 28], "data": [0.0]}
    response = infer(client, "mnist", tensor)
    assert response.status_code == 413 and response.json()["error_type"] == "too_many_items"


def test_a_poisoned_request_the_checks_miss_fails_alone_never_its_batch(tmp_path: Path) -> None:
    # The rating model without its declared ranges: a bad index reaches onnxruntime inside a batch
    # shared with innocent recommendations. Only the poisoned requests may fail.
    shutil.copytree(ROOT / "models" / "rating", tmp_path / "rating")
    spec = json.loads((tmp_path / "rating" / "model.json").read_text())
    for tensor in spec["inputs"]:
        tensor.pop("value_range")
    (tmp_path / "rating" / "model.json").write_text(json.dumps(spec))
    with make_client(repository=tmp_path) as client:
        wait_ready(client)

        def poison(_: int):
            return infer(client, "rating", ints("user", [10**12, 1], [2]), ints("item", [1, 1], [2]))

        def innocent(i: int):
            return client.post("/v1/recommendations", json={"user_id": str(1 + i % 50), "k": 5})

        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(poison if i % 4 == 0 else innocent, i) for i in range(48)]
            responses = [f.result() for f in futures]
    poisoned = responses[::4]
    innocents = [r for i, r in enumerate(responses) if i % 4]
    assert all(r.status_code == 200 for r in innocents), [r.text for r in innocents if r.status_code != 200][:2]
    # onnxruntime refused the index as an invalid argument: the client's mistake, a 400.
    assert all(r.status_code == 400 and r.json()["error_type"] == "invalid_tensor" for r in poisoned)
    assert all("Gather" not in r.text and "indices" not in r.text for r in poisoned)  # no runtime internals


# Protocol conformance (the Open Inference Protocol's REST spec, and HTTP).


def mnist_tensor(**extra) -> dict:
    return {"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}], **extra}


def test_no_slash_redirect_reflects_the_host_header(client: TestClient) -> None:
    # The published spec's path for server metadata is /v2/: answered there, not redirected.
    response = client.get("/v2/", headers={"host": "evil.example"}, follow_redirects=False)
    assert response.status_code == 200 and "location" not in response.headers
    assert response.json() == client.get("/v2").json()
    response = client.get("/v2/models/mnist/", headers={"host": "evil.example"}, follow_redirects=False)
    assert response.status_code == 404 and "location" not in response.headers


def test_metadata_names_the_protocol_platform_and_the_extensions_served(client: TestClient) -> None:
    assert client.get("/v2/models/mnist").json()["platform"] == "onnx_onnxv1"
    # Only what is served: binary tensors and statistics, not model_repository (no load/unload).
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data", "statistics"]
    assert client.get("/v2/models/mnist/stats").status_code == 200


def test_request_id_is_a_string_and_is_echoed(client: TestClient) -> None:
    assert client.post("/v2/models/mnist/infer", json=mnist_tensor(id="abc")).json()["id"] == "abc"
    for bad in (7, ["x"], {"a": 1}, True):
        response = client.post("/v2/models/mnist/infer", json=mnist_tensor(id=bad))
        assert response.status_code == 400 and response.json()["error_type"] == "schema_error", bad


def test_a_protocol_datatype_the_model_does_not_take_is_a_400(client: TestClient) -> None:
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
    response = client.post("/v2/models/mnist/infer", json=body)
    assert response.status_code == 400 and "does not match the model's FP32" in response.json()["error"]


@pytest.mark.parametrize("version", [" 1 ", "01", "+1", "١", "1.0"])
def test_only_the_versions_name_resolves_it(client: TestClient, version: str) -> None:
    response = client.get(f"/v2/models/mnist/versions/{version}")
    assert response.status_code == 404 and response.json()["error_type"] == "model_not_found"


def test_header_length_must_be_plain_digits(client: TestClient) -> None:
    body = b'{"inputs": []}'
    response = client.post("/v2/models/mnist/infer", content=body, headers={"inference-header-content-length": "1_4"})
    assert response.status_code == 400 and "is not a number of bytes" in response.json()["error"]


def test_method_not_allowed_says_what_is(client: TestClient) -> None:
    response = client.delete("/v1/sentiment")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    # Every method of the path, not only the first route's: /v1/faces said "POST".
    response = client.put("/v1/faces")
    assert response.status_code == 405 and response.headers["allow"] == "DELETE, GET, HEAD, POST"
    assert client.post("/v2/health/live").headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    ("url", "body"),
    [
        ("/v1/translation", {"texts": ["Hi"], "beam_size": "2"}),
        ("/v1/translation", {"texts": ["Hi"], "beam_size": True}),
        ("/v1/recommendations", {"user_id": "1", "k": "3"}),
        ("/v1/recommendations", {"user_id": "1", "exclude_seen": 1}),
        ("/v1/image-classification", {"images": ["AAAA"], "top_k": 2.0}),
    ],
)
def test_json_numbers_and_booleans_are_not_coerced(client: TestClient, url: str, body: dict) -> None:
    response = client.post(url, json=body)
    assert response.status_code == 422 and response.json()["error_type"] == "schema_error", response.text


@pytest.mark.parametrize(
    ("model", "tensor"),
    [
        ("sentiment", ints("input_ids", [[True, 2]], [1, 2])),
        ("sentiment", ints("input_ids", [True, 2], [1, 2])),
        (
            "mnist",
            {"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [[[[True] + [0.0] * 27] * 28]]},
        ),
    ],
)
def test_a_boolean_in_a_nested_tensor_is_not_read_as_one(client: TestClient, model: str, tensor: dict) -> None:
    """Only a flat list was checked: [[true, 2]] was served as [[1, 2]]."""
    r = infer(client, model, tensor)
    assert r.status_code == 400 and "not booleans" in r.json()["error"], r.text


def test_an_id_with_a_trailing_newline_is_not_an_id(client: TestClient) -> None:
    response = client.post("/v1/recommendations", json={"user_id": "1\n", "k": 3})
    assert response.status_code == 400 and response.json()["error_type"] == "invalid_id"


def test_every_reference_in_the_openapi_document_resolves(client: TestClient) -> None:
    document = client.get("/openapi.json").json()

    def refs(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in set(refs(document)):
        target = document
        for part in ref.removeprefix("#/").split("/"):
            assert part in target, f"unresolvable {ref}"
            target = target[part]


# Truthful health and errors.


SENTIMENT_VERSION = max((p.name for p in (ROOT / "models" / "sentiment").iterdir() if p.name.isdigit()), key=int)


def broken_copy(root: Path) -> Path:
    shutil.copytree(ROOT / "models" / "mnist", root / "mnist")
    shutil.copytree(ROOT / "models" / "sentiment", root / "sentiment")
    version = root / "sentiment" / SENTIMENT_VERSION
    (version / "model.onnx").write_bytes(b"not a graph")
    spec = json.loads((root / "sentiment" / "model.json").read_text())
    (version / "metadata.json").write_text("{}")  # no sha256 to refuse it earlier
    (root / "sentiment" / "model.json").write_text(json.dumps(spec))
    return root


def test_a_failed_model_makes_the_replica_not_ready_and_answers_503_with_its_reason(tmp_path: Path) -> None:
    from tests.conftest import wait_loaded

    repo = broken_copy(tmp_path)
    with make_client(repository=repo) as client:
        wait_loaded(client)
        ready = client.get("/v2/health/ready")
        assert ready.status_code == 503 and ready.json()["models"] == {"mnist": "READY", "sentiment": "FAILED"}
        assert f"sentiment/{SENTIMENT_VERSION}/model.onnx" in ready.json()["failed"]["sentiment"]
        response = client.post("/v1/sentiment", json={"texts": ["Great film."]})
        assert response.status_code == 503 and response.json()["error_type"] == "model_not_ready"
        assert "retry-after" not in response.headers  # it will not recover by itself
        assert str(tmp_path) not in response.text and str(tmp_path) not in client.get("/v2/models").text
    with make_client(repository=repo, require_all_models=False) as client:
        wait_loaded(client)
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/v2/health/ready").json()["failed"].keys() == {"sentiment"}


def test_the_active_sequences_gauge_returns_to_zero(client: TestClient) -> None:
    client.post("/v1/translation", json={"texts": ["Good morning!", "Where is the station?"]})
    metrics = client.get("/metrics").text
    assert 'neuroserve_active_sequences{model="translation-en-fr"} 0.0' in metrics


def test_a_crafted_path_cannot_forge_a_plain_text_log_line() -> None:
    import logging

    from service.logs import PlainFormatter

    record = logging.makeLogRecord(
        {"msg": "%s %s %d", "args": ("GET", "/v2/x\n2026-12-02 INFO service: forged", 404), "levelname": "INFO"}
    )
    line = PlainFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert "\n" not in line and "\\n2026-12-02 INFO service: forged" in line


def test_the_openapi_document_states_the_limits_this_server_runs_with() -> None:
    from tests.conftest import make_client

    with make_client(max_top_k=7, max_texts_per_request=3, max_beam_size=2, max_recommendations=11) as client:
        document = client.get("/openapi.json").json()
        paths = document["paths"]

        def body(path: str, content: str = "application/json") -> dict:
            return paths[path]["post"]["requestBody"]["content"][content]["schema"]["properties"]

        assert body("/v1/image-classification")["top_k"]["maximum"] == 7
        assert body("/v1/image-classification")["images"]["maxItems"] == 64
        assert body("/v1/sentiment")["texts"]["maxItems"] == 3
        assert body("/v1/sentiment")["texts"]["items"]["maxLength"] == 20000
        assert body("/v1/translation")["beam_size"]["maximum"] == 2
        assert body("/v1/recommendations")["k"]["maximum"] == 11
        assert "x-neuroserve-limit" not in str(document)
        # and the server keeps to what it states, one past each limit being a 4xx
        over = client.post("/v1/sentiment", json={"texts": ["fine"] * 4})
        assert over.status_code == 413 and over.json()["error_type"] == "too_many_items"
        assert client.post("/v1/recommendations", json={"user_id": "1", "k": 12}).status_code == 422


@pytest.mark.parametrize(
    "text",
    [
        "\u200b",
        "\ufeff",
        "\u00ad\u200b",
        "\x00",
        " \u2060 \t",
        "\U000e0020\U000e0001",
        "\ufe0f",
        "\u0301",
        "\u3164",
        "\u2800",
    ],
)
@pytest.mark.parametrize("path", ["/v1/sentiment", "/v1/translation"])
def test_a_text_with_nothing_visible_is_empty(client: TestClient, path: str, text: str) -> None:
    """Zero-width and format characters tokenise to nothing: the classifier answered a guess with a 200."""
    r = client.post(path, json={"texts": ["Fine.", text]})
    assert r.status_code == 400 and r.json()["error_type"] == "invalid_input", r.text
    assert "texts[1] is empty" in r.json()["error"]


def test_an_integer_at_two_to_the_63_written_as_a_float_does_not_wrap_to_the_lowest(client: TestClient) -> None:
    """float(2**63 - 1) is 2**63, which passed "> max" and became -2**63 in the cast."""
    r = infer(client, "rating", ints("user", [9.223372036854775807e18], [1]), ints("item", [1], [1]))
    assert r.status_code == 400 and "out of the INT64 range" in r.json()["error"], r.text


@pytest.mark.parametrize("literal", [b"-9223372036854775809", b"-18446744073709551616", b"1e300", b"-9.3e18"])
def test_an_integer_past_64_bits_is_refused_not_rounded_into_range(client: TestClient, literal: bytes) -> None:
    """The JSON parser reads -2**63 - 1 as the float -2.0**63: it was taken, and quoted as -2**63."""
    body = (
        b'{"inputs": [{"name": "user", "shape": [1], "datatype": "INT64", "data": [' + literal + b"]}, "
        b'{"name": "item", "shape": [1], "datatype": "INT64", "data": [1]}]}'
    )
    r = client.post("/v2/models/rating/infer", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error_type"] == "invalid_tensor", r.text
    assert "out of the INT64 range as written" in r.json()["error"] and "-9223372036854775808" not in r.text


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({"content-encoding": "gzip"}, "Content-Encoding"),
        ({"content-encoding": "br"}, "Content-Encoding"),
        ({"transfer-encoding": "gzip, chunked"}, "Transfer-Encoding"),
        ([("content-encoding", "identity"), ("content-encoding", "gzip")], "Content-Encoding"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/sentiment", "/v2/models/mnist/infer", "/v1/image-classification"])
def test_a_compressed_body_is_415_not_invalid_json(client: TestClient, path: str, headers, problem: str) -> None:
    pairs = list(headers.items()) if isinstance(headers, dict) else headers
    r = client.post(path, content=b"\x1f\x8b\x08\x00", headers=[("content-type", "application/json"), *pairs])
    assert r.status_code == 415 and r.json()["error_type"] == "unsupported_media_type", r.text
    assert problem in r.json()["error"]


@pytest.mark.parametrize("value", ["1_0", "\uff11\uff10", "1e1_0", "٣"])
def test_a_form_number_is_ascii_digits(client: TestClient, value: str) -> None:
    """pydantic (as Python's int()) read "1_0" and full-width digits as 10."""
    from service.api.schemas import SEVEN_PNG_BASE64

    png = __import__("base64").b64decode(SEVEN_PNG_BASE64)
    r = client.post("/v1/image-classification", files=[("files", ("7.png", png))], data={"top_k": value})
    assert r.status_code == 422 and r.json()["error_type"] == "schema_error", r.text
    assert "ASCII digits" in r.json()["error"]
    ok = client.post("/v1/image-classification", files=[("files", ("7.png", png))], data={"top_k": " 3 "})
    assert ok.status_code == 200 and len(ok.json()["predictions"][0]) == 3, ok.text


def test_an_error_never_sends_a_megabyte_of_the_request_back(client: TestClient) -> None:
    name = "m" * 1_000_000
    r = client.post("/v1/sentiment", json={"texts": ["Fine."], "model": name})
    assert r.status_code == 404 and len(r.content) < 2_000, len(r.content)
    assert "1000" in r.json()["error"] or "characters" in r.json()["error"]
