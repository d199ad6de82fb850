"""Ray's real autoscaler on one machine (the fake multi-node provider, logical GPUs): GPU replicas
in placement groups make it add GPU nodes, which go away again when the app is deleted; replicas
that no node type can hold fail the deploy in bounded time.

This cluster is a second head on its own ports, started with `ray-deploy cluster up --config
configs/cluster/local-autoscaling.yaml`, and stopped (with every simulated node) at the end.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PORTS = {
    "RAY_DEPLOY_GCS_PORT": "6799",
    "RAY_DEPLOY_DASHBOARD_PORT": "8798",
    "RAY_DEPLOY_HTTP_PORT": "8797",
    "RAY_DEPLOY_METRICS_PORT": "8796",
    "RAY_DEPLOY_CLIENT_PORT": "9092",
}
APP = "gpu-app"

STEPS = """
@step
def start(self):
    import xgboost
    from sklearn.datasets import load_breast_cancer
    X, y = load_breast_cancer(return_X_y=True)
    self.model = xgboost.XGBClassifier(n_estimators=10, max_depth=3, n_jobs=1).fit(X, y)
    self.next(self.deploy)
"""


def ray_deploy(env: dict, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("ray-deploy")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def autoscaling_cluster():
    env = {**os.environ, **PORTS}
    env.pop("RAY_DEPLOY_NUM_CPUS", None)  # the config's head node type says what the head has
    try:
        up = ray_deploy(env, "cluster", "up", "--config", str(REPO / "configs" / "cluster" / "local-autoscaling.yaml"))
        assert up.returncode == 0, up.stderr[-3000:]
        yield env
    finally:  # also after a failed start: a half-started head would outlive the suite
        ray_deploy(env, "cluster", "down", timeout=120)


def nodes(env: dict) -> list[dict]:
    shown = ray_deploy(env, "cluster", "status", "--json", timeout=60)
    assert shown.returncode == 0, shown.stderr[-2000:]
    return [n for n in json.loads(shown.stdout)["nodes"] if n["alive"]]


def gpu_nodes(env: dict) -> list[dict]:
    return [n for n in nodes(env) if n["resources"].get("GPU", 0) >= 1]


def alive_gpu_nodes_shown(env: dict) -> int:
    """Live GPU nodes as the dashboard's state API lists them (0 if it cannot tell)."""
    from ray_deploy.cluster import auth_headers

    url = f"http://127.0.0.1:{env['RAY_DEPLOY_DASHBOARD_PORT']}/api/v0/nodes?limit=100"
    try:
        rows = httpx.get(url, headers=auth_headers(), timeout=10).json()["data"]["result"]["result"]
    except (httpx.HTTPError, KeyError, TypeError, ValueError):
        return 0
    return sum(1 for n in rows if n.get("state") == "ALIVE" and (n.get("resources_total") or {}).get("GPU", 0) >= 1)


def test_gpu_replicas_bring_gpu_nodes_that_leave_with_the_app(autoscaling_cluster, tmp_path, write_flow, run_flow):
    env = autoscaling_cluster
    assert gpu_nodes(env) == [], "GPU worker nodes start at zero"
    options = (
        f'app="{APP}", predictor="xgboost", num_cpus=0.5, num_gpus=1, num_replicas=2, deploy_timeout_s=240, '
        'placement={"bundles": [{"CPU": 1, "GPU": 1}], "strategy": "STRICT_PACK"}'
    )
    flow = write_flow(tmp_path / "gpu_flow.py", "GpuFlow", STEPS, options)
    done = run_flow(flow, env=env, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "the autoscaler is starting" in output, "progress must say that nodes are on their way"

    (row,) = json.loads(ray_deploy(env, "status", APP, "--json").stdout)
    assert row["replicas"]["ModelServer"] == {"RUNNING": 2}, row["replicas"]
    url = f"http://127.0.0.1:{PORTS['RAY_DEPLOY_HTTP_PORT']}/{APP}"
    assert httpx.post(url, json={"instances": [[1.0] * 30]}, timeout=30).status_code == 200

    # Where each replica runs, as the replicas report it: a GPU node each, inside a placement group.
    placements = row["replica_placement"]
    assert len(placements) == 2
    gpu_node_ids = {n["node_id"] for n in gpu_nodes(env)}
    assert len(gpu_node_ids) == 2, "one GPU node per replica (STRICT_PACK bundle of one GPU each)"
    assert {p["node_id"] for p in placements.values()} == gpu_node_ids
    for placement in placements.values():
        assert placement["placement_group_id"], "each replica runs inside its placement group"
        assert placement["cuda_visible_devices"] == "0"

    # Each replica tried the GPU path: the simulated nodes' GPU 0 is the machine's own GPU 0 where there
    # is one (then XGBoost runs on it); elsewhere the replica runs on the CPU and says why.
    ((label, devices),) = row["devices"].items()
    ((path, count),) = devices.items()
    assert count == 2 and (path == "cuda (GPU 0)" or path.startswith("cpu (GPU 0 assigned;")), path

    assert ray_deploy(env, "delete", APP).returncode == 0
    # Watched over the dashboard's REST API (a `ray-deploy` process every few seconds would cost
    # the machine more than the wait), then checked with the CLI.
    deadline = time.monotonic() + 180
    while alive_gpu_nodes_shown(env) and time.monotonic() < deadline:
        time.sleep(2)
    assert gpu_nodes(env) == [], "idle GPU nodes must be removed after the app is gone"


def test_replicas_no_node_type_can_hold_fail_in_bounded_time(autoscaling_cluster, tmp_path, write_flow, run_flow):
    """8 GPUs per replica: no node type offers that, so the autoscaler never starts a node for it."""
    env = autoscaling_cluster
    options = 'app="too-big", predictor="xgboost", num_cpus=0.5, num_gpus=8, deploy_timeout_s=900'
    flow = write_flow(tmp_path / "big_flow.py", "BigFlow", STEPS, options)
    started = time.monotonic()
    # Nothing will ever start for it: a short stall is enough to tell (the default is 30 s).
    done = run_flow(flow, env={**env, "RAY_DEPLOY_SCHEDULE_STALL_S": "10"}, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "cannot be scheduled and no node is being added for them (for 10s)" in output, output[-3000:]
    assert "GPU" in output
    assert time.monotonic() - started < 600, "the deploy must not wait out deploy_timeout_s"
    assert "too-big" not in json.loads(ray_deploy(env, "cluster", "status", "--json").stdout)["applications"]
