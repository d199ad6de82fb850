"""Services for integration tests, each started once per session: a real Ray head and a real
Metaflow run of the example flow that deploys to it."""

import os
import socket
import subprocess
import sys
import time
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


SESSION_APPS = {"cancer"}
"""Apps the session's fixtures deploy (``train_run``) and every module may read."""


def _session_head_apps() -> set[str] | None:
    """The Serve apps on the session's head, read over the dashboard's REST API (no Ray
    connection); None when the head is not running."""
    from ray_deploy.cluster import LocalClusterSettings, auth_headers

    settings = LocalClusterSettings.from_env()
    try:
        answer = httpx.get(f"{settings.dashboard_url}/api/serve/applications/", headers=auth_headers(), timeout=10)
    except httpx.HTTPError:
        return None
    if answer.status_code != 200:
        return None
    return set(answer.json().get("applications") or {})


@pytest.fixture(autouse=True, scope="module")
def _module_apps_deleted():
    """When a module ends, the apps it deployed on the session's head are deleted (with their
    rollout controllers and stats): no module relies on another's apps, and idle replicas piling
    up over the suite would slow every later test on a 2-core machine. A cleanup that fails is a
    warning, not a test failure (`delete` itself is tested in test_rollouts.py)."""
    import warnings

    before = _session_head_apps() or set()
    yield
    try:
        _delete_new_apps(before)
    except Exception as exc:
        warnings.warn(f"cleaning up the module's apps failed: {exc!r}", stacklevel=1)


def _delete_new_apps(before: set[str]) -> None:
    import time
    import warnings

    from ray_deploy import delete_apps

    leftover = sorted((_session_head_apps() or set()) - before - SESSION_APPS)
    for attempt in range(3):
        if not leftover:
            return
        try:
            delete_apps(leftover)  # side by side: their replicas drain together
            return
        except Exception as exc:
            if attempt == 2:
                warnings.warn(f"could not delete apps {leftover} after their module: {exc!r}", stacklevel=1)
            else:
                time.sleep(3)
                leftover = sorted((_session_head_apps() or set()) - before - SESSION_APPS)


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


def user_of(run) -> str:
    """The user a Metaflow run ran as: its `user:` system tag (Metaflow's own choice among
    METAFLOW_USER, SUDO_USER, USERNAME and USER), so tests never assume a user name."""
    (user,) = [tag.split(":", 1)[1] for tag in run.system_tags if tag.startswith("user:")]
    return user


@pytest.fixture(scope="session")
def run_user():
    """``run_user(run)``: the user a Metaflow run ran as (see ``user_of``)."""
    return user_of


@pytest.fixture()
def http():
    with httpx.Client(timeout=30) as client:
        yield client


@pytest.fixture(scope="session")
def run_flow():
    """Run a flow with `python flow.py [top_level...] run ...`; returns the finished process.

    ``top_level`` holds options of the flow's command line that go before `run`, e.g.
    ``("--config", "deploy", "deploy.json")``."""
    import subprocess

    def run(flow_file: Path, *args: str, env: dict | None = None, timeout: int = 300, top_level: tuple[str, ...] = ()):
        return subprocess.run(
            [sys.executable, str(flow_file), "--no-pylint", *top_level, "run", *args],
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


class MlflowServer:
    """A real `mlflow server` process over HTTP on loopback, with its own SQLite store."""

    def __init__(self, root: Path, port: int | None = None):
        import socket

        self.root = root
        if port is None:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
        self.port = port
        self.uri = f"http://127.0.0.1:{port}"
        self.process = None

    def start(self) -> "MlflowServer":
        import subprocess
        import time

        mlflow = Path(sys.executable).with_name("mlflow")
        self._log = open(self.root / "server.log", "a")
        self.process = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
            + ["--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts"]
            + ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # MLflow 3's server also starts a job runner (eight more Python processes) for its own
            # GenAI jobs; ray-deploy never submits one, and on 2 cores they slow every test.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                pytest.fail(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        self.stop()
        pytest.fail("mlflow server did not answer /health within 120s")

    def stop(self, kill: bool = False) -> None:
        import subprocess

        if self.process is None:
            return
        # `mlflow server` runs uvicorn in a child process: stop the whole group.
        for child in _children(self.process.pid):
            _signal(child, kill)
        _signal(self.process.pid, kill)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.process = None
        self._log.close()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid:
            child = int(entry.name)
            found += [child, *_children(child)]
    return found


def _signal(pid: int, kill: bool) -> None:
    import signal

    try:
        os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` over HTTP on loopback, with its own SQLite store; stopped at the end."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server.uri
    server.stop()


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


RELEASE_MODEL = '''
class Release:
    """A model that tells its release apart: what rollout tests need of a model, with nothing to
    import (a user class shipped from the flow's directory, served by the python predictor)."""

    n_features_in_ = 4

    def __init__(self, release):
        self.release = int(release)

    def predict(self, rows):
        return [self.release % 3 for _ in rows]
'''

RELEASE_STEPS = """
release = Parameter("release", type=int, default=1)

@step
def start(self):
    from release_model import Release
    self.model = Release(self.release)
    self.next(self.deploy)
"""
"""Steps for flows whose model only needs to tell releases apart (``--release N``)."""


@pytest.fixture(scope="session")
def release_steps() -> str:
    """``RELEASE_STEPS``: a start step whose model tells releases apart (``--release N``)."""
    return RELEASE_STEPS


def _write_release_model(directory: Path) -> None:
    (directory / "release_model.py").write_text(RELEASE_MODEL)


@pytest.fixture(scope="session")
def write_release_model():
    """``write_release_model(directory)``: ``release_model.py`` (the ``Release`` model) beside a flow."""
    return _write_release_model


@pytest.fixture(scope="session")
def write_flow():
    """Write a test flow: the given steps (ending in self.next(self.deploy)), then an @ray_serve
    deploy step with the given options, then end. Returns the flow file's path. The flow's
    directory also gets ``release_model.py`` (see ``RELEASE_STEPS``)."""
    import textwrap

    def write(path: Path, name: str, steps: str, options: str) -> Path:
        body = textwrap.indent(textwrap.dedent(steps).strip("\n"), "    ")
        tail = _FLOW_TAIL.replace("OPTIONS", options).replace("NAME", name)
        path.write_text(
            f"from metaflow import FlowSpec, Parameter, step, ray_serve\n\n\nclass {name}(FlowSpec):\n{body}\n{tail}"
        )
        _write_release_model(path.parent)
        return path

    return write


@pytest.fixture()
def start_mlflow_server(tmp_path_factory):
    """Start `mlflow server` processes a test can stop and restart; all stopped at the end."""
    servers = []

    def start(root: Path | None = None, port: int | None = None) -> MlflowServer:
        server = MlflowServer(root or tmp_path_factory.mktemp("mlflow-server"), port).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(kill=True)


class CountedLoad:
    """Steady closed-loop load on ``url`` from a separate process (``benchmarks.loadgen``) for the
    duration of a ``with`` block; ``counts`` (sent, ok, failed, errors) is filled when it ends."""

    def __init__(self, url: str, body: str, concurrency: int = 2, max_seconds: float = 300):
        self.command = [sys.executable, "-m", "benchmarks.loadgen", url, "--concurrency", str(concurrency)]
        self.command += ["--seconds", str(max_seconds), "--warmup", "0", "--body", body]
        self.counts: dict = {}

    def __enter__(self) -> "CountedLoad":
        import subprocess

        self.process = subprocess.Popen(self.command, cwd=REPO, stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc_info) -> None:
        import json
        import signal

        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=60)
        self.counts = json.loads(out) if out.strip() else {"error": f"loadgen exited {self.process.returncode}"}

    def assert_nothing_lost(self, at_least: int = 20) -> None:
        counts = self.counts
        assert counts.get("sent", 0) >= at_least, f"too few requests to prove anything: {counts}"
        assert counts["failed"] == 0 and counts["ok"] == counts["sent"], (counts["errors"], counts["sent"])


@pytest.fixture()
def counted_load():
    """``with counted_load(url, body) as load: ...; load.assert_nothing_lost()``"""
    return CountedLoad


class RecordedLoad:
    """``loadgen.py`` in its own process: steady requests (``rate``/s, one in flight) until
    ``stop()``, each recorded as a JSON line (status, variant, model version, timing)."""

    def __init__(self, url: str, directory: Path, body: str, rate: float = 20, max_seconds: float = 720):
        import subprocess

        self.out = directory / "load.jsonl"
        self.stop_file = directory / "stop"
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("loadgen.py")), url, str(self.out), str(self.stop_file)]
            + ["--rate", str(rate), "--max-seconds", str(max_seconds), "--body", body]
        )

    def rows(self) -> list[dict]:
        import json

        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]

    def wait_for(self, count: int, timeout: float = 60) -> None:
        import time

        deadline = time.monotonic() + timeout
        while len(self.rows()) < count and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self) -> list[dict]:
        import subprocess

        self.stop_file.touch()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        return self.rows()


@pytest.fixture(scope="session")
def recorded_load():
    """``load = recorded_load(url, directory, body); ...; rows = load.stop()``"""
    return RecordedLoad


@pytest.fixture(scope="module")
def s3_endpoint(request, tmp_path_factory):
    """A real S3 API over HTTP on 127.0.0.1 (moto's server mode), with one bucket (the module's
    ``BUCKET``); stopped at the end of the module."""
    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2)
            break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        server.kill()
        pytest.fail("moto server did not answer within 60s")
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=request.module.BUCKET)
    yield url
    server.terminate()
    server.wait(timeout=20)
    log.close()
