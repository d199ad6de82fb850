"""Replica autoscaling: load makes Serve add replicas, and they go again once the load stops."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

MODELS = '''
import time


class SlowModel:
    """Answers after 50 ms: enough to pile up ongoing requests under concurrent load."""

    n_features_in_ = 4

    def predict(self, rows):
        time.sleep(0.05)
        return [0] * len(rows)
'''

STEPS = """
@step
def start(self):
    from slow_models import SlowModel
    self.model = SlowModel()
    self.next(self.deploy)
"""

OPTIONS = (
    'app="elastic", predictor="python", num_cpus=0.1, '
    'autoscaling={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1, '
    '"upscale_delay_s": 1, "downscale_delay_s": 4, "look_back_period_s": 2}'
)


def running_replicas() -> int:
    exe = Path(sys.executable).with_name("ray-deploy")
    shown = subprocess.run([str(exe), "status", "elastic", "--json"], capture_output=True, text=True, timeout=60)
    (row,) = json.loads(shown.stdout)
    return row["replicas"].get("ModelServer", {}).get("RUNNING", 0)


def test_replicas_follow_the_load(tmp_path, write_flow, run_flow, ray_head):
    (tmp_path / "slow_models.py").write_text(MODELS)
    flow = write_flow(tmp_path / "elastic_flow.py", "ElasticFlow", STEPS, OPTIONS)
    done = run_flow(flow)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert running_replicas() == 1
    url = f"{ray_head.http_url}/elastic"

    stop = threading.Event()
    outcomes: list[int] = []

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            for _ in range(5000):  # bounded; the stop event ends it much sooner
                if stop.is_set():
                    return
                outcomes.append(http.post(url, json={"instances": [[1.0, 2.0, 3.0, 4.0]]}).status_code)

    clients = [threading.Thread(target=client) for _ in range(8)]
    for thread in clients:
        thread.start()
    try:
        peak, deadline = 1, time.monotonic() + 120
        while peak < 2 and time.monotonic() < deadline:
            time.sleep(2)
            peak = max(peak, running_replicas())
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=60)
    assert peak >= 2, "under 8 concurrent callers with target_ongoing_requests=1, Serve should add replicas"
    assert outcomes and set(outcomes) == {200}

    deadline = time.monotonic() + 180
    while running_replicas() > 1 and time.monotonic() < deadline:
        time.sleep(3)
    assert running_replicas() == 1, "once the load stops, replicas go back to min_replicas"
    subprocess.run([str(Path(sys.executable).with_name("ray-deploy")), "delete", "elastic"], timeout=60)
