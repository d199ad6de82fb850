"""Operator moves on a live app: split traffic, promote a rollout, roll back.

Each starts from the live app (``control.live.LiveApp``) and asks the state machine
(``control.phases``) whether the move is allowed in the app's phase. While a rollout controller
drives the app (``staged``, ``stepping``), ``promote`` and ``rollback`` are handed to it, so one
process moves the app at a time; otherwise the move is made here, under the app's lock.
"""

from __future__ import annotations

import logging
from typing import Any

from ray_deploy.cluster import connect
from ray_deploy.control.controller import change, find_controller, promote_now, roll_back, wait_for_outcome
from ray_deploy.control.live import LiveApp
from ray_deploy.control.lock import app_lock
from ray_deploy.control.phases import ACTIVE, check_move
from ray_deploy.control.rollout import Plan
from ray_deploy.errors import DeployError, RolloutStateError, SpecError
from ray_deploy.progress import report
from ray_deploy.registry.history import Action, VersionStatus, previous_release
from ray_deploy.registry.lineage import who
from ray_deploy.serving.config import RolloutPhase, ServingConfig, variant_summary

logger = logging.getLogger(__name__)


def set_traffic(app: str, weights: dict[str, float], address: str | None = None, reason: str = "") -> ServingConfig:
    """Split traffic by hand: ``{"xgb@v3": 90, "xgb@v4": 10}`` (labels, or names when unique).

    Variants not named get no traffic but stay loaded. Weights must add up to 100. During a
    rollout that holds, the split changes and the rollout still holds (promote and rollback work).

    Raises:
        SpecError: a name that is not a variant of the app, a shadow, or weights not adding up to 100.
        RolloutStateError: a rollout controller is moving the app's traffic right now.
    """
    with connect(address, start_local=False):
        live = LiveApp.require(app, address)
        if live.phase in ACTIVE and find_controller(app) is not None:
            raise RolloutStateError(
                f"traffic: app {app!r} is {live.phase.value}: its rollout controller moves the traffic now; "
                f"`ray-deploy promote {app}` or `ray-deploy rollback {app}` first"
            )
        resolved = resolve_weights(live.config, weights)
        updated = [v.model_copy(update={"weight": resolved.get(v.label, 0.0)}) for v in live.config.variants]
        config = live.config.with_variants(updated)
        state = live.config.rollout
        if state is not None:
            # Still a rollout (promote and rollback keep working), held by the operator at this share.
            share = sum(resolved.get(label, 0.0) for label in state.new if label not in state.old)
            config = config.model_copy(
                update={"rollout": state.model_copy(update={"percent": share, "phase": RolloutPhase.HOLDING})}
            )
        text = reason or "operator set traffic: " + ", ".join(f"{k}={w:g}" for k, w in resolved.items())
        if state is None:
            with app_lock(app, "traffic"):
                return live.apply(config, Action.TRAFFIC, text).config
        return change(live, config, Action.TRAFFIC, text).config


def resolve_weights(config: ServingConfig, weights: dict[str, float]) -> dict[str, float]:
    """``weights`` by variant label, checked: known, unambiguous, not shadows, adding up to 100."""
    variants = list(config.variants)
    by_label = {v.label: v for v in variants}
    resolved: dict[str, float] = {}
    for key, weight in weights.items():
        matches = [v.label for v in variants if key in (v.label, v.name)]
        if len(matches) != 1:
            known = ", ".join(by_label)
            raise SpecError(
                f"traffic: {key!r} "
                + ("matches several variants" if matches else "is not a variant")
                + f" of app {config.app!r} (variants: {known}); use NAME@RELEASE"
            )
        if by_label[matches[0]].shadow:
            raise SpecError(f"traffic: {key!r} is a shadow variant; it takes no share of traffic")
        if not 0 <= weight <= 100:
            raise SpecError(f"traffic: {key}={weight:g} must be between 0 and 100")
        resolved[matches[0]] = float(weight)
    total = sum(resolved.values())
    if abs(total - 100) > 1e-6:
        raise SpecError(f"traffic: weights add up to {total:g}; make them add up to 100")
    return resolved


def promote(app: str, address: str | None = None, reason: str = "operator promoted the new release") -> ServingConfig:
    """Finish a rollout: all traffic to the new release, old models dropped.

    Raises:
        RolloutStateError: the app has no rollout in progress.
    """
    with connect(address, start_local=False):
        live = LiveApp.require(app, address)
        check_move(app, live.phase, RolloutPhase.PROMOTED, "promote")
        if not _handed_to_controller(app, live, Action.PROMOTED, reason):
            promote_now(live, reason)
        return LiveApp.require(app).config


def rollback(app: str, address: str | None = None, reason: str = "operator rollback") -> ServingConfig:
    """Back to the previous release: the old weights of a rollout in progress, or else the last
    settled release in the registry, rebuilt from its records (its replicas need not exist).

    Raises:
        DeployError: nothing to roll back to (lineage off, or no earlier release recorded).
    """
    with connect(address, start_local=False):
        live = LiveApp.require(app, address)
        if live.config.rollout is not None:
            if not _handed_to_controller(app, live, Action.ROLLED_BACK, reason):
                roll_back(live, Plan.resume(live.config), reason, settled=True)
            return LiveApp.require(app).config
        if live.registry is None:
            raise DeployError(f"app {app!r} was deployed with lineage off: there is no registry record to roll back to")
        with app_lock(app, "rollback"):
            return _rebuild_previous(live, reason).config


def _handed_to_controller(app: str, live: LiveApp, action: Action, reason: str) -> bool:
    """While a controller drives the app, the move is its to make: ask, then wait for it."""
    if live.phase not in ACTIVE:
        return False
    handle = find_controller(app)
    if handle is None:
        return False
    import ray

    report(f"app {app!r}: asking its rollout controller to {'promote' if action == Action.PROMOTED else 'roll back'}")
    if not ray.get(handle.request.remote(action.value, f"{reason} (asked by {who()})"), timeout=30):
        return False
    try:
        wait_for_outcome(app, handle)
    except DeployError as exc:
        raise DeployError(f"app {app!r}: the rollout controller could not {action.value}: {exc}") from exc
    return True


def _rebuild_previous(live: LiveApp, reason: str) -> LiveApp:
    """Stage the last settled release from the registry beside the current one, then switch to it."""
    current = live.config
    previous = previous_release(live.registry, current)
    plan = Plan(tuple(v for v in current.variants if v.weight > 0 or v.shadow), tuple(previous))
    target = current.with_variants(plan.final()).model_copy(update={"rollout": None})
    try:
        staged = live.apply(
            current.with_variants(plan.at(0)),
            Action.STAGED,
            f"{reason}: reloading {', '.join(sorted(plan.new_labels))}",
        )
        return staged.apply(
            target,
            Action.ROLLED_BACK,
            reason,
            leaving=[v for v in plan.old if v.label in plan.old_labels],
            leaving_status=VersionStatus.ROLLED_BACK,
            settled=True,
        )
    except DeployError:
        live.put_back()
        raise


def describe_variants(config: ServingConfig) -> list[dict[str, Any]]:
    return [variant_summary(v) for v in config.variants]
