"""Traffic history in the MLflow registry: every change to what an app serves, on the versions.

Each change (deploy, rollout step, gate, promotion, rollback, operator traffic split) becomes

* an event tag on every model version involved, ``ray_deploy.event.NNNN`` = JSON with when,
  who, what, why, the traffic split and, for gates, the numbers judged;
* metrics on the MLflow run that mirrors the version's Metaflow run, ``serving.<label>.*``
  (traffic share, and for gates error rate, p50/p99 and requests; ``@`` becomes ``.``), stepped by event number;
* the aliases: the largest share holds ``production``, the next ``canary``; a version taking
  production from another is tagged ``ray_deploy.previous_production``;
* for a settled state, a release record on the registered model, ``ray_deploy.release.<app>.NNNN``:
  what served with which weights, enough to rebuild it (``rollback``) even after its replicas
  are gone, since each version also keeps its serving entry in ``ray_deploy.variant_config``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ray_deploy.errors import LineageError
from ray_deploy.registry.lineage import Registry, VersionRef, recorded_at, who
from ray_deploy.serving.config import AppSettings, RolloutPhase, ServingConfig, VariantConfig

logger = logging.getLogger(__name__)


class VersionStatus(StrEnum):
    """A model version's ``ray_deploy.status`` tag: what it does for its app now."""

    SERVING = "serving"  # takes a share of traffic (or a shadow copy)
    STAGED = "staged"  # loaded beside the serving release, no traffic yet
    RETIRED = "retired"  # replaced by a newer release that was promoted
    ROLLED_BACK = "rolled_back"  # took traffic in a rollout that was rolled back
    FAILED = "failed"  # its deploy failed before it served


class Action(StrEnum):
    """What a traffic event on a version records (``ray_deploy.event.NNNN``'s ``action``)."""

    DEPLOYED = "deployed"  # a first deploy, or new settings for the same release
    STAGED = "staged"  # a new release loaded beside the serving one
    TRAFFIC = "traffic"  # traffic moved: a rollout step or an operator's split
    HOLDING = "holding"  # a rollout stopped short of 100%, waiting for an operator
    GATE_PASSED = "gate_passed"  # a rollout gate judged a step and passed it
    PROMOTED = "promoted"  # the new release took all traffic; the old one retired
    ROLLED_BACK = "rolled_back"  # traffic went back to the previous release
    RESTORED = "restored"  # the app was rebuilt from the registry after the cluster lost it


EVENT_PREFIX = "ray_deploy.event."
ROLLOUT_TAG = "ray_deploy.rollout"
"""Registered-model tag ``ray_deploy.rollout.<app>``: the app's rollout phase as last recorded
(the ``RolloutState`` while one runs; the phase it ended in after). ``restore`` reads it to find
a rollout the cluster lost mid-way."""
RELEASE_PREFIX = "ray_deploy.release."
VARIANT_CONFIG_TAG = "ray_deploy.variant_config"
SETTINGS_TAG = "ray_deploy.app_settings"
CODE_DIR_TAG = "ray_deploy.code_dir"


def version_of(variant: VariantConfig) -> VersionRef | None:
    if not variant.model_version or "/" not in variant.model_version:
        return None
    name, number = variant.model_version.rsplit("/", 1)
    return VersionRef(name, number)


@dataclass
class TrafficRecorder:
    """Writes one app's traffic changes to the registry (built by ``control.live.LiveApp`` only)."""

    registry: Registry
    app: str
    settings: AppSettings = field(default_factory=AppSettings)
    options: dict[str, Any] = field(default_factory=dict)
    by: str | None = None  # on whose behalf (default: this process's user)

    def record(
        self,
        config: ServingConfig,
        action: Action,
        reason: str,
        gate: dict[str, Any] | None = None,
        leaving: tuple[VariantConfig, ...] | list[VariantConfig] = (),
        leaving_status: VersionStatus = VersionStatus.RETIRED,
        settled: bool = False,
        observed: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Record that ``config`` now serves (and ``leaving`` stopped serving) because of ``reason``.

        Raises:
            LineageError: the registry refused or failed a write (naming the registry and the change).
        """
        try:
            self._record(
                config, Action(action), reason, gate, leaving, VersionStatus(leaving_status), settled, observed
            )
        except LineageError:
            raise
        except Exception as exc:
            raise LineageError(
                f"recording {Action(action).value!r} of app {self.app!r} in the MLflow registry at "
                f"{self.registry.registry_uri} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _record(
        self,
        config: ServingConfig,
        action: Action,
        reason: str,
        gate: dict[str, Any] | None,
        leaving: tuple[VariantConfig, ...] | list[VariantConfig],
        leaving_status: VersionStatus,
        settled: bool,
        observed: dict[str, dict[str, Any]] | None,
    ) -> None:
        at, by = recorded_at(), self.by or who()
        traffic = {v.label: v.weight for v in config.variants if v.weight > 0 or v.shadow}
        event = {"at": at, "by": by, "app": self.app, "action": action.value, "reason": reason, "traffic": traffic}
        if gate:
            event["gate"] = gate
        serving = [v for v in config.variants if version_of(v)]
        for variant in serving:
            status = VersionStatus.SERVING if variant.weight > 0 or variant.shadow else VersionStatus.STAGED
            tags = {
                **self.settings.deployment_tags,
                "ray.traffic_weight": f"{variant.weight:g}",
                "ray_deploy.status": status.value,
                VARIANT_CONFIG_TAG: variant.model_copy(update={"weight": 0.0}).model_dump_json(),
            }
            self._event(version_of(variant), variant, self._with_stats(event, variant, observed), tags, gate)
        for variant in leaving:
            version = version_of(variant)
            if version is None:
                continue
            tags = {"ray.traffic_weight": "0", "ray_deploy.status": leaving_status.value}
            if leaving_status == VersionStatus.ROLLED_BACK:
                tags["ray_deploy.rollback_reason"] = reason[:4000]
            moved = {**self._with_stats(event, variant, observed), "weight": 0.0, "status": leaving_status.value}
            self._event(version, variant, moved, tags, gate)
        self._move_aliases(config)
        self._rollout(config, action, at)
        if settled:
            self._release(config, action, reason, at, by)

    def _rollout(self, config: ServingConfig, action: Action, at: str) -> None:
        """Keep the app's rollout phase on its registered model(s), as the app's config has it."""
        if config.rollout is not None:
            state: dict[str, Any] = config.rollout.model_dump(mode="json")
        elif action in (Action.PROMOTED, Action.ROLLED_BACK):
            state = {"phase": RolloutPhase(action.value).value}
        else:
            state = {"phase": RolloutPhase.SETTLED.value}
        state["recorded_at"] = at
        for name in {version_of(v).name for v in config.variants if version_of(v)}:
            self.registry.client.set_registered_model_tag(name, f"{ROLLOUT_TAG}.{self.app}", json.dumps(state))

    @staticmethod
    def _with_stats(
        event: dict[str, Any], variant: VariantConfig, observed: dict[str, dict[str, Any]] | None
    ) -> dict[str, Any]:
        """The event for one version, with its live numbers so far (requests, errors, p50/p99,
        prediction mean, shadow agreement) when it has served any."""
        entry = {**event, "weight": variant.weight}
        if observed and variant.label in observed:
            entry["observed"] = observed[variant.label]
        return entry

    def _event(
        self,
        version: VersionRef,
        variant: VariantConfig,
        event: dict[str, Any],
        tags: dict[str, str],
        gate: dict[str, Any] | None,
    ) -> None:
        current = self.registry.client.get_model_version(version.name, version.version)
        sequence = sum(1 for key in current.tags if key.startswith(EVENT_PREFIX))
        if tags.get("ray_deploy.status") == VersionStatus.SERVING and "ray.deployed_at" not in current.tags:
            tags = {**tags, "ray.deployed_at": event["at"]}  # when it first took traffic
        self.registry.set_tags(version, {**tags, f"{EVENT_PREFIX}{sequence:04d}": json.dumps(event, sort_keys=True)})
        run_id = getattr(current, "run_id", None)
        if not run_id:
            return
        prefix = f"serving.{variant.label.replace('@', '.')}"  # MLflow metric names take no '@'
        metrics = {f"{prefix}.traffic_pct": float(event["weight"])}
        side = event.get("observed")
        if gate:
            side = gate.get("canary") if variant.label in gate.get("new", ()) else gate.get("baseline")
        if side:
            for key in ("requests", "error_rate", "p50_ms", "p99_ms", "shadow_agreement"):
                value = (side or {}).get(key)
                if isinstance(value, int | float) and value == value and value != float("inf"):
                    metrics[f"{prefix}.{key}"] = float(value)
        try:
            for key, value in metrics.items():
                self.registry.client.log_metric(run_id, key, value, step=sequence)
        except Exception as exc:  # the run may live in another tracking store
            logger.warning("could not log serving metrics on run %s: %s", run_id, exc)

    def _move_aliases(self, config: ServingConfig) -> None:
        by_name: dict[str, list[tuple[float, VariantConfig]]] = {}
        for variant in config.variants:
            version = version_of(variant)
            if version is not None and variant.weight > 0 and not variant.shadow:
                by_name.setdefault(version.name, []).append((variant.weight, variant))
        for name, shares in by_name.items():
            holder = self._alias_holder(name, self.settings.production_alias)
            # The largest share is production; on a tie the current holder keeps it.
            ranked = sorted(shares, key=lambda item: (-item[0], version_of(item[1]).version != holder))
            top = version_of(ranked[0][1])
            if top.version != holder:
                self.registry.set_alias(top, self.settings.production_alias)
                if holder is not None:
                    self.registry.set_tags(top, {"ray_deploy.previous_production": holder})
            if len(ranked) > 1 and version_of(ranked[1][1]).version != top.version:
                self.registry.set_alias(version_of(ranked[1][1]), self.settings.canary_alias)
            else:
                self.registry.delete_alias(name, self.settings.canary_alias)

    def _alias_holder(self, name: str, alias: str) -> str | None:
        try:
            return str(self.registry.client.get_model_version_by_alias(name, alias).version)
        except Exception:
            return None

    def _release(self, config: ServingConfig, action: Action, reason: str, at: str, by: str) -> None:
        record = {
            "at": at,
            "by": by,
            "action": action.value,
            "reason": reason,
            "variants": [
                {"label": v.label, "model_version": v.model_version, "weight": v.weight, "shadow": v.shadow}
                for v in config.variants
            ],
        }
        settings = config.model_dump(mode="json", exclude={"variants", "rollout"})
        for name in {version_of(v).name for v in config.variants if version_of(v)}:
            model = self.registry.client.get_registered_model(name)
            prefix = f"{RELEASE_PREFIX}{self.app}."
            sequence = sum(1 for key in (model.tags or {}) if key.startswith(prefix))
            self.registry.client.set_registered_model_tag(name, f"{prefix}{sequence:04d}", json.dumps(record))
            self.registry.client.set_registered_model_tag(
                name, f"{SETTINGS_TAG}.{self.app}", json.dumps({"settings": settings, "options": self.options})
            )
            if self.settings.code_dir:
                self.registry.client.set_registered_model_tag(
                    name, f"{CODE_DIR_TAG}.{self.app}", self.settings.code_dir
                )


def releases(registry: Registry, name: str, app: str) -> list[dict[str, Any]]:
    """The settled releases of ``app`` recorded on registered model ``name``, oldest first."""
    model = registry.client.get_registered_model(name)
    prefix = f"{RELEASE_PREFIX}{app}."
    tags = model.tags or {}
    return [json.loads(tags[key]) for key in sorted(k for k in tags if k.startswith(prefix))]


def events(registry: Registry, version: VersionRef) -> list[dict[str, Any]]:
    """Every traffic event recorded on one model version, oldest first."""
    tags = registry.version_tags(version)
    return [json.loads(tags[key]) for key in sorted(k for k in tags if k.startswith(EVENT_PREFIX))]


def previous_release(registry: Registry, current: ServingConfig) -> list[VariantConfig]:
    """The variants of the last settled release before the current one that was not rolled back.

    Raises:
        LineageError: there is no earlier release, or a version lacks its recorded serving entry.
    """
    names = {version_of(v).name for v in current.variants if version_of(v)}
    if not names:
        raise LineageError(
            f"app {current.app!r} has no registered model versions (deployed with lineage off); "
            "rollback rebuilds releases from the MLflow registry"
        )
    now = {v.label: v.weight for v in current.variants if v.weight > 0}
    history = [record for name in sorted(names) for record in releases(registry, name, current.app)]
    history.sort(key=lambda record: record["at"])
    for record in reversed(history):
        weights = {entry["label"]: entry["weight"] for entry in record["variants"] if entry["weight"] > 0}
        if weights == now:
            continue
        variants = []
        usable = True
        for entry in record["variants"]:
            version = VersionRef(*entry["model_version"].rsplit("/", 1)) if entry.get("model_version") else None
            tags = registry.version_tags(version) if version else {}
            if (
                version is None
                or tags.get("ray_deploy.status") == VersionStatus.ROLLED_BACK
                or VARIANT_CONFIG_TAG not in tags
            ):
                usable = False
                break
            stored = VariantConfig.model_validate_json(tags[VARIANT_CONFIG_TAG])
            variants.append(stored.model_copy(update={"weight": entry["weight"], "shadow": entry["shadow"]}))
        if usable:
            return variants
    raise LineageError(
        f"app {current.app!r}: no earlier release to roll back to in the registry at {registry.registry_uri}"
    )


def recorded_rollout(registry: Registry, name: str, app: str) -> dict[str, Any] | None:
    """The rollout phase of ``app`` last recorded on registered model ``name`` (None: never recorded)."""
    value = (registry.client.get_registered_model(name).tags or {}).get(f"{ROLLOUT_TAG}.{app}")
    return json.loads(value) if value else None
