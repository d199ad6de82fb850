"""Changing what a live app serves: rollouts, traffic splits, promotion and rollback.

``Mover`` applies one config to the running app (in place: replicas reconfigure, nothing
restarts) and records the change in the registry. ``roll_out`` walks a ``Plan`` through its
steps with gates; ``set_traffic``, ``promote`` and ``rollback`` are the operator commands. All of
them hold the app's lock, so two changes to one app never interleave.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ray_deploy.cluster import connect
from ray_deploy.control.apply import RunningApp, apply_config, restore, running_app, url_base
from ray_deploy.control.lock import app_lock
from ray_deploy.control.rollout import GateResult, Plan, watch
from ray_deploy.errors import DeployError, RolloutFailed, SpecError
from ray_deploy.progress import Waiter, report
from ray_deploy.registry.history import TrafficRecorder, previous_release
from ray_deploy.registry.lineage import Registry, recorded_at
from ray_deploy.serving.config import SERVER_DEPLOYMENT, ServingConfig
from ray_deploy.serving.metrics import VariantStats, get_collector
from ray_deploy.spec import RolloutSpec

logger = logging.getLogger(__name__)


@dataclass
class Mover:
    """Applies configs to one running app and records each change."""

    app: str
    route_prefix: str
    url: str
    options: dict[str, Any]
    timeout_s: float = 300.0
    recorder: TrafficRecorder | None = None
    applied: list[str] = field(default_factory=list)

    def apply(self, config: ServingConfig, action: str, reason: str, **record: Any) -> None:
        shares = ", ".join(f"{v.label} {v.weight:g}%" for v in config.variants if v.weight > 0 or v.shadow)
        report(f"app {self.app!r}: {reason} [{shares}]")
        # What each release did up to this change (errors, latency, shadow agreement): recorded
        # with the change, so a version's history says how it compared when traffic moved.
        observed = _observed(self.app)
        options = {**self.options, "user_config": config.model_dump(mode="json")}
        apply_config(self.app, self.route_prefix, options, self.url, self.timeout_s)
        self.applied.append(action)
        if self.recorder is not None:
            self.recorder.record(config, action, reason, observed=observed, **record)


def _observed(app: str) -> dict[str, dict[str, Any]]:
    try:
        return {label: stats.summary() for label, stats in stats_snapshot(app).items() if stats.requests}
    except Exception as exc:  # stats are informative; never block a change on them
        logger.warning("could not read the stats of %s: %s", app, exc)
        return {}


def stats_snapshot(app: str) -> dict[str, VariantStats]:
    import ray

    data = ray.get(get_collector(create=True).snapshot.remote(app), timeout=30)
    return {label: VariantStats.from_dict(stats) for label, stats in data.items()}


def roll_out(mover: Mover, plan: Plan, incoming: ServingConfig, running: ServingConfig, policy: RolloutSpec) -> dict:
    """Move traffic from ``running`` to ``incoming`` by ``policy``; roll back if a gate fails.

    Returns:
        What happened: the steps taken, each gate's result, and the final state
        (``promoted`` or ``holding`` at a step short of 100%).

    Raises:
        RolloutFailed: a gate failed; the old release serves all traffic again.
        DeployError: Serve did not apply a step; the app was put back as it was.
    """
    started_at = recorded_at()
    gates: list[dict[str, Any]] = []
    rollout_start = stats_snapshot(mover.app)
    steps = policy.plan
    new_labels = sorted(plan.new_labels)

    def at(percent: float) -> ServingConfig:
        return incoming.with_variants(plan.at(percent)).model_copy(
            update={"rollout": plan.state(policy.strategy, percent, started_at)}
        )

    mover.apply(at(0), "staged", f"loading {', '.join(new_labels) or 'the new config'} beside the serving release")
    for index, percent in enumerate(steps, start=1):
        mover.apply(
            at(percent), "traffic", f"{policy.strategy} step {index}/{len(steps)}: {percent:g}% to the new release"
        )
        if not policy.gated:
            continue
        waiter = Waiter(f"gate at {percent:g}%", every_s=5.0)
        gate: GateResult = watch(
            policy,
            percent,
            plan,
            lambda: stats_snapshot(mover.app),
            stats_snapshot(mover.app),
            rollout_start,
            waiter.update,
        )
        record = {**gate.to_dict(), "new": new_labels}
        gates.append(record)
        if not gate.passed:
            reason = f"gate failed at {percent:g}%: {gate.reason}"
            report(f"app {mover.app!r}: {reason}; rolling back")
            mover.apply(
                running.with_variants(plan.rollback()).model_copy(update={"rollout": None}),
                "rolled_back",
                f"automatic rollback: {reason}",
                gate=record,
                leaving=[v for v in plan.new if v.label in plan.new_labels],
                leaving_status="rolled_back",
                settled=False,
            )
            raise RolloutFailed(
                f"app {mover.app!r}: the new release ({', '.join(new_labels)}) was rolled back, {reason}; "
                f"the previous release serves all traffic",
                gate=record,
            )
        report(f"app {mover.app!r}: gate passed at {percent:g}%: {gate.reason}")
        if mover.recorder is not None:
            mover.recorder.record(
                at(percent), "gate_passed", f"gate passed at {percent:g}%: {gate.reason}", gate=record
            )
    if steps[-1] < 100:
        report(
            f"app {mover.app!r}: holding at {steps[-1]:g}% on the new release; "
            f"`ray-deploy promote {mover.app}` or `ray-deploy rollback {mover.app}`"
        )
        return {"strategy": policy.strategy, "state": "holding", "percent": steps[-1], "gates": gates}
    finish(mover, plan, incoming, f"{policy.strategy} rollout complete")
    return {"strategy": policy.strategy, "state": "promoted", "percent": 100.0, "gates": gates}


def finish(mover: Mover, plan: Plan, incoming: ServingConfig, reason: str) -> None:
    """All traffic on the new release; then drop the old models (running requests finish)."""
    mover.apply(
        incoming.with_variants(plan.final()).model_copy(update={"rollout": None}),
        "promoted",
        reason,
        leaving=[v for v in plan.old if v.label in plan.old_labels],
        leaving_status="retired",
        settled=True,
    )


def _operate(app: str) -> tuple[Registry | None, RunningApp, Mover]:
    running = running_app(app)
    if running is None:
        raise DeployError(f"no app {app!r} deployed by ray-deploy on this cluster")
    recorder = None
    registry = None
    if running.config.registry_uri:
        registry = Registry(tracking=running.config.registry_uri)
        recorder = TrafficRecorder(
            registry,
            app,
            deployment_tags={"ray.app": app, "ray.deployment": SERVER_DEPLOYMENT, "ray.route": running.route_prefix},
            options={k: v for k, v in running.options.items() if k != "user_config"},
        )
    mover = Mover(
        app,
        running.route_prefix,
        url_base() + running.route_prefix,
        {k: v for k, v in running.options.items() if k != "user_config"},
        recorder=recorder,
    )
    return registry, running, mover


def set_traffic(app: str, weights: dict[str, float], address: str | None = None, reason: str = "") -> ServingConfig:
    """Split traffic by hand: ``{"xgb@v3": 90, "xgb@v4": 10}`` (labels, or names when unique).

    Variants not named get no traffic but stay loaded. Weights must add up to 100.
    """
    with connect(address, start_local=False), app_lock(app, "traffic"):
        _, running, mover = _operate(app)
        variants = list(running.config.variants)
        by_label = {v.label: v for v in variants}
        resolved: dict[str, float] = {}
        for key, weight in weights.items():
            matches = [v.label for v in variants if key in (v.label, v.name)]
            if len(matches) != 1:
                known = ", ".join(by_label)
                raise SpecError(
                    f"traffic: {key!r} "
                    + ("matches several variants" if matches else "is not a variant")
                    + f" of app {app!r} (variants: {known}); use NAME@RELEASE"
                )
            if by_label[matches[0]].shadow:
                raise SpecError(f"traffic: {key!r} is a shadow variant; it takes no share of traffic")
            if not 0 <= weight <= 100:
                raise SpecError(f"traffic: {key}={weight:g} must be between 0 and 100")
            resolved[matches[0]] = float(weight)
        total = sum(resolved.values())
        if abs(total - 100) > 1e-6:
            raise SpecError(f"traffic: weights add up to {total:g}; make them add up to 100")
        updated = [v.model_copy(update={"weight": resolved.get(v.label, 0.0)}) for v in variants]
        config = running.config.with_variants(updated)
        state = running.config.rollout
        if state is not None:
            # Still a rollout (promote and rollback keep working); only the share changed.
            share = sum(resolved.get(label, 0.0) for label in state.new if label not in state.old)
            config = config.model_copy(update={"rollout": state.model_copy(update={"percent": share})})
        mover.apply(
            config, "traffic", reason or "operator set traffic: " + ", ".join(f"{k}={w:g}" for k, w in resolved.items())
        )
        return config


def promote(app: str, address: str | None = None) -> ServingConfig:
    """Finish a rollout that is holding: all traffic to the new release, old models dropped."""
    with connect(address, start_local=False), app_lock(app, "promote"):
        _, running, mover = _operate(app)
        if running.config.rollout is None:
            raise DeployError(f"app {app!r} has no rollout in progress to promote")
        plan = Plan.resume(running.config)
        finish(mover, plan, running.config, "operator promoted the new release")
        return running_app(app).config


def rollback(app: str, address: str | None = None, reason: str = "operator rollback") -> ServingConfig:
    """Back to the previous release: the old weights of a rollout in progress, or else the last
    settled release in the registry, rebuilt from its records (its replicas need not exist)."""
    with connect(address, start_local=False), app_lock(app, "rollback"):
        registry, running, mover = _operate(app)
        current = running.config
        if current.rollout is not None:
            plan = Plan.resume(current)
            target = current.with_variants(plan.rollback()).model_copy(update={"rollout": None})
            leaving = [v for v in plan.new if v.label in plan.new_labels]
            mover.apply(target, "rolled_back", reason, leaving=leaving, leaving_status="rolled_back", settled=True)
            return target
        if registry is None:
            raise DeployError(f"app {app!r} was deployed with lineage off: there is no registry record to roll back to")
        previous = previous_release(registry, current)
        plan = Plan(tuple(v for v in current.variants if v.weight > 0 or v.shadow), tuple(previous))
        target = current.with_variants(plan.final()).model_copy(update={"rollout": None})
        try:
            mover.apply(
                current.with_variants(plan.at(0)), "staged", f"{reason}: reloading {', '.join(sorted(plan.new_labels))}"
            )
            mover.apply(
                target,
                "rolled_back",
                reason,
                leaving=[v for v in plan.old if v.label in plan.old_labels],
                leaving_status="rolled_back",
                settled=True,
            )
        except DeployError:
            restore(running)
            raise
        return target


def describe_variants(config: ServingConfig) -> list[dict[str, Any]]:
    return [
        {
            "label": v.label,
            "name": v.name,
            "release": v.release,
            "weight": v.weight,
            "shadow": v.shadow,
            "model_version": v.model_version,
            "model_uri": v.model.uri,
        }
        for v in config.variants
    ]
