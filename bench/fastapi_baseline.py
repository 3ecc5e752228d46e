"""The plain baseline for bench/serve.py: one plaintext ONNX model behind a minimal FastAPI app on uvicorn,
speaking just enough of the Open Inference Protocol (ready, metadata, infer with the binary tensor
extension) for the same tritonclient load generator. No batching, no TLS, no checks beyond the shape.

    python bench/fastapi_baseline.py MODEL.onnx NAME PORT
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request, Response

HEADER = "Inference-Header-Content-Length"


def build(path: str, name: str) -> FastAPI:
    session = ort.InferenceSession(path)
    inp, out = session.get_inputs()[0], session.get_outputs()[0]
    app = FastAPI()

    @app.get("/v2/health/ready")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.get(f"/v2/models/{name}")
    def metadata() -> dict[str, object]:
        shape = [-1 if not isinstance(d, int) else d for d in inp.shape]
        return {"name": name, "versions": ["1"], "platform": "onnxruntime_onnx",
                "inputs": [{"name": inp.name, "datatype": "FP32", "shape": shape}],
                "outputs": [{"name": out.name, "datatype": "FP32", "shape": [-1, *out.shape[1:]]}]}  # fmt: skip

    @app.post(f"/v2/models/{name}/infer")
    async def infer(request: Request) -> Response:
        body = await request.body()
        n = int(request.headers.get(HEADER, len(body)))
        header = json.loads(body[:n])
        spec = header["inputs"][0]
        if n < len(body):
            array = np.frombuffer(body[n:], dtype=np.float32).reshape(spec["shape"])
        else:
            array = np.asarray(spec["data"], dtype=np.float32).reshape(spec["shape"])
        result = session.run([out.name], {inp.name: array})[0]
        raw = result.tobytes()
        meta = json.dumps({"model_name": name, "model_version": "1", "outputs": [
            {"name": out.name, "datatype": "FP32", "shape": list(result.shape),
             "parameters": {"binary_data_size": len(raw)}}]}).encode()  # fmt: skip
        return Response(meta + raw, media_type="application/octet-stream", headers={HEADER: str(len(meta))})

    return app


if __name__ == "__main__":
    uvicorn.run(build(sys.argv[1], sys.argv[2]), host="127.0.0.1", port=int(sys.argv[3]), log_level="warning")
