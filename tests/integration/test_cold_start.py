"""Three processes started at once on a machine with no head (three flows deploying together).

Each connects as a flow's deploy step does (``connect()``: start or reuse the local head, then
Serve and the front). Before the head's start lock, the second ``ray start --head`` on the same
temp dir failed ("Session name ... does not match persisted value"). Now one process starts the
head while the others say they wait, then reuse it. The test's head has ports of its own, so
that it never meets the suite's head, and is stopped at the end.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_deploy.cluster import LOOPBACK, LocalClusterSettings, _processes_using, is_listening, stop_local_cluster

pytestmark = pytest.mark.integration

SETTINGS = LocalClusterSettings(gcs_port=6421, dashboard_port=8321, http_port=8121, metrics_port=8621, client_port=9121)
ENV = {
    "RAY_DEPLOY_GCS_PORT": str(SETTINGS.gcs_port),
    "RAY_DEPLOY_DASHBOARD_PORT": str(SETTINGS.dashboard_port),
    "RAY_DEPLOY_HTTP_PORT": str(SETTINGS.http_port),
    "RAY_DEPLOY_METRICS_PORT": str(SETTINGS.metrics_port),
    "RAY_DEPLOY_CLIENT_PORT": str(SETTINGS.client_port),
    "RAY_DEPLOY_NUM_CPUS": "2",
    "RAY_DEPLOY_QUIET": "0",
}
# What a flow's deploy step does first; prints where it landed and the front it found.
FLOW_START = """
import json
from ray_deploy import connect
from ray_deploy.serving.front import front_status
with connect() as info:
    print(json.dumps({"address": info.address, "front": front_status(info.http_url)}))
"""


def gcs_servers() -> list[int]:
    return [
        pid for pid in _processes_using(SETTINGS) if b"gcs_server" in Path(f"/proc/{pid}/cmdline").read_bytes()[:300]
    ]


def test_processes_started_at_once_start_one_head_and_share_it(tmp_path):
    address = SETTINGS.address
    assert not is_listening(LOOPBACK, SETTINGS.gcs_port, timeout_s=1.0), f"a Ray head already answers at {address}"
    env = {**os.environ, **ENV}
    try:
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", FLOW_START],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        results = [process.communicate(timeout=600) for process in processes]
        for process, (_, err) in zip(processes, results, strict=True):
            assert process.returncode == 0, err[-4000:]
        stderr = "".join(err for _, err in results)
        assert stderr.count(f"starting a local Ray head at {address}") == 1, stderr
        waited = [
            err for _, err in results if f"waiting for another process starting the local Ray head at {address}" in err
        ]
        assert len(waited) == 2, stderr
        assert all(
            f"the local Ray head at {address} was started by another process; reusing it" in err for err in waited
        )
        assert "does not match persisted value" not in stderr
        assert len(gcs_servers()) == 1, "more than one GCS server runs for the test's head"
        answers = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
        assert {answer["address"] for answer in answers} == {address}
        fronts = [answer["front"] for answer in answers]
        assert all(front["state"] == "serving" for front in fronts), fronts
        assert len({front["actor_pid"] for front in fronts}) == 1, "each process got a front of its own"
    finally:
        stop_local_cluster(SETTINGS)
    assert not _processes_using(SETTINGS), "the test's head was not stopped"
