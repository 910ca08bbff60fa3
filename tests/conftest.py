from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings

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
    folder = data_dir / "image_classification" / "mnist"
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    return images, labels


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def wait_ready(client: TestClient, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = client.get("/v2/health/ready")
        if response.status_code == 200:
            return
        if client.app.state.registry.loading_done.is_set():
            break
        time.sleep(0.05)
    raise AssertionError(f"server not ready: {client.get('/v2/health/ready').json()}")


def make_client(**overrides) -> TestClient:
    settings = Settings(**{"repository": ROOT / "models", "log_json": False, **overrides})
    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def client() -> TestClient:
    """The committed model repository, served in-process."""
    with make_client() as c:
        wait_ready(c)
        yield c
