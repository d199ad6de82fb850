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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` over HTTP on loopback, with its own SQLite store; stopped at the end."""
    import socket
    import subprocess
    import time

    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mlflow = Path(sys.executable).with_name("mlflow")
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    else:
        server.kill()
        pytest.fail("mlflow server did not answer /health within 120s")
    yield uri
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


@pytest.fixture(scope="session")
def embedded_registry():
    """The registry the example flow wrote to: the default SQLite file under RAY_DEPLOY_HOME."""
    from ray_deploy import Registry

    return Registry()


_FLOW_TAIL = """
    @ray_serve(OPTIONS)
    @step
    def deploy(self):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    NAME()
"""


@pytest.fixture(scope="session")
def write_flow():
    """Write a test flow: the given steps (ending in self.next(self.deploy)), then an @ray_serve
    deploy step with the given options, then end. Returns the flow file's path."""
    import textwrap

    def write(path: Path, name: str, steps: str, options: str) -> Path:
        body = textwrap.indent(textwrap.dedent(steps).strip("\n"), "    ")
        tail = _FLOW_TAIL.replace("OPTIONS", options).replace("NAME", name)
        path.write_text(
            f"from metaflow import FlowSpec, Parameter, step, ray_serve\n\n\nclass {name}(FlowSpec):\n{body}\n{tail}"
        )
        return path

    return write
