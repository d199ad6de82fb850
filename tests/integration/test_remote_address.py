"""Deploying to a cluster by address, as to a remote one: the dashboard address (`http://host:8265`,
what Ray Jobs users have in RAY_ADDRESS), which deploys through the Ray client (`ray://host:port`,
with token auth), the address the operator commands are given too. The user's predictor code travels with the deployment. (A Ray client without the
token is refused with an authentication error: tests/integration/test_claims_auth.py.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

PREDICTORS = '''
class Tagged:
    """A user predictor that exists only in the flow's directory: it must travel with the deployment."""

    def __init__(self, model, config):
        self.model = model
        self.n_features = 4
        self.tag = config.get("tag", "?")

    def predict(self, rows):
        return [f"{self.tag}-{label}" for label in self.model.predict(rows)]
'''

STEPS = """
@step
def start(self):
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    X, y = load_iris(return_X_y=True)
    self.model = LogisticRegression(C=0.81, max_iter=3000).fit(X, y)
    self.next(self.deploy)
"""


def test_flow_deploys_through_a_remote_style_address(tmp_path, write_flow, run_flow, ray_head, http):
    """The flow is given the dashboard address; it deploys through the Ray client (the same path as
    an explicit ``ray://`` address, which the operator commands below are given)."""
    client = f"ray://127.0.0.1:{os.environ['RAY_DEPLOY_CLIENT_PORT']}"
    app = "remote-app"
    (tmp_path / "remote_predictors.py").write_text(PREDICTORS)
    options = f'app="{app}", predictor="remote_predictors:Tagged", predictor_config={{"tag": "remote"}}, num_cpus=0.25'
    flow = write_flow(tmp_path / "remote_flow.py", "RemoteFlow", STEPS, options)
    done = run_flow(flow, env={"RAY_ADDRESS": ray_head.dashboard_url})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert f"is a dashboard address; deploying through the Ray client at {client}" in output
    answer = http.post(f"{ray_head.http_url}/{app}", json={"instances": [[5.1, 3.5, 1.4, 0.2]]})
    assert answer.status_code == 200 and answer.json()["predictions"] == ["remote-0"]

    exe = Path(sys.executable).with_name("ray-deploy")
    for address in (client, ray_head.dashboard_url):
        shown = subprocess.run(
            [str(exe), "status", app, "--json", "--address", address], capture_output=True, text=True, timeout=120
        )
        assert shown.returncode == 0, shown.stderr[-2000:]
        assert json.loads(shown.stdout)[0]["status"] == "RUNNING"
    deleted = subprocess.run(
        [str(exe), "delete", app, "--address", client], capture_output=True, text=True, timeout=120
    )
    assert deleted.returncode == 0, deleted.stderr[-2000:]
    assert http.get(f"{ray_head.http_url}/{app}").status_code == 404
