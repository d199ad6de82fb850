"""The hand-written Ray Serve deployment we compare with: the least code that serves the model.

One ``@serve.deployment`` class: it builds an onnxruntime session from the model bytes and
answers ``POST {"instances": [[...20 floats...]]}`` with ``{"predictions": [...]}``. No request
checks, variants, metrics or lineage: what a user writes by hand from Serve's docs, with the
same resources as our app's replica (``num_cpus``, ``max_ongoing_requests``, one onnxruntime
thread).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request

APP_NAME = "handwritten"
ROUTE_PREFIX = "/handwritten"


@serve.deployment
class HandwrittenONNX:
    def __init__(self, onnx_bytes: bytes) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    async def __call__(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        rows = np.asarray(body["instances"], dtype=np.float32)
        predictions = self.session.run([self.output_name], {self.input_name: rows})[0]
        return {"predictions": predictions.tolist()}


def deploy_handwritten(onnx_bytes: bytes, *, num_cpus: float, max_ongoing_requests: int) -> None:
    """Run the deployment as app ``handwritten`` on the connected cluster; blocks until it is ready.

    The class is pickled by value, so replicas need no copy of this module.
    """
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    deployment = HandwrittenONNX.options(
        num_replicas=1,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": num_cpus},
    )
    serve.run(deployment.bind(onnx_bytes), name=APP_NAME, route_prefix=ROUTE_PREFIX)
