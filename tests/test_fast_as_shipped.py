"""What makes the default configuration fast (bench/run.py measures it): the v2 infer route served
straight from the request guard, the access log written off the event loop, the loaded heap out of
the garbage collector's reach, one onnxruntime thread per core beyond the event loop's, cheap
request ids. Each keeps the behaviour it replaced."""

from __future__ import annotations

import gc
import io
import json
import logging

import numpy as np
from fastapi.testclient import TestClient

from service import logs
from service.api.routes import v2
from service.config import Settings

INFER = "/v2/models/mnist/infer"


def digits_body(images: np.ndarray) -> dict:
    x = (images.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def test_v2_infer_answers_the_same_on_the_fast_path_as_through_every_middleware(client: TestClient, mnist_test) -> None:
    images, labels = mnist_test
    body = digits_body(images[:8])
    fast = client.post(INFER, json=body, headers={"accept-encoding": "identity"})
    slow = client.post(INFER, json=body, headers={"accept-encoding": "gzip"})
    assert fast.status_code == slow.status_code == 200
    assert fast.json()["outputs"] == slow.json()["outputs"]
    assert "content-encoding" not in fast.headers
    assert fast.headers["x-batch-size"] and fast.headers["x-request-id"]
    predicted = np.argmax(np.asarray(fast.json()["outputs"][0]["data"]).reshape(8, 10), axis=1)
    assert (predicted == labels[:8]).mean() >= 0.875


def test_the_fast_path_takes_only_infer_posts_from_clients_that_do_not_ask_for_gzip() -> None:
    dispatch = v2.fast_path({v2.HTTPException: object()})

    def scope(method: str, path: str, encoding: bytes = b"identity") -> dict:
        return {"type": "http", "method": method, "path": path, "headers": [(b"accept-encoding", encoding)]}

    assert dispatch(scope("POST", "/v2/models/mnist/infer")) is not None
    assert dispatch(scope("POST", "/v2/models/mnist/versions/1/infer")) is not None
    assert dispatch(scope("POST", "/v2/models/mnist/infer", b"gzip, deflate, br")) is None
    assert dispatch(scope("GET", "/v2/models/mnist/infer")) is None
    assert dispatch(scope("POST", "/v1/image-classification")) is None
    taken = scope("POST", "/v2/models/mnist/infer")
    dispatch(taken)
    assert taken["path_params"] == {"model": "mnist"} and taken["route"].path == "/v2/models/{model}/infer"


def test_fast_path_requests_are_counted_under_their_route_template(client: TestClient, mnist_test) -> None:
    series = 'neuroserve_http_requests_total{method="POST",route="/v2/models/{model}/infer",status="200"}'

    def count() -> float:
        line = next((ln for ln in client.get("/metrics").text.splitlines() if ln.startswith(series)), None)
        return float(line.split()[-1]) if line else 0.0

    before = count()
    for _ in range(3):
        client.post(INFER, json=digits_body(mnist_test[0][:1]), headers={"accept-encoding": "identity"})
    assert count() == before + 3


def test_the_access_log_is_written_by_its_own_thread_with_each_request_id(client: TestClient, mnist_test) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    writer = logs.configure("info", json_lines=True, stream=stream)
    try:
        ids = []
        for i in range(5):
            answer = client.post(
                INFER,
                json=digits_body(mnist_test[0][i : i + 1]),
                headers={"accept-encoding": "identity", "x-request-id": f"test-{i}"},
            )
            ids.append(answer.headers["x-request-id"])
        client.post(INFER, content=b"{", headers={"x-request-id": "broken-one"})
    finally:
        writer.stop()
        logs._writer = None
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = {line["request_id"]: line for line in lines if line["logger"] == "neuroserve.access"}
    assert ids == [f"test-{i}" for i in range(5)]
    for request_id in ids:
        line = access[request_id]
        assert line["message"] == f"POST {INFER} 200" and line["status"] == 200 and line["duration_ms"] > 0
        assert line["route"] == "/v2/models/{model}/infer"
    assert access["broken-one"]["status"] == 400


def test_the_writer_writes_what_is_queued_when_stopped_and_survives_a_bad_record() -> None:
    stream = io.StringIO()
    writer = logs.LogWriter(stream, logs.PlainFormatter("%(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    writer.start()
    record = logging.makeLogRecord({"msg": "%d things", "args": ("not a number",), "levelname": "INFO"})
    writer.queue.put(record)
    for i in range(200):
        writer.queue.put((0.0, logging.INFO, "GET", f"/x/{i}\nforged", 200, {"request_id": f"r{i}"}))
    writer.stop()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 201 and lines[0].startswith("(unformattable log record")
    assert lines[-1] == "INFO neuroserve.access [r199]: GET /x/199\\nforged 200"


def test_request_ids_are_unique_and_a_clients_sane_id_is_kept(client: TestClient) -> None:
    made = {client.get("/v2/health/live").headers["x-request-id"] for _ in range(200)}
    assert len(made) == 200 and all(len(i) == 32 for i in made)
    assert client.get("/v2/health/live", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    bad = client.get("/v2/health/live", headers={"x-request-id": "a b\tc"}).headers["x-request-id"]
    assert bad != "a b\tc" and len(bad) == 32


def test_the_loaded_heap_is_frozen_out_of_the_collectors_reach(client: TestClient) -> None:
    # Every object alive once the models are loaded: FastAPI, pydantic, numpy, onnx, the models.
    assert gc.get_freeze_count() > 100_000


def test_onnxruntime_gets_one_thread_per_core_beyond_the_event_loops(monkeypatch) -> None:
    for cores, threads in ((1, 1), (2, 1), (4, 3), (16, 15)):
        monkeypatch.setattr(Settings, "cpu_cores", staticmethod(lambda cores=cores: cores))
        assert Settings().intra_op_threads_or_default() == threads
    assert Settings(intra_op_threads=0).intra_op_threads_or_default() == 0  # onnxruntime's own choice
    assert Settings(intra_op_threads=2).intra_op_threads_or_default() == 2


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def test_small_images_decode_on_the_event_loop_and_large_or_broken_ones_on_worker_threads() -> None:
    from service.api.images import decode_inline

    settings = Settings()
    digit = png(np.zeros((28, 28), np.uint8))
    assert decode_inline([("a.png", digit)] * 8, settings)
    assert not decode_inline([("big.png", png(np.zeros((600, 600), np.uint8)))], settings)
    assert not decode_inline([("a.png", digit)] * 100, Settings(inline_decode_pixels=28 * 28 * 99))
    assert not decode_inline([("broken.png", b"not an image")], settings)
    assert not decode_inline([("padded.png", digit + b"\0" * 9_000)], settings)  # bytes bound it too


def test_a_digit_is_classified_the_same_decoded_inline_or_on_a_worker_thread(mnist_test, tmp_path) -> None:
    from tests.conftest import ROOT, make_client, wait_ready

    (tmp_path / "mnist").symlink_to(ROOT / "models" / "mnist")
    images, _ = mnist_test
    files = [("files", (f"{i}.png", png(images[i]), "image/png")) for i in range(4)]
    answers = []
    for pixels in (65_536, 0):  # 0: every request goes to a worker thread
        with make_client(inline_decode_pixels=pixels, repository=tmp_path) as client:
            wait_ready(client)
            response = client.post("/v1/image-classification", files=files)
            assert response.status_code == 200, response.text
            answers.append(response.json()["predictions"])
    assert answers[0] == answers[1]


def test_a_stalled_log_reader_costs_a_count_not_memory() -> None:
    writer = logs.LogWriter(io.StringIO(), logs.JsonFormatter())  # not started: nothing is written
    for i in range(logs.MAX_QUEUED + 5):
        writer.put((0.0, logging.INFO, "GET", f"/{i}", 404, {"request_id": str(i)}))
    assert writer.queue.qsize() == logs.MAX_QUEUED and writer.dropped == 5
    writer.start()
    writer.stop()
    first = json.loads(writer.stream.getvalue().splitlines()[0])
    assert first["level"] == "warning" and first["message"].startswith("5 log lines dropped")


def test_a_warning_is_written_at_once_and_flush_writes_everything_queued(monkeypatch) -> None:
    import time

    monkeypatch.setattr(logs, "GATHER_S", 30.0)  # an ordinary line would wait this long
    stream = io.StringIO()
    writer = logs.LogWriter(stream, logs.PlainFormatter("%(levelname)s %(message)s"))
    writer.start()
    try:
        writer.put(logging.makeLogRecord({"msg": "disk full", "levelname": "WARNING", "levelno": 30}), urgent=True)
        deadline = time.monotonic() + 5
        while "disk full" not in stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stream.getvalue() == "WARNING disk full\n"
        writer.put((0.0, logging.INFO, "GET", "/later", 200, {"request_id": "r"}))
        writer.flush()
        assert stream.getvalue().endswith("GET /later 200\n") and writer.is_alive()
    finally:
        writer.stop()


def test_an_access_line_keeps_at_most_a_kilobyte_of_path(monkeypatch) -> None:
    writer = logs.LogWriter(io.StringIO(), logs.JsonFormatter())
    monkeypatch.setattr(logs, "_writer", writer)
    logs.log_request(logging.WARNING, "GET", "/x" * 30_000, 404, {"request_id": "r"})
    (_, _, _, path, _, _) = writer.queue.get_nowait()
    assert len(path) == logs.MAX_PATH_CHARS + 3 and path.endswith("...")


def test_the_cpu_quota_of_a_container_bounds_the_cores(tmp_path) -> None:
    from service.config import _cgroup_cpu_quota

    cpu_max = tmp_path / "cpu.max"
    for text, cores in (("200000 100000", 2), ("150000 100000", 2), ("max 100000", None), ("garbage", None)):
        cpu_max.write_text(text)
        assert _cgroup_cpu_quota(cpu_max) == cores
    assert _cgroup_cpu_quota(tmp_path / "absent") is None


def test_a_small_image_never_waits_for_the_decode_slots_that_large_ones_hold(mnist_test, tmp_path) -> None:
    import threading

    from tests.conftest import ROOT, make_client, wait_ready

    (tmp_path / "mnist").symlink_to(ROOT / "models" / "mnist")
    with make_client(repository=tmp_path, image_decode_slots=2) as client:
        wait_ready(client)
        slots = client.app.state.decode_slots
        held = [slots.acquire(timeout=5) for _ in range(2)]  # as two workers decoding large photos would
        answers: list = []
        try:
            files = [("files", ("digit.png", png(mnist_test[0][0]), "image/png"))]
            url = "/v1/image-classification"
            asker = threading.Thread(target=lambda: answers.append(client.post(url, files=files)))
            asker.start()
            asker.join(10)
            assert all(held) and answers and answers[0].status_code == 200
        finally:
            for _ in held:
                slots.release()


def test_every_route_dependency_runs_on_the_event_loop_without_a_thread_hop(client: TestClient) -> None:
    # FastAPI runs a plain-function dependency in its thread pool; for the registry and settings
    # lookups that hop cost 19 % of the loop at 512 connections (py-spy). So every dependency of
    # every route is a coroutine function.
    import inspect

    from fastapi.routing import APIRoute

    def calls(dependant) -> list:  # type: ignore[no-untyped-def]
        return [d.call for d in dependant.dependencies] + [c for d in dependant.dependencies for c in calls(d)]

    def api_routes(routes) -> list[APIRoute]:  # type: ignore[no-untyped-def]
        found = []
        for r in routes:
            if isinstance(r, APIRoute):
                found.append(r)
            elif getattr(r, "original_router", None) is not None:  # FastAPI 0.165's included routers
                found += api_routes(r.original_router.routes)
        return found

    routes = api_routes(client.app.routes)
    found = [call for route in routes for call in calls(route.dependant)]
    assert len(routes) > 20 and found, "routes with dependencies were expected"
    sync = {getattr(c, "__qualname__", repr(c)) for c in found if not inspect.iscoroutinefunction(c)}
    assert not sync, f"dependencies run in the thread pool: {sorted(sync)}"


def test_texts_are_tokenised_one_by_one_exactly_as_the_batch_call_would() -> None:
    # encode_each (per text) replaced encode_batch, whose thread pool waited for a core under load.
    from pathlib import Path

    from tokenizers import Tokenizer

    from service.tasks.assets import encode_each

    root = Path(__file__).resolve().parents[1] / "models"
    texts = ["Where is the train station?", "", "  spaces  ", "Ünïcödé café 東京 🙂", "a" * 3000, "\x00\x1f"]
    for path in (root / "translation-en-fr" / "1" / "tokenizer.json", *root.glob("sentiment*/1/*.json")):
        if path.name == "metadata.json":
            continue
        tokenizer = Tokenizer.from_file(str(path))
        one_by_one, batched = encode_each(tokenizer, texts), tokenizer.encode_batch(texts)
        assert [e.ids for e in one_by_one] == [e.ids for e in batched], path
        assert [e.offsets for e in one_by_one] == [e.offsets for e in batched], path


def test_models_are_warmed_at_powers_of_two_and_their_largest_batch() -> None:
    from service.registry import warm_sizes

    assert warm_sizes(1) == [1]
    assert warm_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert warm_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    assert len(warm_sizes(2048)) == 12  # the rating model: 12 runs, not 2,048
