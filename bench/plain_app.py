"""The baseline to beat: a plain FastAPI app that runs onnxruntime once per request, on the event
loop, with no batching and no queue. Same model, same v2 JSON request and response.

    uvicorn bench.plain_app:app --port 8001   (MODEL=models/mnist/1/model.onnx)
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request

_options = ort.SessionOptions()
_options.intra_op_num_threads = int(os.environ.get("THREADS", "0"))
session = ort.InferenceSession(
    os.environ.get("MODEL", "models/mnist/1/model.onnx"), _options, providers=["CPUExecutionProvider"]
)
app = FastAPI()


@app.post("/v2/models/{model}/infer")
async def infer(model: str, request: Request) -> dict:
    body = await request.json()
    feeds = {t["name"]: np.asarray(t["data"], dtype=np.float32).reshape(t["shape"]) for t in body["inputs"]}
    outputs = session.run(None, feeds)
    names = [o.name for o in session.get_outputs()]
    return {
        "model_name": model,
        "outputs": [
            {"name": n, "datatype": "FP32", "shape": list(o.shape), "data": o.ravel().tolist()}
            for n, o in zip(names, outputs, strict=True)
        ],
    }
