"""A head restart loses every Serve app; `ray-deploy restore` brings them back from the registry.

Requests are counted before the restart and after the restore (nothing may fail in either);
while the head is down nothing can answer, and what must not be lost is the app itself: the same
model version and user code answer the same way after the restore.
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

PORTS = {
    "RAY_DEPLOY_GCS_PORT": "6899",
    "RAY_DEPLOY_DASHBOARD_PORT": "8898",
    "RAY_DEPLOY_HTTP_PORT": "8897",
    "RAY_DEPLOY_METRICS_PORT": "8896",
    "RAY_DEPLOY_CLIENT_PORT": "9094",
}

PREDICTORS = '''
class Named:
    """A user predictor: it must come back with the app, shipped from the flow's directory."""

    def __init__(self, model, config):
        self.model = model
        self.n_features = 4

    def predict(self, rows):
        return [f"class-{label}" for label in self.model.predict(rows)]
'''

STEPS = """
@step
def start(self):
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    X, y = load_iris(return_X_y=True)
    self.model = LogisticRegression(C=0.5, max_iter=3000).fit(X, y)
    self.next(self.deploy)
"""


def ray_deploy(env: dict, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("ray-deploy")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_apps_come_back_after_a_head_restart(tmp_path, write_flow, run_flow, counted_load):
    env = {**os.environ, **PORTS}
    assert ray_deploy(env, "cluster", "up").returncode == 0
    try:
        (tmp_path / "phoenix_predictors.py").write_text(PREDICTORS)
        options = 'app="phoenix", predictor="phoenix_predictors:Named", num_cpus=0.25'
        flow = write_flow(tmp_path / "phoenix_flow.py", "PhoenixFlow", STEPS, options)
        done = run_flow(flow, env=env)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        url = f"http://127.0.0.1:{PORTS['RAY_DEPLOY_HTTP_PORT']}/phoenix"
        rows = {"instances": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}
        before = httpx.post(url, json=rows, timeout=30).json()
        assert before["predictions"] == ["class-0", "class-2"]
        with counted_load(url, json.dumps(rows)) as load:
            time.sleep(3)
        load.assert_nothing_lost()

        assert ray_deploy(env, "cluster", "down").returncode == 0
        assert ray_deploy(env, "cluster", "up").returncode == 0
        missing = ray_deploy(env, "status", "phoenix")
        assert missing.returncode == 1 and "no app 'phoenix'" in missing.stderr

        restored = ray_deploy(env, "restore", "phoenix")
        assert restored.returncode == 0, restored.stderr[-3000:]
        assert "restored: phoenix" in restored.stdout
        after = httpx.post(url, json=rows, timeout=30).json()
        assert after == before, "the same model version answers the same way after the restart"
        with counted_load(url, json.dumps(rows)) as load:
            time.sleep(3)
        load.assert_nothing_lost()
        again = ray_deploy(env, "restore", "phoenix")
        assert again.returncode == 0 and "left as it is" in again.stderr
        (row,) = json.loads(ray_deploy(env, "status", "phoenix", "--json").stdout)
        assert row["variants"][0]["model_version"] == before["model_version"]
    finally:
        ray_deploy(env, "cluster", "down", timeout=120)
