"""MLflow registry reads and writes: every deployed variant is a registered model version.

A version's tags lead back to the Metaflow run, step, task, artifact (and its sha256) and the
input data, and forward to the Ray app that serves it. Aliases follow the truth: the version
serving all traffic (or the largest share of it) holds ``production``; the version serving the
next largest share, such as a canary, holds ``canary``.

Tag names (all strings, as MLflow stores them)::

    metaflow.flow  metaflow.run_id  metaflow.step  metaflow.task  metaflow.user  metaflow.code_version
    metaflow.artifact  metaflow.artifact_uri  metaflow.artifact_sha256  metaflow.artifact_blob_key
    metaflow.datastore_type  metaflow.datastore_root
    metaflow.producer_task  metaflow.producer_artifact  (where the model's content first appeared in
        the run, i.e. the task that trained it, such as a foreach's winning branch; metaflow.task
        is the task that deployed it, often holding a copy)
    metaflow.data.<name>  (JSON: pathspec, sha256, blob_key of each input data artifact)
    ray.variant  ray.app  ray.deployment  ray.route  ray.url  ray.address  ray.dashboard_url
    ray.deployed_at  ray.traffic_weight  ray_deploy.status  (registered, serving, failed)

The registry is ``MLFLOW_REGISTRY_URI``, else ``MLFLOW_TRACKING_URI``, else a SQLite file at
``$RAY_DEPLOY_HOME/mlflow/mlflow.db`` (``RAY_DEPLOY_HOME`` defaults to ``~/.ray_deploy``).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ray_deploy.errors import LineageError, RegistryUnreachable
from ray_deploy.models.artifacts import ModelRef

logger = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 3.0


def ray_deploy_home() -> Path:
    return Path(os.environ.get("RAY_DEPLOY_HOME") or Path.home() / ".ray_deploy")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the embedded SQLite store under RAY_DEPLOY_HOME."""
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        return configured
    directory = ray_deploy_home() / "mlflow"
    return f"sqlite:///{directory / 'mlflow.db'}"


def registry_uri() -> str:
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri()


@dataclass(frozen=True)
class DataRef:
    """An input data artifact the model was trained from."""

    name: str
    pathspec: str
    sha256: str | None = None
    blob_key: str | None = None

    def to_tag(self) -> str:
        return json.dumps({"pathspec": self.pathspec, "sha256": self.sha256, "blob_key": self.blob_key})


@dataclass(frozen=True)
class LineageSource:
    """Where the deployed models came from (filled in by the Metaflow glue)."""

    flow: str
    run_id: str
    step: str
    task: str
    user: str
    code_version: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    data: tuple[DataRef, ...] = ()
    model_origins: dict[str, str] = field(default_factory=dict)
    """Content address (blob key) of a deployed model -> pathspec of the artifact where that content
    first appeared in the run (``Flow/run/train/4/model``): the task that trained it."""

    @property
    def run_pathspec(self) -> str:
        return f"{self.flow}/{self.run_id}"


@dataclass(frozen=True)
class VersionRef:
    """A registered model version: ``name/version``."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def artifact_uri(ref: ModelRef) -> str:
    """Where the artifact's bytes live in the Metaflow datastore (file:// or s3:// ...)."""
    if ref.kind != "metaflow" or not ref.datastore_root or not ref.blob_key:
        return ref.uri
    root = ref.datastore_root.rstrip("/")
    path = f"{root}/{ref.flow_name}/data/{ref.blob_key[:2]}/{ref.blob_key}"
    return path if "://" in path else f"file://{path}"


class Registry:
    """The MLflow registry, reached through ``MlflowClient``; every call names the URI on failure."""

    def __init__(self, tracking: str | None = None, registry: str | None = None):
        self.tracking_uri = tracking or tracking_uri()
        self.registry_uri = registry or (registry_uri() if tracking is None else tracking)
        self._client = None

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                from mlflow import MlflowClient
            except ImportError:
                raise LineageError("recording lineage needs MLflow: pip install 'mlflow>=3'") from None
            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
        return self._client

    def check_reachable(self) -> None:
        """Fail fast, naming the URI, when the registry cannot be reached.

        Raises:
            RegistryUnreachable: a server does not answer, or a SQLite file cannot be created.
        """
        self.check_address()
        self.first_answer()

    def check_address(self) -> None:
        """The quick half of ``check_reachable``: a server's port accepts a connection, a SQLite
        file's directory exists or can be made (RegistryUnreachable otherwise)."""
        for uri in dict.fromkeys((self.tracking_uri, self.registry_uri)):
            parsed = urlparse(uri)
            if parsed.scheme in ("http", "https"):
                port = parsed.port or (443 if parsed.scheme == "https" else 80)
                try:
                    with socket.create_connection((parsed.hostname, port), timeout=_CONNECT_TIMEOUT_S):
                        pass
                except OSError as exc:
                    raise RegistryUnreachable(
                        f"MLflow registry unreachable at {uri} ({exc}); start the server or set "
                        "MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI"
                    ) from None
            elif parsed.scheme == "sqlite":
                path = Path(uri[len("sqlite:///") :])
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise RegistryUnreachable(
                        f"MLflow registry at {uri}: cannot create {path.parent} ({exc})"
                    ) from None

    def first_answer(self) -> None:
        """The registry answers a query (the first one creates an embedded SQLite store, which
        takes seconds: ``deploy`` overlaps it with the preflight)."""
        try:
            self.client.search_registered_models(max_results=1)
        except LineageError:
            raise
        except Exception as exc:
            raise RegistryUnreachable(f"MLflow registry at {self.registry_uri} did not answer: {exc}") from None

    def mirror_run(self, source: LineageSource) -> str:
        """The MLflow run mirroring a Metaflow run (created once): params and metrics of the flow."""
        client = self.client
        experiment_name = f"metaflow/{source.flow}"
        experiment = client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`metaflow.run` = '{source.run_pathspec}'", max_results=1
        )
        if found:
            run_id = found[0].info.run_id
        else:
            run = client.create_run(
                experiment_id,
                run_name=f"{source.flow}-{source.run_id}",
                tags={
                    "metaflow.run": source.run_pathspec,
                    "metaflow.flow": source.flow,
                    "metaflow.run_id": source.run_id,
                    "metaflow.user": source.user,
                    "mlflow.user": source.user,
                    **({"metaflow.code_version": source.code_version} if source.code_version else {}),
                },
            )
            run_id = run.info.run_id
            for name, value in sorted(source.parameters.items()):
                client.log_param(run_id, name, value)
            client.set_terminated(run_id)
        for name, value in sorted(source.metrics.items()):
            client.log_metric(run_id, name, value)
        return run_id

    def register_version(
        self, name: str, variant: str, ref: ModelRef, source: LineageSource, run_id: str, predictor: str
    ) -> VersionRef:
        """Register one variant's model; a retry of the same task reuses the version it made."""
        client = self.client
        existing = self.find_version(name, source.task, variant, ref.sha256)
        if existing is not None:
            return existing
        self._ensure_registered_model(name)
        tags = {
            "metaflow.flow": source.flow,
            "metaflow.run_id": source.run_id,
            "metaflow.step": source.step,
            "metaflow.task": source.task,
            "metaflow.user": source.user,
            "metaflow.artifact": ref.artifact_name or "",
            "metaflow.artifact_pathspec": ref.pathspec or "",
            "metaflow.artifact_uri": artifact_uri(ref),
            "metaflow.artifact_sha256": ref.sha256 or "",
            "metaflow.artifact_blob_key": ref.blob_key or "",
            "metaflow.datastore_type": ref.datastore_type or "",
            "metaflow.datastore_root": ref.datastore_root or "",
            "metaflow.python_type": ref.python_type or "",
            "ray.variant": variant,
            "ray_deploy.predictor": predictor,
            "ray_deploy.status": "registered",
        }
        if source.code_version:
            tags["metaflow.code_version"] = source.code_version
        producer = producer_tags(source.model_origins.get(ref.blob_key or ""))
        tags.update(producer)
        for data in source.data:
            tags[f"metaflow.data.{data.name}"] = data.to_tag()
        description = f"{ref.uri} (variant {variant!r}), deployed by {source.task}"
        if producer:
            description += f", trained by {producer['metaflow.producer_task']}"
        version = None
        for candidate in (artifact_uri(ref), ref.uri):
            try:
                version = client.create_model_version(
                    name, candidate, run_id=run_id, tags=tags, description=description
                )
                break
            except Exception as exc:
                # An MLflow server refuses local paths as sources; the metaflow:// URI names the
                # same artifact and the datastore location stays in metaflow.artifact_uri.
                if "Invalid model version source" not in str(exc) or candidate == ref.uri:
                    raise
        return VersionRef(name, str(version.version))

    def record_mlflow_model(self, name: str, variant: str, ref: ModelRef, predictor: str) -> VersionRef:
        """Record an MLflow model deployed without a Metaflow run (the MLflow deployments target).

        A version of ``name`` itself (``models:/name/...`` for the app's own registered model) is
        the record, tagged; any other source gets a new version of ``name`` with the source's
        artifacts and MLflow run, tagged with the source, and carrying the source's ``metaflow.*``
        tags (the Metaflow run behind it, when ``@ray_serve`` recorded it)."""
        client = self.client
        tags = {
            "mlflow.source_uri": ref.uri,
            "ray_deploy.model_sha256": ref.sha256 or "",
            "ray.variant": variant,
            "ray_deploy.predictor": predictor,
            "ray_deploy.status": "registered",
            "ray_deploy.deployed_by": who(),
        }
        if ref.uri.startswith("models:/"):
            source = self.resolve(ref.uri)
            found = client.get_model_version(source.name, source.version)
            if source.name == name:
                self.set_tags(source, tags)
                return source
            # Where its files are, not its source: an MLflow 3 source is "models:/m-<id>", which the
            # registry resolves against the process-wide tracking URI, not this client's.
            artifacts, run_id = client.get_model_version_download_uri(source.name, source.version), found.run_id
            tags.update({k: v for k, v in found.tags.items() if k.startswith("metaflow.")})
            tags["mlflow.source_model_version"] = str(source)
        else:  # runs:/RUN_ID/PATH
            artifacts, run_id = ref.uri, ref.uri.removeprefix("runs:/").split("/", 1)[0]
        self._ensure_registered_model(name)
        version = client.create_model_version(
            name,
            artifacts,
            run_id=run_id,
            tags=tags,
            description=f"{ref.uri} (variant {variant!r}), deployed by MLflow deployments",
        )
        return VersionRef(name, str(version.version))

    def _ensure_registered_model(self, name: str) -> None:
        try:
            self.client.create_registered_model(name, tags={"ray_deploy.managed": "true"})
        except Exception as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc) and "already exists" not in str(exc):
                raise

    def find_version(self, name: str, task: str, variant: str, sha256: str | None) -> VersionRef | None:
        try:
            found = self.client.search_model_versions(
                f"name = '{name}' and tags.`metaflow.task` = '{task}' and tags.`ray.variant` = '{variant}'"
            )
        except Exception:
            return None
        for version in sorted(found, key=lambda v: int(v.version)):
            if version.tags.get("metaflow.artifact_sha256") == (sha256 or ""):
                return VersionRef(name, str(version.version))
        return None

    def set_tags(self, version: VersionRef, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(version.name, version.version, key, str(value))

    def set_alias(self, version: VersionRef, alias: str) -> None:
        self.client.set_registered_model_alias(version.name, alias, version.version)

    def delete_alias(self, name: str, alias: str) -> None:
        try:
            self.client.delete_registered_model_alias(name, alias)
        except Exception as exc:
            logger.debug("no alias %s on %s: %s", alias, name, exc)

    def version_tags(self, version: VersionRef) -> dict[str, str]:
        return dict(self.client.get_model_version(version.name, version.version).tags)

    def resolve(self, reference: str) -> VersionRef:
        """``NAME/VERSION`` or ``NAME@ALIAS`` (or the same behind ``models:/``) to a version."""
        text = reference.removeprefix("models:/")
        if "@" in text:
            name, alias = text.rsplit("@", 1)
            try:
                version = self.client.get_model_version_by_alias(name, alias)
            except Exception as exc:
                raise LineageError(f"no version of {name!r} holds alias {alias!r} in {self.registry_uri}: {exc}")
            return VersionRef(name, str(version.version))
        if "/" in text:
            name, number = text.rsplit("/", 1)
            if number.isdigit():
                return VersionRef(name, number)
        raise LineageError(
            f"model reference {reference!r}: expected NAME/VERSION or NAME@ALIAS, e.g. cancer@production"
        )


def recorded_at() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def who() -> str:
    """The user on whose behalf a change is made, found as Metaflow finds a run's user
    (METAFLOW_USER, SUDO_USER, USERNAME, USER; ``root`` only as a last resort)."""
    for name in ("METAFLOW_USER", "SUDO_USER", "USERNAME", "USER"):
        if os.environ.get(name) and os.environ[name] != "root":
            return os.environ[name]
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def flatten_metrics(name: str, value: Any) -> dict[str, float]:
    """Metrics from an artifact: a number, or a (nested) dict of numbers, as dotted names.

    Example:
        >>> flatten_metrics("best", {"auc": 0.99, "by_class": {"0": 0.9}})
        {'best.auc': 0.99, 'best.by_class.0': 0.9}
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} is a boolean, not a number")
    if isinstance(value, int | float):
        return {name: float(value)}
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return {name: float(value.item())}
    if isinstance(value, dict):
        flat: dict[str, float] = {}
        for key, item in value.items():
            flat.update(flatten_metrics(f"{name}.{key}", item))
        return flat
    raise ValueError(f"{name} is a {type(value).__name__}; metrics must be numbers or dicts of numbers")


def code_version(directory: str | None) -> str | None:
    """The git commit of the code directory (with ``-dirty`` when it has uncommitted changes)."""
    import subprocess

    if not directory:
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", directory, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", directory, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit or None


def data_ref_from_pathspec(pathspec: str, flow_datastore: Any | None = None) -> DataRef:
    """An input data artifact of any finished run, by pathspec, with its content address and sha256."""
    import hashlib

    from metaflow import DataArtifact, namespace

    from ray_deploy.models.artifacts import METAFLOW_SCHEME, read_model_bytes

    namespace(None)
    try:
        artifact = DataArtifact(pathspec)
        blob_key = artifact.sha
    except Exception as exc:
        raise LineageError(f"data: cannot find artifact {pathspec!r} through the Metaflow client ({exc})") from None
    sha256 = None
    if flow_datastore is not None:
        ref = ModelRef(
            kind="metaflow",
            uri=METAFLOW_SCHEME + pathspec,
            blob_key=blob_key,
            datastore_type=flow_datastore.TYPE,
            datastore_root=flow_datastore.datastore_root,
        )
        sha256 = hashlib.sha256(read_model_bytes(ref)).hexdigest()
    return DataRef(name=pathspec.rsplit("/", 1)[1], pathspec=pathspec, sha256=sha256, blob_key=blob_key)


def origin_of(flow: str, run_id: str, name: str | None, blob_key: str | None) -> str | None:
    """The artifact of a run where this content first appeared, as ``Flow/run/step/task/artifact``.

    Every finished task of the run holding an artifact with content address ``blob_key``
    (Metaflow's ``DataArtifact.sha``, which a copy such as ``self.model = self.best_model`` keeps) is
    a candidate, and the one that finished first produced the content: for a model picked in a join,
    the winning branch of the foreach. ``name`` limits the search to artifacts of that name (input
    data); None accepts any name (a model is often renamed on its way to the deploy step). A running
    task's own artifacts are not visible yet, so from inside a deploy step only earlier tasks count.

    Returns:
        The artifact's pathspec, or None when no finished task of the run holds the content or the
        run cannot be read through the Metaflow client.
    """
    from metaflow import Run, namespace

    if not blob_key:
        return None
    namespace(None)
    try:
        steps = list(Run(f"{flow}/{run_id}"))
    except Exception:
        return None
    holders = []
    for order, step in enumerate(reversed(steps)):  # the client lists steps newest first
        for task in step:
            try:
                if name is not None:
                    names = [name] if name in task and task[name].sha == blob_key else []
                else:
                    names = sorted(artifact.id for artifact in task if artifact.sha == blob_key)
                finished_at = task.finished_at if names else None
            except Exception:
                continue
            if finished_at is not None:
                holders.append((finished_at, order, (len(task.id), task.id), f"{task.pathspec}/{names[0]}"))
    return min(holders)[-1] if holders else None


def producer_tags(origin: str | None) -> dict[str, str]:
    """The registry tags naming where a model's content first appeared, from that artifact's pathspec.

    Args:
        origin: ``Flow/run/step/task/artifact``, as ``origin_of`` finds it; None when unknown.

    Returns:
        ``metaflow.producer_task`` and ``metaflow.producer_artifact``; no tags for None.

    Raises:
        LineageError: ``origin`` is not an artifact pathspec.

    Example:
        >>> producer_tags("TrainFlow/12/train/4/model")
        {'metaflow.producer_task': 'TrainFlow/12/train/4', 'metaflow.producer_artifact': 'model'}
    """
    if origin is None:
        return {}
    parts = origin.split("/")
    if len(parts) != 5 or not all(parts):
        raise LineageError(
            f"model origin {origin!r}: expected an artifact pathspec Flow/run/step/task/artifact, "
            "e.g. TrainFlow/12/train/4/model"
        )
    return {"metaflow.producer_task": "/".join(parts[:4]), "metaflow.producer_artifact": parts[4]}
