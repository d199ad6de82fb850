"""One served app, as a step of a flow (or a notebook) sees it: ``Endpoint("cancer")``.

What was served and how well flows back into Metaflow through this object: its status, the
captured requests and their labels as pandas DataFrames, each variant's quality figure, and the
operator moves (traffic, promote, rollback) with the calling run recorded as their reason::

    from ray_deploy import Endpoint

    endpoint = Endpoint("cancer")
    served = endpoint.captured(since=datetime.now(UTC) - timedelta(hours=1))
    joined = endpoint.labeled()                      # captured rows with their labels
    figures = endpoint.quality()                     # {"xgb@v3": {"quality": 0.97, "labels": 120, ...}}
    endpoint.promote("onnx", reason=f"A/B review {current.pathspec}")

Everything starts from the live app (``control.live.LiveApp``): where its captures are, the metric
and the registry all come from the config the app runs with.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ray_deploy.cluster import connect
from ray_deploy.control.live import LiveApp
from ray_deploy.errors import DeployError
from ray_deploy.registry.lineage import Registry, VersionRef
from ray_deploy.serving.capture import read_captures, read_labels
from ray_deploy.serving.config import CaptureConfig, ServingConfig
from ray_deploy.serving.metrics import app_metrics

QUALITY_TAG = "ray_deploy.quality"
"""Registry tags a quality figure is recorded under: ``ray_deploy.quality`` (the figure),
``.metric``, ``.labels`` (labels it is the mean of), ``.at`` (when it was read)."""


class Endpoint:
    """A served app: status, captures, labels, quality, and the operator moves."""

    def __init__(self, app: str, address: str | None = None) -> None:
        self.app = app
        self.address = address

    def config(self) -> ServingConfig:
        """The config the app runs with now (read from Serve)."""
        with connect(self.address, start_local=False):
            return LiveApp.require(self.app, self.address).config

    def status(self) -> dict[str, Any]:
        """What ``ray-deploy status APP --json`` prints: state, URL, variants, rollout, live metrics."""
        from ray_deploy.control.status import app_status

        (row,) = app_status(self.app, self.address)
        return row

    def _capture(self) -> CaptureConfig:
        capture = self.config().capture
        if capture is None:
            raise DeployError(
                f"app {self.app!r} captures nothing: deploy it with capture={{'sample': 0.1}} to capture "
                "requests and take labels"
            )
        return capture

    def captured(
        self,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
        variant: str | None = None,
        release: str | None = None,
    ) -> Any:
        """The captured rows (one per input row of a sampled request) as a pandas DataFrame:
        ``ts, request_id, request_key, app, variant, label, release, model_version, latency_ms, row,
        input, prediction, prediction_value, shadow``. Captures reach storage every ``flush_s``."""
        return read_captures(self._capture().root, self.app, since=since, until=until, variant=variant, release=release)

    def labels(self, since: datetime | float | None = None, until: datetime | float | None = None) -> Any:
        """The labels posted to the app's ``/feedback``, with the answer each one labels and its score."""
        return read_labels(self._capture().root, self.app, since=since, until=until)

    def labeled(self, since: datetime | float | None = None) -> Any:
        """Captured requests that got a label, one row per request: the served answer (not the
        shadows'), its variant and release, the label and its score."""
        capture = self._capture()
        captured = read_captures(capture.root, self.app, since=since)
        labels = read_labels(capture.root, self.app, since=since)
        columns = ["request_id", "latency_ms", "request_key", "input"]
        served = captured[~captured["shadow"].astype(bool)] if not captured.empty else captured
        served = served.reindex(columns=columns).drop_duplicates("request_id")
        return labels.merge(served, on="request_id", how="left")

    def quality(self, record: bool = True) -> dict[str, dict[str, Any]]:
        """Each variant's live quality figure (the mean score of its labels, from every replica),
        by label: ``{"quality", "labels", "metric", "goal", "requests", "captured", "capture_dropped"}``.
        ``record``: also tag each variant's registered model version with it (``ray_deploy.quality*``)."""
        config = self.config()
        capture = config.capture
        if capture is None:
            raise DeployError(f"app {self.app!r} takes no labels: deploy it with capture={{'sample': ...}}")
        with connect(self.address, start_local=False):
            metrics = app_metrics(self.app)
        figures = {}
        for label, seen in metrics.items():
            figures[label] = {
                "quality": seen.get("quality"),
                "labels": seen.get("labels", 0),
                "metric": capture.quality,
                "goal": capture.goal,
                "requests": seen.get("requests", 0),
                "captured": seen.get("captured", 0),
                "capture_dropped": seen.get("capture_dropped", 0),
            }
        if record and config.registry_uri:
            self._record_quality(config, figures)
        return figures

    def _record_quality(self, config: ServingConfig, figures: dict[str, dict[str, Any]]) -> None:
        registry = Registry(config.registry_uri, config.registry_uri)
        at = datetime.now().astimezone().isoformat(timespec="seconds")
        for variant in config.variants:
            figure = figures.get(variant.label)
            if not variant.model_version or figure is None or figure["quality"] is None:
                continue
            registry.set_tags(
                VersionRef(*variant.model_version.rsplit("/", 1)),
                {
                    QUALITY_TAG: f"{figure['quality']:.6g}",
                    f"{QUALITY_TAG}.metric": figure["metric"],
                    f"{QUALITY_TAG}.labels": figure["labels"],
                    f"{QUALITY_TAG}.at": at,
                },
            )

    def set_traffic(self, weights: dict[str, float], reason: str = "") -> ServingConfig:
        """Split traffic by hand (labels, or names when unique); see ``ray_deploy.set_traffic``."""
        from ray_deploy.control.operate import set_traffic

        return set_traffic(self.app, weights, self.address, reason)

    def promote(self, variant: str | None = None, reason: str = "") -> ServingConfig:
        """Finish the app's rollout (``variant`` None), or send all traffic to ``variant`` (the
        winner of an A/B: its label, or its name when unique); ``reason`` is recorded in the
        registry's history of the app (e.g. the pathspec of the run that reviewed it)."""
        from ray_deploy.control.operate import promote

        if variant is None:
            return promote(self.app, self.address, reason or "promoted the new release")
        return self.set_traffic({variant: 100.0}, reason or f"promoted {variant}")

    def rollback(self, reason: str = "") -> ServingConfig:
        """Back to the previous release; see ``ray_deploy.rollback``."""
        from ray_deploy.control.operate import rollback

        return rollback(self.app, self.address, reason or "rollback")
