"""The seed's A/B test: the ONNX export against the native XGBoost model, 50/50 behind one route."""

import json
import re
import time
from collections import Counter
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.integration

REQUESTS = 400


@pytest.fixture(scope="module")
def ab_run(ray_head, repo):
    from metaflow import Runner

    with Runner(str(repo / "flows" / "ab_flow.py"), show_output=False, cwd=str(repo)).run() as running:
        if running.status != "successful":
            pytest.fail(f"ABTestFlow failed:\n{running.stdout[-3000:]}\n{running.stderr[-6000:]}")
        return running.run


def test_parity_gate_passed_before_traffic(ab_run):
    (report,) = ab_run["deploy"].task.data.ray_serve["parity"]
    assert report["ok"] and report["source"] == "xgb" and report["derived"] == "onnx"
    assert "143 declared rows" in report["summary"]


def test_weights_are_honoured_and_each_answer_names_its_model(ab_run, http):
    record = ab_run["deploy"].task.data.ray_serve
    versions = {v["name"]: v["model_version"] for v in record["variants"]}
    rows = ab_run["deploy"].task.data.dataset["X_test"]
    seen = Counter()
    for index in range(REQUESTS):
        answer = http.post(record["url"], json={"instances": [rows[index % len(rows)].tolist()]})
        assert answer.status_code == 200
        body = answer.json()
        assert body["model_version"] == versions[body["variant"]] == answer.headers["x-model-version"]
        seen[body["variant"]] += 1
    # 50/50 over 400 requests: outside 150..250 happens with probability below 1e-6.
    assert 150 <= seen["xgb"] <= 250, seen


def test_request_key_pins_a_caller_to_one_variant(ab_run, http):
    url = ab_run["deploy"].task.data.ray_serve["url"]
    row = ab_run["deploy"].task.data.dataset["X_test"][0].tolist()
    pinned = {}
    for key in (f"user-{i}" for i in range(30)):
        answers = {
            http.post(url, json={"instances": [row]}, headers={"X-Request-Key": key}).json()["variant"]
            for _ in range(4)
        }
        assert len(answers) == 1, (key, answers)
        pinned[key] = answers.pop()
    assert set(pinned.values()) == {"xgb", "onnx"}


def test_both_formats_answer_alike(ab_run, http):
    url = ab_run["deploy"].task.data.ray_serve["url"]
    rows = ab_run["deploy"].task.data.dataset["X_test"][:50].tolist()
    by_variant = {}
    for key in (f"k{i}" for i in range(40)):
        body = http.post(url, json={"instances": rows}, headers={"X-Request-Key": key}).json()
        by_variant.setdefault(body["variant"], body["predictions"])
    assert by_variant["xgb"] == by_variant["onnx"]


def test_parity_failure_blocks_the_variant_and_changes_nothing(tmp_path, run_flow, write_flow, ray_head, http):
    flow = write_flow(tmp_path / "bad_export_flow.py", "BadExportFlow", BAD_EXPORT_STEPS, BAD_EXPORT_OPTIONS)
    finished = run_flow(flow)
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0
    assert "Parity gate failed" in output and "worst rows: row" in output, output[-3000:]
    assert http.get(f"{ray_head.http_url}/bad-export").status_code == 404


BAD_EXPORT_STEPS = """
@step
def start(self):
    import xgboost as xgb
    from sklearn.datasets import load_breast_cancer
    from ray_deploy import xgboost_to_onnx

    X, y = load_breast_cancer(return_X_y=True)
    self.model = xgb.XGBClassifier(n_estimators=50, max_depth=4, n_jobs=1).fit(X, y)
    # The "export" is of a different model: the gate must catch it.
    other = xgb.XGBClassifier(n_estimators=3, max_depth=1, n_jobs=1).fit(X, y)
    self.model_onnx = xgboost_to_onnx(other)
    self.next(self.deploy)
"""
BAD_EXPORT_OPTIONS = (
    'app="bad-export", num_cpus=0.25, variants={"xgb": {"model": "model", "weight": 50}, '
    '"onnx": {"model": "model_onnx", "predictor": "onnx", "weight": 50, "derived_from": "xgb"}}'
)


def metrics_by_variant(row: dict) -> dict:
    """Status metrics are keyed by release label (name@vN); these tests look them up by name."""
    return {v["name"]: row["metrics"][v["label"]] for v in row["variants"] if v["label"] in row["metrics"]}


def test_status_reports_per_variant_metrics(ab_run, http):
    """Counts, errors and latency per variant, merged over replicas, from `ray-deploy status`."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    url = ab_run["deploy"].task.data.ray_serve["url"]
    row = ab_run["deploy"].task.data.dataset["X_test"][0].tolist()
    ray_deploy = Path(sys.executable).with_name("ray-deploy")

    def metrics():
        shown = subprocess.run(
            [str(ray_deploy), "status", "cancer-ab", "--json"], capture_output=True, text=True, timeout=60
        )
        assert shown.returncode == 0, shown.stderr
        return metrics_by_variant(json.loads(shown.stdout)[0])

    before = metrics()
    sent = {"xgb": 0, "onnx": 0}
    for index in range(40):
        sent[http.post(url, json={"instances": [row]}, headers={"X-Request-Key": f"m{index}"}).json()["variant"]] += 1
    assert http.post(url, json={"instances": [[1.0]]}, headers={"X-Request-Key": "m0"}).status_code == 400
    pinned = http.post(url, json={"instances": [row]}, headers={"X-Request-Key": "m0"}).json()["variant"]
    sent[pinned] += 1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = metrics()
        grown = {v: after.get(v, {}).get("requests", 0) - before.get(v, {}).get("requests", 0) for v in sent}
        refused = after.get(pinned, {}).get("client_errors", 0) - before.get(pinned, {}).get("client_errors", 0)
        # Replicas push every 2 s: wait for the push that carries this test's requests (the
        # flow's own requests may land between `before` and now, so counts alone do not tell).
        if refused >= 1 and all(grown[v] >= sent[v] for v in sent):
            break
        time.sleep(1)
    assert all(grown[v] >= sent[v] for v in sent), (grown, sent)
    assert after[pinned]["client_errors"] - before.get(pinned, {}).get("client_errors", 0) >= 1
    assert after["xgb"]["errors"] == 0 and after["onnx"]["errors"] == 0
    assert after["xgb"]["p50_ms"] is not None and after["xgb"]["p99_ms"] >= after["xgb"]["p50_ms"]
    assert 0 <= after["onnx"]["prediction_mean"] <= 1


def test_shadow_variant_is_compared_never_returned(ab_run, run_user, http):
    """The ONNX export shadows the XGBoost model: every answer comes from xgb, every request is mirrored."""
    import time

    from ray_deploy import DeploymentSpec, LineageSource, ModelRef, Registry, app_status, deploy
    from ray_deploy.registry.history import events

    refs = {v["name"]: ModelRef(**v["model_ref"]) for v in ab_run["deploy"].task.data.ray_serve["variants"]}
    spec = DeploymentSpec.from_options(
        {"app": "shadowed", "num_cpus": 0.25, "variants": {"main": {"weight": 100}, "mirror": {"shadow": True}}}
    )
    task = ab_run["deploy"].task
    source = LineageSource(
        flow="ABTestFlow", run_id=ab_run.id, step="deploy", task=task.pathspec, user=run_user(ab_run)
    )
    models, predictors = {"main": refs["xgb"], "mirror": refs["onnx"]}, {"main": "xgboost", "mirror": "onnx"}
    result = deploy(spec, models, predictors, lineage=source)
    rows = ab_run["deploy"].task.data.dataset["X_test"][:30]
    for row in rows:
        answer = http.post(result.url, json={"instances": [row.tolist()]}).json()
        assert answer["variant"] == "main"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seen = metrics_by_variant(app_status("shadowed")[0])
        if seen.get("mirror", {}).get("shadow_compared", 0) >= len(rows):
            break
        time.sleep(1)
    assert seen["mirror"]["requests"] >= len(rows) and seen["mirror"]["errors"] == 0
    assert seen["mirror"]["shadow_compared"] >= len(rows)
    assert seen["mirror"]["shadow_agreement"] == 1.0
    assert seen["main"]["requests"] >= len(rows)

    # Dropping the shadow records its comparison on its model version: how much it agreed.
    alone = DeploymentSpec.from_options({"app": "shadowed", "num_cpus": 0.25, "variants": {"main": {"weight": 100}}})
    deploy(alone, {"main": refs["xgb"]}, {"main": "xgboost"}, lineage=source)
    last = events(Registry(), result.versions["mirror"])[-1]
    assert last["status"] == "retired" and last["observed"]["shadow_agreement"] == 1.0
    assert last["observed"]["shadow_compared"] >= len(rows)


def _samples(text: str, name: str, app: str) -> list[tuple[dict[str, str], float]]:
    """The samples of one metric in Prometheus' text format, for one app: (labels, value)."""
    found = []
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels_text, value = line[len(name) + 1 :].rsplit("} ", 1)
        labels = dict(re.findall(r'(\w+)="([^"]*)"', labels_text))
        if labels.get("app") == app:
            found.append((labels, float(value)))
    return found


def _per_variant(samples: list[tuple[dict[str, str], float]], *keys: str) -> dict[tuple[str, ...], float]:
    """Samples summed over replicas (and anything else not in ``keys``)."""
    summed: dict[tuple[str, ...], float] = {}
    for labels, value in samples:
        key = tuple(labels.get(k, "") for k in keys)
        summed[key] = summed.get(key, 0.0) + value
    return summed


def test_per_variant_metrics_reach_prometheus(ab_run, http):
    """Ray's metrics endpoint on the head (what Prometheus scrapes) carries our counters per variant,
    under the documented names, and a latency histogram that agrees with them."""
    import os
    import time

    from ray_deploy.serving.metrics import LATENCY_LE

    url = ab_run["deploy"].task.data.ray_serve["url"]
    row = ab_run["deploy"].task.data.dataset["X_test"][0].tolist()
    for index in range(20):
        assert http.post(url, json={"instances": [row]}, headers={"X-Request-Key": f"p{index}"}).status_code == 200
    endpoint = f"http://127.0.0.1:{os.environ['RAY_DEPLOY_METRICS_PORT']}/metrics"
    deadline = time.monotonic() + 90
    while True:
        try:
            text = http.get(endpoint).text
        except Exception:
            text = ""
        requests = _per_variant(_samples(text, "ray_deploy_requests_total", "cancer-ab"), "variant", "outcome")
        buckets = _per_variant(_samples(text, "ray_deploy_request_latency_ms_bucket", "cancer-ab"), "variant", "le")
        counts = _per_variant(_samples(text, "ray_deploy_request_latency_ms_count", "cancer-ab"), "variant")
        timed = _per_variant(_samples(text, "ray_deploy_request_latency_ms_sum", "cancer-ab"), "variant")
        answered = {v: sum(n for (name, _), n in requests.items() if name == v) for v in ("xgb", "onnx")}
        # Both variants answered, and the histogram counts every request the counter counts
        # (both are published by the same push; the scrape may fall between two pushes).
        settled = all(answered[v] >= 1 and counts.get((v,)) == answered[v] for v in ("xgb", "onnx"))
        if settled or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert requests.get(("xgb", "ok"), 0) >= 1, requests
    assert settled, (requests, counts)
    releases = {labels["release"] for labels, _ in _samples(text, "ray_deploy_requests_total", "cancer-ab")}
    assert all(release.startswith("v") for release in releases), releases
    for variant in ("xgb", "onnx"):
        cumulative = [buckets.get((variant, le), 0.0) for le in LATENCY_LE]
        assert cumulative == sorted(cumulative), cumulative  # buckets are cumulative ("le")
        assert cumulative[-1] == counts[(variant,)]  # +Inf holds every request
        assert 0 < timed[(variant,)] < 1000 * counts[(variant,)]  # milliseconds, each under a second


# The A/B review: ab_flow.py captured every request and posted the true labels of its 100; the
# review flow reads them back, compares the variants and sends all traffic to the winner. It ends
# the module's 50/50 split, so its tests come last (tests run in file order).


def run_review(repo, **parameters):
    """flows/ab_review_flow.py, run to its end through Metaflow's Runner: its status, output and run."""
    import os

    from metaflow import Runner

    # Metaflow 2.19 reads a task's cards from <its datastore root>/mf.cards but writes local cards under
    # the first ./.metaflow up from the working directory (setting METAFLOW_CARD_LOCALROOT does not help:
    # its local card root then comes out None). Run the flow from the tests' datastore directory, so
    # that both are its .metaflow/mf.cards (and no card lands in the repository's own .metaflow).
    root = os.environ["METAFLOW_DATASTORE_SYSROOT_LOCAL"]
    os.makedirs(os.path.join(root, ".metaflow"), exist_ok=True)
    with Runner(str(repo / "flows" / "ab_review_flow.py"), show_output=False, cwd=root).run(**parameters) as running:
        return SimpleNamespace(status=running.status, stdout=running.stdout, stderr=running.stderr, run=running.run)


@pytest.fixture(scope="module")
def review_run(ab_run, repo):
    """The review with its defaults (app cancer-ab, 20 labels per variant, 15 s for captures and
    labels to reach storage), after ab_flow.py."""
    running = run_review(repo)
    if running.status != "successful":
        pytest.fail(f"ABReviewFlow failed:\n{running.stdout[-3000:]}\n{running.stderr[-6000:]}")
    return running.run


def test_review_compares_the_variants_on_their_labels(ab_run, review_run):
    import math

    assert review_run.successful
    assert ab_run["end"].task.data.labels_accepted == 100
    served = {v["name"]: v["model_version"] for v in ab_run["deploy"].task.data.ray_serve["variants"]}
    comparison = review_run["review"].task.data.comparison
    assert {row["variant"]: row["model_version"] for row in comparison.values()} == served
    for label, row in comparison.items():
        assert row["labels"] > 0 and 0 < row["accuracy"] <= 1, (label, row)
        assert row["requests"] >= row["labels"]  # every labeled request was captured, and more were sent
        assert 0 < row["p50_ms"] <= row["p90_ms"], (label, row)
    assert sum(row["labels"] for row in comparison.values()) == 100
    winner = review_run["review"].task.data.winner
    (other,) = set(comparison) - {winner}
    # The best accuracy wins; within 0.005 the lower p50 does.
    assert comparison[winner]["accuracy"] >= comparison[other]["accuracy"] - 0.005
    if math.isclose(comparison[winner]["accuracy"], comparison[other]["accuracy"], abs_tol=0.005):
        assert comparison[winner]["p50_ms"] <= comparison[other]["p50_ms"]


def test_review_promotes_the_winner_and_says_why(ab_run, review_run, http):
    from ray_deploy import Registry
    from ray_deploy.registry.history import events
    from ray_deploy.registry.lineage import VersionRef

    comparison = review_run["review"].task.data.comparison
    winner = review_run["review"].task.data.winner
    (other,) = set(comparison) - {winner}
    assert review_run["promote"].task.data.promoted == {winner: 100.0, other: 0.0}

    url = ab_run["deploy"].task.data.ray_serve["url"]
    deadline = time.monotonic() + 30
    while True:  # each replica takes the new weights from Serve
        weights = {v["label"]: v["weight"] for v in http.get(url).json()["variants"]}
        if weights == {winner: 100.0, other: 0.0} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert weights == {winner: 100.0, other: 0.0}
    row = [0.5] * 30
    for index in range(10):
        answer = http.post(url, json={"instances": [row]}, headers={"X-Request-Key": f"after-review-{index}"})
        assert answer.status_code == 200 and answer.json()["variant"] == comparison[winner]["variant"]

    # The registry's history of the app: the traffic change, with the review run as its reason.
    registry = Registry()
    reason = f"A/B review {review_run['promote'].task.pathspec}"
    versions = {label: VersionRef(*comparison[label]["model_version"].rsplit("/", 1)) for label in comparison}
    last = events(registry, versions[winner])[-1]
    assert last["action"] == "traffic" and last["reason"] == reason, last
    assert last["traffic"] == {winner: 100.0}
    assert events(registry, versions[other])[-1]["reason"] == reason

    # Each variant's quality figure, on its model version: the accuracy the review compared.
    for label, version in versions.items():
        tags = registry.version_tags(version)
        assert float(tags["ray_deploy.quality"]) == pytest.approx(comparison[label]["accuracy"], abs=1e-5), tags
        assert tags["ray_deploy.quality.metric"] == "accuracy"
        assert int(tags["ray_deploy.quality.labels"]) == comparison[label]["labels"]


def test_review_card_shows_the_comparison(review_run):
    from metaflow.cards import get_cards

    (shown,) = get_cards(review_run["review"].task, id="review")
    html = shown.get()
    assert "data:image/png;base64" in html
    # That string is also the page's favicon: look at what the card holds (base64 JSON in the page).
    components = card_components(html)
    comparison = review_run["review"].task.data.comparison
    (image,) = [c for c in components if c["type"] == "image"]
    assert image["src"].startswith("data:image/png;base64,") and len(image["src"]) > 5000
    (table,) = [c for c in components if c["type"] == "table"]
    assert {row[0]: int(row[2]) for row in table["data"]} == {k: v["labels"] for k, v in comparison.items()}
    winner = review_run["review"].task.data.winner
    assert any(c["type"] == "markdown" and f"Winner: `{winner}`" in c["source"] for c in components)


def card_components(html: str) -> list[dict]:
    """The components of a Metaflow card (its data is base64 JSON inside the page), flattened."""
    import base64

    (encoded,) = re.findall(r'window\.__MF_DATA__\["[^"]+"\] = "([^"]+)"', html)
    found, todo = [], json.loads(base64.b64decode(encoded))["components"]
    while todo:
        component = todo.pop(0)
        found.append(component)
        todo += component.get("contents") or []
    return found


def test_review_without_enough_labels_fails_and_moves_nothing(ab_run, review_run, repo, http):
    url = ab_run["deploy"].task.data.ray_serve["url"]
    before = {v["label"]: v["weight"] for v in http.get(url).json()["variants"]}
    running = run_review(repo, min_labels=1000, wait_s=2)
    assert running.status == "failed"
    output = running.stdout + running.stderr + running.run["review"].task.stderr
    assert "no variant has 1000 labels yet" in output and "--min_labels" in output, output[-3000:]
    assert "promote" not in [step.id for step in running.run]
    assert {v["label"]: v["weight"] for v in http.get(url).json()["variants"]} == before
