"""Request ids, prediction capture, delayed labels and the quality figure, from outside: a real
flow deploys with ``capture``, real HTTP requests are answered, captured to Parquet under the
flow's Metaflow datastore root, labeled through ``/feedback``, and read back through
``ray_deploy.Endpoint``, ``ray-deploy status`` and the registry's version tags."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from ray_deploy import Endpoint, Registry
from ray_deploy.registry.lineage import VersionRef
from ray_deploy.serving.capture import partitioning

pytestmark = pytest.mark.integration

APP = "captured"
ROW = [5.1, 3.5, 1.4, 0.2]
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TOKEN_ENV = "RAY_DEPLOY_TEST_FEEDBACK_TOKEN"  # set by tests/conftest.py before the head starts


def wait_until(check, timeout: float = 30.0, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        done = value is not None and value is not False and not (isinstance(value, dict) and not value)
        if done or time.monotonic() > deadline:
            return value
        time.sleep(every)


@pytest.fixture(scope="module")
def captured_app(tmp_path_factory, write_flow, run_flow, release_steps, ray_head):
    """An app of the Release model (answers ``release % 3`` = 1 for every row) with a shadow of the
    same model, capturing every request, flushing every half second, labels behind a bearer token."""
    directory = tmp_path_factory.mktemp("capture-flow")
    capture = {"sample": 1.0, "flush_s": 0.5, "feedback_token_env": TOKEN_ENV}
    variants = {
        "main": {"model": "model", "predictor": "python"},
        "mirror": {"model": "model", "predictor": "python", "shadow": True},
    }
    options = f'app="{APP}", num_cpus=0.25, variants={variants!r}, capture={json.dumps(capture)}'
    flow = write_flow(directory / "capture_flow.py", "CaptureFlow", release_steps, options)
    done = run_flow(flow, "--release", "1")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return {"url": f"{ray_head.http_url}/{APP}", "directory": directory}


def feedback(http, url: str, items, token: str | None = os.environ.get(TOKEN_ENV)):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return http.post(f"{url}/feedback", json=items, headers=headers)


def test_every_answer_carries_a_request_id(captured_app, http):
    url = captured_app["url"]
    mine = http.post(url, json={"instances": [ROW]}, headers={"X-Request-Id": "order-42.attempt-1"})
    assert mine.status_code == 200
    assert mine.headers["x-request-id"] == "order-42.attempt-1" == mine.json()["request_id"]

    generated = http.post(url, json={"instances": [ROW]})
    rid = generated.headers["x-request-id"]
    assert UUID.fullmatch(rid) and generated.json()["request_id"] == rid
    assert http.post(url, json={"instances": [ROW]}).headers["x-request-id"] != rid

    malformed = http.post(url, json={"instances": [ROW]}, headers={"X-Request-Id": "two words"})
    assert UUID.fullmatch(malformed.headers["x-request-id"]), malformed.headers  # replaced by the front
    assert malformed.json()["request_id"] == malformed.headers["x-request-id"]

    refused = http.post(url, content=b"{not json", headers={"X-Request-Id": "bad-body-1"})
    assert refused.status_code == 400 and refused.headers["x-request-id"] == "bad-body-1"
    assert "error" in refused.json()

    oip = http.post(
        f"{url}/v2/models/{APP}/infer",
        json={"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64", "data": ROW}]},
        headers={"X-Request-Id": "oip-7"},
    )
    assert oip.status_code == 200 and oip.headers["x-request-id"] == "oip-7"


def test_captures_labels_and_quality_reach_storage_status_and_registry(captured_app, http, repo):
    url = captured_app["url"]
    ids = []
    for index in range(6):
        rows = [ROW] * (1 + index % 2)  # one or two rows
        answer = http.post(url, json={"instances": rows}, headers={"X-Request-Key": f"user-{index}"})
        assert answer.status_code == 200
        ids.append((answer.headers["x-request-id"], len(rows)))

    # Labels: the model answers 1 for every row; three requests labeled right, one wrong (0.75).
    (one_a, _), (two_a, _), (one_b, _), (two_b, _) = ids[:4]
    labels = [
        {"request_id": one_a, "label": 1},
        {"request_id": two_a, "label": [1, 1]},
        {"request_id": one_b, "label": 1},
        {"request_id": two_b, "label": [0, 0]},
    ]
    accepted = feedback(http, url, labels)
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["accepted"] == 4

    # Refusals, each a 4xx naming what is wrong, none of them stored.
    unknown = feedback(http, url, {"request_id": "never-served", "label": 1})
    assert unknown.status_code == 404 and "never-served" in unknown.json()["error"]
    wrong_length = feedback(http, url, {"request_id": ids[5][0], "label": [1, 1, 1]})
    assert wrong_length.status_code == 400 and "2 rows" in wrong_length.json()["error"]
    not_an_item = feedback(http, url, [{"request_id": ids[4][0]}])
    assert not_an_item.status_code == 400 and "feedback item 0" in not_an_item.json()["error"]
    no_token = feedback(http, url, {"request_id": ids[4][0], "label": 1}, token=None)
    assert no_token.status_code == 401 and no_token.headers["www-authenticate"].startswith("Bearer")
    wrong_token = feedback(http, url, {"request_id": ids[4][0], "label": 1}, token="not-the-token")
    assert wrong_token.status_code == 401
    assert http.post(url, json={"instances": [ROW]}).status_code == 200  # the replica keeps serving

    endpoint = Endpoint(APP)
    # The quality figure: live, merged over replicas, in Endpoint, status and the registry.
    figures = wait_until(lambda: {k: v for k, v in endpoint.quality().items() if v["labels"] == 4}, timeout=20)
    ((label, figure),) = figures.items()
    assert figure["quality"] == pytest.approx(0.75) and figure["metric"] == "accuracy"
    status = subprocess.run(
        [str(Path(sys.executable).with_name("ray-deploy")), "status", APP],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr
    assert "accuracy 0.75 over 4 label(s)" in status.stdout, status.stdout
    config = endpoint.config()
    version = next(v.model_version for v in config.variants if v.name == "main")
    tags = Registry().version_tags(VersionRef(*version.rsplit("/", 1)))
    assert float(tags["ray_deploy.quality"]) == pytest.approx(0.75)
    assert tags["ray_deploy.quality.metric"] == "accuracy" and tags["ray_deploy.quality.labels"] == "4"

    # The captures: Parquet under the flow's datastore root, partitioned by app, release and hour.
    root = Path(config.capture.root)
    assert root.name == "ray_deploy_captures" and root.is_dir()
    frame = wait_until(lambda: _with_ids(endpoint.captured(), {rid for rid, _ in ids}), timeout=20)
    assert frame is not None, "the captures did not reach storage"
    # The shadow's answers to captured requests are captured under the same ids.
    mirrored = frame[frame["shadow"]]
    assert set(mirrored["request_id"]) >= {rid for rid, _ in ids} and set(mirrored["variant"]) == {"mirror"}
    frame = frame[~frame["shadow"]]
    by_request = frame.groupby("request_id").size().to_dict()
    assert all(by_request[rid] == rows for rid, rows in ids)  # one captured row per input row
    first = frame[frame["request_id"] == ids[1][0]].sort_values("row")
    assert list(first["row"]) == [0, 1] and list(first["input"]) == [ROW, ROW]
    assert list(first["prediction"]) == [1, 1] and list(first["prediction_value"]) == [1.0, 1.0]
    assert set(first["request_key"]) == {"user-1"} and set(first["variant"]) == {"main"}
    assert set(first["model_version"]) == {version} and (first["latency_ms"] > 0).all()
    dataset = ds.dataset(root / f"app={APP}" / "predictions", format="parquet", partitioning=partitioning())
    base = root / f"app={APP}" / "predictions"
    partitions = {p.split("=")[0] for f in dataset.files for p in Path(f).relative_to(base).parts if "=" in p}
    assert partitions == {"release", "hour"}
    assert set(dataset.to_table().column("release").to_pylist()) == {v.release for v in config.variants}

    stored = wait_until(lambda: (lambda frame: frame if len(frame) >= 4 else None)(endpoint.labels()), timeout=20)
    assert stored is not None and sorted(stored["score"].tolist()) == [0.0, 1.0, 1.0, 1.0]
    joined = endpoint.labeled()
    assert set(joined["request_id"]) == {one_a, two_a, one_b, two_b}
    assert set(joined["request_key"]) == {"user-0", "user-1", "user-2", "user-3"}

    described = http.get(url).json()
    assert described["capture"]["sample"] == 1.0 and described["capture_dropped"] == 0
    assert sum(q["labels"] for q in described["quality"].values()) <= 4  # this replica's share of the labels
    assert os.environ[TOKEN_ENV] not in json.dumps(described) + status.stdout + json.dumps(tags)


def _with_ids(frame, ids):
    return frame if not frame.empty and ids <= set(frame["request_id"]) else None


def test_a_capture_that_cannot_be_written_is_dropped_counted_and_serving_goes_on(
    tmp_path, write_flow, run_flow, release_steps, ray_head, http
):
    """The capture root lies under a regular file (a disk that refuses every write): every request
    is still answered, and the dropped records are counted in the description, the metrics and
    ``ray-deploy status``."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the capture directory should be")
    capture = {"sample": 1.0, "flush_s": 0.3, "path": str(blocker / "captures")}
    options = f'app="capfail", predictor="python", num_cpus=0.25, lineage=False, capture={json.dumps(capture)}'
    flow = write_flow(tmp_path / "capfail_flow.py", "CapFailFlow", release_steps, options)
    done = run_flow(flow)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    url = f"{ray_head.http_url}/capfail"
    answers = [http.post(url, json={"instances": [ROW]}) for _ in range(40)]
    assert [a.status_code for a in answers] == [200] * 40

    dropped = wait_until(lambda: http.get(url).json()["capture_dropped"] >= 40, timeout=20)
    assert dropped, http.get(url).json()
    seen = wait_until(
        lambda: sum(m.get("capture_dropped", 0) for m in Endpoint("capfail").status()["metrics"].values()) >= 40,
        timeout=20,
    )
    assert seen, Endpoint("capfail").status()["metrics"]


def test_a_release_that_answers_fast_but_wrong_is_rolled_back_by_the_disagreement_gate(
    tmp_path, write_flow, run_flow, release_steps, ray_head, http, recorded_load
):
    """Release 2 answers as fast as release 1 and never errs, but answers 2 where release 1 answers 1:
    the error and latency gates pass it; the disagreement gate (the old release asked the same
    requests off the request path) rolls it back, under steady load, with no request lost."""
    app = "disagree"
    rollout = {"strategy": "canary", "steps": [50, 100], "interval_s": 3, "max_disagreement": 0.2}
    options = f'app="{app}", predictor="python", num_cpus=0.25, rollout={json.dumps(rollout)}'
    flow = write_flow(tmp_path / "disagree_flow.py", "DisagreeFlow", release_steps, options)
    first = run_flow(flow, "--release", "1")
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    url = f"{ray_head.http_url}/{app}"

    load = recorded_load(url, tmp_path, json.dumps({"instances": [ROW]}), rate=25, max_seconds=300)
    try:
        load.wait_for(20)
        wrong = run_flow(flow, "--release", "2")
        time.sleep(2)  # the load goes on after the rollback
    finally:
        rows = load.stop()

    output = wrong.stdout + wrong.stderr
    assert wrong.returncode != 0, output[-4000:]
    assert "Rollout rolled back" in output and "max_disagreement=0.2" in output, output[-4000:]
    assert re.search(r"disagreement 1\.000 with the old release \(\d+/\d+ compared", output), output[-4000:]
    failures = [r for r in rows if r["status"] != 200]
    assert not failures, f"{len(failures)} of {len(rows)} requests failed, e.g. {failures[:3]}"
    versions = {r["model_version"] for r in rows}
    assert len(versions) == 2, "the wrong release never got its canary share"
    assert [v["weight"] for v in http.get(url).json()["variants"]] == [100]
