"""Shared test environment: isolated Metaflow datastore, test-only Ray ports, a user name.

Set before anything imports Metaflow or Ray, so every process the tests start (flows run with
Metaflow's Runner, the Ray head, ray-deploy) sees the same settings.
"""

import os
import secrets
import tempfile
from pathlib import Path

# `make test` runs two pytest-xdist workers (`--dist loadfile`: a module runs whole on one worker;
# TEST_WORKERS=0 for one process). One process kept a 2-core machine ~1.05 cores busy on average
# (waits on replicas, rollout steps and timeouts); two kept it ~1.7 busy and ran 1.46x faster. Each worker is a machine of its own: its own state directory, registry and
# Metaflow datastore, and its own session head on ports of its own (worker N: the ports below +
# 50*N). Modules that start heads of their own use ports no other module uses.
WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
OFFSET = 50 * WORKER
_state = os.environ.get("RAY_DEPLOY_TEST_STATE")
STATE_DIR = Path(f"{_state}-{WORKER}" if _state and WORKER else _state or tempfile.mkdtemp(prefix="ray-deploy-tests-"))
os.environ.setdefault("USERNAME", "ci")
os.environ["METAFLOW_DATASTORE_SYSROOT_LOCAL"] = str(STATE_DIR / "metaflow")
# Test-only ports, so a developer's own local head (6379/8265/8000) is left alone. A worker sets
# its own (it inherits the environment of pytest's main process, which ran this file too).
for _name, _port in (
    ("RAY_DEPLOY_GCS_PORT", 6399),
    ("RAY_DEPLOY_DASHBOARD_PORT", 8299),
    ("RAY_DEPLOY_HTTP_PORT", 8099),
    ("RAY_DEPLOY_METRICS_PORT", 8599),
    ("RAY_DEPLOY_CLIENT_PORT", 9091),
):
    if "PYTEST_XDIST_WORKER" in os.environ:
        os.environ[_name] = str(_port + OFFSET)
    else:
        os.environ.setdefault(_name, str(_port))
# Logical CPUs: the suite's apps (0.25-0.5 CPU replicas, mostly idle) fit on a 2-core machine.
os.environ.setdefault("RAY_DEPLOY_NUM_CPUS", "8")
os.environ.pop("RAY_ADDRESS", None)
# Dummy credentials for the S3-compatible test server (moto): every node of the test cluster has
# them, as real nodes have an instance role. Never real keys.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
# A bearer token for the feedback routes of capture tests, in the environment the test heads (and so
# their replicas) start with, as an operator would set it on the nodes. Random, never a real secret.
os.environ.setdefault("RAY_DEPLOY_TEST_FEEDBACK_TOKEN", secrets.token_hex(16))
# The embedded registry (a SQLite file under RAY_DEPLOY_HOME), unless a test points elsewhere.
os.environ["RAY_DEPLOY_HOME"] = str(STATE_DIR / "home")
for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
    os.environ.pop(name, None)


# Modules heaviest first (seconds of one CI run in brackets), so that the two workers start the long
# ones at once and end together; unlisted modules follow.
HEAVY_FIRST = (
    "test_rollouts.py",  # 285 (with the worker's session setup)
    "test_controller.py",  # 277 (one test on a head of its own)
    "test_autoscaling_cluster.py",  # 160 (a fake multi-node cluster)
    "test_mlflow_deployments.py",  # 150
    "test_capture.py",  # 150
    "test_lineage.py",  # 120
    "test_replica_faults.py",  # 90
    "test_flow_options.py",  # 83
    "test_deploy_failures.py",  # 82
    "test_retry_deploy.py",  # 80
    "test_claims_rollouts.py",  # 74
    "test_ab_flow.py",  # 90 (with the A/B review flow)
    "test_front_supervision.py",  # 61
    "test_export_options.py",  # 56
)


def pytest_collection_modifyitems(items):
    rank = {name: place for place, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
