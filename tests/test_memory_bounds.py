"""Memory that cannot be amplified: small files that decode to gigabytes are refused from their
headers, and what is accepted decodes one image at a time; the server's own peak is measured."""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from bench.harness import multipart, neuroserve
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def blank_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side), 255).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def post_files(server, path: str, files: list[tuple[str, bytes]]) -> tuple[int, dict, float]:
    import http.client
    import json

    body, content_type = multipart(files)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    started = time.perf_counter()
    conn.request("POST", path, body=body, headers={"content-type": content_type})
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    return response.status, data, time.perf_counter() - started


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("repo")
    for model in ("mnist", "digit-detector"):
        shutil.copytree(ROOT / "models" / model, repo / model)
    with neuroserve(repo) as running:
        yield running


def test_64_blank_6000px_pngs_are_refused_from_their_headers_without_a_spike(server) -> None:
    png = blank_png(6000)
    assert len(png) < 100_000  # a 2-6 MB request body that would decode to 2.3 gigapixels
    before = memory_kib(server.proc.pid)
    status, body, seconds = post_files(server, "/v1/image-classification", [(f"{i}.png", png) for i in range(64)])
    after = memory_kib(server.proc.pid)
    assert status == 413 and body["error_type"] == "image_too_large", body
    assert "per request" in body["error"] and seconds < 2.0
    assert after["VmHWM"] - before["VmHWM"] < 64 * 1024, (before, after)  # no decode happened


def test_an_accepted_large_request_decodes_one_image_at_a_time_and_gives_memory_back(server) -> None:
    png = blank_png(4000)  # 16 megapixels each; three of them fit the 48-megapixel budget
    before = memory_kib(server.proc.pid)
    status, body, _ = post_files(server, "/v1/image-classification", [(f"{i}.png", png) for i in range(3)])
    assert status == 200 and len(body["predictions"]) == 3, body
    status, body, _ = post_files(server, "/v1/object-detection", [("a.png", png)])
    assert status == 200 and body["images"][0]["width"] == 4000, body
    after = memory_kib(server.proc.pid)
    # One 16-megapixel grey image and its working copies at a time: far below the 3 x 16 MB x
    # (grey + float32) the request would hold if its images were decoded together.
    assert after["VmHWM"] - before["VmHWM"] < 200 * 1024, (before, after)
    assert after["VmRSS"] - before["VmRSS"] < 60 * 1024, (before, after)  # handed back, not kept


def test_the_models_share_one_memory_arena_so_a_replica_starts_smaller() -> None:
    # Each session's own arena kept what its warm-up's largest batch needed (the detector's 153 MB,
    # the face embedder's 76 MB, sentiment's 61 MB ...); one shared arena holds what the largest
    # runs need at once. Measured: 625 against 834 MiB, every committed model (python -m bench.arena).
    def ready_rss_mib(arena: str) -> float:
        with neuroserve(ROOT / "models", NEUROSERVE_CPU_MEMORY_ARENA=arena) as running:
            return memory_kib(running.proc.pid)["VmRSS"] / 1024

    shared, per_model = ready_rss_mib("shared"), ready_rss_mib("per-model")
    assert shared < per_model - 100, (shared, per_model)


def test_unloading_a_model_gives_its_share_of_the_arena_back(tmp_path: Path) -> None:
    # The detector's warm-up at batch 16 takes about 150 MiB of the shared arena. The arena
    # outlives the model, so after unloading, a run of a model still loaded shrinks it (measured:
    # 289 -> 125 MiB; with a session's own arena, as before, 306 -> 302 MiB two seconds later).
    for model in ("digit-detector", "mnist"):
        shutil.copytree(ROOT / "models" / model, tmp_path / model)
    with neuroserve(tmp_path, NEUROSERVE_MODEL_CONTROL="explicit") as running:
        before = memory_kib(running.proc.pid)["VmRSS"]
        status, answer, _ = running.request("POST", "/v2/repository/models/digit-detector/unload", timeout=60)
        assert status == 200, answer
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and before - memory_kib(running.proc.pid)["VmRSS"] < 100 * 1024:
            time.sleep(0.2)
        assert before - memory_kib(running.proc.pid)["VmRSS"] >= 100 * 1024, before
        zeros = {"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}
        status, answer, _ = running.request("POST", "/v2/models/mnist/infer", body=zeros, timeout=30)
        assert status == 200, answer  # the model that ran the shrink still serves
