"""Per-variant request metrics: counts, errors, latency percentiles and a prediction summary.

Each replica keeps cumulative stats per variant and pushes them every few seconds to one
detached ``StatsCollector`` actor, which merges the replicas of an app; ``ray-deploy status``
and the rollout gates read them there. The same numbers reach Prometheus through Ray Serve's
metrics (``PrometheusExport``): ``ray_deploy_requests_total`` and the latency histogram
``ray_deploy_request_latency_ms_bucket`` / ``_sum`` / ``_count``, tagged by app, variant and
release (and Serve's deployment, replica and application tags).
"""

from __future__ import annotations

import bisect
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

LATENCY_BUCKETS_MS = (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
COLLECTOR_NAME = "ray_deploy_stats"
COLLECTOR_NAMESPACE = "ray_deploy"
PUSH_INTERVAL_S = 2.0
_NUMBER_TYPES = frozenset((int, float))  # exactly: a bool is no prediction to sum
_SUM_AS_ARRAY_FROM = 16  # predictions per answer from which summing them in numpy costs less


@dataclass
class VariantStats:
    """Cumulative stats of one variant on one replica (or merged across replicas).

    Beside requests and latency: a summary of the numeric predictions (count, sum, sum of
    squares: the shift gate's mean and spread); shadow answers compared with the served ones;
    during a rollout with a disagreement gate, the new release's answers compared with the old
    release's on the same requests (``reference_*``); labels joined to captured requests
    (``labeled``, ``quality_sum``: the quality figure is their mean score); captured requests
    written and dropped."""

    requests: int = 0
    errors: int = 0
    client_errors: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    prediction_count: int = 0
    prediction_sum: float = 0.0
    prediction_sq_sum: float = 0.0
    shadow_compared: int = 0
    shadow_agreed: int = 0
    reference_compared: int = 0
    reference_agreed: int = 0
    labeled: int = 0
    quality_sum: float = 0.0
    captured: int = 0
    capture_dropped: int = 0

    def compare(self, served: list[Any], shadowed: list[Any]) -> None:
        """Count a shadow answer as agreeing when every row equals the served one."""
        self.shadow_compared += 1
        if same_answer(served, shadowed):
            self.shadow_agreed += 1

    def compare_reference(self, answered: Any, reference: Any) -> None:
        """Count one of this (new) release's answers against the old release's on the same request."""
        self.reference_compared += 1
        if same_answer(answered, reference):
            self.reference_agreed += 1

    def record_label(self, score: float) -> None:
        self.labeled += 1
        self.quality_sum += score

    def record(self, latency_ms: float, status: int, predictions: Any = None) -> None:
        self.requests += 1
        if status >= 500:
            self.errors += 1
        elif status >= 400:
            self.client_errors += 1
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)] += 1
        if isinstance(predictions, list):
            self._add_predictions(predictions)

    def _add_predictions(self, predictions: list[Any]) -> None:
        if len(predictions) >= _SUM_AS_ARRAY_FROM and set(map(type, predictions)) <= _NUMBER_TYPES:
            values = np.asarray(predictions, dtype=np.float64)  # a batch's labels or scores: summed in C
            self.prediction_count += len(values)
            self.prediction_sum += float(values.sum())
            self.prediction_sq_sum += float(values.dot(values))
            return
        for value in predictions:
            first = value[0] if isinstance(value, list) and value else value
            if isinstance(first, int | float) and not isinstance(first, bool):
                number = float(first)
                self.prediction_count += 1
                self.prediction_sum += number
                self.prediction_sq_sum += number * number

    def record_batch(self, latency_ms: float, statuses: list[int], answers: list[Any]) -> None:
        """``record`` for requests that share one latency (a shadow's batch), in one pass."""
        self.requests += len(statuses)
        self.errors += sum(1 for status in statuses if status >= 500)
        self.client_errors += sum(1 for status in statuses if 400 <= status < 500)
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)] += len(statuses)
        for predictions in answers:
            if isinstance(predictions, list):
                self._add_predictions(predictions)

    def merge(self, other: VariantStats) -> VariantStats:
        return self._combine(other, 1)

    def minus(self, earlier: VariantStats) -> VariantStats:
        """What happened between an earlier snapshot and this one."""
        return self._combine(earlier, -1)

    def _combine(self, other: VariantStats, sign: int) -> VariantStats:
        values: dict[str, Any] = {}
        for name in _STAT_FIELDS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if isinstance(mine, list):
                values[name] = [a + sign * b for a, b in zip(mine, theirs, strict=True)]
            else:
                values[name] = mine + sign * theirs
        return VariantStats(**values)

    @property
    def prediction_mean(self) -> float | None:
        return self.prediction_sum / self.prediction_count if self.prediction_count else None

    @property
    def prediction_std(self) -> float | None:
        """The spread of the numeric predictions (population standard deviation)."""
        if not self.prediction_count:
            return None
        mean = self.prediction_sum / self.prediction_count
        return math.sqrt(max(self.prediction_sq_sum / self.prediction_count - mean * mean, 0.0))

    @property
    def disagreement(self) -> float | None:
        """Share of compared requests answered otherwise than the old release (or, for a shadow, than
        the served variant)."""
        if self.reference_compared:
            return 1 - self.reference_agreed / self.reference_compared
        if self.shadow_compared:
            return 1 - self.shadow_agreed / self.shadow_compared
        return None

    @property
    def quality(self) -> float | None:
        """The mean score of the labeled requests (accuracy, MAE or the app's own metric)."""
        return self.quality_sum / self.labeled if self.labeled else None

    def percentile_ms(self, quantile: float) -> float | None:
        """Upper bound of the latency bucket holding the quantile (None before any request)."""
        total = sum(self.latency_counts)
        if total == 0:
            return None
        target = quantile * total
        running = 0
        for index, count in enumerate(self.latency_counts):
            running += count
            if running >= target:
                return float(LATENCY_BUCKETS_MS[index]) if index < len(LATENCY_BUCKETS_MS) else float("inf")
        return float("inf")

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "client_errors": self.client_errors,
            "error_rate": round(self.error_rate, 6),
            "p50_ms": self.percentile_ms(0.5),
            "p90_ms": self.percentile_ms(0.9),
            "p99_ms": self.percentile_ms(0.99),
            "prediction_mean": self.prediction_mean,
            "prediction_std": self.prediction_std,
            "shadow_compared": self.shadow_compared,
            "shadow_agreement": (self.shadow_agreed / self.shadow_compared) if self.shadow_compared else None,
            "compared": self.reference_compared or self.shadow_compared,
            "disagreement": self.disagreement,
            "labels": self.labeled,
            "quality": self.quality,
            "captured": self.captured,
            "capture_dropped": self.capture_dropped,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantStats:
        return cls(**{k: v for k, v in data.items() if k in _STAT_FIELDS})


_STAT_FIELDS = tuple(f.name for f in fields(VariantStats))


def same_answer(one: Any, other: Any) -> bool:
    """Whether two answers to one request agree: equal, numbers within a relative 1e-6 (float32
    and float64 models of one tree ensemble), lists element by element."""
    if one == other:
        return True
    if isinstance(one, list) and isinstance(other, list):
        return len(one) == len(other) and all(same_answer(a, b) for a, b in zip(one, other))
    if isinstance(one, int | float) and isinstance(other, int | float) and not isinstance(one, bool):
        return math.isclose(one, other, rel_tol=1e-6, abs_tol=1e-9)
    return False


REQUESTS_METRIC = "deploy_requests"
"""Ray prefixes ``ray_`` and a counter gets ``_total``: exposed as ``ray_deploy_requests_total``."""
LATENCY_METRIC = "deploy_request_latency_ms"
"""Exposed as ``ray_deploy_request_latency_ms_bucket`` (with ``le``), ``_sum`` and ``_count``."""
CAPTURE_METRIC = "deploy_captured_requests"
"""Exposed as ``ray_deploy_captured_requests`` with ``outcome`` written or dropped (``capture_dropped``)."""
LABELS_METRIC = "deploy_labels"
QUALITY_METRIC = "deploy_quality"
LATENCY_LE = (*(repr(float(bound)) for bound in LATENCY_BUCKETS_MS), "+Inf")
_OUTCOMES = ("ok", "client_error", "error")


class PrometheusExport:
    """A replica's per-variant request metrics for Prometheus, from its cumulative stats.

    Called once per push (``PUSH_INTERVAL_S``), never per request: a Ray metric call costs a few
    microseconds alone but 15-20 under load: the histogram call per request cost ~7% of a
    replica's throughput, and ~4% more when deferred to one call per request in a loop at each
    push (measured with the benchmarks). So requests are added to the counter per variant
    and outcome, and the latency histogram is published as its cumulative series, set as gauges
    named as Prometheus names a histogram's series; PromQL reads them as it reads any histogram:
    ``histogram_quantile(0.99, sum by (le, variant) (rate(ray_deploy_request_latency_ms_bucket[1m])))``.
    They are exact, per replica (Serve's ``replica`` tag), and restart at zero with the replica,
    which ``rate`` handles.
    """

    def __init__(self) -> None:
        from ray.serve import metrics

        variant_keys = ("app", "variant", "release")
        self._requests = metrics.Counter(
            REQUESTS_METRIC,
            description="Scoring requests by app, variant, release and outcome (ok, client_error, error).",
            tag_keys=(*variant_keys, "outcome"),
        )
        self._bucket = metrics.Gauge(
            f"{LATENCY_METRIC}_bucket",
            description="Scoring requests answered within le milliseconds inside the replica (cumulative).",
            tag_keys=(*variant_keys, "le"),
        )
        self._sum = metrics.Gauge(
            f"{LATENCY_METRIC}_sum",
            description="Total scoring latency inside the replica, in milliseconds (cumulative).",
            tag_keys=variant_keys,
        )
        self._count = metrics.Gauge(
            f"{LATENCY_METRIC}_count", description="Scoring requests timed (cumulative).", tag_keys=variant_keys
        )
        self._capture = metrics.Gauge(
            CAPTURE_METRIC,
            description="Captured requests by app, variant, release and outcome (written, dropped), cumulative.",
            tag_keys=(*variant_keys, "outcome"),
        )
        self._labels = metrics.Gauge(
            LABELS_METRIC, description="Labels received for captured requests (cumulative).", tag_keys=variant_keys
        )
        self._quality = metrics.Gauge(
            QUALITY_METRIC,
            description="Mean score of the labels received (the app's quality metric).",
            tag_keys=variant_keys,
        )
        self._counted: dict[str, tuple[int, int, int]] = {}

    def export(self, stats: dict[str, VariantStats], tags: dict[str, dict[str, str]], sums: dict[str, float]) -> None:
        """Publish ``stats`` (cumulative, by variant label) under each label's ``tags``."""
        for label, variant in list(stats.items()):
            variant_tags = tags[label]
            now = (variant.requests - variant.errors - variant.client_errors, variant.client_errors, variant.errors)
            before = self._counted.get(label, (0, 0, 0))
            for outcome, count, earlier in zip(_OUTCOMES, now, before):
                if count > earlier:
                    self._requests.inc(count - earlier, tags={**variant_tags, "outcome": outcome})
            self._counted[label] = now
            cumulative = 0
            for le, count in zip(LATENCY_LE, variant.latency_counts):
                cumulative += count
                self._bucket.set(cumulative, tags={**variant_tags, "le": le})
            self._count.set(cumulative, tags=variant_tags)
            self._sum.set(sums.get(label, 0.0), tags=variant_tags)
            if variant.captured or variant.capture_dropped:
                self._capture.set(variant.captured, tags={**variant_tags, "outcome": "written"})
                self._capture.set(variant.capture_dropped, tags={**variant_tags, "outcome": "dropped"})
            if variant.labeled:
                self._labels.set(variant.labeled, tags=variant_tags)
                self._quality.set(variant.quality, tags=variant_tags)


CAPTURE_INDEX_LIMIT = 200_000
"""Captured requests per app the collector remembers for labels sent to another replica than the
one that answered (the oldest are forgotten first); a replica remembers its own too."""


class StatsCollector:
    """Latest cumulative stats of every replica, by app; merged on read. Also the index of recently
    captured requests (request id -> what answered it), so that a label posted to any replica finds
    the answer it labels."""

    def __init__(self) -> None:
        self._reports: dict[str, dict[str, tuple[float, dict[str, dict[str, Any]]]]] = {}
        self._devices: dict[str, dict[str, dict[str, Any]]] = {}
        self._captured: dict[str, OrderedDict[str, tuple]] = {}

    def index(self, app: str, entries: list[tuple]) -> None:
        """Remember captured requests: ``(request_id, *answer)`` tuples, bounded by ``CAPTURE_INDEX_LIMIT``."""
        index = self._captured.setdefault(app, OrderedDict())
        for entry in entries:
            index[entry[0]] = entry[1:]
        while len(index) > CAPTURE_INDEX_LIMIT:
            index.popitem(last=False)

    def lookup(self, app: str, request_ids: list[str]) -> dict[str, tuple]:
        index = self._captured.get(app, {})
        return {rid: index[rid] for rid in request_ids if rid in index}

    def report_devices(self, app: str, replica: str, info: dict[str, Any]) -> None:
        """Where one replica runs (node, placement group, GPUs) and which path (GPU or CPU, and
        why) each of its variants took, as it loaded them."""
        self._devices.setdefault(app, {})[replica] = info

    def devices(self, app: str) -> dict[str, dict[str, Any]]:
        return dict(self._devices.get(app, {}))

    def report(self, app: str, replica: str, stats: dict[str, dict[str, Any]]) -> None:
        self._reports.setdefault(app, {})[replica] = (time.time(), stats)

    def forget(self, app: str) -> None:
        self._reports.pop(app, None)
        self._devices.pop(app, None)
        self._captured.pop(app, None)

    def snapshot(self, app: str) -> dict[str, dict[str, Any]]:
        merged: dict[str, VariantStats] = {}
        for _, stats in self._reports.get(app, {}).values():
            for variant, data in stats.items():
                merged[variant] = merged.get(variant, VariantStats()).merge(VariantStats.from_dict(data))
        return {variant: stats.to_dict() for variant, stats in merged.items()}


_COLLECTOR_CLASS: Any = None


def get_collector(create: bool = True) -> Any:
    """The detached collector actor (created on first use), or None if absent and not created."""
    import ray

    global _COLLECTOR_CLASS
    if create:
        # The actor class is made once per process: making it anew on every call exported the
        # class to the cluster each time (a rollout controller asks every second).
        if _COLLECTOR_CLASS is None:
            _COLLECTOR_CLASS = ray.remote(num_cpus=0, max_restarts=-1)(StatsCollector)
        return _COLLECTOR_CLASS.options(
            name=COLLECTOR_NAME, namespace=COLLECTOR_NAMESPACE, lifetime="detached", get_if_exists=True
        ).remote()
    try:
        return ray.get_actor(COLLECTOR_NAME, namespace=COLLECTOR_NAMESPACE)
    except ValueError:
        return None


def app_metrics(app: str) -> dict[str, dict[str, Any]]:
    """Per-variant summaries of an app, merged over its replicas (needs a Ray connection)."""
    import ray

    collector = get_collector(create=False)
    if collector is None:
        return {}
    snapshot = ray.get(collector.snapshot.remote(app), timeout=30)
    return {variant: VariantStats.from_dict(data).summary() for variant, data in snapshot.items()}


def replica_reports(app: str, live_replicas: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Replica id -> {"devices": {label: path}, "placement": {...}} for an app's (live) replicas."""
    import ray

    collector = get_collector(create=False)
    if collector is None:
        return {}
    reports = ray.get(collector.devices.remote(app), timeout=30)
    return {r: info for r, info in reports.items() if live_replicas is None or r in live_replicas}


def app_devices(reports: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    """For each variant label: how many replicas run it on each device path."""
    by_label: dict[str, dict[str, int]] = {}
    for info in reports.values():
        for label, device in info.get("devices", {}).items():
            by_label.setdefault(label, {})
            by_label[label][device] = by_label[label].get(device, 0) + 1
    return by_label


def report_devices(app: str, replica: str, devices: dict[str, str], placement: dict[str, Any]) -> None:
    """Fire and forget, from a replica: never blocks or breaks serving."""
    try:
        get_collector(create=True).report_devices.remote(app, replica, {"devices": devices, "placement": placement})
    except Exception:
        import logging

        logging.getLogger("ray.serve").exception("ray-deploy: could not report devices")
