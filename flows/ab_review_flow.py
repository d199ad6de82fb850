"""Review a live A/B test on its labels, pass the result back, and promote the winner.

The seed story's last act ("deploy them both in an A/B test, log their performance, pass this
information back"): flows/ab_flow.py serves an XGBoost model and its ONNX export 50/50, captures
every request and posts the true labels of its test requests to the app's /feedback. This flow
reads what was served back into Metaflow (``ray_deploy.Endpoint``: the captured requests and their
labels as pandas DataFrames), compares the variants (labels, accuracy, requests, p50/p90 latency)
in a card, picks the winner (the best accuracy among variants with at least ``min_labels`` labels;
within 0.005 of each other, the faster p50 wins), records each variant's quality figure on its
MLflow model version and sends all traffic to the winner, with this run as the recorded reason.

    python flows/ab_flow.py run
    python flows/ab_review_flow.py run                       # --app cancer-ab --min_labels 20 --wait_s 15
    python flows/ab_review_flow.py card view review          # the comparison: a table and a figure
    ray-deploy status cancer-ab                              # the winner at 100%, accuracy per variant
    ray-deploy lineage cancer-ab                             # the traffic change and why (this run)
"""

import time

from metaflow import FlowSpec, Parameter, card, current, step

TIE = 0.005
"""Accuracies this close are a tie, which the lower p50 latency breaks."""


class ABReviewFlow(FlowSpec):
    """Compare the variants of a live A/B test on their labels and promote the winner."""

    app = Parameter("app", help="The A/B test's app (deployed with capture on).", default="cancer-ab")
    min_labels = Parameter(
        "min_labels", help="Labels a variant needs before its accuracy counts.", type=int, default=20
    )
    wait_s = Parameter(
        "wait_s", help="Seconds to wait for captures and labels to reach storage.", type=float, default=15
    )

    @step
    def start(self):
        from ray_deploy import Endpoint

        config = Endpoint(self.app).config()
        if config.capture is None:
            raise RuntimeError(
                f"app {self.app!r} captures nothing: deploy it with capture={{'sample': 1.0}} and post labels "
                "to its /feedback (flows/ab_flow.py does both) before reviewing it"
            )
        if config.capture.quality != "accuracy":
            raise RuntimeError(
                f"app {self.app!r} scores its labels by {config.capture.quality!r}: this review compares accuracy"
            )
        self.variants = {v.label: v.name for v in config.variants if not v.shadow}
        self.model_versions = {v.label: v.model_version for v in config.variants if not v.shadow}
        self.capture_root = config.capture.root
        print(f"app {self.app!r} serves {', '.join(self.variants)}; captures under {self.capture_root}")
        self.next(self.review)

    @card(type="blank", id="review")
    @step
    def review(self):
        from metaflow.cards import Image, Markdown, Table

        from ray_deploy import Endpoint

        labeled, captured = read_when_stored(Endpoint(self.app), list(self.variants), self.wait_s)
        self.comparison = compare(labeled, captured, self.variants, self.model_versions)
        current.card.append(Markdown(f"# A/B review of `{self.app}`"))
        current.card.append(Table(table_rows(self.comparison), headers=list(TABLE_HEADERS)))
        current.card.append(Image.from_matplotlib(figure(self.comparison), label="accuracy and p50 latency"))
        try:
            self.winner = pick_winner(self.comparison, self.min_labels)
        except ValueError as exc:
            current.card.append(Markdown(f"**No winner**: {exc}"))
            raise
        won = self.comparison[self.winner]
        current.card.append(
            Markdown(
                f"**Winner: `{self.winner}`**, accuracy {won['accuracy']:.4f} over {won['labels']} labels, "
                f"p50 {won['p50_ms']:.2f} ms. It gets all of `{self.app}`'s traffic."
            )
        )
        for label, row in self.comparison.items():
            print(
                f"{label}: {row['labels']} labels, accuracy {fmt(row['accuracy'], '.4f')}, {row['requests']} requests, "
                f"p50 {fmt(row['p50_ms'], '.2f')} ms, p90 {fmt(row['p90_ms'], '.2f')} ms"
            )
        print(f"winner: {self.winner}")
        self.next(self.promote)

    @step
    def promote(self):
        from ray_deploy import Endpoint

        endpoint = Endpoint(self.app)
        # Each variant's live quality figure, tagged on its MLflow model version (ray_deploy.quality*).
        self.quality_figures = endpoint.quality(record=True)
        config = endpoint.promote(self.winner, reason=f"A/B review {current.pathspec}")
        self.promoted = {v.label: v.weight for v in config.variants}
        print(f"app {self.app!r} now serves: {self.promoted}")
        self.next(self.end)

    @step
    def end(self):
        print(f"{self.winner} won the A/B review of {self.app!r}; `ray-deploy status {self.app}` shows it")


def read_when_stored(endpoint, variants: list[str], wait_s: float):
    """``endpoint.labeled()`` and ``endpoint.captured()`` once storage holds every label the
    variants counted live, each with its captured request (replicas write every ``flush_s``), or
    once ``wait_s`` has passed, whatever is there then."""
    deadline = time.monotonic() + wait_s
    while True:
        live = {label: figure["labels"] for label, figure in endpoint.quality(record=False).items()}
        labeled, captured = endpoint.labeled(), endpoint.captured()
        stored = labeled["label"].value_counts().to_dict() if not labeled.empty else {}
        joined = "latency_ms" in labeled and labeled["latency_ms"].notna().all()
        complete = joined and all(stored.get(label, 0) >= live.get(label, 0) for label in variants)
        if (complete and sum(stored.get(label, 0) for label in variants) > 0) or time.monotonic() >= deadline:
            return labeled, captured
        time.sleep(1)


def compare(labeled, captured, variants: dict[str, str], model_versions: dict[str, str | None]) -> dict:
    """Per variant label: labels, accuracy (their mean score), requests captured, p50/p90 latency (ms)."""
    import numpy as np

    served = captured[~captured["shadow"]].drop_duplicates("request_id") if not captured.empty else captured
    comparison = {}
    for label, name in variants.items():
        scores = labeled.loc[labeled["label"] == label, "score"].dropna() if not labeled.empty else []
        latency = served.loc[served["label"] == label, "latency_ms"].dropna() if not served.empty else []
        comparison[label] = {
            "variant": name,
            "model_version": model_versions.get(label),
            "labels": int(len(scores)),
            "accuracy": float(np.mean(scores)) if len(scores) else None,
            "requests": int(len(latency)),
            "p50_ms": float(np.percentile(latency, 50)) if len(latency) else None,
            "p90_ms": float(np.percentile(latency, 90)) if len(latency) else None,
        }
    return comparison


def pick_winner(comparison: dict, min_labels: int) -> str:
    """The best accuracy among variants with at least ``min_labels`` labels; accuracies within
    ``TIE`` of the best go to the lowest p50 latency.

    Raises:
        ValueError: no variant has ``min_labels`` labels.
    """
    ready = {label: row for label, row in comparison.items() if row["labels"] >= max(min_labels, 1)}
    if not ready:
        counts = ", ".join(f"{label}: {row['labels']}" for label, row in comparison.items()) or "no variants"
        raise ValueError(
            f"no variant has {min_labels} labels yet ({counts}); post more labels to the app's /feedback "
            "(or lower --min_labels) and review again"
        )
    best = max(row["accuracy"] for row in ready.values())
    tied = [label for label, row in ready.items() if row["accuracy"] >= best - TIE]
    return min(tied, key=lambda label: (ready[label]["p50_ms"] is None, ready[label]["p50_ms"] or 0.0, label))


TABLE_HEADERS = ("variant", "model version", "labels", "accuracy", "requests captured", "p50 ms", "p90 ms")


def table_rows(comparison: dict) -> list[list[str]]:
    return [
        [
            label,
            row["model_version"] or "-",
            str(row["labels"]),
            fmt(row["accuracy"], ".4f"),
            str(row["requests"]),
            fmt(row["p50_ms"], ".2f"),
            fmt(row["p90_ms"], ".2f"),
        ]
        for label, row in comparison.items()
    ]


def figure(comparison: dict):
    """Accuracy and p50 latency per variant, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(comparison)
    fig, (accuracy, latency) = plt.subplots(1, 2, figsize=(9, 3.5))
    accuracy.bar(labels, [comparison[label]["accuracy"] or 0.0 for label in labels], color="#4c72b0")
    accuracy.set_ylim(0, 1.05)
    accuracy.set_title("accuracy (mean label score)")
    latency.bar(labels, [comparison[label]["p50_ms"] or 0.0 for label in labels], color="#dd8452")
    latency.set_title("p50 latency (ms)")
    accuracy.bar_label(accuracy.containers[0], fmt="%.3f")
    latency.bar_label(latency.containers[0], fmt="%.2f")
    for axes in (accuracy, latency):
        axes.tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    return fig


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    ABReviewFlow()
