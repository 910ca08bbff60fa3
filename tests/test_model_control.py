"""Model control (Triton's model repository extension): versions loaded, switched and unloaded
while clients keep sending requests, by request (explicit) and by watching the repository (poll)."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.auth import scope_of
from service.config import Settings
from tests.conftest import ROOT, wait_ready
from tests.onnx_models import write_model
from tests.test_task_interface import rgb_classifier

X = [[1.0, 2.0, 3.0, 4.0]]


def infer(client: TestClient) -> tuple[int, dict]:
    r = client.post(
        "/v2/models/scale/infer",
        json={"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": X}]},
    )
    return r.status_code, r.json()


def factor_of(body: dict) -> float:
    return float(np.asarray(body["outputs"][0]["data"])[0] / X[0][0])


class Traffic:
    """Clients sending requests back to back on threads: (start time, status, version, factor)."""

    def __init__(self, client: TestClient, clients: int = 4) -> None:
        self.client = client
        self.records: list[tuple[float, int, str | None, float | None, dict]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            status, body = infer(self.client)
            ok = status == 200
            version = body.get("model_version") if ok else None
            self.records.append((started, status, version, factor_of(body) if ok else None, body))

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    write_model(tmp_path, "scale", version=1, factor=2.0)
    return tmp_path


def serve(repo: Path, **settings) -> TestClient:
    return TestClient(create_app(Settings(repository=repo, log_json=False, **settings)))


def test_with_model_control_off_loading_by_request_is_refused_and_says_how_to_turn_it_on(repo: Path) -> None:
    with serve(repo) as client:
        wait_ready(client)
        for action in ("load", "unload"):
            r = client.post(f"/v2/repository/models/scale/{action}")
            assert r.status_code == 403, r.text
            assert r.json()["error_type"] == "model_control_disabled"
            assert "NEUROSERVE_MODEL_CONTROL=explicit" in r.json()["error"]
        assert "model_repository" not in client.get("/v2").json()["extensions"]
        assert infer(client)[0] == 200


def test_a_new_version_loaded_under_load_takes_over_with_no_failed_request(repo: Path) -> None:
    with serve(repo, model_control="explicit") as client:
        wait_ready(client)
        assert "model_repository" in client.get("/v2").json()["extensions"]
        with Traffic(client) as traffic:
            time.sleep(0.3)
            write_model(repo, "scale", version=2, factor=3.0)
            r = client.post("/v2/repository/models/scale/load")
            switched = time.monotonic()
            assert r.status_code == 200, r.text
            assert r.json() == {"name": "scale", "state": "READY", "versions": ["2"], "reason": None}
            time.sleep(0.3)
        records = traffic.records
        assert len(records) > 20
        assert [r for r in records if r[1] != 200] == []  # not one failed request
        before = [r for r in records if r[0] < switched]
        after = [r for r in records if r[0] > switched]
        assert {(r[2], r[3]) for r in before} >= {("1", 2.0)}
        assert after and {(r[2], r[3]) for r in after} == {("2", 3.0)}  # every request begun after: version 2
        index = client.post("/v2/repository/index", json={"ready": True}).json()
        assert [(row["name"], row["version"], row["state"]) for row in index] == [("scale", "2", "READY")]


def test_a_version_that_fails_to_load_leaves_the_serving_one_in_place_with_the_reason(repo: Path) -> None:
    with serve(repo, model_control="explicit") as client:
        wait_ready(client)
        broken = repo / "scale" / "2"
        broken.mkdir()
        (broken / "model.onnx").write_bytes(b"not an onnx graph")
        r = client.post("/v2/repository/models/scale/load")
        assert r.status_code == 400, r.text
        assert r.json()["error_type"] == "model_load_failed"
        assert "2/model.onnx" in r.json()["error"] and str(repo) not in r.json()["error"]
        status, body = infer(client)
        assert status == 200 and body["model_version"] == "1" and factor_of(body) == 2.0
        (row,) = client.get("/v2/models").json()
        assert row["state"] == "READY" and row["version"] == "1" and "new load failed" in row["reason"]
        assert client.get("/v2/health/ready").status_code == 200


def test_an_unloaded_model_answers_503_until_it_is_loaded_back(repo: Path) -> None:
    with serve(repo, model_control="explicit") as client:
        wait_ready(client)
        r = client.post("/v2/repository/models/scale/unload")
        assert r.status_code == 200 and r.json()["state"] == "UNAVAILABLE" and r.json()["versions"] == []
        status, body = infer(client)
        assert status == 503 and body["error_type"] == "model_not_ready" and "UNAVAILABLE" in body["error"]
        assert client.post("/v2/repository/index", json={"ready": True}).json() == []
        r = client.post("/v2/repository/models/scale/load")
        assert r.status_code == 200 and r.json()["versions"] == ["1"]
        assert infer(client)[0] == 200


def test_a_load_can_override_model_json_fields_and_an_unknown_model_is_404(repo: Path) -> None:
    with serve(repo, model_control="explicit") as client:
        wait_ready(client)
        r = client.post("/v2/repository/models/scale/load", json={"parameters": {"config": '{"max_batch_size": 2}'}})
        assert r.status_code == 200, r.text
        assert client.get("/v2/models/scale").json()["parameters"]["max_batch_size"] == 2
        bad = client.post("/v2/repository/models/scale/load", json={"parameters": {"config": "{not json"}})
        assert bad.status_code == 400 and bad.json()["error_type"] == "invalid_input"
        missing = client.post("/v2/repository/models/..%2F..%2Fetc/load")
        assert missing.status_code == 404
        assert client.post("/v2/repository/models/nothing-here/load").status_code == 404


def test_a_load_with_no_content_type_as_tritonclient_sends_it_is_read_and_a_form_is_refused(repo: Path) -> None:
    """tritonclient's load_model posts '{}' (or its config) with no Content-Type; FastAPI's body
    parameter answered that with 422. A form or text Content-Type (what a page on another origin
    can send without a preflight) is refused with 415, not parsed."""
    with serve(repo, model_control="explicit") as client:
        wait_ready(client)
        config = b'{"parameters": {"config": "{\\"max_batch_size\\": 3}"}}'
        for body in (b"{}", b"", config):
            r = client.post("/v2/repository/models/scale/load", content=body)
            assert r.status_code == 200, (body, r.text)
        assert client.get("/v2/models/scale").json()["parameters"]["max_batch_size"] == 3
        r = client.post("/v2/repository/index", content=b'{"ready": true}')
        assert r.status_code == 200 and [row["name"] for row in r.json()] == ["scale"]
        for kind in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"):
            r = client.post("/v2/repository/models/scale/load", content=b"{}", headers={"content-type": kind})
            assert r.status_code == 415 and r.json()["error_type"] == "unsupported_media_type", (kind, r.text)
        assert infer(client)[0] == 200


def test_polling_loads_a_copied_in_version_and_unloads_a_removed_model_under_load(repo: Path) -> None:
    with serve(repo, model_control="poll", model_poll_interval_s=0.1) as client:
        wait_ready(client)
        assert client.post("/v2/repository/models/scale/load").status_code == 403  # the poller decides
        with Traffic(client) as traffic:
            time.sleep(0.3)
            write_model(repo, "scale", version=2, factor=3.0)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and client.get("/v2/models").json()[0].get("version") != "2":
                time.sleep(0.05)
            switched = time.monotonic()
            time.sleep(0.3)
        assert [r for r in traffic.records if r[1] != 200] == []
        assert {(r[2], r[3]) for r in traffic.records if r[0] > switched} == {("2", 3.0)}
        shutil.rmtree(repo / "scale")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and client.get("/v2/models").json()[0]["state"] != "UNAVAILABLE":
            time.sleep(0.05)
        (row,) = client.get("/v2/models").json()
        assert row["state"] == "UNAVAILABLE" and row["reason"] == "removed from the repository"
        assert infer(client)[0] == 503


def test_loading_and_unloading_need_the_admin_scope() -> None:
    assert scope_of("POST", "/v2/repository/models/mnist/load") == "admin"
    assert scope_of("POST", "/v2/repository/models/mnist/unload") == "admin"
    assert scope_of("POST", "/v2/repository/index") == "admin"
    assert scope_of("POST", "/v2/models/mnist/infer") == "infer"


def test_a_batch_size_that_warm_up_cannot_hold_is_refused_before_anything_loads(repo: Path) -> None:
    with serve(repo, model_control="explicit") as client:
        wait_ready(client)
        config = '{"max_batch_size": 100000000}'  # warm-up of 10^8 rows had the kernel kill the server
        r = client.post("/v2/repository/models/scale/load", json={"parameters": {"config": config}})
        assert r.status_code == 400 and r.json()["error_type"] == "model_load_failed"
        assert "max_batch_size" in r.json()["error"]
        assert infer(client)[0] == 200


def test_folders_that_are_not_plain_version_numbers_are_not_versions(repo: Path) -> None:
    (repo / "scale" / "²").mkdir()  # str.isdigit() says yes, int() says no
    write_model(repo, "scale", version=2, factor=3.0)
    (repo / "scale" / "2").rename(repo / "scale" / "02")
    with serve(repo, model_control="explicit") as client:
        wait_ready(client)
        r = client.post("/v2/repository/models/scale/load")
        assert r.status_code == 200 and r.json()["versions"] == ["1"]


def test_a_new_default_takes_over_from_an_unloaded_one(repo: Path) -> None:
    for name in ("first", "second"):
        rgb_classifier(repo, name, default=name == "first")
    with serve(repo, model_control="explicit", require_all_models=False) as client:
        wait_ready(client)
        assert client.post("/v2/repository/models/first/unload").status_code == 200
        override = '{"default": true}'
        r = client.post("/v2/repository/models/second/load", json={"parameters": {"config": override}})
        assert r.status_code == 200, r.text
        defaults = {row["name"] for row in client.get("/v2/models").json() if row["default"]}
        assert defaults == {"second"}


def test_a_new_model_that_fails_to_load_does_not_take_the_replica_out_of_service(repo: Path) -> None:
    with serve(repo, model_control="explicit") as client:
        wait_ready(client)
        broken = repo / "broken"
        broken.mkdir()
        (broken / "model.json").write_text("{bad")
        r = client.post("/v2/repository/models/broken/load")
        assert r.status_code == 400 and r.json()["error_type"] == "model_load_failed"
        assert client.get("/v2/health/ready").status_code == 200
        states = {row["name"]: row["state"] for row in client.get("/v2/models").json()}
        assert states == {"scale": "READY", "broken": "FAILED"}


def test_reloading_a_model_again_and_again_gives_its_memory_back(tmp_path: Path) -> None:
    # A retired version's memory (onnxruntime's arenas, freed to malloc) went back to the system
    # only with a trim: without it the server grew by 100-165 MB per reload of the language model.
    from bench.harness import neuroserve

    shutil.copytree(ROOT / "models" / "text-generator", tmp_path / "text-generator")

    def rss_mb(pid: int) -> float:
        line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS"))
        return int(line.split()[1]) / 1024

    with neuroserve(tmp_path, NEUROSERVE_MODEL_CONTROL="explicit") as server:
        sizes = []
        for _ in range(5):
            status, answer, _ = server.request("POST", "/v2/repository/models/text-generator/load", timeout=120)
            assert status == 200, answer
            time.sleep(1.0)  # the retired version drains and closes in the background
            sizes.append(rss_mb(server.proc.pid))
        assert max(sizes[1:]) - sizes[0] < 60, sizes  # after the first reload, flat
