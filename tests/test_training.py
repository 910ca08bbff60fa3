"""Training smoke run on the real data format: a small subset, one epoch, ONNX export that passes
the parity check, and a repository folder that the service then serves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import make_client, wait_ready

pytestmark = pytest.mark.slow


def test_image_classification_smoke_training_exports_a_servable_model(data_dir: Path, tmp_path: Path) -> None:
    from training import image_classification

    meta = image_classification.main(
        [
            "--smoke",
            "--data-dir",
            str(data_dir / "image_classification" / "mnist"),
            "--output-dir",
            str(tmp_path),
            "--version",
            "3",
            "--seed",
            "7",
        ]
    )
    version_dir = tmp_path / "mnist" / "3"
    assert (version_dir / "model.onnx").is_file()
    saved = json.loads((version_dir / "metadata.json").read_text())
    assert saved == meta
    assert saved["metrics"]["test_examples"] == 512
    assert 0.0 <= saved["metrics"]["test_accuracy"] <= 1.0
    assert saved["metrics"]["onnx_vs_torch_max_abs_diff"] < 1e-4
    assert "--smoke" in saved["training"]["command"]
    spec = json.loads((tmp_path / "mnist" / "model.json").read_text())
    assert spec["labels"] == [str(d) for d in range(10)]

    with make_client(repository=tmp_path) as client:
        wait_ready(client)
        meta = client.get("/v2/models/mnist").json()
        assert meta["versions"] == ["3"]
        body = {"inputs": [{"name": "image", "shape": [3, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 2352}]}
        response = client.post("/v2/models/mnist/infer", json=body)
        assert response.status_code == 200 and response.json()["outputs"][0]["shape"] == [3, 10]


def test_training_reads_idx_files_and_rejects_other_files(tmp_path: Path, data_dir: Path) -> None:
    import gzip

    from training.idx import read_idx
    from training.image_classification import load_split

    x, y = load_split(data_dir / "image_classification" / "mnist", "test")
    assert tuple(x.shape) == (10000, 1, 28, 28) and tuple(y.shape) == (10000,)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    bogus = tmp_path / "bogus.gz"
    with gzip.open(bogus, "wb") as fh:
        fh.write(b"\x00\x00\x00\x07" + b"\x00" * 12)
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(bogus)
