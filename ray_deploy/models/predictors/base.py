"""The predictor protocol, in the spirit of Cortex.

A predictor is a small class::

    class MyPredictor:
        payload_format = "array"          # or "dataframe" or "json"

        def __init__(self, model, config):
            self.model = model            # loaded once per replica, by reference
            self.threshold = config.get("threshold", 0.5)

        def predict(self, payload):
            return (self.model.predict_proba(payload)[:, 1] > self.threshold).astype(int)

``__init__`` receives the loaded model and the ``predictor_config`` dict; ``predict`` receives the
request's rows and returns one prediction per row (a list, a numpy array or a pandas object).
What ``payload`` is depends on ``payload_format``:

* ``"array"`` (default): a 2-D float64 numpy array; requests with non-numeric or non-finite
  values are refused with 400 before ``predict`` is called.
* ``"dataframe"``: a pandas DataFrame (column names when the request gave them).
* ``"json"``: the parsed request body, untouched; return any JSON-serializable value.

Set ``n_features`` (an int) to have rows of the wrong width refused with 400. Raise
``RequestError`` from ``predict`` to answer a client mistake with a 4xx.

Predictions that take more than a couple of milliseconds run off the replica's event loop, on one
thread: one at a time. Set ``thread_safe = True`` when ``predict`` may run on several threads at
once (the model's own predict is thread-safe, and ideally releases the GIL, as onnxruntime's does):
a replica then runs up to ``RAY_DEPLOY_PREDICT_THREADS`` (2) such predictions at a time.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar


class RequestError(Exception):
    """A client mistake: answered with ``status`` (4xx) and a JSON ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.message = message
        self.status = status
        self.headers = headers


class Predictor:
    """Base class for predictors; subclassing it is optional (any class with the protocol works)."""

    payload_format: ClassVar[str] = "array"
    thread_safe: ClassVar[bool] = False
    n_features: int | None = None
    device: str = "cpu"

    def __init__(self, model: Any, config: dict[str, Any]):
        self.model = model
        self.config = dict(config)

    def predict(self, payload: Any) -> Any:
        raise NotImplementedError


def config_choice(config: dict[str, Any], key: str, allowed: tuple[str, ...], default: str) -> str:
    """Read an enumerated predictor_config entry, refusing values outside ``allowed``."""
    from ray_deploy.errors import PredictorError

    value = config.get(key, default)
    if value not in allowed:
        raise PredictorError(f"predictor_config.{key}: got {value!r}; expected one of {', '.join(allowed)}")
    return value


def visible_gpus() -> list[str]:
    """GPUs this process holds. In a Ray worker (a replica, the preflight task): the GPUs Ray
    assigned it, so a replica with ``num_gpus=0`` holds none even where a user exported
    ``CUDA_VISIBLE_DEVICES`` (Ray leaves that variable alone for actors without GPUs). Elsewhere:
    ``CUDA_VISIBLE_DEVICES``."""
    try:
        import ray
        from ray._private.worker import WORKER_MODE, global_worker

        if ray.is_initialized() and global_worker.mode == WORKER_MODE:
            return [str(gpu) for gpu in ray.get_gpu_ids()]
    except Exception:  # no Ray, or not in a worker: the environment says
        pass
    value = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return [d.strip() for d in value.split(",") if d.strip() and d.strip() != "-1"]
