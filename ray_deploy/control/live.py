"""The live app: one object for "the app as it runs", read once from Serve (and the registry).

Every process that changes an app starts here: the deploying flow, the rollout controller on the
cluster, the operator commands (``set_traffic``, ``promote``, ``rollback``), ``restore`` and
``export``. A ``LiveApp`` carries everything a later process needs, because the app's config
persists it (``ServingConfig.settings``: aliases, deployment tags, code location, timeouts; the
registry URI; the rollout phase and policy) and the deployment options are read back from Serve.
It is also the only place that builds the registry recorder, so every change is recorded the same
way, with the app's own aliases.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from enum import Enum
from functools import cached_property
from typing import Any

from ray_deploy.control.apply import apply_config, remove_new_app, serve_details, starting_replicas, url_base
from ray_deploy.errors import DeployError
from ray_deploy.progress import report
from ray_deploy.registry.history import Action, TrafficRecorder, VersionStatus
from ray_deploy.registry.lineage import Registry, recorded_at, who
from ray_deploy.serving.config import (
    SERVER_DEPLOYMENT,
    VARIANT_APP_SEPARATOR,
    RolloutOutcome,
    RolloutPhase,
    ServingConfig,
    VariantConfig,
)
from ray_deploy.serving.metrics import VariantStats, get_collector
from ray_deploy.spec import routes_overlap

logger = logging.getLogger(__name__)

OPTION_KEYS = ("autoscaling_config", "max_replicas_per_node", "placement_group_bundles", "placement_group_strategy")


@dataclass(frozen=True)
class LiveApp:
    """An app as Serve runs it: its config, its ModelServer options, where it answers.

    ``options`` are the deployment options without ``user_config``, as plain JSON values (Serve's
    details carry enums, which neither YAML export nor a comparison should see).
    """

    name: str
    route_prefix: str
    url: str
    config: ServingConfig
    options: dict[str, Any]
    exists: bool = True

    @classmethod
    def read(cls, app: str) -> LiveApp | None:
        """The app from Serve (this process is connected), or None if ray-deploy runs no such app."""
        details = serve_details()
        entry = (details.get("applications") or {}).get(app)
        deployment = ((entry or {}).get("deployments") or {}).get(SERVER_DEPLOYMENT)
        deployed = (deployment or {}).get("deployment_config") or {}
        user_config = deployed.get("user_config")
        if not user_config:
            return None
        options: dict[str, Any] = {
            "name": SERVER_DEPLOYMENT,
            "num_replicas": deployed.get("num_replicas", 1),
            "max_ongoing_requests": deployed.get("max_ongoing_requests"),
            "max_surge_percent": deployed.get("max_surge_percent", 100),
            "ray_actor_options": deployed.get("ray_actor_options") or {},
        }
        options.update({key: deployed[key] for key in OPTION_KEYS if deployed.get(key)})
        config = ServingConfig.model_validate(user_config)
        for key, value in (config.settings.placement or {}).items():
            options.setdefault(key, value)
        if deployed.get("autoscaling_config"):
            options.pop("num_replicas", None)  # Serve refuses both; the autoscaler owns the count
        route = entry.get("route_prefix") or config.route_prefix
        return cls(
            name=app,
            route_prefix=route,
            url=url_base() + route,
            config=config,
            options=plain({k: v for k, v in options.items() if v is not None}),
        )

    @classmethod
    def require(cls, app: str, address: str | None = None) -> LiveApp:
        """Like ``read``, but an app that is not there is an error naming the cluster."""
        live = cls.read(app)
        if live is None:
            where = f" on {address}" if address else " on this cluster"
            raise DeployError(f"no app {app!r} deployed by ray-deploy{where}")
        return live

    @classmethod
    def new(cls, config: ServingConfig, options: dict[str, Any], url: str) -> LiveApp:
        """An app about to be deployed for the first time (or rebuilt by ``restore``)."""
        options = plain({k: v for k, v in options.items() if k != "user_config"})
        return cls(config.app, config.route_prefix, url, config, options, exists=False)

    @property
    def phase(self) -> RolloutPhase:
        return self.config.phase

    @cached_property
    def registry(self) -> Registry | None:
        """The registry holding the app's model versions (None: deployed with lineage off)."""
        uri = self.config.registry_uri
        return Registry(tracking=uri, registry=uri) if uri else None

    def recorder(self) -> TrafficRecorder | None:
        """The one way changes to this app are recorded: its persisted aliases, tags and options;
        a rollout's changes on behalf of whoever started it (the controller runs as the cluster's user)."""
        if self.registry is None:
            return None
        by = self.config.rollout.started_by if self.config.rollout is not None else None
        return TrafficRecorder(
            self.registry, self.name, settings=self.config.settings, options=self.options, by=by or None
        )

    def serve_options(self, config: ServingConfig | None = None) -> dict[str, Any]:
        """ModelServer options with ``config`` (default: the running one) as user_config."""
        return {**self.options, "user_config": (config or self.config).model_dump(mode="json")}

    def apply(
        self,
        config: ServingConfig,
        action: Action,
        reason: str,
        *,
        record: bool = True,
        gate: dict[str, Any] | None = None,
        leaving: list[VariantConfig] | tuple[VariantConfig, ...] = (),
        leaving_status: VersionStatus = VersionStatus.RETIRED,
        settled: bool = False,
    ) -> LiveApp:
        """Make the app serve ``config`` (replicas reconfigure in place), wait until it does, record it.

        Returns:
            The app as it now runs.

        Raises:
            DeployError: Serve did not apply it within the app's ``deploy_timeout_s``.
            LineageError: the registry did not take the record (the change itself is live).
        """
        config = self._with_outcome(config, action, reason, leaving)
        shares = ", ".join(f"{v.label} {v.weight:g}%" for v in config.variants if v.weight > 0 or v.shadow)
        report(f"app {self.name!r}: {reason} [{shares}]")
        # What each release did up to this change (errors, latency, shadow agreement): recorded
        # with the change, so a version's history says how it compared when traffic moved.
        observed = observed_stats(self.name) if self.exists else {}
        apply_config(
            self.name, self.route_prefix, self.serve_options(config), self.url, config.settings.deploy_timeout_s
        )
        moved = replace(self, config=config, exists=True)
        recorder = self.recorder()
        if record and recorder is not None:
            recorder.record(
                config,
                action,
                reason,
                gate=gate,
                leaving=leaving,
                leaving_status=leaving_status,
                settled=settled,
                observed=observed,
            )
        return moved

    def _with_outcome(
        self,
        config: ServingConfig,
        action: Action,
        reason: str,
        leaving: list[VariantConfig] | tuple[VariantConfig, ...] = (),
    ) -> ServingConfig:
        """``config`` carrying how the last rollout ended: a promotion or rollback records its
        outcome; any other change keeps the outcome the app already carries."""
        if action in (Action.PROMOTED, Action.ROLLED_BACK) and config.rollout is None:
            rollout = self.config.rollout
            by = (rollout.started_by if rollout is not None else "") or who()
            if rollout is not None:
                new = tuple(sorted(rollout.new))
            else:  # a rollback with no rollout in the config (e.g. one that restore found lost)
                new = tuple(sorted(v.label for v in leaving)) if action == Action.ROLLED_BACK else ()
            outcome = RolloutOutcome(
                phase=RolloutPhase(action.value),
                reason=reason[:1000],
                new=new,
                recorded_at=recorded_at(),
                by=by,
            )
            return config.model_copy(update={"last_rollout": outcome})
        if config.last_rollout is None and self.exists and self.config.last_rollout is not None:
            return config.model_copy(update={"last_rollout": self.config.last_rollout})
        return config

    def put_back(self) -> None:
        """Serve this app exactly as it was read (a new app: remove it); never raises, since the
        caller is already reporting the failure that made it necessary."""
        if not self.exists:
            try:
                remove_new_app(self.name)
            except Exception as exc:
                logger.error("could not remove the new app %s: %s", self.name, exc)
            return
        report(f"putting the previous version of app {self.name!r} back ...")
        try:
            # Replicas still starting belong to the change that failed: the previous version's are running.
            stuck = starting_replicas(self.name)
            apply_config(
                self.name,
                self.route_prefix,
                self.serve_options(),
                self.url,
                self.config.settings.deploy_timeout_s,
                replaced=stuck,
            )
        except Exception as exc:
            logger.error("the previous version of %s did not come back: %s", self.name, exc)

    def mark_failed(self, configs: list[VariantConfig], reason: str) -> None:
        """Tag the versions of a deploy that never served as failed (best effort: the registry may
        be what failed)."""
        from ray_deploy.registry.history import version_of

        if self.registry is None:
            return
        for variant in configs:
            version = version_of(variant)
            if version is None:
                continue
            try:
                self.registry.set_tags(
                    version, {"ray_deploy.status": VersionStatus.FAILED.value, "ray_deploy.failure": reason[:4000]}
                )
            except Exception as exc:
                logger.warning("could not mark %s as failed: %s", version, exc)


def plain(value: Any) -> Any:
    """``value`` with enums replaced by their values and tuples by lists (JSON/YAML-ready)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def stats_snapshot(app: str) -> dict[str, VariantStats]:
    """Per-variant stats of ``app`` merged over its replicas (cumulative since each replica started)."""
    import ray

    data = ray.get(get_collector(create=True).snapshot.remote(app), timeout=30)
    return {label: VariantStats.from_dict(stats) for label, stats in data.items()}


def observed_stats(app: str) -> dict[str, dict[str, Any]]:
    """Each label's numbers so far, for the record of a change; empty if they cannot be read."""
    try:
        return {label: stats.summary() for label, stats in stats_snapshot(app).items() if stats.requests}
    except Exception as exc:  # stats are informative; never block a change on them
        logger.warning("could not read the stats of %s: %s", app, exc)
        return {}


def overlapping_app(app: str, route: str) -> tuple[str, str] | None:
    """Another app on the cluster (this process is connected) whose route overlaps ``route``: its
    name and route, or None. ``app``'s own releases and isolated variant apps do not count."""
    for name, entry in (serve_details().get("applications") or {}).items():
        if name == app or name.startswith(app + VARIANT_APP_SEPARATOR):
            continue
        other = (entry or {}).get("route_prefix")
        if other and routes_overlap(route, other):
            return name, other
    return None
