"""KServe's own REST client against a server: run with a Python that has ``kserve`` installed (the
test's separate venv; KServe's pins do not fit ours), it prints one JSON object of what it saw.

    python kserve_client.py http://127.0.0.1:8000 MODEL ROWS_JSON
"""

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig


async def main(base_url: str, model: str, rows: list[list[float]]) -> dict:
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    seen: dict = {}
    try:
        seen["live"] = await client.is_server_live(base_url)
        seen["ready"] = await client.is_server_ready(base_url)
        seen["model_ready"] = await client.is_model_ready(base_url, model)
        seen["unknown_model_ready"] = await client.is_model_ready(base_url, model + "-nowhere")
        array = np.asarray(rows, dtype=np.float32)
        for binary in (False, True):
            tensor = InferInput(name="input", shape=list(array.shape), datatype="FP32")
            tensor.set_data_from_numpy(array, binary_data=binary)
            request = InferRequest(model_name=model, infer_inputs=[tensor], request_id=f"kserve-{binary}")
            headers: dict = {}
            response = await client.infer(base_url, request, model_name=model, response_headers=headers)
            (output,) = response.outputs
            seen["binary" if binary else "json"] = {
                "id": response.id,
                "model_name": response.model_name,
                "variant": headers.get("x-ray-deploy-variant"),  # KServe's response drops model_version
                "output": output.name,
                "datatype": output.datatype,
                "predictions": output.as_numpy().tolist(),
            }
        wide = InferInput(name="input", shape=[1, 3], datatype="FP32")
        wide.set_data_from_numpy(np.ones((1, 3), dtype=np.float32), binary_data=False)
        try:
            await client.infer(base_url, InferRequest(model_name=model, infer_inputs=[wide]), model_name=model)
        except Exception as exc:  # httpx.HTTPStatusError carrying our error text
            seen["refused"] = f"{type(exc).__name__}: {exc}"
    finally:
        await client.close()
    return seen


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))))
