"""Services for integration tests, each started once per session: a real Ray head and a real
Metaflow run of the example flow that deploys to it."""

import os
import sys
from pathlib import Path

import httpx
import pytest

from ray_deploy import start_local_cluster, stop_local_cluster

REPO = Path(__file__).resolve().parents[2]
TRAIN_FLOW = REPO / "flows" / "train_flow.py"


@pytest.fixture(scope="session")
def ray_head():
    """A persistent local Ray head with token auth, as users get it; stopped at the end."""
    info = start_local_cluster()
    yield info
    stop_local_cluster()


@pytest.fixture(scope="session")
def train_run(ray_head):
    """The example flow, run to completion through Metaflow's Runner."""
    from metaflow import Runner

    with Runner(str(TRAIN_FLOW), show_output=False, cwd=str(REPO)).run() as running:
        if running.status != "successful":
            pytest.fail(f"TrainFlow failed:\n{running.stdout[-3000:]}\n{running.stderr[-6000:]}")
        return running.run


@pytest.fixture(scope="session")
def cancer_url(train_run):
    return train_run["deploy"].task.data.ray_serve["url"]


@pytest.fixture()
def http():
    with httpx.Client(timeout=30) as client:
        yield client


@pytest.fixture(scope="session")
def run_flow():
    """Run a flow with `python flow.py run ...`; returns the finished process."""
    import subprocess

    def run(flow_file: Path, *args: str, env: dict | None = None, timeout: int = 300):
        return subprocess.run(
            [sys.executable, str(flow_file), "--no-pylint", "run", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
            cwd=str(flow_file.parent),
        )

    return run


@pytest.fixture(scope="session")
def repo():
    return REPO
