"""Bringing apps back from their registry records after the cluster lost them (a head restart).

Every settled state of an app is recorded on its registered model (``history``): the release
(which versions with which weights), the app's settings and deployment options, and the
directory its user code came from. Each version keeps its serving entry (model reference, sha256,
predictor). ``restore`` rebuilds each app's last settled release from those records and applies
it, checking the models on the cluster first, as a deploy does.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from ray_deploy.cluster import connect
from ray_deploy.control.live import LiveApp
from ray_deploy.control.lock import app_lock
from ray_deploy.errors import DeployError, LineageError
from ray_deploy.progress import report
from ray_deploy.registry.history import (
    CODE_DIR_TAG,
    RELEASE_PREFIX,
    ROLLOUT_TAG,
    SETTINGS_TAG,
    VARIANT_CONFIG_TAG,
    Action,
    VersionStatus,
)
from ray_deploy.registry.lineage import Registry, VersionRef
from ray_deploy.serving.config import RolloutPhase, ServingConfig, VariantConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordedApp:
    """What the registry says an app served last: enough to rebuild it."""

    app: str
    config: ServingConfig
    options: dict[str, Any]
    code_dir: str | None
    rollout: dict[str, Any] | None = None


def recorded_apps(registry: Registry) -> list[RecordedApp]:
    """Every app with a settled release in the registry, as last recorded.

    Raises:
        LineageError: a recorded version lacks its serving entry.
    """
    found: dict[str, tuple[str, RecordedApp]] = {}
    for model in registry.client.search_registered_models(max_results=1000):
        tags = dict(model.tags or {})
        if tags.get("ray_deploy.managed") != "true":
            continue
        for key, value in tags.items():
            if not key.startswith(f"{SETTINGS_TAG}."):
                continue
            app = key[len(SETTINGS_TAG) + 1 :]
            prefix = f"{RELEASE_PREFIX}{app}."
            releases = sorted(k for k in tags if k.startswith(prefix))
            if not releases:
                continue
            release = json.loads(tags[releases[-1]])
            recorded = json.loads(value)
            variants = [_variant(registry, entry) for entry in release["variants"]]
            config = ServingConfig.model_validate({**recorded["settings"], "variants": [], "rollout": None})
            rebuilt = RecordedApp(
                app=app,
                config=config.with_variants(variants),
                options=recorded["options"],
                code_dir=tags.get(f"{CODE_DIR_TAG}.{app}"),
                rollout=json.loads(tags[f"{ROLLOUT_TAG}.{app}"]) if f"{ROLLOUT_TAG}.{app}" in tags else None,
            )
            # One app may be recorded on several registered models: the newest record wins.
            if app not in found or release["at"] > found[app][0]:
                found[app] = (release["at"], rebuilt)
    return [entry for _, entry in sorted(found.values(), key=lambda item: item[1].app)]


def _variant(registry: Registry, entry: dict[str, Any]) -> VariantConfig:
    name, number = entry["model_version"].rsplit("/", 1)
    tags = registry.version_tags(VersionRef(name, number))
    if VARIANT_CONFIG_TAG not in tags:
        raise LineageError(f"model version {entry['model_version']} has no recorded serving entry to rebuild from")
    stored = VariantConfig.model_validate_json(tags[VARIANT_CONFIG_TAG])
    return stored.model_copy(update={"weight": entry["weight"], "shadow": entry["shadow"]})


def restore(app: str | None = None, address: str | None = None, registry: Registry | None = None) -> list[str]:
    """Re-create recorded apps that the cluster does not run (all, or one); returns their names.

    Apps already running are left alone. Each restored app is checked on the cluster (models
    loaded and hash-checked) before it is applied, and holds its lock while it is. An app that the
    cluster lost in the middle of a rollout comes back as its last settled release, and the
    rollout is recorded as rolled back (its versions say why): no split is left unrecorded.

    Raises:
        DeployError: ``app`` has no record, or an app did not come back (the others still do).
    """
    from ray_deploy.control.deploy import preflight

    registry = registry or Registry()
    registry.check_reachable()
    records = [r for r in recorded_apps(registry) if app is None or r.app == app]
    if app is not None and not records:
        raise DeployError(f"no settled release of app {app!r} is recorded in the registry at {registry.registry_uri}")
    restored, failed = [], []
    for record in records:
        code_dir = record.code_dir if record.code_dir and os.path.isdir(record.code_dir) else None
        if record.code_dir and code_dir is None:
            report(f"app {record.app!r}: its code directory {record.code_dir} is gone; user predictors will not import")
        with connect(address, code_dir=code_dir) as cluster:
            if LiveApp.read(record.app) is not None:
                report(f"app {record.app!r} is running; left as it is")
                continue
            try:
                with app_lock(record.app, "restore"):
                    _restore_one(record, registry, cluster.http_url + record.config.route_prefix, preflight)
                    restored.append(record.app)
            except Exception as exc:
                logger.error("could not restore %s: %s", record.app, exc)
                failed.append(f"{record.app}: {exc}")
        if failed and app is not None:
            break
    if failed:
        raise DeployError("could not restore " + "; ".join(failed))
    return restored


def _restore_one(record: RecordedApp, registry: Registry, url: str, preflight: Any) -> None:
    report(f"restoring app {record.app!r}: " + ", ".join(f"{v.label} {v.weight:g}%" for v in record.config.variants))
    preflight(record.config, timeout_s=record.config.settings.deploy_timeout_s)
    options = {k: v for k, v in record.options.items() if k != "user_config"}
    actor = dict(options.get("ray_actor_options") or {})
    actor.pop("runtime_env", None)  # the old cluster's code package; the job ships it again
    options["ray_actor_options"] = actor
    live = LiveApp.new(record.config.model_copy(update={"registry_uri": registry.registry_uri}), options, url)
    lost = _lost_rollout(registry, record)
    if lost:
        phase = record.rollout.get("phase")
        live.apply(
            live.config,
            Action.ROLLED_BACK,
            f"restore: the cluster lost app {record.app!r} during a rollout ({phase} at "
            f"{record.rollout.get('percent', 0):g}%); its last settled release serves again",
            leaving=lost,
            leaving_status=VersionStatus.ROLLED_BACK,
        )
    else:
        live.apply(live.config, Action.RESTORED, "restore: rebuilt from the registry after the cluster lost it")
    report(f"app {record.app!r} is serving again at {url}")


def _lost_rollout(registry: Registry, record: RecordedApp) -> list[VariantConfig]:
    """The versions of a rollout the cluster lost: recorded as staged or serving for the app, but
    not part of its last settled release."""
    if not record.rollout or record.rollout.get("phase") not in (
        RolloutPhase.STAGED,
        RolloutPhase.STEPPING,
        RolloutPhase.HOLDING,
    ):
        return []
    kept = {v.model_version for v in record.config.variants}
    lost = []
    for name in {v.model_version.rsplit("/", 1)[0] for v in record.config.variants if v.model_version}:
        for version in registry.client.search_model_versions(f"name='{name}'"):
            tags = dict(version.tags or {})
            if tags.get("ray.app") != record.app or f"{name}/{version.version}" in kept:
                continue
            if (
                tags.get("ray_deploy.status") in (VersionStatus.SERVING, VersionStatus.STAGED)
                and VARIANT_CONFIG_TAG in tags
            ):
                lost.append(VariantConfig.model_validate_json(tags[VARIANT_CONFIG_TAG]))
    return lost
