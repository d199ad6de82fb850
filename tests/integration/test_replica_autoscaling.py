"""Replica ``autoscaling`` follows the load up and down, and no request is lost on the way.

A steady trickle of load (one connection) runs from a separate process for the whole test; a
burst (eight connections) from a second one makes Serve add replicas; once the burst ends, Serve
removes them while the trickle still runs. Both processes count every request: none may fail,
in particular none of the trickle's while replicas are stopped under it.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

APP = "elastic"
BODY = json.dumps({"instances": [[1.0, 2.0, 3.0, 4.0]]})

MODELS = '''
import time


class SlowModel:
    """Answers after 50 ms: concurrent callers pile up ongoing requests, a single one does not."""

    n_features_in_ = 4

    def predict(self, rows):
        time.sleep(0.05)
        return [0] * len(rows)
'''

STEPS = """
@step
def start(self):
    from elastic_models import SlowModel
    self.model = SlowModel()
    self.next(self.deploy)
"""

# One connection keeps ~1 request ongoing: below target_ongoing_requests=2 on one replica.
# Eight keep ~8: four replicas' worth, capped at max_replicas=3.
OPTIONS = (
    f'app="{APP}", predictor="python", num_cpus=0.1, '
    'autoscaling={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2, '
    '"upscale_delay_s": 1, "downscale_delay_s": 4, "look_back_period_s": 2}'
)


def cli_running_replicas() -> int:
    """Running replicas as `ray-deploy status` shows them."""
    exe = Path(sys.executable).with_name("ray-deploy")
    shown = subprocess.run([str(exe), "status", APP, "--json"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr[-2000:]
    (row,) = json.loads(shown.stdout)
    return row["replicas"].get("ModelServer", {}).get("RUNNING", 0)


def running_replicas(dashboard_url: str, app: str = APP) -> int:
    """Running replicas as the dashboard's Serve API lists them (polled: no process per look)."""
    from ray_deploy.cluster import auth_headers

    shown = httpx.get(f"{dashboard_url}/api/serve/applications/", headers=auth_headers(), timeout=30).json()
    replicas = shown["applications"][app]["deployments"]["ModelServer"]["replicas"]
    return sum(1 for replica in replicas if replica["state"] == "RUNNING")


def wait_for_replicas(dashboard_url: str, done, timeout_s: float, app: str = APP) -> list[int]:
    """Replica counts seen every ~second until ``done(count)`` or the timeout."""
    seen = [running_replicas(dashboard_url, app)]
    deadline = time.monotonic() + timeout_s
    while not done(seen[-1]) and time.monotonic() < deadline:
        time.sleep(1)
        seen.append(running_replicas(dashboard_url, app))
    return seen


def test_replicas_shrink_under_a_steady_load_and_no_request_fails(
    tmp_path, write_flow, run_flow, ray_head, counted_load
):
    (tmp_path / "elastic_models.py").write_text(MODELS)
    flow = write_flow(tmp_path / "elastic_flow.py", "ElasticFlow", STEPS, OPTIONS)
    done = run_flow(flow)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    url = f"{ray_head.http_url}/{APP}"
    assert cli_running_replicas() == 1

    with counted_load(url, BODY, concurrency=1, max_seconds=400) as trickle:
        time.sleep(2)
        with counted_load(url, BODY, concurrency=8, max_seconds=200) as burst:
            grown = wait_for_replicas(ray_head.dashboard_url, lambda count: count >= 2, timeout_s=120)
            time.sleep(2)  # the new replicas take part of the burst
        shrunk = wait_for_replicas(ray_head.dashboard_url, lambda count: count == 1, timeout_s=180)
        assert trickle.process.poll() is None, "the steady load ended before the replicas went"
        time.sleep(2)

    assert grown[-1] >= 2, f"under 8 connections Serve should add replicas; saw {grown}"
    assert shrunk[-1] == 1, f"once the burst ends, replicas go back to min_replicas; saw {shrunk}"
    assert max(shrunk) >= 2, f"the replicas were gone before the burst ended; nothing shrank under load: {shrunk}"
    burst.assert_nothing_lost(at_least=100)
    trickle.assert_nothing_lost(at_least=100)


QUICK_APP = "brisk"
QUICK_STEPS = """
@step
def start(self):
    import xgboost as xgb
    from sklearn.datasets import load_breast_cancer
    from ray_deploy import xgboost_to_onnx

    X, y = load_breast_cancer(return_X_y=True)
    model = xgb.XGBClassifier(n_estimators=30, max_depth=3, n_jobs=1, random_state=0).fit(X[:, :4], y)
    self.model = xgboost_to_onnx(model, n_features=4)
    self.next(self.deploy)
"""

# An ONNX model answers in ~0.1 ms, on the replica's event loop: the replica takes one request at a
# time off its sockets, and Serve's own count never shows more than one ongoing request.
QUICK_OPTIONS = (
    f'app="{QUICK_APP}", predictor="onnx", num_cpus=0.1, '
    'autoscaling={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, '
    '"upscale_delay_s": 1, "downscale_delay_s": 600, "look_back_period_s": 2}'
)


def test_a_quick_model_under_many_callers_gets_more_replicas(tmp_path, write_flow, run_flow, ray_head, counted_load):
    """16 callers keep the quick model's one replica busy: the requests wait in the front and in
    the replica's sockets, where Serve's own count does not see them; the front's does."""
    flow = write_flow(tmp_path / "brisk_flow.py", "BriskFlow", QUICK_STEPS, QUICK_OPTIONS)
    done = run_flow(flow)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    url = f"{ray_head.http_url}/{QUICK_APP}"
    shown = httpx.get(f"{ray_head.dashboard_url}/api/serve/applications/", headers=auth(), timeout=30).json()
    server = shown["applications"][QUICK_APP]["deployments"]["ModelServer"]["deployment_config"]
    assert server["autoscaling_config"]["policy"]["policy_function"].endswith(":front_load_policy")
    assert running_replicas(ray_head.dashboard_url, QUICK_APP) == 1

    with counted_load(url, BODY, concurrency=16, max_seconds=150) as load:
        grown = wait_for_replicas(ray_head.dashboard_url, lambda count: count >= 2, timeout_s=90, app=QUICK_APP)
        time.sleep(1)

    assert grown[-1] >= 2, f"16 callers on one replica of a quick model should bring a second; saw {grown}"
    load.assert_nothing_lost(at_least=200)
    cli = subprocess.run(
        [str(Path(sys.executable).with_name("ray-deploy")), "delete", QUICK_APP], capture_output=True, text=True
    )
    assert cli.returncode == 0, cli.stderr[-2000:]


def auth() -> dict[str, str]:
    from ray_deploy.cluster import auth_headers

    return auth_headers()
