"""Object-detection serving benchmark, every configuration in one run (compare within a run):

1. the raw in-process onnxruntime ceiling of the committed detector, batch 1 to 16;
2. where suppression runs: the served graph (decoding in the graph, top 100) followed by the
   service's vectorised numpy post-processing (score threshold, class-wise IoU suppression),
   against the same graph extended with ONNX ``NonMaxSuppression`` (class-wise, thresholds as graph
   inputs, so still per request) whose selected indices are then gathered; per batch of real scenes;
3. ``/v1/object-detection`` over HTTP with wrk (one held-out scene as multipart PNG per request) at
   each concurrency, batching off (``max_batch_size`` 1) and on.

    python -m bench.object_detection [--duration 10] [--concurrency 1 16 64] [--threads 2]
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from PIL import Image

from bench.harness import format_table, load_arguments, measure, neuroserve, raw_ceiling, write_multipart
from service.tasks import object_detection as task
from training.digit_scenes import makers

MODEL = "digit-detector"


def with_nms(source: Path, target: Path, n_classes: int) -> None:
    """The detector graph plus class-wise ONNX NonMaxSuppression over its top-k detections: extra
    inputs ``max_per_class`` [1] int64, ``iou_threshold`` [1], ``score_threshold`` [1]; extra output
    ``selected`` [n, 3] (image, class, detection index)."""
    model = onnx.load(str(source))
    g = model.graph
    g.initializer.append(helper.make_tensor("class_ids", TensorProto.INT64, [1, n_classes, 1], list(range(n_classes))))
    g.initializer.append(helper.make_tensor("axis1", TensorProto.INT64, [1], [1]))
    g.node.extend(
        [
            helper.make_node("Unsqueeze", ["classes", "axis1"], ["classes_1"]),  # [B, 1, K]
            helper.make_node("Equal", ["classes_1", "class_ids"], ["is_class"]),  # [B, C, K]
            helper.make_node("Cast", ["is_class"], ["is_class_f"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["scores", "axis1"], ["scores_1"]),
            helper.make_node("Mul", ["is_class_f", "scores_1"], ["class_scores"]),  # [B, C, K], 0 off-class
            helper.make_node(
                "NonMaxSuppression",
                ["boxes", "class_scores", "max_per_class", "iou_threshold", "score_threshold"],
                ["selected"],
            ),
        ]
    )
    g.input.extend(
        [
            helper.make_tensor_value_info("max_per_class", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("iou_threshold", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("score_threshold", TensorProto.FLOAT, [1]),
        ]
    )
    g.output.append(helper.make_tensor_value_info("selected", TensorProto.INT64, ["n", 3]))
    onnx.checker.check_model(model)
    onnx.save(model, str(target))


def postprocess_comparison(
    graph: Path, scenes: list[np.ndarray], size: int, pad: float, threads: int, seconds: float
) -> list[dict]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    plain = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    nms_path = graph.with_name("model-nms.onnx")
    with_nms(graph, nms_path, 10)
    nms = ort.InferenceSession(str(nms_path), options, providers=["CPUExecutionProvider"])
    boxed = [task.letterbox(Image.fromarray(s), size, pad)[0] for s in scenes]
    params = {
        "max_per_class": np.array([100], np.int64),
        "iou_threshold": np.array([0.5], np.float32),
        "score_threshold": np.array([0.4], np.float32),
    }

    def numpy_path(x: np.ndarray) -> tuple[float, int]:
        boxes, scores, classes = plain.run(None, {"images": x})
        graph_done = time.perf_counter()
        kept = 0
        for b, s, c in zip(boxes, scores, classes, strict=True):
            keep = s >= 0.4
            kept += len(task.suppress(b[keep], s[keep], c[keep], 0.5)[0])
        return time.perf_counter() - graph_done, kept

    def graph_path(x: np.ndarray) -> tuple[float, int]:
        boxes, scores, classes, selected = nms.run(None, {"images": x, **params})
        started = time.perf_counter()
        image, index = selected[:, 0], selected[:, 2]
        chosen = (boxes[image, index], scores[image, index], classes[image, index])  # what the service reads
        return time.perf_counter() - started, len(chosen[0])

    rows = []
    for batch in (1, 16):
        x = np.stack((boxed * batch)[:batch])
        for label, run, session_feeds in (
            ("graph + numpy suppression", numpy_path, {"images": x}),
            ("graph with ONNX NonMaxSuppression", graph_path, {"images": x, **params}),
        ):
            session = plain if run is numpy_path else nms
            run(x)  # warm up
            total = post = 0.0
            runs = 0
            started = time.perf_counter()
            while (time.perf_counter() - started) < seconds or runs < 5:
                t0 = time.perf_counter()
                post_s, kept = run(x)
                total += time.perf_counter() - t0
                post += post_s
                runs += 1
            graph_only = min(_time(session, session_feeds) for _ in range(3))
            rows.append(
                {
                    "where": label,
                    "batch": batch,
                    "ms_per_batch": 1000 * total / runs,
                    "graph_ms": 1000 * graph_only,
                    "postprocess_ms": 1000 * post / runs if run is numpy_path else None,
                    "detections_kept": kept,
                }
            )
    return rows


def _time(session: ort.InferenceSession, feeds: dict) -> float:
    started = time.perf_counter()
    session.run(None, feeds)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    p = load_arguments(__doc__)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads, same everywhere")
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")

    spec = json.loads((args.repository / MODEL / "model.json").read_text())
    size, pad = spec["parameters"]["input_size"], spec["parameters"]["pad_value"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-det-"))
    repo = tmp / "repo"
    repo.mkdir()
    (repo / MODEL).symlink_to((args.repository / MODEL).resolve())
    maker = makers(args.data_dir, 1)["test"]
    scenes = [maker.scene(i)[0] for i in range(16)]
    newest = max((p for p in (args.repository / MODEL).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    onnx_path = newest / "model.onnx"

    print(f"raw onnxruntime ceiling ({onnx_path}, {args.threads} intra-op thread(s)):", flush=True)
    ceiling = raw_ceiling(onnx_path, args.threads, batches=(1, 2, 4, 8, 16))
    for row in ceiling:
        print(f"  batch {row['batch']:>3}: {row['ms_per_batch']:8.2f} ms/batch  {row['images_per_s']:7.1f} images/s")

    print("\nwhere suppression runs (real scenes, score 0.4, IoU 0.5):", flush=True)
    local = tmp / "graph"
    local.mkdir()
    shutil.copy(onnx_path, local / "model.onnx")
    post = postprocess_comparison(local / "model.onnx", scenes, size, pad, args.threads, max(1.0, args.duration / 5))
    for row in post:
        extra = f"  of which numpy {row['postprocess_ms']:.3f} ms" if row["postprocess_ms"] is not None else ""
        print(f"  {row['where']:<36} batch {row['batch']:>2}: {row['ms_per_batch']:7.2f} ms{extra}")

    png = io.BytesIO()
    Image.fromarray(scenes[0]).save(png, "PNG")
    body = tmp / "scene.multipart"
    ctype = write_multipart(body, [("scene.png", png.getvalue())])
    h, w = scenes[0].shape[:2]
    print(f"\n/v1/object-detection, one {w}x{h} PNG scene per request:", flush=True)
    http: list[dict] = []
    for label, env in (
        ("neuroserve, batching off", {"NEUROSERVE_MAX_BATCH_SIZE": "1"}),
        ("neuroserve, batching on, delay 0", {"NEUROSERVE_MAX_QUEUE_DELAY_MS": "0"}),
        ("neuroserve, batching on, delay 5 ms", {"NEUROSERVE_MAX_QUEUE_DELAY_MS": "5"}),
    ):
        with neuroserve(repo, label=label, NEUROSERVE_INTRA_OP_THREADS=str(args.threads), **env) as server:
            http += measure(server, "/v1/object-detection", body, ctype, args.concurrency, args.duration, MODEL)

    results = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.object_detection " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu_count": os.cpu_count(),
        "model": str(onnx_path),
        "raw_onnxruntime": ceiling,
        "postprocessing": post,
        "http": http,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"object-detection-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(results, indent=2))
    print("\n### /v1/object-detection (multipart PNG)\n")
    print(format_table(http, server_side=True))
    print(f"\nwritten to {out}")
    return results


if __name__ == "__main__":
    main()
