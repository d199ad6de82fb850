"""README and docs/rollouts.md claims about rollouts, each under a steady load from a separate
process (``loadgen.py``, every request recorded):

* a canary slower than ``max_p99_ms`` is rolled back by the latency gate on its own, the flow
  step fails naming the gate, no request fails, and the old release serves all traffic after;
* ``blue_green`` moves all traffic to the new release while the old one stays loaded, gates it,
  promotes it, and no request fails on the way.
"""

import json
import threading
import time
from pathlib import Path

import pytest

from ray_deploy import Registry
from ray_deploy.registry.history import events

pytestmark = pytest.mark.integration

ROW = [5.1, 3.5, 1.4, 0.2]
BODY = json.dumps({"instances": [ROW]})
DELAY_S = 0.04  # the slow release's extra time per request: twice max_p99_ms below

MODELS = '''
import time


class Slow:
    """Answers exactly as the model it wraps, DELAY_S later: a correct release that is too slow."""

    def __init__(self, inner, delay_s):
        self.inner = inner
        self.delay_s = delay_s

    def predict(self, rows):
        time.sleep(self.delay_s)
        return self.inner.predict(rows)
'''

STEPS = f"""
release = Parameter("release", type=int, default=1)
slow = Parameter("slow", type=bool, default=False)

@step
def start(self):
    from release_model import Release
    model = Release(self.release)
    if self.slow:
        from claims_models import Slow
        model = Slow(model, {DELAY_S})
    self.model = model
    self.next(self.deploy)
"""


APP = "claimed-rollouts"


def release_flow(write_flow, directory: Path, app: str, rollout: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "claims_models.py").write_text(MODELS)
    options = f'app="{app}", predictor="python", num_cpus=0.25, rollout={json.dumps(rollout)}'
    return write_flow(directory / "release_flow.py", "ReleaseFlow", STEPS, options)


def answered(rows: list[dict], start: float, end: float) -> set:
    """Model versions of the answers to requests sent and answered inside [start, end]."""
    return {r["model_version"] for r in rows if r["start"] >= start and r["end"] <= end}


def shares(http, url: str) -> dict[str, float]:
    """What the app serves: model version -> traffic share."""
    return {v["model_version"]: v["weight"] for v in http.get(url).json()["variants"]}


@pytest.fixture(scope="module")
def serving(tmp_path_factory, write_flow, run_flow, ray_head) -> str:
    """The module's app, serving a first release (deployed once: each test starts from whatever
    single release it serves and leaves it serving one)."""
    flow = release_flow(write_flow, tmp_path_factory.mktemp("first"), APP, {"strategy": "immediate"})
    first = run_flow(flow, "--release", "1")
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    return f"{ray_head.http_url}/{APP}"


def test_a_slow_canary_is_rolled_back_by_the_p99_gate_under_load(
    tmp_path, write_flow, run_flow, serving, http, recorded_load
):
    app, url = APP, serving
    rollout = {"strategy": "canary", "steps": [50, 100], "interval_s": 4, "max_p99_ms": 20}
    flow = release_flow(write_flow, tmp_path / "flow", app, rollout)
    (v1,) = shares(http, url)

    load = recorded_load(url, tmp_path, BODY, rate=25, max_seconds=300)
    try:
        load.wait_for(20)
        slow_start = time.time()
        slow = run_flow(flow, "--release", "2", "--slow", "True")
        slow_end = time.time()
        time.sleep(3)  # the load goes on after the rollback
        after = shares(http, url)
    finally:
        rows = load.stop()

    output = slow.stdout + slow.stderr
    assert slow.returncode != 0, output[-4000:]
    assert "Rollout rolled back" in output and "max_p99_ms=20" in output, output[-4000:]
    failures = [r for r in rows if r["status"] != 200]
    assert not failures, f"{len(failures)} of {len(rows)} requests failed, e.g. {failures[:3]}"
    assert len(rows) >= 100, "the load generator sent too few requests to prove anything"

    # The slow release did get its canary share, and it was slow: the gate judged real traffic.
    (v2,) = answered(rows, slow_start, slow_end) - {v1}
    slow_answers = [r for r in rows if r["model_version"] == v2]
    assert len(slow_answers) >= 10 and all(r["end"] - r["start"] >= DELAY_S for r in slow_answers)
    # Afterwards the old release serves all traffic.
    assert after == {v1: 100}
    assert answered(rows, slow_end, float("inf")) == {v1}
    tags = Registry().version_tags(Registry().resolve(v2))
    assert tags["ray_deploy.status"] == "rolled_back" and "max_p99_ms" in tags["ray_deploy.rollback_reason"]


def test_blue_green_under_load_keeps_the_old_release_loaded_then_promotes_losing_nothing(
    tmp_path, write_flow, run_flow, serving, http, recorded_load
):
    app, url = APP, serving
    flow = release_flow(write_flow, tmp_path / "flow", app, {"strategy": "blue_green", "interval_s": 4})
    (v1,) = shares(http, url)

    seen: list[dict[str, float]] = []  # the app's split, as callers could see it during the rollout
    finished: dict = {}
    load = recorded_load(url, tmp_path, BODY, rate=25, max_seconds=300)
    try:
        load.wait_for(20)
        switch_start = time.time()
        deployer = threading.Thread(target=lambda: finished.update(done=run_flow(flow, "--release", "3")))
        deployer.start()
        while deployer.is_alive():
            seen.append(shares(http, url))
            time.sleep(0.25)
        deployer.join()
        switch_end = time.time()
        time.sleep(3)
        after = shares(http, url)
    finally:
        rows = load.stop()

    done = finished["done"]
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    failures = [r for r in rows if r["status"] != 200]
    assert not failures, f"{len(failures)} of {len(rows)} requests failed, e.g. {failures[:3]}"
    assert len(rows) >= 100, "the load generator sent too few requests to prove anything"
    (v2,) = set(after)
    assert v2 != v1 and after == {v2: 100}
    # While the gate watched, the new release had all traffic and the old one was still loaded.
    assert {v1: 0, v2: 100} in seen, seen
    assert answered(rows, 0, switch_start) == {v1}
    assert answered(rows, switch_start, switch_end) == {v1, v2}
    assert answered(rows, switch_end, float("inf")) == {v2}
    registry = Registry()
    assert registry.version_tags(registry.resolve(v2))["ray_deploy.status"] == "serving"
    assert registry.version_tags(registry.resolve(v1))["ray_deploy.status"] == "retired"
    # Recorded as it happened: staged beside the old release, all traffic, the gate, promoted.
    assert [e["action"] for e in events(registry, registry.resolve(v2))] == [
        "staged",
        "traffic",
        "gate_passed",
        "promoted",
    ]
    assert str(registry.resolve(f"{app}@production")) == v2
