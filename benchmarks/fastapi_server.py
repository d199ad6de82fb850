"""Plain FastAPI + uvicorn, one process, serving the ONNX model: the no-Ray baseline.

    python -m benchmarks.fastapi_server MODEL.onnx --port 8123

Binds 127.0.0.1 only; ``POST /predict`` takes ``{"instances": [[...]]}`` and answers
``{"predictions": [...]}``, with one onnxruntime thread like the Serve replicas.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
from fastapi import FastAPI, Request

ROUTE = "/predict"


def create_app(onnx_path: Path) -> FastAPI:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(onnx_path.read_bytes(), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    app = FastAPI()

    @app.post(ROUTE)
    async def predict(request: Request) -> dict[str, Any]:
        body = await request.json()
        rows = np.asarray(body["instances"], dtype=np.float32)
        return {"predictions": session.run([output_name], {input_name: rows})[0].tolist()}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="ONNX model file")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.model), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
