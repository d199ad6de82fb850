"""One model variant loaded in this process: its predictor, the answer parts it always sends,
and how it predicts (inline or on the prediction thread).

Imports nothing of Serve: the deploy preflight loads variants with it on a plain Ray worker.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ray_deploy.models.artifacts import load_model
from ray_deploy.models.predictors import RequestError, build_predictor
from ray_deploy.serving.config import VariantConfig, predict_threads_setting
from ray_deploy.serving.payload import ModelInput

VARIANT_HEADER = "X-Ray-Deploy-Variant"
MODEL_VERSION_HEADER = "X-Model-Version"

INLINE_PREDICT_S = 0.002
"""Predictions that typically take less than this run on the replica's event loop; slower ones
run on the replica's prediction thread, so that the event loop keeps accepting requests,
answering health checks and counting ongoing requests for the autoscaler."""
_PREDICT_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ray-deploy-predict")
_parallel: ThreadPoolExecutor | None = None


def parallel_executor() -> ThreadPoolExecutor:
    """The threads of thread-safe predictors (``PREDICT_THREADS``), made when the first one loads."""
    global _parallel
    if _parallel is None:
        workers = predict_threads_setting(os.environ)
        _parallel = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ray-deploy-predict-parallel")
    return _parallel


def _timed(predict: Any, payload: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = predict(payload)
    return result, time.perf_counter() - started


_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))  # built once, not per call


def json_bytes(value: Any) -> bytes:
    return _ENCODER.encode(value).encode("utf-8")


@dataclass
class LoadedVariant:
    config: VariantConfig
    predictor: Any
    typical_s: float | None = None  # moving average of this variant's predict time
    # What every answer of this variant ends with, built once: the JSON after the predictions
    # and the response headers naming the variant.
    answer_tail: bytes = field(init=False, repr=False)
    answer_headers: tuple[tuple[bytes, bytes], ...] = field(init=False, repr=False)
    # What the predictor takes, read once: "array" (with n_features, if known), "json" or "dataframe";
    # and whether its predict takes a request's "params".
    payload_format: str = field(init=False, repr=False)
    n_features: int | None = field(init=False, repr=False)
    accepts_params: bool = field(init=False, repr=False)
    # Where predictions that are not quick run: the replica's one prediction thread, or for
    # predictors that declare ``thread_safe = True``, several (``PREDICT_THREADS``).
    executor: ThreadPoolExecutor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        config = self.config
        self.executor = (
            parallel_executor() if getattr(self.predictor, "thread_safe", False) is True else _PREDICT_THREAD
        )
        self.payload_format = getattr(self.predictor, "payload_format", "array")
        self.n_features = getattr(self.predictor, "n_features", None)
        self.accepts_params = takes_params(self.predictor)
        tail = {"variant": config.name}
        headers = [(VARIANT_HEADER.lower().encode(), config.name.encode())]
        if config.model_version:
            tail["model_version"] = config.model_version
            headers.append((MODEL_VERSION_HEADER.lower().encode(), config.model_version.encode()))
        self.answer_tail = b"," + json_bytes(tail)[1:]
        self.answer_headers = tuple(headers)

    @property
    def quick(self) -> bool:
        """Known to answer within ``INLINE_PREDICT_S``: ``predict_inline`` may run it on the event loop."""
        typical = self.typical_s
        return typical is not None and typical < INLINE_PREDICT_S

    def predict_inline(self, payload: Any) -> Any:
        """The predictor's answer, computed here (for quick variants: see ``quick``)."""
        started = time.perf_counter()
        result = self.predictor.predict(payload)
        self.typical_s = 0.8 * self.typical_s + 0.2 * (time.perf_counter() - started)
        return result

    async def predict(self, payload: Any) -> Any:
        """The predictor's answer, computed inline when it is known to be quick, else on the
        prediction thread (one per replica: predictions stay serialized, as predictors expect;
        thread-safe predictors' on several, ``executor``)."""
        if self.quick:
            return self.predict_inline(payload)
        loop = asyncio.get_running_loop()
        result, took = await loop.run_in_executor(self.executor, _timed, self.predictor.predict, payload)
        self.typical_s = took if self.typical_s is None else 0.8 * self.typical_s + 0.2 * took
        return result

    async def predict_with_params(self, payload: Any, params: dict[str, Any]) -> Any:
        """The predictor's answer to a request that sent ``params`` (on the prediction thread, or threads)."""
        if not self.accepts_params:
            raise RequestError(
                f"variant {self.label!r} (predictor {self.config.predictor!r}) takes no params; "
                'send the request without "params"'
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: self.predictor.predict(payload, params=params))

    def make_payload(self, model_input: ModelInput) -> Any:
        payload_format = self.payload_format
        if payload_format == "array":
            return model_input.to_array(self.n_features)
        if payload_format == "json":
            return model_input.body
        return model_input.to_dataframe()

    @property
    def label(self) -> str:
        return self.config.label

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "label": self.config.label,
            "release": self.config.release,
            "model_version": self.config.model_version,
            "weight": self.config.weight,
            "shadow": self.config.shadow,
            "predictor": self.config.predictor,
            "model": self.config.model.uri,
            "sha256": self.config.model.sha256,
            "n_features": self.n_features,
            "device": getattr(self.predictor, "device", "cpu"),
        }


def takes_params(predictor: Any) -> bool:
    """Whether ``predictor.predict`` takes a ``params`` argument (``accepts_params`` says so, or its
    signature has one)."""
    declared = getattr(predictor, "accepts_params", None)
    if declared is not None:
        return bool(declared)
    try:
        return "params" in inspect.signature(predictor.predict).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def load_variant(config: VariantConfig, cache: dict[tuple, LoadedVariant] | None = None) -> LoadedVariant:
    """Load one variant's model by reference and wrap it in its predictor (reusing a loaded one)."""
    if cache and config.identity in cache:
        return LoadedVariant(config=config, predictor=cache[config.identity].predictor)
    model = load_model(config.model, flavor=config.predictor)
    predictor = build_predictor(config.predictor, model, config.predictor_config, code_dir=os.getcwd())
    return LoadedVariant(config=config, predictor=predictor)
