"""Moving traffic from the release an app serves to a new one: plans, steps, gates, rollback.

A rollout never starts or stops replicas. Every step is a new ``user_config`` for the live
ModelServer replicas (see ``serving.server.server_deployment``): first the new release is loaded
beside the old one with no traffic, then its share grows step by step, and only when it holds
all traffic are the old models dropped (requests already running on them finish, since they
hold their own reference). A gate after each step compares the new release's live error rate
and latency with the old one's, from the per-variant stats the replicas push to the collector;
a failing gate puts the old weights back.

This module is pure planning and judging; the rollout controller (``control.controller``)
applies the configs and records them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray_deploy.errors import RolloutStateError
from ray_deploy.serving.config import RolloutPhase, RolloutState, ServingConfig, VariantConfig
from ray_deploy.serving.metrics import PUSH_INTERVAL_S, VariantStats
from ray_deploy.spec import RolloutSpec


@dataclass(frozen=True)
class Plan:
    """The old release's variants, the new release's, and the traffic between them at any step."""

    old: tuple[VariantConfig, ...]
    new: tuple[VariantConfig, ...]

    @classmethod
    def between(cls, running: ServingConfig, incoming: ServingConfig) -> Plan:
        """Pair what runs with what comes in; a variant that did not change keeps its entry."""
        old = tuple(v for v in running.variants if v.weight > 0 or v.shadow)
        by_identity = {v.identity: v for v in old}
        taken = {v.label for v in old}
        new = []
        for variant in incoming.variants:
            same = by_identity.get(variant.identity)
            if same is not None:
                new.append(same.model_copy(update={"weight": variant.weight, "shadow": variant.shadow}))
                continue
            if variant.label in taken:
                # Same name and release label but other bytes (e.g. no registry, a rebuilt artifact).
                variant = variant.model_copy(update={"release": f"{variant.release or 'r'}-new"})
            new.append(variant)
        return cls(old, tuple(new))

    @property
    def new_labels(self) -> set[str]:
        return {v.label for v in self.new} - {v.label for v in self.old}

    @property
    def old_labels(self) -> set[str]:
        return {v.label for v in self.old} - {v.label for v in self.new}

    def at(self, percent: float) -> list[VariantConfig]:
        """Every variant of both releases, with ``percent`` of the traffic on the new one."""
        share = percent / 100.0
        weights: dict[str, float] = {}
        entries: dict[str, VariantConfig] = {}
        for variant in self.old:
            entries[variant.label] = variant
            weights[variant.label] = 0.0 if variant.shadow else variant.weight * (1 - share)
        for variant in self.new:
            entries[variant.label] = variant
            weights[variant.label] = weights.get(variant.label, 0.0) + (
                0.0 if variant.shadow else variant.weight * share
            )
        return [v.model_copy(update={"weight": round(weights[label], 6)}) for label, v in entries.items()]

    def final(self) -> list[VariantConfig]:
        return list(self.new)

    def rollback(self) -> list[VariantConfig]:
        return list(self.old)

    def state(
        self, policy: RolloutSpec, phase: RolloutPhase, step: int, percent: float, started_at: str, started_by: str = ""
    ) -> RolloutState:
        """The persisted form of this plan at ``phase`` (``step`` steps taken, ``percent`` on the new)."""
        return RolloutState(
            strategy=policy.strategy,
            phase=phase,
            step=step,
            percent=percent,
            old={v.label: v.weight for v in self.old},
            new={v.label: v.weight for v in self.new},
            started_at=started_at,
            started_by=started_by,
            policy=policy,
        )

    @classmethod
    def resume(cls, config: ServingConfig) -> Plan:
        """The plan of the rollout recorded in a running app's config (the controller, promote, rollback).

        Raises:
            RolloutStateError: the config records no rollout.
        """
        if config.rollout is None:
            raise RolloutStateError(f"app {config.app!r} is settled: there is no rollout to resume")
        by_label = {v.label: v for v in config.variants}
        old = tuple(by_label[label].model_copy(update={"weight": w}) for label, w in config.rollout.old.items())
        new = tuple(by_label[label].model_copy(update={"weight": w}) for label, w in config.rollout.new.items())
        return cls(old, new)


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict, with the numbers it judged."""

    passed: bool
    reason: str
    percent: float
    canary: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reason": self.reason,
            "percent": self.percent,
            "canary": self.canary,
            "baseline": self.baseline,
        }


def combined(stats: dict[str, VariantStats], labels: set[str]) -> VariantStats:
    total = VariantStats()
    for label in labels:
        if label in stats:
            total = total.merge(stats[label])
    return total


def delta(after: dict[str, VariantStats], before: dict[str, VariantStats]) -> dict[str, VariantStats]:
    return {label: stats.minus(before.get(label, VariantStats())) for label, stats in after.items()}


def judge(
    policy: RolloutSpec,
    percent: float,
    canary: VariantStats,
    baseline: VariantStats,
    final: bool = True,
    goal: str = "max",
) -> GateResult:
    """Does the new release (``canary``) do as well as the old one (``baseline``) over the window?

    Gates on requests (errors, latency, ``min_requests``), then on the model's answers: their
    disagreement with the old release's on the same requests, the shift of their mean, and, with
    labels, their quality (``goal``: whether a higher figure is better). Each verdict names the
    signal and both numbers. ``final=False`` judges a window still open: only what cannot get
    better (errors, latency).
    """
    numbers = {"canary": canary.summary(), "baseline": baseline.summary()}
    excess = canary.error_rate - baseline.error_rate
    if canary.errors and excess > policy.max_error_rate:
        return GateResult(
            False,
            f"error rate {canary.error_rate:.3f} ({canary.errors}/{canary.requests}) exceeds the old release's "
            f"{baseline.error_rate:.3f} by more than max_error_rate={policy.max_error_rate:g}",
            percent,
            **numbers,
        )
    p99 = canary.percentile_ms(0.99)
    if policy.max_p99_ms is not None and p99 is not None and p99 > policy.max_p99_ms:
        return GateResult(
            False, f"p99 latency <= {p99:g} ms is above max_p99_ms={policy.max_p99_ms:g}", percent, **numbers
        )
    base_p99 = baseline.percentile_ms(0.99)
    if policy.max_p99_ratio is not None and p99 is not None and base_p99:
        if p99 > policy.max_p99_ratio * base_p99:
            return GateResult(
                False,
                f"p99 latency <= {p99:g} ms is more than max_p99_ratio={policy.max_p99_ratio:g} x the old "
                f"release's {base_p99:g} ms",
                percent,
                **numbers,
            )
    if final and canary.requests < policy.min_requests:
        return GateResult(
            False,
            f"only {canary.requests} request(s) reached the new release; min_requests={policy.min_requests}",
            percent,
            **numbers,
        )
    if final:
        failed = judge_model_signals(policy, canary, baseline, goal)
        if failed is not None:
            return GateResult(False, failed, percent, **numbers)
    signals = []
    if policy.max_disagreement is not None and canary.disagreement is not None:
        signals.append(f"disagreement {canary.disagreement:.3f}")
    if policy.max_prediction_shift is not None and canary.prediction_mean is not None:
        signals.append(f"mean prediction {canary.prediction_mean:.4g} (old {baseline.prediction_mean:.4g})")
    if policy.min_quality_delta is not None and canary.quality is not None and baseline.quality is not None:
        signals.append(f"quality {canary.quality:.4g} (old {baseline.quality:.4g})")
    return GateResult(
        True,
        f"{canary.requests} request(s), error rate {canary.error_rate:.3f} (old {baseline.error_rate:.3f}), "
        f"p99 <= {p99 if p99 is not None else '-'} ms" + "".join(f", {signal}" for signal in signals),
        percent,
        **numbers,
    )


def judge_model_signals(policy: RolloutSpec, canary: VariantStats, baseline: VariantStats, goal: str) -> str | None:
    """Why the new release's answers fail the policy's model gates, or None when they pass (or none is set)."""
    if policy.max_disagreement is not None:
        compared = canary.reference_compared or canary.shadow_compared
        disagreement = canary.disagreement
        if not compared or disagreement is None:
            return (
                f"disagreement gate: none of the new release's {canary.requests} request(s) could be compared with "
                f"the old release's answers; max_disagreement={policy.max_disagreement:g} cannot be checked"
            )
        if disagreement > policy.max_disagreement:
            return (
                f"disagreement {disagreement:.3f} with the old release ({round(disagreement * compared)}/{compared} "
                f"compared requests answered otherwise) exceeds max_disagreement={policy.max_disagreement:g}"
            )
    if policy.max_prediction_shift is not None:
        mean, base_mean, base_std = canary.prediction_mean, baseline.prediction_mean, baseline.prediction_std
        if mean is None or base_mean is None or base_std is None:
            return (
                "prediction shift gate: no numeric predictions to compare "
                f"(new release {canary.prediction_count}, old release {baseline.prediction_count})"
            )
        shift = abs(mean - base_mean) / base_std if base_std > 0 else (0.0 if mean == base_mean else math.inf)
        if shift > policy.max_prediction_shift:
            return (
                f"prediction shift {shift:.3g} (mean {mean:.4g} against the old release's {base_mean:.4g}, "
                f"its standard deviation {base_std:.4g}) exceeds max_prediction_shift={policy.max_prediction_shift:g}"
            )
    if policy.min_quality_delta is not None:
        if canary.labeled < policy.min_labels or baseline.labeled < policy.min_labels:
            return (
                f"quality gate: labels for the new release {canary.labeled}, for the old {baseline.labeled}; "
                f"each needs min_labels={policy.min_labels}"
            )
        better = canary.quality - baseline.quality if goal == "max" else baseline.quality - canary.quality
        if better < policy.min_quality_delta:
            return (
                f"quality {canary.quality:.4g} against the old release's {baseline.quality:.4g} "
                f"({'higher' if goal == 'max' else 'lower'} is better; difference {better:+.4g}) is below "
                f"min_quality_delta={policy.min_quality_delta:g}"
            )
    return None


def watch(
    policy: RolloutSpec,
    percent: float,
    plan: Plan,
    snapshot: Callable[[], dict[str, VariantStats]],
    since: dict[str, VariantStats],
    rollout_start: dict[str, VariantStats],
    progress: Callable[[str], None],
    goal: str = "max",
) -> GateResult:
    """Wait out one step, then judge it.

    The canary is judged on the step's window; the baseline is the old release over the whole
    rollout so far (at 100% it gets no new traffic). Replicas push stats every few seconds, so
    the window closes one push interval after ``interval_s``.
    """
    deadline = time.monotonic() + policy.interval_s + PUSH_INTERVAL_S + 0.5
    cap = time.monotonic() + max(policy.interval_s * 10, 60.0) if policy.min_requests else deadline
    while True:
        now = time.monotonic()
        current = snapshot()
        canary = combined(delta(current, since), plan.new_labels)
        remaining = deadline - now
        progress(
            f"{percent:g}% on the new release: {canary.requests} request(s), {canary.errors} error(s)"
            + (f"; gate in {remaining:.0f}s" if remaining > 0 else "; waiting for min_requests")
        )
        if now >= deadline and (canary.requests >= policy.min_requests or now >= cap):
            baseline = combined(delta(current, rollout_start), plan.old_labels)
            return judge(policy, percent, canary, baseline, goal=goal)
        # An error burst fails the gate early: no need to keep sending traffic to a broken release.
        if canary.errors and canary.requests >= 20:
            baseline = combined(delta(current, rollout_start), plan.old_labels)
            early = judge(policy, percent, canary, baseline, final=False)
            if not early.passed:
                return early
        time.sleep(min(1.0, max(remaining, 0.2)))
