from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from training.idx import load_mnist

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--data-dir",
        default=os.environ.get("NEUROSERVE_TEST_DATA", str(ROOT.parent / "shared" / "data")),
        help="folder with the datasets (default: $NEUROSERVE_TEST_DATA or ../shared/data)",
    )


@pytest.fixture(scope="session")
def data_dir(request: pytest.FixtureRequest) -> Path:
    path = Path(request.config.getoption("--data-dir"))
    if not path.is_dir():
        pytest.skip(f"datasets not found at {path} (pass --data-dir or set NEUROSERVE_TEST_DATA)")
    return path


@pytest.fixture(scope="session")
def mnist_test(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return load_mnist(data_dir / "image_classification" / "mnist", "test")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def wait_ready(client: TestClient, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        finished = client.app.state.registry.loading_done.is_set()  # read before asking, or it races
        if client.get("/v2/health/ready").status_code == 200:
            return
        if finished:
            break
        time.sleep(0.05)
    raise AssertionError(f"server not ready: {client.get('/v2/health/ready').json()}")


def wait_loaded(client: TestClient) -> None:
    """Until every model has been tried (loaded, warmed or FAILED): for repositories with broken
    models, where the server is, by default, rightly never ready."""
    client.portal.call(client.app.state.registry.loading_done.wait)


# Removed when the test run's interpreter exits: one folder per app under it (a run makes about 140).
_GALLERIES = tempfile.TemporaryDirectory(prefix="neuroserve-galleries-")


def make_client(**overrides) -> TestClient:
    # Each app's face gallery in a folder of its own (the default, data/, is the working directory's).
    gallery = Path(tempfile.mkdtemp(prefix="gallery-", dir=_GALLERIES.name)) / "gallery.sqlite3"
    settings = Settings(**{"repository": ROOT / "models", "log_json": False, "gallery_path": gallery, **overrides})
    return TestClient(create_app(settings))


@pytest.fixture(scope="session")
def client() -> TestClient:
    """The committed model repository, served in-process (loaded and warmed once per run)."""
    with make_client() as c:
        wait_ready(c)
        yield c
