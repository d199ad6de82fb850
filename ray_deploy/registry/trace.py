"""Reading lineage back, checking every hop: app -> variant -> model version -> Metaflow task that
deployed it -> model artifact -> task that trained it -> input data, from either end.

Each hop is checked, not just printed: the model version must be the one the app serves, the
Metaflow tasks must exist and have succeeded, the training task's artifact must have the deployed
model's content address, and the artifact and data blobs must still hash to the sha256 recorded at
deploy time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ray_deploy.errors import RayDeployError
from ray_deploy.models.artifacts import METAFLOW_SCHEME, ModelRef, read_model_bytes
from ray_deploy.registry.lineage import Registry, VersionRef
from ray_deploy.serving.config import ServingConfig


@dataclass(frozen=True)
class Hop:
    """One link of a lineage chain and whether it checks out."""

    kind: str
    name: str
    ok: bool
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


AppReader = Callable[[str, "str | None"], "tuple[ServingConfig, str, str]"]
"""Reads a live app: (app, address) -> (config, Serve status, URL). The control plane passes
``ray_deploy.control.status.app_serving_config``; this module never reaches Serve itself."""


def trace_config(
    app: str, config: ServingConfig, status: str, url: str, registry: Registry | None = None
) -> dict[str, list[Hop]]:
    """The lineage of every variant a live app serves (its config as read from Serve).

    Returns:
        variant label -> its chain of hops, app first.
    """
    if registry is None and config.registry_uri:
        registry = Registry(config.registry_uri, config.registry_uri)
    chains = {}
    for variant in config.variants:
        hops = [
            Hop("app", app, status == "RUNNING", f"{status} at {url}"),
            Hop(
                "variant",
                variant.label,
                True,
                ("shadow" if variant.shadow else f"{variant.weight:g}% of traffic")
                + f", predictor {variant.predictor}, model {variant.model.uri}",
            ),
        ]
        if variant.model_version is None:
            hops.append(Hop("model_version", "-", False, "this deployment recorded no MLflow model version"))
            hops += _artifact_hops_from_ref(variant.model)
        elif registry is None:
            hops.append(Hop("model_version", variant.model_version, False, "no registry URI recorded"))
        else:
            name, number = variant.model_version.rsplit("/", 1)
            hops += _version_hops(registry, VersionRef(name, number), expected=variant.model, app=app)
        chains[variant.label] = hops
    return chains


def trace_model(
    reference: str, read_app: AppReader, registry: Registry | None = None, address: str | None = None
) -> list[Hop]:
    """The lineage of one model version (``NAME/VERSION`` or ``NAME@ALIAS``), with the app serving it."""
    registry = registry or Registry()
    version = registry.resolve(reference)
    hops = _version_hops(registry, version, expected=None, app=None)
    tags = _tags(registry, version)
    app = tags.get("ray.app") if tags else None
    if app:
        hops.insert(0, _serving_hop(app, version, read_app, address or tags.get("ray.address")))
    return hops


def broken(hops: list[Hop]) -> list[Hop]:
    return [hop for hop in hops if not hop.ok]


def _serving_hop(app: str, version: VersionRef, read_app: AppReader, address: str | None) -> Hop:
    try:
        config, status, url = read_app(app, address)
    except RayDeployError as exc:
        return Hop("app", app, False, f"cannot read the app: {exc}")
    serving = [v for v in config.variants if v.model_version == str(version)]
    if not serving:
        return Hop("app", app, False, f"{status} at {url}, but no longer serves {version}")
    weights = ", ".join(f"{v.label} {v.weight:g}%" for v in serving)
    return Hop("app", app, status == "RUNNING", f"{status} at {url}, serving {version} as {weights}")


def _tags(registry: Registry, version: VersionRef) -> dict[str, str] | None:
    try:
        return registry.version_tags(version)
    except Exception:
        return None


def _version_hops(registry: Registry, version: VersionRef, expected: ModelRef | None, app: str | None) -> list[Hop]:
    tags = _tags(registry, version)
    if tags is None:
        return [Hop("model_version", str(version), False, f"not found in {registry.registry_uri}")]
    # An MLflow model deployed by the MLflow deployments target records the sha256 of its files.
    recorded_sha = tags.get("ray_deploy.model_sha256") or tags.get("metaflow.artifact_sha256", "")
    problems = []
    if expected is not None and expected.sha256 and recorded_sha != expected.sha256:
        problems.append(f"records sha256 {recorded_sha[:12]} but the app serves {expected.sha256[:12]}")
    if app is not None and tags.get("ray.app") not in (None, app):
        problems.append(f"is tagged for app {tags.get('ray.app')!r}")
    aliases = _aliases(registry, version)
    detail = f"{registry.registry_uri}; status {tags.get('ray_deploy.status', '?')}"
    if aliases:
        detail += f"; aliases {', '.join(aliases)}"
    hops = [Hop("model_version", str(version), not problems, "; ".join(problems) or detail)]
    if not tags.get("metaflow.task") and tags.get("mlflow.source_uri"):
        # Deployed by the MLflow deployments target from a model no @ray_serve step recorded: its
        # MLflow run is where the chain goes on.
        return [*hops, _mlflow_run_hop(registry, version, tags), *history_hops(tags)]
    hops.append(_task_hop(tags.get("metaflow.task", "")))
    pathspec = tags.get("metaflow.artifact_pathspec", "")
    ref = ModelRef(
        kind="metaflow",
        uri=METAFLOW_SCHEME + pathspec,
        sha256=recorded_sha or None,
        blob_key=tags.get("metaflow.artifact_blob_key") or None,
        datastore_type=tags.get("metaflow.datastore_type") or None,
        datastore_root=tags.get("metaflow.datastore_root") or None,
    )
    deployed = _blob_hop("model_artifact", pathspec, ref)
    hops.append(deployed)
    if tags.get("metaflow.producer_task"):  # versions recorded before the producer tags have none
        hops.append(
            _training_hop(tags["metaflow.producer_task"], tags.get("metaflow.producer_artifact", ""), ref, deployed)
        )
    for key, value in sorted(tags.items()):
        if key.startswith("metaflow.data."):
            data = json.loads(value)
            data_ref = ref.model_copy(
                update={
                    "uri": METAFLOW_SCHEME + data["pathspec"],
                    "sha256": data.get("sha256"),
                    "blob_key": data.get("blob_key"),
                }
            )
            hops.append(_blob_hop("data", data["pathspec"], data_ref))
    return hops + history_hops(tags)


def history_hops(tags: dict[str, str]) -> list[Hop]:
    """The version's traffic history (deploys, rollout steps, gates, rollbacks), oldest first."""
    from ray_deploy.registry.history import EVENT_PREFIX

    hops = []
    for key in sorted(k for k in tags if k.startswith(EVENT_PREFIX)):
        event = json.loads(tags[key])
        detail = (
            f"{event.get('at')} by {event.get('by')}: {event.get('reason')}; this version {event.get('weight', 0):g}%"
        )
        seen = event.get("observed")
        if seen:
            detail += f"; had answered {seen.get('requests')} request(s), error rate {seen.get('error_rate')}"
            if seen.get("shadow_agreement") is not None:
                detail += f", shadow agreement {seen['shadow_agreement']:.3f}"
        gate = event.get("gate")
        if gate:
            canary = gate.get("canary") or {}
            detail += (
                f"; gate {'passed' if gate.get('passed') else 'FAILED'} on {canary.get('requests', 0)} request(s), "
                f"error rate {canary.get('error_rate')}, p99 <= {canary.get('p99_ms')} ms"
            )
        hops.append(Hop("traffic", event.get("action", "?"), True, detail))
    return hops


def _mlflow_run_hop(registry: Registry, version: VersionRef, tags: dict[str, str]) -> Hop:
    origin = tags.get("mlflow.source_model_version") or tags["mlflow.source_uri"]
    try:
        run_id = registry.client.get_model_version(version.name, version.version).run_id
    except Exception as exc:
        return Hop("mlflow_run", "-", False, f"cannot read {version}: {type(exc).__name__}")
    if not run_id:
        return Hop("mlflow_run", "-", False, f"{origin} names no MLflow run")
    try:
        run = registry.client.get_run(run_id)
    except Exception as exc:
        return Hop("mlflow_run", run_id, False, f"not found in {registry.tracking_uri}: {type(exc).__name__}")
    return Hop("mlflow_run", run_id, run.info.status == "FINISHED", f"{run.info.status}; deployed from {origin}")


def _aliases(registry: Registry, version: VersionRef) -> list[str]:
    try:
        return list(registry.client.get_model_version(version.name, version.version).aliases)
    except Exception:
        return []


def _task_hop(task_pathspec: str) -> Hop:
    from metaflow import Task, namespace

    if not task_pathspec:
        return Hop("metaflow_task", "-", False, "no metaflow.task tag")
    namespace(None)
    try:
        task = Task(task_pathspec)
        finished = task.finished
        successful = task.successful
    except Exception as exc:
        return Hop("metaflow_task", task_pathspec, False, f"not found through the Metaflow client ({exc})")
    if not finished or not successful:
        return Hop("metaflow_task", task_pathspec, False, "the task did not finish successfully")
    return Hop("metaflow_task", task_pathspec, True, f"finished {task.finished_at}")


def _training_hop(task_pathspec: str, artifact: str, ref: ModelRef, deployed: Hop) -> Hop:
    """The task that trained the model: it succeeded, and its artifact has the deployed model's
    content address and so its bytes (hashed to the recorded sha256 by the ``deployed`` hop, else
    here)."""
    from metaflow import DataArtifact, namespace

    task = _task_hop(task_pathspec)
    if not task.ok:
        return Hop("training_task", task_pathspec, False, task.detail)
    pathspec = f"{task_pathspec}/{artifact}"
    namespace(None)
    try:
        sha = DataArtifact(pathspec).sha
    except Exception as exc:
        return Hop("training_task", task_pathspec, False, f"artifact {artifact!r} not found ({exc})")
    if sha != ref.blob_key:
        return Hop(
            "training_task",
            task_pathspec,
            False,
            f"artifact {artifact!r} has content address {sha}, not the deployed model's {ref.blob_key}",
        )
    if not deployed.ok:
        # The deployed copy did not check out: hash the bytes here, so this hop stands on its own.
        checked = _blob_hop("training_task", pathspec, ref)
        if not checked.ok:
            return Hop("training_task", task_pathspec, False, f"artifact {artifact!r}: {checked.detail}")
    return Hop(
        "training_task",
        task_pathspec,
        True,
        f"trained the model: artifact {artifact!r}, content address {sha}, sha256 {ref.sha256} as deployed; "
        + task.detail,
    )


def _blob_hop(kind: str, pathspec: str, ref: ModelRef) -> Hop:
    """The artifact exists in Metaflow under the recorded content address and still hashes the same."""
    from metaflow import DataArtifact, namespace

    namespace(None)
    try:
        sha = DataArtifact(pathspec).sha
    except Exception as exc:
        return Hop(kind, pathspec, False, f"not found through the Metaflow client ({exc})")
    if ref.blob_key and sha != ref.blob_key:
        return Hop(kind, pathspec, False, f"content address {sha} differs from the recorded {ref.blob_key}")
    try:
        blob = read_model_bytes(ref.model_copy(update={"sha256": None, "blob_key": sha}))
    except RayDeployError as exc:
        return Hop(kind, pathspec, False, str(exc))
    actual = hashlib.sha256(blob).hexdigest()
    if ref.sha256 and actual != ref.sha256:
        return Hop(kind, pathspec, False, f"hash no longer matches: recorded {ref.sha256}, now {actual}")
    return Hop(kind, pathspec, True, f"sha256 {actual} matches")


def _artifact_hops_from_ref(ref: ModelRef) -> list[Hop]:
    if ref.kind != "metaflow" or not ref.pathspec:
        return [Hop("model_artifact", ref.uri, True, "an MLflow model URI")]
    task = ref.pathspec.rsplit("/", 1)[0]
    return [_task_hop(task), _blob_hop("model_artifact", ref.pathspec, ref)]
