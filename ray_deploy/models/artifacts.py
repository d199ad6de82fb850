"""Model references: where a model lives and the hash it must have.

A replica never receives a pickled model from the driver. It receives a ``ModelRef`` and loads
the model itself, which is what lets a restart on another node, a rollback or an exported Serve
config rebuild exactly the same thing without re-running the flow.

Two kinds of reference exist:

* ``metaflow``: a step artifact, named by its pathspec (``Flow/run/step/task/artifact``) and by
  its content address in the flow's datastore (the key Metaflow itself stores it under). The
  replica reads the blob from that datastore root (a local path or ``s3://...``) and checks its
  sha256 before unpickling it.
* ``mlflow``: an MLflow model URI (``models:/name/1``, ``runs:/id/path``), loaded as a pyfunc.
  The reference carries the tracking and registry URIs it resolves against (without
  credentials), as a Metaflow reference carries its datastore root: a replica resolves the URI
  there, not against whatever MLflow defaults to in the replica's working directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse, urlunparse

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ray_deploy.errors import ArtifactError

logger = logging.getLogger(__name__)

METAFLOW_SCHEME = "metaflow://"
_MLFLOW_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


class ModelRef(BaseModel):
    """Where a model lives, and the hash its bytes must have."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["metaflow", "mlflow"] = Field(description="Where the model is stored.")
    uri: str = Field(description="metaflow://Flow/run/step/task/artifact, or an MLflow model URI.")
    sha256: str | None = Field(None, description="sha256 of the stored bytes; checked before loading.")
    blob_key: str | None = Field(None, description="Content address of the artifact in the Metaflow datastore.")
    datastore_type: str | None = Field(None, description="Metaflow datastore type, e.g. 'local' or 's3'.")
    datastore_root: str | None = Field(None, description="Metaflow datastore root the blob lives under.")
    python_type: str | None = Field(None, description="Fully qualified type of the model object.")
    tracking_uri: str | None = Field(
        None, description="MLflow: the tracking store the URI resolves against (None: MLflow's default where loaded)."
    )
    registry_uri: str | None = Field(
        None, description="MLflow: the registry a models:/ URI resolves against (None: MLflow's default where loaded)."
    )

    @field_validator("tracking_uri", "registry_uri")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        """References are recorded in registry tags and Serve configs: addresses, never secrets."""
        return without_credentials(value) if value else value

    @property
    def pathspec(self) -> str | None:
        """``Flow/run/step/task/artifact`` for Metaflow artifacts."""
        return self.uri[len(METAFLOW_SCHEME) :] if self.kind == "metaflow" else None

    @property
    def flow_name(self) -> str | None:
        return self.pathspec.split("/", 1)[0] if self.pathspec else None

    @property
    def artifact_name(self) -> str | None:
        return self.pathspec.rsplit("/", 1)[1] if self.pathspec else None


def python_type_name(value: Any) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def metaflow_model_ref(task_datastore: Any, flow_datastore: Any, name: str, value: Any) -> ModelRef:
    """Store a step's artifact now (as Metaflow will at the end of the task) and reference it.

    The artifact is saved through the task's own datastore so its bytes and content address are
    exactly those Metaflow records for it; saving it again when the task persists is a no-op.

    Args:
        task_datastore: the running task's ``TaskDataStore`` (mode 'w').
        flow_datastore: the flow's ``FlowDataStore``.
        name: artifact name, e.g. ``"model"``.
        value: the artifact's current value.

    Returns:
        A ``ModelRef`` whose sha256 covers the stored (serialized) bytes.
    """
    task_datastore.save_artifacts(iter([(name, value)]), len_hint=1)
    # keys_for_artifacts() is only allowed once the task is done (mode 'r'); while it runs the
    # content address is in _objects, where save_artifacts just put it.
    blob_key = task_datastore._objects[name]
    blob = _read_blob(flow_datastore.ca_store, blob_key, where=name)
    pathspec = f"{flow_datastore.flow_name}/{task_datastore.pathspec}/{name}"
    return ModelRef(
        kind="metaflow",
        uri=METAFLOW_SCHEME + pathspec,
        sha256=hashlib.sha256(blob).hexdigest(),
        blob_key=blob_key,
        datastore_type=flow_datastore.TYPE,
        datastore_root=flow_datastore.datastore_root,
        python_type=python_type_name(value),
    )


def read_model_bytes(ref: ModelRef) -> bytes:
    """The stored bytes of a Metaflow artifact, checked against the reference's sha256.

    Raises:
        ArtifactError: the datastore cannot be read, the blob is missing, or its hash differs.
    """
    if ref.kind != "metaflow" or not (ref.blob_key and ref.datastore_type and ref.datastore_root):
        raise ArtifactError(f"{ref.uri}: not a Metaflow artifact reference with a content address")
    from metaflow.datastore.content_addressed_store import ContentAddressedStore
    from metaflow.plugins import DATASTORES

    storage_classes = {cls.TYPE: cls for cls in DATASTORES}
    if ref.datastore_type not in storage_classes:
        raise ArtifactError(
            f"{ref.uri}: datastore type {ref.datastore_type!r} is not available on this node "
            f"(known: {', '.join(sorted(storage_classes))})"
        )
    storage = storage_classes[ref.datastore_type](ref.datastore_root)
    store = ContentAddressedStore(storage.path_join(ref.flow_name, "data"), storage)
    blob = _read_blob(store, ref.blob_key, where=f"{ref.uri} under {ref.datastore_root}")
    verify_sha256(ref, blob)
    return blob


def verify_sha256(ref: ModelRef, blob: bytes) -> None:
    """Refuse bytes whose sha256 is not the one recorded in the reference."""
    if ref.sha256 is None:
        return
    actual = hashlib.sha256(blob).hexdigest()
    if actual != ref.sha256:
        raise ArtifactError(
            f"{ref.uri}: sha256 mismatch, recorded {ref.sha256} but the stored bytes hash to {actual}; "
            "refusing to load a model that changed after it was recorded"
        )


MLFLOW_FLAVORS = ("xgboost", "onnx")
"""Predictors that take an MLflow model in its own flavor (an XGBoost model, an ONNX ModelProto)
rather than as a pyfunc."""


def load_model(ref: ModelRef, flavor: str | None = None) -> Any:
    """Load the model a reference points at, hash checked first: a Metaflow artifact's bytes, or an
    MLflow model's files (as a pyfunc, or in ``flavor``, one of ``MLFLOW_FLAVORS``, for the
    predictor of that name)."""
    if ref.kind == "mlflow":
        try:
            import mlflow.pyfunc
        except ImportError:
            raise ArtifactError(f"{ref.uri}: loading MLflow models needs mlflow: pip install mlflow") from None
        # Resolved against the registry the reference was made with; MLflow's own default would be
        # a new, empty store in the replica's working directory.
        with mlflow_uris(ref.tracking_uri, ref.registry_uri):
            local, actual = fetch_mlflow_model(ref)
            if ref.sha256 is not None and actual != ref.sha256:
                raise ArtifactError(
                    f"{ref.uri}: sha256 mismatch, recorded {ref.sha256} at deploy but its files hash to {actual}; "
                    "the model's files changed since it was deployed"
                )
            if flavor not in MLFLOW_FLAVORS:
                return mlflow.pyfunc.load_model(str(local))
            import importlib

            try:
                return importlib.import_module(f"mlflow.{flavor}").load_model(str(local))
            except Exception as exc:
                raise ArtifactError(
                    f"{ref.uri}: cannot load it in the {flavor!r} flavor ({type(exc).__name__}: {exc}); "
                    f"log it with mlflow.{flavor}.log_model, or serve it as a pyfunc (predictor 'mlflow')"
                ) from exc
    blob = read_model_bytes(ref)
    try:
        # The bytes were hash-checked above: only the exact artifact the flow recorded is unpickled.
        return pickle.loads(blob)
    except Exception as exc:
        raise ArtifactError(
            f"{ref.uri}: could not unpickle the model ({type(exc).__name__}: {exc}); "
            "the serving environment may lack the library the model was built with"
        ) from exc


MLFLOW_MODEL_CACHE = "ray-deploy-mlflow-models"
"""Directory under the temp dir holding fetched MLflow models, one per content hash."""


def fetch_mlflow_model(ref: ModelRef) -> tuple[Path, str]:
    """The MLflow model's files on this machine and their sha256 (see ``directory_sha256``), fetched
    once per content: ``<tmp>/ray-deploy-mlflow-models/<sha256>`` (MLflow's URIs must be set)."""
    import shutil
    import tempfile

    import mlflow.artifacts

    cache = Path(tempfile.gettempdir()) / MLFLOW_MODEL_CACHE
    if ref.sha256 and (cache / ref.sha256).is_dir() and directory_sha256(cache / ref.sha256) == ref.sha256:
        return cache / ref.sha256, ref.sha256
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="fetch-", dir=cache))
    try:
        fetched = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=str(staging)))
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ArtifactError(f"{ref.uri}: cannot fetch the model's files ({type(exc).__name__}: {exc})") from exc
    sha256 = directory_sha256(fetched)
    final = cache / sha256
    try:
        fetched.rename(final)
    except OSError:  # another process put the same files there first
        pass
    shutil.rmtree(staging, ignore_errors=True)
    return final, sha256


def directory_sha256(directory: Path) -> str:
    """sha256 over every file under ``directory``: its path relative to it, then its bytes, in path order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode("utf-8") + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _read_blob(store: Any, key: str, where: str) -> bytes:
    try:
        for _, blob in store.load_blobs([key]):
            return blob
    except Exception as exc:
        raise ArtifactError(f"{where}: cannot read blob {key} ({type(exc).__name__}: {exc})") from exc
    raise ArtifactError(f"{where}: blob {key} is missing from the datastore")


@contextmanager
def mlflow_uris(tracking: str | None, registry: str | None) -> Iterator[None]:
    """MLflow's process-wide URIs set for a load, then put back as they were (MLflow resolves
    ``models:/`` with its global registry URI whatever URIs are passed to it, and mirrors its
    globals into the environment, which ray-deploy reads)."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_globals
    from mlflow.tracking._tracking_service import utils as tracking_globals

    before = {name: os.environ.get(name) for name in _MLFLOW_URI_ENV}
    # MLflow's own globals as they are (None: not set, the environment decides), put back as they
    # were: set from the environment instead, they would outlive it (a caller's temporary settings).
    globals_before = (tracking_globals._tracking_uri, registry_globals._registry_uri)
    if tracking:
        mlflow.set_tracking_uri(tracking)
    if registry:
        mlflow.set_registry_uri(registry)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(globals_before[0])
        registry_globals._registry_uri = globals_before[1]
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def without_credentials(uri: str) -> str:
    """``https://user:secret@host/x`` -> ``https://host/x``: references are recorded in tags and configs."""
    parsed = urlparse(uri)
    if "@" not in uri or not (parsed.username or parsed.password):
        return uri
    host = parsed.hostname or ""
    return urlunparse(parsed._replace(netloc=f"{host}:{parsed.port}" if parsed.port else host))
