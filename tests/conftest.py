"""Shared test environment: isolated Metaflow datastore, test-only Ray ports, a user name.

Set before anything imports Metaflow or Ray, so every process the tests start (flows run with
Metaflow's Runner, the Ray head, ray-deploy) sees the same settings.
"""

import os
import tempfile
from pathlib import Path

STATE_DIR = Path(os.environ.get("RAY_DEPLOY_TEST_STATE") or tempfile.mkdtemp(prefix="ray-deploy-tests-"))
os.environ.setdefault("USERNAME", "ci")
os.environ["METAFLOW_DATASTORE_SYSROOT_LOCAL"] = str(STATE_DIR / "metaflow")
# Test-only ports, so a developer's own local head (6379/8265/8000) is left alone.
os.environ.setdefault("RAY_DEPLOY_GCS_PORT", "6399")
os.environ.setdefault("RAY_DEPLOY_DASHBOARD_PORT", "8299")
os.environ.setdefault("RAY_DEPLOY_HTTP_PORT", "8099")
os.environ.setdefault("RAY_DEPLOY_METRICS_PORT", "8599")
os.environ.setdefault("RAY_DEPLOY_CLIENT_PORT", "9091")
# Logical CPUs: the suite's apps (0.25-0.5 CPU replicas, mostly idle) fit on a 2-core machine.
os.environ.setdefault("RAY_DEPLOY_NUM_CPUS", "8")
os.environ.pop("RAY_ADDRESS", None)
# Dummy credentials for the S3-compatible test server (moto): every node of the test cluster has
# them, as real nodes have an instance role. Never real keys.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
# The embedded registry (a SQLite file under RAY_DEPLOY_HOME), unless a test points elsewhere.
os.environ["RAY_DEPLOY_HOME"] = str(STATE_DIR / "home")
for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
    os.environ.pop(name, None)
