"""The ModelServer Serve deployment: loads variants by reference and answers scoring requests.

Routes, relative to the app's route prefix:

* ``POST /`` or ``POST /invocations``: score; body and answer follow ``mlflow models serve``.
* ``GET /``: what this app serves (variants, weights, model references, predictors).
* ``GET /-/healthz``: 200 once the models are loaded.
* ``GET /ping``, ``/health`` (200 once every variant is loaded) and ``/version``, as ``mlflow models serve``.
* ``POST /feedback``: delayed labels for captured requests, ``{"request_id": ..., "label": ...}`` or a
  list of them (apps deployed with ``capture``; see ``serving.capture``).
* The Open Inference Protocol v2 (``serving.oip``), the model named after the app:
  ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{app}[/versions/{v}][/ready]``
  and ``POST /v2/models/{app}[/versions/{v}]/infer``, JSON tensors or the binary tensor extension.
  A version in the path pins the request to the loaded release with that registered model version
  number (``cancer/3`` is version ``3``) or variant label (``xgb@v3``, or ``xgb`` while one release
  of it is loaded); unpinned, an infer request is routed like any other.

Both protocols score through one path (``_score``): the variant chosen by weight (sticky with
``X-Request-Key``) unless pinned, quick array models predicted inline, batching, shadows and the
per-variant stats the rollout gates read.

Every answer carries ``X-Request-Id`` (Serve's request id: the caller's if it sent a well-formed
one, else a generated UUID); the MLflow protocol's answers carry it as ``request_id`` too, and
captures and labels name requests by it. With ``capture``, a sample of requests is copied (rows, predictions, request
id and key, variant, release, latency) to a ``CaptureWriter`` that writes them off the request
path; shadows' answers to a captured request are captured under the same id.

During a rollout with a disagreement gate (``max_disagreement``), requests answered by the new
release are also asked of the old release off the request path, like a shadow, and the two
answers compared on the new release's stats.

A client mistake is answered with a 4xx and ``{"error": "..."}``; the replica keeps serving.
When a variant fails on the server side while another variant serves the same app (a canary
beside the stable release, or an A/B split), the request is answered by the stable one (the
largest share) and the failure is counted against the variant that failed: rollout gates see
it, callers do not. A request pinned to a version is answered by that version or fails.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import hmac
import logging
import math
import os
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from ray_deploy.errors import RayDeployError
from ray_deploy.models.predictors.base import RequestError
from ray_deploy.serving.access import LOOK_AGAIN_S, FrontGate
from ray_deploy.serving.autoscale import FRONT_LOAD_METRIC, FrontLoad
from ray_deploy.serving.capture import Captured, CaptureWriter, Labelled, load_quality_function
from ray_deploy.serving.config import (
    CaptureConfig,
    ServingConfig,
    VariantConfig,
    gc_threshold_setting,
    variant_app_name,
)
from ray_deploy.serving.metrics import (
    PUSH_INTERVAL_S,
    PrometheusExport,
    VariantStats,
    get_collector,
    report_devices,
    same_answer,
)
from ray_deploy.serving.oip import (
    PLATFORMS,
    PREDICTIONS,
    InferRows,
    TensorSpec,
    encode_infer_response,
    mlflow_schema_specs,
    model_metadata,
    onnx_tensor_specs,
    output_specs,
    parse_infer_request,
    parse_route,
    row_input_specs,
    server_metadata,
)
from ray_deploy.serving.payload import ModelInput, parse_body, parse_csv, parse_model_input
from ray_deploy.serving.variant import (
    LoadedVariant,
    json_bytes,
    load_variant,
)

logger = logging.getLogger("ray.serve")

REQUEST_KEY_HEADER = "X-Request-Key"
REQUEST_ID_HEADER = "X-Request-Id"
"""Serve's own request id: its middleware keeps the caller's (the front drops a malformed one, see
``serving.front``) or generates one, and sends it back on every answer."""
CAPTURE_INDEX_LOCAL = 50_000
"""Captured requests a replica remembers for labels (the collector remembers more, from every replica)."""
FEEDBACK_PATH = "/feedback"
FALLBACK_HEADER = "X-Ray-Deploy-Fallback-From"
_SCORE_PATHS = ("", "/", "/invocations")


def tune_gc(environ: Any = os.environ) -> int:
    """Set this process's generation-0 GC threshold for serving (``GC_THRESHOLD`` unless
    ``RAY_DEPLOY_GC_THRESHOLD`` says otherwise); returns the threshold in force."""
    threshold = gc_threshold_setting(environ)
    if threshold > 0:
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(threshold, older, oldest)
    return gc.get_threshold()[0]


REMOTE_ATTEMPTS = 4
HEALTH_TIMEOUT_S = 2.0
"""Longest ``/health`` waits for an isolated variant's app to answer."""


def package_version() -> str:
    """This package's version: what ``GET /v2`` answers as the server's version."""
    from ray_deploy import __version__

    return __version__


def scoring_server_version() -> str:
    """What ``GET /version`` answers: the MLflow version of the replica's environment, as
    ``mlflow models serve`` does (MLflow clients compare it), else this package's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlflow")
    except PackageNotFoundError:
        return package_version()


@dataclass
class RemoteVariant:
    """Stands in for the predictor of an isolated variant: its own Serve app answers ``score``."""

    handle: Any
    app_name: str
    payload_format: str = "json"
    n_features: int | None = None
    device: str = "isolated"

    async def score(self, body: Any) -> Any:
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        # Predictions are idempotent: a request whose replica died under it is sent again, and
        # Serve routes it to a live replica (or one it restarted).
        for attempt in range(REMOTE_ATTEMPTS):
            try:
                return await self.handle.score.remote(body)
            except (ActorDiedError, ActorUnavailableError):
                if attempt == REMOTE_ATTEMPTS - 1:
                    raise
                logger.warning("ray-deploy: a replica of %s went away; sending the request again", self.app_name)
                await asyncio.sleep(0.05 * (attempt + 1))
            except Exception as exc:
                cause = exc if isinstance(exc, RequestError) else getattr(exc, "cause", None)
                if isinstance(cause, RequestError):
                    raise RequestError(cause.message, cause.status) from None
                raise


def attach_variant(app: str, config: VariantConfig, cache: dict[tuple, LoadedVariant]) -> LoadedVariant:
    """The router's view of a variant: loaded here, or a handle to its own app if isolated."""
    if config.isolated is None:
        return load_variant(config, cache)
    if config.identity in cache:
        return LoadedVariant(config=config, predictor=cache[config.identity].predictor)
    app_name = variant_app_name(app, config)
    handle = serve.get_deployment_handle(config.deployment_name(), app_name=app_name)
    return LoadedVariant(config=config, predictor=RemoteVariant(handle, app_name))


def choose_variant(variants: list[LoadedVariant], request_key: str | None = None) -> LoadedVariant:
    """Pick a variant by weight; the same request key always lands on the same variant."""
    if len(variants) == 1:
        return variants[0]
    total = sum(v.config.weight for v in variants)
    if request_key is None:
        point = random.random() * total
    else:
        digest = hashlib.sha256(request_key.encode("utf-8")).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64 * total
    for variant in variants:
        point -= variant.config.weight
        if point < 0 and variant.config.weight > 0:
            return variant
    return next(v for v in reversed(variants) if v.config.weight > 0)


def to_jsonable(predictions: Any) -> Any:
    """Predictions as ``mlflow models serve`` answers them, in plain JSON values: an array as a list,
    a DataFrame as records, a Series as the records of its one-column frame, dicts and lists with
    numpy and pandas values inside; NaN and infinities become null (MLflow writes bare NaN, which
    is not JSON)."""
    if type(predictions) is np.ndarray:
        kind = predictions.dtype.kind
        if kind in "iub":
            return predictions.tolist()  # plain ints or bools: nothing to replace
        if kind == "f" and predictions.size > 64 and np.isfinite(predictions).all():
            return predictions.tolist()  # (for a few values, the walk below is cheaper than numpy's check)
    if hasattr(predictions, "to_frame") and hasattr(predictions, "index"):  # a pandas Series
        predictions = predictions.to_frame().to_dict(orient="records")
    elif hasattr(predictions, "to_dict") and hasattr(predictions, "columns"):
        predictions = predictions.to_dict(orient="records")
    return _finite(predictions)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return _finite(value.tolist())
    if isinstance(value, np.generic):
        return _finite(value.item())
    if isinstance(value, bytes | bytearray):
        return base64.encodebytes(value).decode("ascii")
    if hasattr(value, "isoformat"):  # datetime, date, time, pandas Timestamp
        return value.isoformat()
    if hasattr(value, "tolist"):  # pandas Series, Index and the like
        return _finite(value.tolist())
    return value


SHADOW_BATCH = 64
SHADOW_DELAY_S = 0.02
SHADOW_QUEUE_LIMIT = 256
"""Requests waiting for the shadows, at most; beyond it shadows skip requests (counted). Each waiting
request keeps its decoded body alive: with 4096 of them, the queue a saturated replica keeps full,
the served path slowed by 10-20% at c=8 and c=32 (benchmarks, rows ours and ours_shadow); with
256, by 1-9%, the shadows' own scoring."""


_JSON_TYPE = (b"content-type", b"application/json")


class JSONAnswer(Response):
    """A JSON answer sent as two ASGI messages.

    Starlette's JSONResponse does the same through more general machinery; on the scoring path
    that machinery was a measurable share of a replica's time per request (docs/data-path.md),
    so the body is encoded once and each variant's headers are built once."""

    def __init__(self, body: bytes, status_code: int = 200, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        self.body = body
        self.status_code = status_code
        self.background = None
        self.raw_headers = [_JSON_TYPE, (b"content-length", str(len(body)).encode()), *headers]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body})


class InferAnswer(JSONAnswer):
    """An Open Inference Protocol answer: the codec's headers (its content type and, in binary, the
    JSON header's length) instead of JSONAnswer's content type, then the variant's."""

    def __init__(self, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.body = body
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-length", str(len(body)).encode()), *headers]


def json_answer(content: Any, status_code: int = 200) -> JSONAnswer:
    return JSONAnswer(json_bytes(content), status_code)


def error_response(status: int, message: str) -> JSONAnswer:
    answer = json_answer({"error": message}, status)
    if status == 413:  # the body was not read to its end: the connection cannot carry another request
        answer.raw_headers.append((b"connection", b"close"))
    return answer


def failure_response(exc: Exception) -> JSONAnswer:
    """The answer to a request that raised: its 4xx for a client mistake, else a 500 (logged)."""
    if isinstance(exc, RequestError):
        answer = error_response(exc.status, exc.message)
        for name, value in exc.headers:
            answer.raw_headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    else:
        logger.exception("ray-deploy: prediction failed")
        if isinstance(exc, RayDeployError):
            answer = error_response(500, str(exc))
        else:
            answer = error_response(500, f"prediction failed: {type(exc).__name__}: {exc}")
    return answer


def reference_of(config: ServingConfig, variants: list[LoadedVariant]) -> tuple[LoadedVariant | None, frozenset[str]]:
    """During a rollout gated on disagreement: the old release's variant with the largest share
    (it answers the new release's requests too, for comparison) and the new release's labels."""
    rollout = config.rollout
    if rollout is None or rollout.policy.max_disagreement is None:
        return None, frozenset()
    candidates = frozenset(rollout.new) - frozenset(rollout.old)
    old = [v for v in variants if v.label in rollout.old and not v.config.shadow]
    if not old or not candidates:
        return None, frozenset()
    return max(old, key=lambda v: rollout.old[v.label]), candidates


def quality_scorer(metric: str) -> Callable[[Any, Any], float]:
    """How one label scores one row's prediction: ``accuracy`` (1.0 when equal; a list of class
    probabilities counts as its most likely class), ``mae`` (absolute error) or a user function
    ``module:function`` (prediction, label) -> float, imported here (the replica has the code)."""
    if metric == "accuracy":
        return _accuracy
    if metric == "mae":
        return _absolute_error
    function = load_quality_function(metric)
    return lambda prediction, label: float(function(prediction, label))


def _accuracy(prediction: Any, label: Any) -> float:
    if isinstance(prediction, list) and len(prediction) > 1 and all(isinstance(p, int | float) for p in prediction):
        prediction = max(range(len(prediction)), key=prediction.__getitem__)
    elif isinstance(prediction, list) and len(prediction) == 1:
        prediction = prediction[0]
    if isinstance(label, list | dict):
        raise RequestError(f"label {label!r} is not a class: send one value per row")
    return 1.0 if same_answer(prediction, label) else 0.0


def _absolute_error(prediction: Any, label: Any) -> float:
    if isinstance(prediction, list) and len(prediction) == 1:
        prediction = prediction[0]
    if isinstance(label, bool) or not isinstance(label, int | float) or not math.isfinite(label):
        raise RequestError(f"label {label!r} is not a finite number (quality metric mae)")
    if isinstance(prediction, bool) or not isinstance(prediction, int | float):
        raise RequestError(f"the answer {prediction!r} is not a number: mae cannot score it")
    return abs(float(prediction) - float(label))


def request_score(scorer: Callable[[Any, Any], float], predictions: Any, label: Any) -> float:
    """One request's score: a single value labels a one-row request; a list gives one label per
    row (the request's score is their mean)."""
    rows = predictions if isinstance(predictions, list) else [predictions]
    if not isinstance(label, list):
        if len(rows) != 1:
            raise RequestError(
                f"the request had {len(rows)} rows: send its label as a list of {len(rows)} values, one per row"
            )
        return scorer(rows[0], label)
    if len(label) != len(rows):
        raise RequestError(f"the label lists {len(label)} values but the request had {len(rows)} rows")
    return sum(scorer(p, t) for p, t in zip(rows, label)) / len(rows)


def oip_version(config: VariantConfig) -> str:
    """How the Open Inference Protocol names a variant's release: its registered model version
    number, else its label."""
    return config.version_number or config.label


@serve.deployment
class ModelServer:
    """Serves every variant of one app from this replica; configured through ``user_config``."""

    def __init__(self) -> None:
        self.config: ServingConfig | None = None
        self.variants: list[LoadedVariant] = []
        self.stats: dict[str, VariantStats] = {}
        self.served: list[LoadedVariant] = []
        self.fallback: LoadedVariant | None = None
        self.shadows: list[LoadedVariant] = []
        self._shadow_queue: list[tuple[ModelInput, Any, int | None]] = []
        self._shadow_worker: asyncio.Task | None = None
        self.shadow_dropped = 0
        self._pusher: asyncio.Task | None = None
        self._metric_tags: dict[str, dict[str, str]] = {}
        self._latency_sums: dict[str, float] = {}
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._prometheus = PrometheusExport()
        self._gc_threshold = tune_gc()
        self._tensor_specs: dict[tuple, tuple[list[TensorSpec], list[TensorSpec]]] = {}
        self._infer_path: str | None = None
        self.capture: CaptureWriter | None = None
        self._capture_settings: CaptureConfig | None = None
        self._captured_index: OrderedDict[str, tuple] = OrderedDict()
        self._index_pending: list[tuple] = []
        self._index_warned = False
        self._scorer: Callable[[Any, Any], float] | None = None
        # A rollout with a disagreement gate: the old release that also answers the new one's requests.
        self.reference: LoadedVariant | None = None
        self._candidates: frozenset[str] = frozenset()
        self._front_load = FrontLoad()
        # Behind a front, HTTP requests must carry this app's secret (serving.access).
        self._gate = FrontGate()
        self._gate_watch: asyncio.Task | None = None

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve asks this of autoscaled apps' replicas: the requests the front holds for this app,
        which the app's autoscaling policy counts beside Serve's own figure (``serving.autoscale``).
        Nothing where no front runs."""
        load = await self._front_load.read(self.config.route_prefix) if self.config is not None else None
        return {} if load is None else {FRONT_LOAD_METRIC: load}

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load what is new off the event loop, then switch in one step; requests keep flowing."""
        config = ServingConfig.model_validate(user_config)
        loaded = {v.config.identity: v for v in self.variants}
        variants = await asyncio.to_thread(lambda: [attach_variant(config.app, v, loaded) for v in config.variants])
        # Requests already running keep their variant object; new requests see the new lists.
        self.variants = variants
        self.served = [v for v in variants if not v.config.shadow and v.config.weight > 0]
        self.fallback = max(self.served, key=lambda v: v.config.weight) if len(self.served) > 1 else None
        self.shadows = [v for v in variants if v.config.shadow]
        self.config = config
        self._infer_path = f"/v2/models/{config.app}/infer"
        await asyncio.to_thread(self._gate.configure, config.app)
        if self._gate.expected is None and self._gate_watch is None:  # no front yet: look again now and then
            self._gate_watch = asyncio.get_running_loop().create_task(self._watch_gate())
        self.reference, self._candidates = reference_of(config, variants)
        await asyncio.to_thread(self._configure_capture, config)
        local = {v.label: v.describe()["device"] for v in variants if not isinstance(v.predictor, RemoteVariant)}
        report_devices(config.app, self._replica, local, replica_placement())
        self._predict_batched.set_max_batch_size(config.max_batch_size)
        self._predict_batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        logger.info(
            "ray-deploy: serving %s", ", ".join(f"{v.config.name} <- {v.config.model.uri}" for v in self.variants)
        )

    def _configure_capture(self, config: ServingConfig) -> None:
        """Start, change or stop this replica's capture writer to match ``config.capture`` (what
        was captured under earlier settings is written first)."""
        settings = config.capture
        if settings == self._capture_settings:
            return
        if self.capture is not None:
            self.capture.close()
            self.capture = None
        self._capture_settings = settings
        self._scorer = quality_scorer(settings.quality) if settings is not None else None
        if settings is not None:
            writer = CaptureWriter(
                settings.root,
                config.app,
                self._replica,
                sample=settings.sample,
                max_pending=settings.max_pending,
                flush_s=settings.flush_s,
            )
            writer.start()
            self.capture = writer
            logger.info("ray-deploy: capturing %g of requests to %s", settings.sample, settings.root)

    def __del__(self) -> None:
        # Serve calls this when the replica shuts down gracefully: write what is still pending.
        if self.capture is not None:
            self.capture.close(timeout_s=5.0)

    async def _watch_gate(self) -> None:
        """Look for the cluster's front key until there is one (a front started after this replica)."""
        while self._gate.expected is None:
            await asyncio.sleep(LOOK_AGAIN_S)
            await asyncio.to_thread(self._gate.refresh)

    async def __call__(self, request: Request) -> Response:
        scope = request.scope
        if not self._gate.admits(scope):
            status, body = self._gate.refusal()
            return JSONAnswer(body, status)
        method = scope["method"]
        path = scope["path"][len(scope.get("root_path", "")) :]
        if method == "POST" and path in _SCORE_PATHS:
            try:
                return await self._score(scope, request.receive)
            except Exception as exc:
                return failure_response(exc)
        if path == self._infer_path and method == "POST":  # the common OIP request, without parsing its route
            try:
                return await self._score(scope, request.receive, oip=True)
            except Exception as exc:
                return failure_response(exc)
        if path == "/v2" or path.startswith("/v2/"):
            try:
                return await self._open_inference(method, path, scope, request.receive)
            except Exception as exc:
                return failure_response(exc)
        if path == FEEDBACK_PATH and method == "POST":
            try:
                return await self._feedback(scope, request.receive)
            except Exception as exc:
                return failure_response(exc)
        if method == "GET":
            if path == "/-/healthz":
                return json_answer({"status": "ok"})
            if path in _SCORE_PATHS:
                return json_answer(self.describe())
            if path in ("/ping", "/health"):
                return await self._health()
            if path == "/version":
                return PlainTextResponse(scoring_server_version())
            return error_response(404, f"no route {path!r}; POST {self.config.route_prefix} to predict")
        if method != "POST":
            return error_response(405, f"method {method} not allowed; POST JSON to predict, GET to describe")
        return error_response(404, f"no route {path!r}; POST to {self.config.route_prefix} or its /invocations")

    async def _health(self) -> JSONAnswer:
        """``/ping`` and ``/health``, as ``mlflow models serve`` answers them: 200 once every variant
        is loaded (an isolated variant: once its own app answers), else 503 naming what is not."""
        waiting = await self._not_loaded(self.variants)
        if waiting:
            return error_response(503, f"not ready: {', '.join(waiting)} not loaded")
        return json_answer({"status": "ok", "variants": [v.label for v in self.variants]})

    async def _not_loaded(self, variants: list[LoadedVariant]) -> list[str]:
        """What of ``variants`` does not answer yet (isolated variants are asked), named."""
        waiting = [] if self.config is not None else ["the app's config"]
        for variant in variants:
            if isinstance(variant.predictor, RemoteVariant):
                try:
                    await asyncio.wait_for(variant.predictor.handle.describe.remote(), HEALTH_TIMEOUT_S)
                except Exception as exc:
                    waiting.append(f"{variant.label} ({variant.predictor.app_name}: {type(exc).__name__})")
        return waiting

    async def _open_inference(self, method: str, path: str, scope: dict[str, Any], receive: Any) -> Response:
        """A request under ``/v2``: the Open Inference Protocol, the model named after the app."""
        route = parse_route(path)
        if method != route.method:
            raise RequestError(f"method {method} not allowed on {path}; use {route.method}", 405)
        if route.kind == "live":
            return json_answer({"live": True})
        if route.kind == "server":
            return json_answer(server_metadata(package_version()))
        app = self.config.app if self.config is not None else None
        if route.model is not None and route.model != app:
            raise RequestError(f"no model {route.model!r} here; this app serves model {app!r}", 404)
        pinned = self._pinned(route.version) if route.version is not None else None
        if route.kind == "infer":
            return await self._score(scope, receive, oip=True, pinned=pinned)
        if route.kind == "model":
            return json_answer(await self._model_metadata(pinned))
        waiting = await self._not_loaded(self.variants if pinned is None else [pinned])
        if waiting:
            return error_response(503, f"not ready: {', '.join(waiting)} not loaded")
        if route.kind == "ready":
            return json_answer({"ready": True})
        return json_answer({"name": app, "ready": True})

    def _pinned(self, version: str) -> LoadedVariant:
        """The loaded variant a path's version names: by registered model version number, else by
        label, else by variant name when one release of it is loaded; 404 naming the loaded ones."""
        variants = self.variants
        for matches in (
            [v for v in variants if v.config.version_number == version],
            [v for v in variants if v.label == version],
            [v for v in variants if v.config.name == version],
        ):
            if len(matches) == 1:
                return matches[0]
            if matches:
                raise RequestError(
                    f"version {version!r} names {len(matches)} loaded releases "
                    f"({', '.join(v.label for v in matches)}); use one of their labels",
                    404,
                )
        loaded = ", ".join(f"{oip_version(v.config)} ({v.label})" for v in variants) or "none"
        raise RequestError(f"version {version!r} of model {self.config.app!r} is not loaded; loaded: {loaded}", 404)

    async def _model_metadata(self, pinned: LoadedVariant | None) -> dict[str, Any]:
        """Model metadata: every loaded version, and the platform, inputs and outputs of the pinned
        variant (unpinned: of the one with the largest share of traffic)."""
        assert self.config is not None
        variant = pinned or max(self.served or self.variants, key=lambda v: v.config.weight)
        predictor = variant.config.predictor
        inputs, outputs = await self._specs_of(variant)
        return model_metadata(
            self.config.app,
            versions=[oip_version(v.config) for v in self.variants],
            platform=PLATFORMS.get(predictor, "python"),
            inputs=inputs,
            outputs=outputs,
        )

    async def _specs_of(self, variant: LoadedVariant) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """A variant's inputs and outputs, read from the model once per loaded model.

        ONNX: the graph input the predictor feeds and the output it serves, as the session types
        them (named ``predictions``, as answers name a single array). An MLflow model: its signature.
        Models that take rows of known width: ``input`` [-1, n_features], and the outputs of one
        prediction of a row of zeros (none, if that prediction fails)."""
        key = variant.config.identity
        if key in self._tensor_specs:
            return self._tensor_specs[key]
        predictor = variant.predictor
        if variant.config.predictor == "onnx" and not isinstance(predictor, RemoteVariant):
            session = predictor.session
            (served,) = [node for node in session.get_outputs() if node.name == predictor.output_name]
            (output,) = onnx_tensor_specs([served])
            specs = (
                onnx_tensor_specs(session.get_inputs()[:1]),
                [TensorSpec(PREDICTIONS, output.datatype, output.shape)],
            )
        elif variant.config.predictor == "mlflow" and not isinstance(predictor, RemoteVariant):
            signature = getattr(predictor.model.metadata, "signature", None)
            specs = (
                mlflow_schema_specs(signature and signature.inputs),
                mlflow_schema_specs(signature and signature.outputs),
            )
        else:
            n_features = variant.n_features
            if isinstance(predictor, RemoteVariant):
                described = await asyncio.wait_for(predictor.handle.describe.remote(), HEALTH_TIMEOUT_S)
                n_features = described.get("n_features")
            outputs = []
            if n_features and variant.payload_format == "array":
                zeros = [[0.0] * n_features]
                try:
                    probe = ModelInput(rows=zeros, columns=None, body={"instances": zeros})
                    outputs = output_specs(await self._predict(variant, probe))
                except Exception:
                    logger.warning("ray-deploy: variant %s: no outputs for its metadata", variant.label, exc_info=True)
            specs = row_input_specs(n_features), outputs
        self._tensor_specs[key] = specs
        return specs

    def describe(self) -> dict[str, Any]:
        assert self.config is not None
        return {
            "app": self.config.app,
            "route_prefix": self.config.route_prefix,
            "variants": [v.describe() for v in self.variants],
            "source": self.config.source,
            "replica": replica_placement(),
            "shadow_skipped": self.shadow_dropped,
            "gc_threshold": self._gc_threshold,
            "capture": self._capture_summary(),
            "capture_dropped": sum(self.capture.dropped.values()) if self.capture is not None else 0,
            # This replica's labels (``ray-deploy status`` merges every replica's).
            "quality": {
                label: {"quality": stats.quality, "labels": stats.labeled}
                for label, stats in self.stats.items()
                if stats.labeled
            },
        }

    def _capture_summary(self) -> dict[str, Any] | None:
        writer, settings = self.capture, self._capture_settings
        if writer is None or settings is None:
            return None
        return {
            "root": settings.root,
            "sample": settings.sample,
            "quality": settings.quality,
            "written": dict(writer.written),
            "dropped": dict(writer.dropped),
            "labels_written": writer.labels_written,
            "labels_dropped": writer.labels_dropped,
            "feedback_token": settings.feedback_token_env is not None,
        }

    async def _score(
        self, scope: dict[str, Any], receive: Any, *, oip: bool = False, pinned: LoadedVariant | None = None
    ) -> Response:
        """Score one request, in MLflow's protocol or (``oip``) the Open Inference Protocol's: the
        variant chosen by weight (sticky with ``X-Request-Key``) unless ``pinned``, the body read
        and parsed, predicted (inline for quick array models), answered, copied to the shadows and
        counted against the variant; a server-side failure of an unpinned request is answered by
        the fallback variant. The two protocols differ only in parsing and answering."""
        assert self.config is not None
        content_type = declared = request_key = header_length = encoding = request_id = None
        for name, value in scope["headers"]:  # ASGI header names are lower case
            if name == b"content-type":
                content_type = value
            elif name == b"content-length":
                declared = value
            elif name == b"x-request-key":
                request_key = value.decode("latin-1")
            elif name == b"x-request-id":
                request_id = value.decode("latin-1")
            elif name == b"inference-header-content-length":
                header_length = value
            elif name == b"content-encoding":
                encoding = value
        if request_id is None:  # Serve's request-id middleware sets one; a replica called otherwise makes one
            request_id = str(uuid.uuid4())
        if pinned is None:
            served = self.served
            variant = served[0] if len(served) == 1 else choose_variant(served, request_key)
        else:
            variant = pinned
        started = time.perf_counter()
        # One coroutine for the common request: the body is read, checked and scored inline;
        # only a failure on the server side goes on to the fallback variant.
        status, predictions, body = 500, None, _NO_BODY
        try:
            # The Open Inference Protocol reads the body by its header length, whatever its type says.
            csv_body = self._check_headers(None if oip else content_type, declared, encoding)
            message = await receive()
            chunk = message.get("body", b"")
            if (
                message["type"] != "http.request"
                or message.get("more_body")
                or len(chunk) > self.config.max_request_bytes
            ):
                chunk = await _receive_rest(receive, message, self.config.max_request_bytes)  # refuses what is wrong
            if oip:
                body = model_input = InferRows(parse_infer_request(chunk, header_length))
            elif csv_body:
                model_input = parse_csv(chunk)
                body = model_input.body
            else:
                body = parse_body(chunk)
                model_input = parse_model_input(body, chunk)
            if (
                variant.quick
                and variant.payload_format == "array"
                and self.config.max_batch_size <= 1
                and model_input.params is None
            ):
                raw = variant.predict_inline(model_input.to_array(variant.n_features))
            else:
                raw = await self._predict(variant, model_input)
            answered = to_jsonable(raw)
            response = self._answer(variant, model_input, answered, raw, request_id, request_key, started)
            status, predictions = 200, answered
            return response
        except RequestError as exc:
            status = exc.status
            raise
        except Exception:
            fallback = self.fallback
            if fallback is None or fallback is variant or body is _NO_BODY or pinned is not None:
                raise
            logger.exception("ray-deploy: variant %s failed; answering with %s", variant.label, fallback.label)
        finally:
            self._record(variant, (time.perf_counter() - started) * 1000, status, predictions)
        response = await self._attempt(body, fallback, time.perf_counter(), request_id, request_key)
        response.raw_headers.append((FALLBACK_HEADER.lower().encode(), variant.label.encode()))
        return response

    async def _attempt(
        self, body: Any, variant: LoadedVariant, started: float, request_id: str, request_key: str | None
    ) -> JSONAnswer:
        """Score an already decoded body with one variant, counting the outcome against it."""
        status, predictions = 500, None
        try:
            model_input = body if type(body) is InferRows else parse_model_input(body)
            raw = await self._predict(variant, model_input)
            answered = to_jsonable(raw)
            response = self._answer(variant, model_input, answered, raw, request_id, request_key, started)
            status, predictions = 200, answered
            return response
        except RequestError as exc:
            status = exc.status
            raise
        finally:
            self._record(variant, (time.perf_counter() - started) * 1000, status, predictions)

    async def _feedback(self, scope: dict[str, Any], receive: Any) -> JSONAnswer:
        """``POST <route>/feedback``: labels for captured requests, ``{"request_id": ..., "label": ...}``
        or a list of them. All or nothing: an unknown id or a bad label refuses the whole body
        (4xx naming it). Each label is scored against the answer it labels (the app's quality
        metric), counted on the variant that answered, and stored beside the captures."""
        settings, writer = self._capture_settings, self.capture
        if settings is None or writer is None:
            raise RequestError(
                f"app {self.config.app!r} takes no feedback: it was deployed without capture "
                "(deploy with capture={'sample': ...} to capture requests and take labels)",
                404,
            )
        headers = dict(scope["headers"])
        self._check_feedback_token(settings, headers.get(b"authorization"))
        if self._check_headers(headers.get(b"content-type"), headers.get(b"content-length"), None):
            raise RequestError("feedback is JSON: send Content-Type: application/json", 415)
        message = await receive()
        chunk = message.get("body", b"")
        if message["type"] != "http.request" or message.get("more_body"):
            chunk = await _receive_rest(receive, message, self.config.max_request_bytes)
        items = parse_body(chunk)
        items = items if isinstance(items, list) else [items]
        if not items:
            raise RequestError('send {"request_id": "...", "label": ...} or a non-empty list of them')
        for index, item in enumerate(items):
            if not isinstance(item, dict) or set(item) != {"request_id", "label"}:
                raise RequestError(
                    f'feedback item {index}: expected {{"request_id": "...", "label": ...}}, got {_short(item)}'
                )
            if not isinstance(item["request_id"], str) or not item["request_id"]:
                raise RequestError(f"feedback item {index}: request_id must be a non-empty string")
            if item["label"] is None:
                raise RequestError(f"feedback item {index}: label is null")
        answers = await self._answers_of([item["request_id"] for item in items])
        unknown = [item["request_id"] for item in items if item["request_id"] not in answers]
        if unknown:
            raise RequestError(
                f"unknown request id(s) {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}: labels are "
                f"taken for captured requests only (capture samples {settings.sample:g} of requests; the answer's "
                "X-Request-Id names it), and for the most recent ones",
                404,
            )
        scored = []
        for index, item in enumerate(items):
            label, name, release, model_version, predictions = answers[item["request_id"]]
            try:
                score = request_score(self._scorer, predictions, item["label"])
            except RequestError as exc:
                raise RequestError(f"feedback item {index} ({item['request_id']}): {exc.message}") from None
            except Exception as exc:
                raise RequestError(
                    f"feedback item {index} ({item['request_id']}): quality {settings.quality!r} could not score "
                    f"label {_short(item['label'])}: {type(exc).__name__}: {exc}"
                ) from None
            if not math.isfinite(score):
                raise RequestError(f"feedback item {index} ({item['request_id']}): its score is {score}")
            scored.append((item, label, name, release, model_version, predictions, score))
        now = time.time()
        for item, label, name, release, model_version, predictions, score in scored:
            self._stats_of(label, name, release).record_label(score)
            writer.add_label(
                Labelled(
                    now, item["request_id"], name, label, release, model_version, item["label"], predictions, score
                )
            )
        if self._pusher is None:
            self._pusher = asyncio.get_running_loop().create_task(self._push_stats())
        return json_answer({"accepted": len(scored), "quality": settings.quality})

    def _check_feedback_token(self, settings: CaptureConfig, authorization: bytes | None) -> None:
        """Labels steer rollouts: with ``feedback_token_env``, only callers with that token write them."""
        if settings.feedback_token_env is None:
            return
        token = os.environ.get(settings.feedback_token_env)
        if not token:
            raise RequestError(
                f"feedback is restricted to a bearer token, but {settings.feedback_token_env} is not set "
                "in this replica's environment; set it where the Ray nodes start",
                503,
            )
        sent = authorization.decode("latin-1") if authorization is not None else ""
        scheme, _, value = sent.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise RequestError(
                "feedback needs the app's bearer token: send Authorization: Bearer <token>",
                401,
                (("WWW-Authenticate", 'Bearer realm="ray-deploy feedback"'),),
            )

    async def _answers_of(self, request_ids: list[str]) -> dict[str, tuple]:
        """What answered each captured request: this replica's memory, else the collector's (which
        every replica tells every few seconds; asked again one push later for a fresh answer)."""
        index = self._captured_index
        found = {rid: index[rid] for rid in request_ids if rid in index}
        for attempt in range(2):
            missing = [rid for rid in request_ids if rid not in found]
            if not missing:
                break
            if attempt:
                await asyncio.sleep(PUSH_INTERVAL_S + 0.5)
            try:
                found.update(await get_collector(create=True).lookup.remote(self.config.app, missing))
            except Exception:
                logger.exception("ray-deploy: could not ask the collector for captured requests")
                break
        return found

    def _stats_of(self, label: str, name: str, release: str | None) -> VariantStats:
        stats = self.stats.get(label)
        if stats is None:
            loaded = next((v for v in self.variants if v.label == label), None)
            if loaded is not None:
                return self._start_stats(loaded)
            self._metric_tags[label] = {"app": self.config.app, "variant": name, "release": release or ""}
            self._latency_sums[label] = 0.0
            stats = self.stats[label] = VariantStats()
        return stats

    def _record(self, variant: LoadedVariant, latency_ms: float, status: int, predictions: Any) -> None:
        label = variant.label
        stats = self.stats.get(label) or self._start_stats(variant)
        stats.record(latency_ms, status, predictions)
        self._latency_sums[label] += latency_ms
        if self._pusher is None:
            self._pusher = asyncio.get_running_loop().create_task(self._push_stats())

    def _start_stats(self, variant: LoadedVariant) -> VariantStats:
        config = variant.config
        self._metric_tags[variant.label] = {
            "app": self.config.app,
            "variant": config.name,
            "release": config.release or "",
        }
        self._latency_sums[variant.label] = 0.0
        stats = self.stats[variant.label] = VariantStats()
        return stats

    async def _push_stats(self) -> None:
        """Every few seconds: send this replica's cumulative stats to the collector and publish
        them for Prometheus (a few metric calls per variant, none per request)."""
        collector = get_collector(create=True)
        while True:
            await asyncio.sleep(PUSH_INTERVAL_S)
            try:
                writer = self.capture
                if writer is not None:
                    for label, stats in self.stats.items():
                        stats.captured = writer.written.get(label, 0)
                        stats.capture_dropped = writer.dropped.get(label, 0)
                self._prometheus.export(self.stats, self._metric_tags, self._latency_sums)
                collector.report.remote(self.config.app, self._replica, {k: v.to_dict() for k, v in self.stats.items()})
            except Exception:  # metrics must never break serving
                logger.exception("ray-deploy: could not push stats")
            if self._index_pending:
                entries, self._index_pending = self._index_pending, []
                try:
                    collector.index.remote(self.config.app, entries)
                except Exception:  # e.g. a collector started by an older ray-deploy: labels then find
                    if not self._index_warned:  # only what this replica answered
                        logger.warning("ray-deploy: the stats collector keeps no capture index", exc_info=True)
                        self._index_warned = True

    def _check_headers(self, content_type: bytes | None, declared: bytes | None, encoding: bytes | None) -> bool:
        """Refuse, before reading it, a body that is neither JSON nor CSV (in UTF-8), is compressed
        or is declared too large; True for a CSV body."""
        assert self.config is not None
        if encoding is not None and encoding.strip().lower() != b"identity":
            raise RequestError(
                f"Content-Encoding {encoding.decode('latin-1')!r} is not supported; send the body uncompressed", 415
            )
        csv_body = False
        if content_type is not None and content_type != b"application/json":
            kind, *parameters = (part.strip().lower() for part in content_type.decode("latin-1").split(";"))
            csv_body = kind == "text/csv"
            if not csv_body and kind not in ("application/json", "") and not kind.endswith("+json"):
                raise RequestError(
                    f"content type {kind!r} is not supported; send Content-Type: application/json or text/csv", 415
                )
            for parameter in parameters:
                name, _, value = parameter.partition("=")
                if name.strip() != "charset" or value.strip().strip('"') not in ("utf-8", "utf8"):
                    raise RequestError(f"content type parameter {parameter!r} is not supported; send UTF-8", 415)
        limit = self.config.max_request_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(
                f"request body is {declared.decode()} bytes; the limit is {limit} (max_request_bytes)", 413
            )
        return csv_body

    def _predict(self, variant: LoadedVariant, model_input: ModelInput) -> Awaitable[Any]:
        """The variant's predictions, to await (a plain function: one coroutine less per request)."""
        if isinstance(variant.predictor, RemoteVariant):
            return variant.predictor.score(model_input.body)
        payload = variant.make_payload(model_input)
        if model_input.params is not None:
            return variant.predict_with_params(payload, model_input.params)
        if self.config.max_batch_size > 1 and variant.payload_format == "array":
            return self._predict_batched((variant, payload))
        return variant.predict(payload)

    def _answer(
        self,
        variant: LoadedVariant,
        model_input: ModelInput | InferRows,
        predictions: Any,
        raw: Any,
        request_id: str,
        request_key: str | None,
        started: float,
    ) -> JSONAnswer:
        """The answer to a scored request (and its copies to the capture, the shadows and the
        reference release, if any): ``predictions`` as JSON values for MLflow's protocol, ``raw``
        (as the predictor returned them, typed) for the Open Inference Protocol's."""
        rid = json_bytes(request_id)
        if type(model_input) is InferRows:
            body, headers = encode_infer_response(
                self.config.app, oip_version(variant.config), model_input.request, raw
            )
            response = InferAnswer(body, [*headers, *variant.answer_headers])
        else:
            # MLflow scoring clients read "predictions" and ignore the rest; "variant" and "model_version"
            # say which model answered, "request_id" names the answer for labels (also in headers,
            # for clients that only look at those).
            answer = b'{"predictions":' + json_bytes(predictions) + b',"request_id":' + rid + variant.answer_tail
            response = JSONAnswer(answer, 200, variant.answer_headers)
        capture = self.capture
        captured = capture is not None and capture.wanted()
        if captured:
            self._capture(variant, request_id, request_key, model_input, predictions, started)
        # A shadow would score without the params; a request pinned to a shadow is not served traffic.
        if model_input.params is None and not variant.config.shadow:
            if self.shadows or variant.label in self._candidates:
                # The rows were checked as numbers of this width if the served variant took an array.
                checked = variant.payload_format == "array" and not isinstance(variant.predictor, RemoteVariant)
                self._queue_shadow(
                    (
                        model_input,
                        predictions,
                        len(model_input.rows[0]) if checked else None,
                        request_id if captured else None,
                        variant.label,
                    )
                )
        return response

    def _capture(
        self,
        variant: LoadedVariant,
        request_id: str,
        request_key: str | None,
        model_input: Any,
        predictions: Any,
        started: float,
    ) -> None:
        """Hand a sampled request to the capture writer, and remember what answered it for labels."""
        config = variant.config
        self.capture.add(
            Captured(
                time.time(),
                request_id,
                request_key,
                config.name,
                variant.label,
                config.release,
                config.model_version,
                (time.perf_counter() - started) * 1000,
                model_input,
                predictions,
                config.shadow,
            )
        )
        entry = (variant.label, config.name, config.release, config.model_version, predictions)
        index = self._captured_index
        index[request_id] = entry
        if len(index) > CAPTURE_INDEX_LOCAL:
            index.popitem(last=False)
        self._index_pending.append((request_id, *entry))

    def _queue_shadow(self, item: tuple[Any, Any, int | None, str | None, str]) -> None:
        """Shadows (and the reference release of a rollout) score off the request path, in batches:
        the caller never waits for (or sees) them, and a request costs the router one list append.
        ``item``: the request's input, its answer, the row width the served path checked (or
        None), its request id if captured, the label of the variant that answered. Best effort:
        beyond ``SHADOW_QUEUE_LIMIT`` waiting requests, shadows skip requests (counted)."""
        if len(self._shadow_queue) >= SHADOW_QUEUE_LIMIT:
            self.shadow_dropped += 1
            return
        self._shadow_queue.append(item)
        if self._shadow_worker is None or self._shadow_worker.done():
            self._shadow_worker = asyncio.get_running_loop().create_task(self._drain_shadows())

    async def _drain_shadows(self) -> None:
        while self._shadow_queue:
            await asyncio.sleep(SHADOW_DELAY_S)
            batch = self._shadow_queue[:SHADOW_BATCH]
            del self._shadow_queue[: len(batch)]
            for shadow in self.shadows:
                try:
                    await self._shadow_batch(shadow, batch)
                except Exception:
                    logger.exception("ray-deploy: shadow variant %s failed", shadow.config.name)
            reference, candidates = self.reference, self._candidates
            if reference is not None:
                asked = [item for item in batch if item[4] in candidates]
                try:
                    if asked:
                        await self._reference_batch(reference, asked)
                except Exception:
                    logger.exception("ray-deploy: the old release %s failed to answer for comparison", reference.label)

    async def _reference_batch(self, reference: LoadedVariant, batch: list[tuple]) -> None:
        """Ask the old release the new release's requests; count agreement on the new release's stats."""
        answers, _ = await self._score_batch(reference, batch)
        for (_, served, _, _, label), answer in zip(batch, answers):
            stats = self.stats.get(label)
            if answer is not None and stats is not None:
                stats.compare_reference(served, answer)

    async def _shadow_batch(self, shadow: LoadedVariant, batch: list[tuple]) -> None:
        """Score a batch of requests with one shadow; count it and compare it with the served answers."""
        started = time.perf_counter()
        answers, statuses = await self._score_batch(shadow, batch)
        per_row_ms = (time.perf_counter() - started) * 1000 / len(batch)
        stats = self.stats.get(shadow.label) or self._start_stats(shadow)
        self._latency_sums[shadow.label] += per_row_ms * len(batch)
        stats.record_batch(per_row_ms, statuses, answers)
        capture = self.capture
        for (model_input, served, _, request_id, _), answer in zip(batch, answers):
            if answer is not None:
                stats.compare(served, answer)
                if request_id is not None and capture is not None:  # the served answer was captured: so is this
                    config = shadow.config
                    capture.add(
                        Captured(
                            time.time(),
                            request_id,
                            None,
                            config.name,
                            shadow.label,
                            config.release,
                            config.model_version,
                            per_row_ms,
                            model_input,
                            answer,
                            True,
                        )
                    )
        if self._pusher is None:
            self._pusher = asyncio.get_running_loop().create_task(self._push_stats())

    async def _score_batch(self, variant: LoadedVariant, batch: list[tuple]) -> tuple[list[Any], list[int]]:
        """A variant's answers to a batch of queued requests (None where it failed), and their
        statuses: one predict call for array models."""
        answers: list[Any] = [None] * len(batch)
        statuses = [500] * len(batch)
        shadow = variant  # (or the reference release)
        widths = {item[2] for item in batch}
        if shadow.payload_format == "array" and not isinstance(shadow.predictor, RemoteVariant):
            width = next(iter(widths))
            if len(widths) == 1 and width is not None and shadow.n_features in (None, width):
                # Every row was checked on the served path: one array for the whole batch.
                sizes = [len(item[0]) for item in batch]
                stacked = np.array([row for item in batch for row in item[0].rows], dtype=np.float64)
                rows = list(range(len(batch)))
            else:
                arrays, rows, sizes = [], [], []
                for index, (model_input, *_) in enumerate(batch):
                    try:
                        arrays.append(shadow.make_payload(model_input))
                        rows.append(index)
                        sizes.append(len(model_input))
                    except RequestError as exc:
                        statuses[index] = exc.status
                stacked = np.concatenate(arrays) if arrays else None
            if stacked is not None:
                values = to_jsonable(await shadow.predict(stacked))
                offset = 0
                for index, size in zip(rows, sizes):
                    answers[index] = values[offset : offset + size]
                    statuses[index] = 200
                    offset += size
        else:
            for index, (model_input, *_) in enumerate(batch):
                try:
                    answers[index] = to_jsonable(await self._predict(shadow, model_input))
                    statuses[index] = 200
                except RequestError as exc:
                    statuses[index] = exc.status
                except Exception:
                    logger.exception("ray-deploy: variant %s failed off the request path", shadow.label)
        return answers, statuses

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _predict_batched(self, items: list[tuple[LoadedVariant, np.ndarray]]) -> list[Any]:
        """One predict call per variant for all rows that arrived together, split back per request."""
        results: list[Any] = [None] * len(items)
        by_variant: dict[int, list[int]] = {}
        for index, (variant, _) in enumerate(items):
            by_variant.setdefault(id(variant), []).append(index)
        for indices in by_variant.values():
            variant = items[indices[0]][0]
            arrays = [items[i][1] for i in indices]
            stacked = await variant.predict(np.concatenate(arrays))
            offset = 0
            for i, array in zip(indices, arrays):
                results[i] = stacked[offset : offset + len(array)]
                offset += len(array)
        await asyncio.sleep(0)
        return results


def replica_placement() -> dict[str, Any]:
    """Where this replica runs: its id, process, node, placement group and visible GPUs."""
    import ray

    context = ray.get_runtime_context()
    group = context.get_placement_group_id()
    return {
        "id": serve.get_replica_context().replica_id.unique_id,
        "pid": os.getpid(),
        "node_id": context.get_node_id(),
        "placement_group_id": group,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


_NO_BODY = object()


def _short(value: Any, limit: int = 80) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


async def _receive_rest(receive: Any, first: dict[str, Any], limit: int) -> bytes:
    """The request body from the ASGI ``receive`` channel, given its first message; refused
    beyond ``limit`` bytes."""
    chunks = []
    size = 0
    message = first
    while True:
        if message["type"] == "http.disconnect":
            raise RequestError("the client went away before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(f"request body exceeds {limit} bytes (max_request_bytes)", 413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
        message = await receive()


@serve.deployment
class VariantServer:
    """One isolated variant, in a Serve app of its own; the app's ModelServer calls ``score``.

    The user_config is ``{"app": ..., "variant": VariantConfig}``; the model is loaded by
    reference and checked by hash, as in ModelServer.
    """

    def __init__(self) -> None:
        self.variant: LoadedVariant | None = None
        tune_gc()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        config = VariantConfig.model_validate(user_config["variant"])
        loaded = {self.variant.config.identity: self.variant} if self.variant else {}
        self.variant = await asyncio.to_thread(load_variant, config, loaded)
        logger.info("ray-deploy: isolated variant %s <- %s", config.label, config.model.uri)
        replica = serve.get_replica_context().replica_id.unique_id
        report_devices(
            user_config["app"], replica, {config.label: self.variant.describe()["device"]}, replica_placement()
        )

    async def score(self, body: Any) -> Any:
        """Predictions for a scoring body the router has already read (RequestError on bad input)."""
        assert self.variant is not None
        model_input = parse_model_input(body)
        payload = self.variant.make_payload(model_input)
        if model_input.params is not None:
            return to_jsonable(await self.variant.predict_with_params(payload, model_input.params))
        return to_jsonable(await self.variant.predict(payload))

    def describe(self) -> dict[str, Any]:
        assert self.variant is not None
        return {**self.variant.describe(), "replica": replica_placement()}


# Deployment objects, their Serve version pinned to the code above (see SERVER_CODE_VERSION).

REPLICA_CODE = (
    "serving/__init__.py",
    "serving/server.py",
    "serving/config.py",
    "serving/payload.py",
    "serving/oip.py",
    "serving/autoscale.py",
    "serving/access.py",
    "serving/variant.py",
    "serving/metrics.py",
    "serving/capture.py",
    "models",
    "spec.py",
    "errors.py",
)
"""The package's code that runs in a replica (relative to ``ray_deploy/``): the replica server,
its config, payload codecs and metrics, model loading and predictors, and what they import.
The CLI, the control plane and the front are left out, so editing them restarts no replica.
``tests/unit/test_code_version.py`` checks this list against what a replica really imports."""


def _server_code_version() -> str:
    import ray_deploy

    digest = hashlib.sha256(getattr(ray_deploy, "__version__", "0").encode("utf-8"))
    package = Path(__file__).resolve().parent.parent
    paths = set()
    for entry in REPLICA_CODE:
        target = package / entry
        paths |= set(target.rglob("*.py")) if target.is_dir() else {target}
    for path in sorted(paths):
        digest.update(path.relative_to(package).as_posix().encode("utf-8"))
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


SERVER_CODE_VERSION = _server_code_version()


def server_deployment(options: dict[str, Any]) -> Any:
    """The ModelServer deployment with ``options``, its Serve version pinned to the serving code.

    Serve gives an imperatively deployed class a random version on every ``serve.run``, which
    restarts every replica even when only the user_config changed. Pinning the version keeps a
    config-only change a ``reconfigure`` of the live replicas. ``Deployment`` takes no public
    version argument in Ray 2.x; ``_version`` is what ``serve.run`` reads.
    """
    deployment = ModelServer.options(**options)
    deployment._version = SERVER_CODE_VERSION
    return deployment


def variant_deployment(options: dict[str, Any]) -> Any:
    """The VariantServer deployment with ``options``, its version pinned like ModelServer's."""
    deployment = VariantServer.options(**options)
    deployment._version = SERVER_CODE_VERSION
    return deployment


def app_builder(args: dict[str, Any]) -> Any:
    """Serve config entry point (``import_path``): the deployment options arrive from the config file."""
    return ModelServer.bind()


def variant_app_builder(args: dict[str, Any]) -> Any:
    """Serve config entry point of an isolated variant's app: ``args = {"name": <deployment name>}``."""
    return VariantServer.options(name=args["name"]).bind()
