"""The task interface: tasks are registered types, the core names none, a model is its task's
default only when it says so, a model a task cannot feed fails at load with the reason."""

from __future__ import annotations

import ast
import base64
import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from service.tasks import TASKS
from tests.conftest import ROOT, make_client, wait_loaded
from tests.onnx_models import channel_mean_model, model_json, write_model

CORE = [p for p in (ROOT / "service").rglob("*.py") if "tasks" not in p.parts and "routes" not in p.parts]


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def states(client) -> dict[str, dict]:
    return {row["name"]: row for row in client.get("/v2/models").json()}


def test_the_core_names_no_task() -> None:
    names = {name.replace("-", "_") for name in TASKS} | set(TASKS)
    found = []
    for path in CORE:
        for node in ast.walk(ast.parse(path.read_text())):
            identifiers = []
            if isinstance(node, ast.Name):
                identifiers.append(node.id)
            elif isinstance(node, ast.Attribute):
                identifiers.append(node.attr)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                identifiers.append(node.name)
            elif isinstance(node, ast.arg):
                identifiers.append(node.arg)
            elif isinstance(node, ast.alias):
                identifiers.append(node.asname or node.name)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                identifiers.append(node.value)
            found += [f"{path.relative_to(ROOT)}: {i}" for i in identifiers if any(n in i.lower() for n in names)]
    assert found == []


def test_a_misspelt_task_fails_at_load_naming_the_known_tasks(tmp_path: Path) -> None:
    write_model(tmp_path, "good")
    write_model(tmp_path, "typo", spec=model_json("typo", task="image-clasification"))
    with make_client(repository=tmp_path) as client:
        wait_loaded(client)
        row = states(client)["typo"]
        assert row["state"] == "FAILED"
        assert "unknown task 'image-clasification'" in row["reason"]
        assert all(name in row["reason"] for name in TASKS)
        assert states(client)["good"]["state"] == "READY"


@pytest.mark.parametrize(
    ("task", "parameters", "problem"),
    [
        ("image-classification", {}, "is not [batch, 1 or 3 channels"),
        ("sentiment", {}, "inputs must be input_ids and attention_mask"),
        ("translation", {"special_tokens": {"pad": 0, "bos": 1, "eos": 2, "unk": 3}}, "decoder step must take"),
        ("rating", {}, "inputs must be user and item"),
        ("object-detection", {}, "FP32 [batch, 3, size, size]"),
        ("image-classification", {"preprocesing": "mnist"}, "parameters: preprocesing: Extra inputs"),
    ],
)
def test_a_model_its_task_cannot_feed_fails_at_load_with_the_reason(
    tmp_path: Path, task: str, parameters: dict, problem: str
) -> None:
    write_model(tmp_path, "good")
    write_model(tmp_path, "odd", spec=model_json("odd", task=task, parameters=parameters))
    with make_client(repository=tmp_path) as client:
        wait_loaded(client)
        row = states(client)["odd"]
        assert row["state"] == "FAILED" and problem in row["reason"], row
        if not parameters or "special_tokens" in parameters:
            assert "cannot feed this model" in row["reason"] and '"task": "none"' in row["reason"]
        response = client.post("/v2/models/odd/infer", json={"inputs": []})
        assert response.status_code == 503 and response.json()["error_type"] == "model_not_ready"


def rgb_classifier(root: Path, name: str, **spec) -> None:
    channel_mean_model(root / name / "1" / "model.onnx", channels=3, size=8)
    body = {
        "name": name,
        "task": "image-classification",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 8, 8]}],
        "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 3]}],
        "max_batch_size": 4,
        "labels": ["red", "green", "blue"],
        **spec,
    }
    (root / name / "model.json").write_text(json.dumps(body))


def test_an_rgb_classifier_is_fed_rgb_at_its_size_with_its_normalisation(tmp_path: Path) -> None:
    parameters = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 1.0]}
    rgb_classifier(tmp_path, "colours", default=True, parameters=parameters)
    with make_client(repository=tmp_path) as client:
        wait_loaded(client)
        image = Image.new("RGB", (40, 30), (255, 128, 0))  # any size: resized to 8x8
        response = client.post("/v1/image-classification", json={"images": [png_b64(image)], "top_k": 3})
        assert response.status_code == 200, response.text
        scores = {p["label"]: p["score"] for p in response.json()["predictions"][0]}
        expected = {"red": (1.0 - 0.5) / 0.25, "green": (128 / 255 - 0.5) / 0.5, "blue": (0.0 - 0.5) / 1.0}
        assert scores == pytest.approx(expected, abs=1e-4)
        # A transparent PNG is laid on white, as a browser shows it.
        clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
        response = client.post("/v1/image-classification", json={"images": [png_b64(clear)], "top_k": 3})
        scores = {p["label"]: p["score"] for p in response.json()["predictions"][0]}
        assert scores == pytest.approx({"red": 2.0, "green": 1.0, "blue": 0.5}, abs=1e-4)


def mnist_repo(root: Path) -> Path:
    shutil.copytree(ROOT / "models" / "mnist", root / "mnist")
    return root


def seven(client) -> dict:
    from service.api.schemas import SEVEN_PNG_BASE64

    response = client.post("/v1/image-classification", json={"images": [SEVEN_PNG_BASE64], "top_k": 1})
    return response.json()


def test_adding_a_model_never_changes_which_model_answers_a_request_naming_none(tmp_path: Path) -> None:
    repo = mnist_repo(tmp_path)
    rgb_classifier(repo, "brightness")  # sorts before mnist; not marked default
    with make_client(repository=repo) as client:
        wait_loaded(client)
        answer = seven(client)
        assert answer["model"] == "mnist" and answer["predictions"][0][0]["label"] == "7"
        assert states(client)["brightness"]["default"] is False and states(client)["mnist"]["default"] is True
        named = client.post(
            "/v1/image-classification", json={"images": [png_b64(Image.new("RGB", (8, 8)))], "model": "brightness"}
        )
        assert named.status_code == 200 and named.json()["model"] == "brightness"


def test_two_defaults_of_one_task_fail_both_and_a_setting_decides(tmp_path: Path) -> None:
    repo = mnist_repo(tmp_path)
    rgb_classifier(repo, "brightness", default=True)
    with make_client(repository=repo) as client:
        wait_loaded(client)  # nothing serves: never ready
        rows = states(client)
        assert rows["mnist"]["state"] == rows["brightness"]["state"] == "FAILED"
        assert 'all marked "default": true for task image-classification' in rows["mnist"]["reason"]
        assert seven(client)["error_type"] == "model_not_ready"
    with make_client(repository=repo, default_models=["mnist"]) as client:
        wait_loaded(client)
        assert seven(client)["model"] == "mnist"
        assert states(client)["brightness"]["state"] == "READY"


def test_several_models_and_no_default_is_a_clear_404_naming_them(tmp_path: Path) -> None:
    rgb_classifier(tmp_path, "a")
    rgb_classifier(tmp_path, "b")
    with make_client(repository=tmp_path) as client:
        wait_loaded(client)
        body = seven(client)
        assert body["error_type"] == "no_default_model"
        assert "['a', 'b']" in body["error"]


# Found by trying it as a new user would (each failed before its fix).


def text_model(root: Path, name: str, *, classes: int = 2, length: int | str = "length", **spec) -> None:
    from tests.onnx_models import text_classifier

    text_classifier(root / name / "1" / "model.onnx", classes, length)
    shutil.copy(ROOT / "models" / "sentiment" / "6" / "tokenizer.json", root / name / "1" / "tokenizer.json")
    fixed = length if isinstance(length, int) else -1
    body = {
        "name": name,
        "task": "sentiment",
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": [-1, fixed]},
            {"name": "attention_mask", "datatype": "INT64", "shape": [-1, fixed]},
        ],
        "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, classes]}],
        "max_batch_size": 8,
        **spec,
    }
    (root / name / "model.json").write_text(json.dumps(body))


def sentiment(client, **body) -> dict:
    return client.post("/v1/sentiment", json={"texts": ["great movie", "房间干净"], **body}).json()


def test_a_sentiment_model_without_a_language_answers_the_languages_without_their_own(tmp_path: Path) -> None:
    text_model(tmp_path, "any-language", default=True)
    text_model(tmp_path, "english", default=True, parameters={"language": "en"})
    with make_client(repository=tmp_path) as client:
        wait_loaded(client)
        answer = sentiment(client)
        assert [p["model"] for p in answer["predictions"]] == ["english", "any-language"], answer
        assert sentiment(client, language="de")["predictions"][0]["model"] == "any-language"


def test_a_default_named_by_the_setting_decides_only_its_own_scope(tmp_path: Path) -> None:
    text_model(tmp_path, "en-a", default=True, parameters={"language": "en"})
    text_model(tmp_path, "en-b", parameters={"language": "en"})
    text_model(tmp_path, "zh", default=True, parameters={"language": "zh"})
    with make_client(repository=tmp_path, default_models="en-b") as client:  # comma-separated works too
        wait_loaded(client)
        assert [p["model"] for p in sentiment(client)["predictions"]] == ["en-b", "zh"]


def test_text_classes_without_labels_are_numbered_and_a_fixed_length_must_match_the_buckets(tmp_path: Path) -> None:
    text_model(tmp_path, "three", classes=3, default=True)
    text_model(tmp_path, "fixed", length=8, parameters={"length_buckets": [4, 8], "max_length": 8})
    text_model(tmp_path, "fixed-ok", length=8, parameters={"length_buckets": [8], "max_length": 8})
    with make_client(repository=tmp_path) as client:
        wait_loaded(client)
        prediction = sentiment(client)["predictions"][0]
        assert sorted(prediction["scores"]) == ["0", "1", "2"]
        rows = states(client)
        assert rows["fixed"]["state"] == "FAILED" and "length_buckets must be [8]" in rows["fixed"]["reason"]
        named = client.post("/v1/sentiment", json={"texts": ["fine"], "model": "fixed-ok"})
        assert named.status_code == 200 and named.json()["predictions"][0]["tokens"] == 1


def test_a_model_without_a_batch_axis_classifies_several_images_one_by_one(tmp_path: Path) -> None:
    rgb_classifier(tmp_path, "single", default=True, max_batch_size=0)
    spec = json.loads((tmp_path / "single" / "model.json").read_text())
    spec["inputs"][0]["shape"][0] = spec["outputs"][0]["shape"][0] = 1
    (tmp_path / "single" / "model.json").write_text(json.dumps(spec))
    with make_client(repository=tmp_path) as client:
        wait_loaded(client)
        images = [png_b64(Image.new("RGB", (8, 8), colour)) for colour in ((255, 0, 0), (0, 0, 255))]
        response = client.post("/v1/image-classification", json={"images": images, "top_k": 1})
        assert response.status_code == 200, response.text
        assert [p[0]["label"] for p in response.json()["predictions"]] == ["red", "blue"]


def test_form_fields_are_checked_like_json_fields(client) -> None:
    from service.api.schemas import SEVEN_PNG_BASE64

    files = [("files", ("7.png", base64.b64decode(SEVEN_PNG_BASE64), "image/png"))]
    for data, problem in (
        ({"modle": "mnist"}, "modle: unknown form field"),
        ({"top_k": ["1", "2"]}, "top_k: given more"),
    ):
        response = client.post("/v1/image-classification", files=files, data=data)
        assert response.status_code == 422 and problem in response.json()["error"], response.text


@pytest.mark.parametrize(
    ("tensor", "problem"),
    [
        ({"name": "user", "datatype": "INT64", "shape": [1], "data": [5.7]}, "fractional values"),
        ({"name": "user", "datatype": "INT64", "shape": [1], "data": [True]}, "must be numbers"),
    ],
)
def test_v2_numbers_are_taken_as_they_are_or_refused(client, tensor: dict, problem: str) -> None:
    item = {"name": "item", "datatype": "INT64", "shape": [1], "data": [1]}
    response = client.post("/v2/models/rating/infer", json={"inputs": [tensor, item]})
    assert response.status_code == 400 and problem in response.json()["error"], response.text


def test_mnist_preprocessing_refuses_normalisation_it_would_ignore(tmp_path: Path) -> None:
    repo = mnist_repo(tmp_path)
    spec = json.loads((repo / "mnist" / "model.json").read_text())
    spec["parameters"]["mean"] = [0.1307]
    (repo / "mnist" / "model.json").write_text(json.dumps(spec))
    with make_client(repository=repo) as client:
        wait_loaded(client)
        assert "drop mean" in states(client)["mnist"]["reason"]


def test_a_failed_model_named_on_another_tasks_endpoint_is_not_found(tmp_path: Path) -> None:
    repo = mnist_repo(tmp_path)
    write_model(repo, "typo", spec=model_json("typo", task="image-clasification"))
    (repo / "broken").mkdir()
    (repo / "broken" / "model.json").write_text("{not json")
    with make_client(repository=repo) as client:
        wait_loaded(client)
        response = client.post("/v1/sentiment", json={"texts": ["hi"], "model": "mnist"})
        assert response.status_code == 404
        response = client.post("/v1/image-classification", json={"images": ["AAAA"], "model": "typo"})
        assert response.status_code == 404 and response.json()["error_type"] == "model_not_found"
        row = states(client)["broken"]
        assert row["task"] is None and row["state"] == "FAILED"


def test_a_decoding_budget_that_cannot_hold_the_longest_source_fails_at_load(tmp_path: Path) -> None:
    (tmp_path / "translation-en-fr").symlink_to(ROOT / "models" / "translation-en-fr")
    with make_client(repository=tmp_path, decode_max_tokens=16, warmup=False) as client:
        wait_loaded(client)
        reason = states(client)["translation-en-fr"]["reason"]
        assert "cannot hold one sequence of the longest source (65 tokens)" in reason
