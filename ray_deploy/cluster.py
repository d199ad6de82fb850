"""Reaching Ray: an explicit address, ``RAY_ADDRESS``, or a persistent local head.

With no address anywhere, ``connect()`` starts (or reuses) a local head with ``ray start
--head`` so that Serve apps outlive the process that deployed them. Token authentication stays
on: a token is created at Ray's default path (``~/.ray/auth_token``) if none exists, the head
starts with ``RAY_AUTH_MODE=token``, and every client here presents the token.

Local head settings come from the environment (defaults in brackets):
``RAY_DEPLOY_GCS_PORT`` [6379], ``RAY_DEPLOY_DASHBOARD_PORT`` [8265], ``RAY_DEPLOY_HTTP_PORT``
[8000], ``RAY_DEPLOY_METRICS_PORT`` [8080: the head's Prometheus endpoint, our metrics included],
``RAY_DEPLOY_CLIENT_PORT`` [10001: Ray client, for ``ray://`` addresses],
``RAY_DEPLOY_HTTP_HOST`` [127.0.0.1: Serve answers on loopback only unless told otherwise],
``RAY_DEPLOY_NUM_CPUS`` [all cores], ``RAY_DEPLOY_NUM_GPUS`` [0],
``RAY_DEPLOY_DATA_PATH`` [direct: replicas answer HTTP on loopback behind the ray-deploy front;
``proxy`` for Serve's defaults, ``haproxy`` for Serve's HAProxy mode; see ``ray_deploy.serving.front``],
``RAY_DEPLOY_PROXY_PORT`` [a free port: where Serve's own proxy listens behind the front],
``RAY_DEPLOY_PROXY_LOCATION`` [Serve's default: a proxy on every node with a replica; ``HeadOnly``
for simulated nodes on one machine].
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ray_deploy.errors import ClusterError, ClusterUnreachable
from ray_deploy.progress import Waiter, report
from ray_deploy.serving.front import DATA_PATHS, ensure_front, front_problem, front_status, head_environment

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
CONNECT_TIMEOUT_S = 3.0
_START_TIMEOUT_S = 180.0
_CODE_EXCLUDES = [".metaflow", ".venv", ".git", "__pycache__", "*.pyc", "mlruns", "*.db", "node_modules"]


@dataclass(frozen=True)
class LocalClusterSettings:
    """Ports and resources of the local head."""

    gcs_port: int = 6379
    dashboard_port: int = 8265
    http_port: int = 8000
    http_host: str = LOOPBACK
    metrics_port: int = 8080
    client_port: int = 10001
    num_cpus: float | None = None
    num_gpus: float | None = None
    data_path: str = "direct"
    proxy_port: int | None = None

    @classmethod
    def from_env(cls) -> LocalClusterSettings:
        def number(name: str, kind: type, default: Any) -> Any:
            raw = os.environ.get(name)
            if raw in (None, ""):
                return default
            try:
                return kind(raw)
            except ValueError:
                raise ClusterError(f"{name}: expected a number, got {raw!r}") from None

        data_path = os.environ.get("RAY_DEPLOY_DATA_PATH") or cls.data_path
        if data_path not in DATA_PATHS:
            raise ClusterError(f"RAY_DEPLOY_DATA_PATH: expected one of {', '.join(DATA_PATHS)}, got {data_path!r}")
        return cls(
            gcs_port=number("RAY_DEPLOY_GCS_PORT", int, cls.gcs_port),
            dashboard_port=number("RAY_DEPLOY_DASHBOARD_PORT", int, cls.dashboard_port),
            http_port=number("RAY_DEPLOY_HTTP_PORT", int, cls.http_port),
            http_host=os.environ.get("RAY_DEPLOY_HTTP_HOST") or LOOPBACK,
            metrics_port=number("RAY_DEPLOY_METRICS_PORT", int, cls.metrics_port),
            client_port=number("RAY_DEPLOY_CLIENT_PORT", int, cls.client_port),
            num_cpus=number("RAY_DEPLOY_NUM_CPUS", float, None),
            num_gpus=number("RAY_DEPLOY_NUM_GPUS", float, None),
            data_path=data_path,
            proxy_port=number("RAY_DEPLOY_PROXY_PORT", int, None),
        )

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.gcs_port}"

    @property
    def temp_dir(self) -> str:
        # One Ray temp dir per head, so that stopping it touches no other Ray on the machine.
        # Kept short: Ray puts Unix sockets under it, and their paths are limited to 107 bytes.
        return os.path.join(tempfile.gettempdir(), f"ray-deploy-{self.gcs_port}")

    @property
    def start_lock(self) -> Path:
        """Taken by the process that starts this head: beside its temp dir, which ``ray start`` creates."""
        return Path(f"{self.temp_dir}.lock")

    @property
    def dashboard_url(self) -> str:
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    @property
    def head_file(self) -> Path:
        """What the head was started with (its data path, Serve's proxy port), for later clients."""
        return Path(self.temp_dir) / "ray_deploy_head.json"

    def head_state(self) -> dict[str, Any]:
        """The recorded data path of the running head; heads started elsewhere use Serve's proxy."""
        try:
            state = json.loads(self.head_file.read_text())
        except (OSError, ValueError):
            return {"data_path": "proxy"}
        return state if isinstance(state, dict) else {"data_path": "proxy"}


FORWARDED_ENV = (
    "METAFLOW_S3_ENDPOINT_URL",
    "METAFLOW_S3_VERIFY_CERTIFICATE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "RAY_DEPLOY_GC_THRESHOLD",
    "RAY_DEPLOY_PREDICT_THREADS",
)
"""Forwarded to replicas: where the datastore is, so they read models where the flow wrote them,
the replicas' GC threshold and prediction threads. Credentials are never forwarded: nodes bring their own
(instance role, or their environment)."""


def deployment_runtime_env(code_dir: str | None) -> dict[str, Any] | None:
    """The runtime_env deployments get: the declared code directory and the datastore location."""
    runtime_env: dict[str, Any] = {}
    if code_dir:
        runtime_env.update(working_dir=code_dir, excludes=_CODE_EXCLUDES)
    from ray_deploy.serving.config import gc_threshold_setting, predict_threads_setting

    gc_threshold_setting(os.environ)  # a bad value fails here, not in every replica
    predict_threads_setting(os.environ)
    forwarded = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    if forwarded:
        runtime_env["env_vars"] = forwarded
    return runtime_env or None


@dataclass(frozen=True)
class ClusterInfo:
    """Where a cluster answers: its Ray address, dashboard and Serve HTTP base URL."""

    address: str
    dashboard_url: str | None
    http_url: str
    local: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_address(address: str | None = None) -> str | None:
    """The address to use: the explicit one, else ``RAY_ADDRESS``, else None (the local head).

    A dashboard address (``http://head:8265``, what Ray Jobs use in ``RAY_ADDRESS``) becomes the
    same head's Ray client address, ``ray://head:<RAY_DEPLOY_CLIENT_PORT or 10001>``: deploying
    needs a driver connection, which the dashboard does not offer. KubeRay's head service exposes
    both ports.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        host = urlparse(address).hostname
        if not host:
            raise ClusterError(f"Ray address {address!r}: a dashboard address needs a host, e.g. http://head:8265")
        port = LocalClusterSettings.from_env().client_port
        report(f"{address} is a dashboard address; deploying through the Ray client at ray://{host}:{port}")
        return f"ray://{host}:{port}"
    return address


def auth_token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def read_auth_token() -> str | None:
    """The Ray auth token clients present: ``RAY_AUTH_TOKEN``, else the token file."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        return token.strip()
    path = auth_token_path()
    return path.read_text().strip() if path.is_file() else None


def ensure_auth_token() -> None:
    """Create a token at Ray's default path if none is available (as ``ray get-auth-token --generate``)."""
    if read_auth_token():
        return
    path = auth_token_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside it and renamed into place: a process that starts another head at the same
    # moment finds either no token or the whole token, never a half-written one.
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))
    try:
        os.link(staging, path)  # fails if another process put its token there first: use that one
        report(f"created a Ray auth token at {path}")
    except FileExistsError:
        pass
    finally:
        staging.unlink()


def auth_headers() -> dict[str, str]:
    """HTTP headers for Ray's dashboard REST API."""
    token = read_auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def is_listening(host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _host_port(address: str) -> tuple[str, int]:
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname or not parsed.port:
        raise ClusterError(
            f"Ray address {address!r} is not host:port, ray://host:port or 'auto'; e.g. 127.0.0.1:6379 or ray://head:10001"
        )
    return parsed.hostname, parsed.port


def check_reachable(address: str) -> None:
    """Fail fast, naming the address, when nothing listens there (ray.init would retry for a minute)."""
    if address == "auto":
        return
    host, port = _host_port(address)
    if not is_listening(host, port):
        raise ClusterUnreachable(
            f"no Ray cluster answers at {address} (tried a TCP connection to {host}:{port} for {CONNECT_TIMEOUT_S:g}s); "
            "check RAY_ADDRESS or the address option, or unset both to use a local head"
        )


def _ray_executable() -> str:
    candidate = Path(sys.executable).with_name("ray")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("ray")
    if not found:
        raise ClusterError("cannot find the 'ray' command next to this Python or on PATH; pip install 'ray[serve]'")
    return found


def _token_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "token")
    # Serve says why replicas wait for resources after this many seconds (its default is 30).
    env.setdefault("RAY_SERVE_SLOW_STARTUP_WARNING_S", "10")
    # grpcio >= 1.81 restarts its threads in a forked child before exec; Ray's client server forks
    # a server per ray:// client and that child then crashes (SIGSEGV) or hangs about a third of
    # the time (grpc/grpc#43055). Ray forks only to exec, so gRPC's fork support is not needed.
    env.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    return env


def _autoscaling_config_for(
    settings: LocalClusterSettings, path: str, env: dict[str, str]
) -> tuple[str, dict[str, float]]:
    """A copy of an autoscaler YAML fitted to this head; returns (its path, the head's resources).

    For Ray's fake multi-node provider (simulated nodes on this machine): its nodes must join this
    head's GCS (``provider.gcs_address``; otherwise they dial port 6379), and the provider only
    works with ``RAY_FAKE_CLUSTER=1``. The autoscaler reads the file as is, with no defaults.
    """
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ClusterError(f"autoscaling config {path}: cannot read it ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("available_node_types"), dict):
        raise ClusterError(f"autoscaling config {path}: expected a Ray cluster config with available_node_types")
    head_type = config.get("head_node_type")
    if head_type not in config["available_node_types"]:
        raise ClusterError(f"autoscaling config {path}: head_node_type {head_type!r} is not in available_node_types")
    provider = config.setdefault("provider", {})
    if provider.get("type") == "fake_multinode":
        provider["gcs_address"] = settings.address
        env["RAY_FAKE_CLUSTER"] = "1"
        env.setdefault("AUTOSCALER_UPDATE_INTERVAL_S", "1")
    Path(settings.temp_dir).mkdir(parents=True, exist_ok=True)
    resolved = Path(settings.temp_dir) / "autoscaling.yaml"
    resolved.write_text(yaml.safe_dump(config, sort_keys=False))
    head = config["available_node_types"][head_type].get("resources", {})
    return str(resolved), {k: float(v) for k, v in head.items() if k in ("CPU", "GPU")}


def start_local_cluster(
    settings: LocalClusterSettings | None = None, autoscaling_config: str | None = None, *, serve: bool = False
) -> ClusterInfo:
    """Start a persistent local Ray head, or reuse the one already listening on the GCS port.

    Processes that start at once (several flows on a machine with no head) start one head: the
    first takes ``settings.start_lock`` and starts it, the others wait for the lock, then reuse it.

    Args:
        settings: ports and resources; default ``LocalClusterSettings.from_env()``.
        autoscaling_config: path to an autoscaler YAML (e.g. the fake multi-node provider).
        serve: also start Serve and, on a head with the ``direct`` data path, the ray-deploy front
            (a front that is down is restarted), so that the HTTP endpoint answers on return.

    Raises:
        ClusterError: ``ray start`` failed (the message carries the end of its output), or the
            front is down and restarting it did not help (the message says why).
    """
    settings = settings or LocalClusterSettings.from_env()
    info = ClusterInfo(
        address=settings.address,
        dashboard_url=settings.dashboard_url,
        http_url=f"http://{LOOPBACK}:{settings.http_port}",
        local=True,
    )
    with _head_start_lock(settings) as waited:
        if is_listening(LOOPBACK, settings.gcs_port, timeout_s=1.0):
            if waited:
                report(f"the local Ray head at {settings.address} was started by another process; reusing it")
            logger.info("reusing the local Ray head at %s", settings.address)
        else:
            _start_head(settings, autoscaling_config)
    if serve:
        with connect(settings.address):
            pass
    return info


@contextlib.contextmanager
def _head_start_lock(settings: LocalClusterSettings, timeout_s: float = _START_TIMEOUT_S + 60) -> Iterator[bool]:
    """Hold the head's start lock; yields whether another process held it first.

    Two ``ray start --head`` on one temp dir make the second fail ("Session name ... does not
    match persisted value"), so one process starts the head and the others wait for it.

    Raises:
        ClusterError: another process held the lock for ``timeout_s``; the message names the lock file.
    """
    path = settings.start_lock
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        waiter = None
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waiter = waiter or Waiter(
                    f"waiting for another process starting the local Ray head at {settings.address}"
                )
                if waiter.elapsed_s > timeout_s:
                    raise ClusterError(
                        f"another process has been starting the local Ray head at {settings.address} for "
                        f"{timeout_s:g}s (it holds {path}); stop that process, or remove the lock file"
                    ) from None
                waiter.update("still starting")
                time.sleep(0.2)
        try:
            yield waiter is not None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _start_head(settings: LocalClusterSettings, autoscaling_config: str | None) -> None:
    """``ray start --head`` with these settings; records the head's data path for later clients."""
    ensure_auth_token()
    command = [
        _ray_executable(),
        "start",
        "--head",
        f"--port={settings.gcs_port}",
        f"--node-ip-address={LOOPBACK}",
        f"--dashboard-host={LOOPBACK}",
        f"--dashboard-port={settings.dashboard_port}",
        f"--metrics-export-port={settings.metrics_port}",
        f"--ray-client-server-port={settings.client_port}",
        f"--temp-dir={settings.temp_dir}",
        "--disable-usage-stats",
    ]
    env = _token_env()
    for name, value in head_environment(settings.data_path, settings.http_host).items():
        env.setdefault(name, value)
    state: dict[str, Any] = {"data_path": settings.data_path, "http_port": settings.http_port}
    if settings.data_path == "direct":
        state["proxy_port"] = settings.proxy_port or _free_port(settings.http_host)
    num_cpus, num_gpus = settings.num_cpus, settings.num_gpus
    if autoscaling_config:
        resolved, head = _autoscaling_config_for(settings, autoscaling_config, env)
        command.append(f"--autoscaling-config={resolved}")
        # The head's resources are the config's head node type (the autoscaler plans with them).
        num_cpus, num_gpus = head.get("CPU", num_cpus), head.get("GPU", num_gpus)
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus:g}")
    if num_gpus is not None:
        command.append(f"--num-gpus={num_gpus:g}")
    report(f"starting a local Ray head at {settings.address} (dashboard {settings.dashboard_url}) ...")
    started = time.monotonic()
    for attempt in (1, 2):
        try:
            result = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=_START_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            stop_local_cluster(settings)  # a half-started head would hold the ports and be reused next time
            raise ClusterError(f"'ray start --head' did not finish within {_START_TIMEOUT_S:g}s") from None
        if result.returncode == 0:
            break
        stop_local_cluster(settings)  # likewise: what did start (GCS, dashboard) must not linger
        output = result.stdout + result.stderr
        if attempt == 1 and "timed out during startup" in output:
            # A busy machine can keep Ray's agents from starting in time (the raylet gives up on
            # its metrics agent); a second start usually finds the imports warm.
            report("the Ray head timed out while starting (the machine is busy); trying once more ...")
            continue
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise ClusterError(f"'ray start --head' failed (exit {result.returncode}):\n{tail}")
    settings.head_file.write_text(json.dumps(state))
    report(f"local Ray head is up after {time.monotonic() - started:.1f}s")


def stop_local_cluster(settings: LocalClusterSettings | None = None, grace_s: float = 10.0) -> bool:
    """Stop the local head started here, and only it; its Serve apps go away.

    ``ray stop`` would end every Ray process on the machine; this ends the processes that run
    under this head's temp dir. As ``ray stop`` does, the GCS goes last: a raylet or an actor
    asked to stop while the GCS is already gone waits out its RPC timeouts instead of exiting.
    Returns True if any were running.
    """
    settings = settings or LocalClusterSettings.from_env()
    pids = _processes_using(settings)
    if not pids:
        return False
    report(f"stopping the local Ray head at {settings.address} ({len(pids)} processes) ...")
    known: set[int] = set(pids)
    signaled: set[tuple[int, int]] = set()
    for last in (False, True):  # everything but the GCS first, then the GCS
        for sig in (signal.SIGTERM, signal.SIGKILL):
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                # Looked up again each time: a front that is stopping may still restart its HAProxy.
                # Those found before stay known: once their parent is gone, some no longer match.
                known.update(_processes_using(settings))
                pids = [pid for pid in known if _alive(pid) and (last or not _is_gcs(pid))]
                if not pids:
                    break
                for pid in pids:
                    if (pid, sig) not in signaled:
                        signaled.add((pid, sig))
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.kill(pid, sig)
                time.sleep(0.1)
            else:
                continue  # the grace ran out: the next signal
            break
    return True


def _is_gcs(pid: int) -> bool:
    try:
        return b"gcs_server" in (Path("/proc") / str(pid) / "cmdline").read_bytes()[:400]
    except OSError:
        return False


def _processes_using(settings: LocalClusterSettings) -> list[int]:
    """Processes of this head: those naming its temp dir or GCS port, and all their descendants.

    Ray renames some of its processes (their command lines no longer show the temp dir), but
    they descend from ones that do.
    """
    port_flag = re.compile(rf"--(?:gcs-)?address=[\w.\-]+:{settings.gcs_port}(?:\s|$)")
    parents: dict[int, int] = {}
    matched: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            parents[pid] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if settings.temp_dir in cmdline or port_flag.search(cmdline):
            matched.add(pid)
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in matched} - matched
        matched |= children
        grew = bool(children)
    return sorted(matched)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host if host != "0.0.0.0" else LOOPBACK, 0))
        return probe.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextlib.contextmanager
def connect(
    address: str | None = None,
    code_dir: str | None = None,
    start_local: bool = True,
    *,
    require_front: bool = True,
) -> Iterator[ClusterInfo]:
    """Connect this process to Ray and Serve for the duration of the block.

    On the local head with the ``direct`` data path, the ray-deploy front is started if missing;
    one that is down is restarted when ``start_local`` (as for a deploy), else reported.

    Args:
        address: a Ray address; default ``RAY_ADDRESS``, else the local head.
        code_dir: a directory shipped to the cluster (``runtime_env.working_dir``) for user predictors.
        start_local: start the local head if it is not running (else fail with its address).
        require_front: fail when the front is down (``cluster_status`` reports it instead).

    Raises:
        ClusterUnreachable: nothing answers at the address; the message names it.
        ClusterError: the front is down (with ``require_front``); the message says where and why.
    """
    _use_token_auth()
    import ray

    resolved = resolve_address(address)
    settings = LocalClusterSettings.from_env()
    if resolved is None:
        if start_local:
            info = start_local_cluster(settings)
        else:
            check_reachable(settings.address)
            info = ClusterInfo(
                settings.address, settings.dashboard_url, f"http://{LOOPBACK}:{settings.http_port}", True
            )
        target = info.address
    else:
        check_reachable(resolved)
        target = resolved
        info = None
    _use_token_auth()
    runtime_env = deployment_runtime_env(code_dir)
    # Serve logs "connecting to existing Serve app" at INFO on every connect: not news to our users.
    # (Importing Serve sets its logger's level, so it is imported first.)
    import ray.serve  # noqa: F401

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    already = ray.is_initialized()
    if not already:
        try:
            with _declared_code_only():
                context = ray.init(
                    address=target,
                    runtime_env=runtime_env,
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                    configure_logging=False,
                )
        except Exception as exc:
            raise ClusterUnreachable(f"could not connect to the Ray cluster at {target}: {exc}") from exc
        dashboard = getattr(context, "dashboard_url", None)
    else:
        dashboard = None
    try:
        if info is None:
            http_port = settings.http_port
            host = _host_port(target)[0] if target != "auto" else LOOPBACK
            info = ClusterInfo(
                address=target,
                dashboard_url=f"http://{dashboard}" if dashboard and "://" not in dashboard else dashboard,
                http_url=f"http://{host}:{http_port}",
                local=False,
            )
        head = settings.head_state() if _is_local_head(target, settings) else {"data_path": "proxy"}
        if head.get("data_path") == "direct":
            # Serve's proxy moves behind the front, which takes the HTTP port.
            _start_serve({"host": settings.http_host, "port": int(head["proxy_port"])})
            front = ensure_front(
                settings.http_host,
                settings.http_port,
                int(head["proxy_port"]),
                os.path.join(settings.temp_dir, "front"),
                repair=start_local,
            )
            problem = front_problem(front)
            if problem and require_front:
                raise ClusterError(problem)
        elif not _front_runs():  # a front started by `ray-deploy cluster front` has started Serve behind it
            _start_serve({"host": settings.http_host, "port": _port_of(info.http_url)})
        yield info
    finally:
        if not already:
            ray.shutdown()


def _front_runs() -> bool:
    import ray

    from ray_deploy.serving.autoscale import FRONT_NAME, FRONT_NAMESPACE

    try:
        ray.get_actor(FRONT_NAME, namespace=FRONT_NAMESPACE)
    except ValueError:
        return False
    return True


FRONT_PROXY_PORT = 8001
"""Where Serve's proxy listens behind a front started by ``serve_front`` (KubeRay's export)."""


def serve_front(
    address: str | None, host: str, port: int, proxy_port: int = FRONT_PROXY_PORT, *, watch_s: float | None = None
) -> dict[str, Any]:
    """Run the ray-deploy front on a cluster started elsewhere (KubeRay: the head pod's sidecar).

    Connects to the head at ``address`` as a driver on its node (so the front lands there),
    starts Serve with its proxy on ``proxy_port`` unless Serve runs already, and starts (or
    repairs) the front on ``host:port``. The cluster's nodes must run with the direct data
    path's settings (``head_environment("direct", ...)``; ``ray-deploy export --kuberay`` sets
    them on every node), so that replicas answer on their nodes' addresses; the front then
    sends each request to a replica on any node, with its app's secret (``serving.access``).
    With ``watch_s``, keeps checking every ``watch_s`` seconds and repairs a front that is down
    (returns only when interrupted); else returns the serving front's status.

    Raises:
        ClusterUnreachable: nothing answers at the address.
        ClusterError: Serve's proxy already holds ``port``, or the front does not serve (why).
    """
    _use_token_auth()
    import ray

    resolved = resolve_address(address)
    if resolved is None:
        raise ClusterError(
            "`ray-deploy cluster front` is for a cluster started elsewhere: give --address (or RAY_ADDRESS); "
            "a local head started by ray-deploy runs its front already (`ray-deploy cluster up`)"
        )
    check_reachable(resolved)
    import ray.serve  # noqa: F401  (sets Serve's logger level first; see connect)

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        with _declared_code_only():
            ray.init(address=resolved, logging_level=logging.WARNING, log_to_driver=False, configure_logging=False)
    except Exception as exc:
        raise ClusterUnreachable(f"could not connect to the Ray cluster at {resolved}: {exc}") from exc
    try:
        _start_serve({"host": host, "port": proxy_port})
        serving_port = _serve_proxy_port()
        if serving_port == port:
            raise ClusterError(
                f"Serve's proxy already listens on port {port}, where the front should: deploy with "
                f"http_options.port {proxy_port} (ray-deploy export --kuberay does), or give --port another port"
            )
        workdir = os.path.join(tempfile.gettempdir(), f"ray-deploy-front-{port}")
        while True:
            status = ensure_front(host, port, serving_port, workdir, repair=True)
            problem = front_problem(status)
            if watch_s is None:
                if problem:
                    raise ClusterError(problem)
                return status
            report(
                problem or f"the ray-deploy front serves on {host}:{port} (Serve's proxy behind it on {serving_port})"
            )
            time.sleep(watch_s)
    finally:
        ray.shutdown()


def _serve_proxy_port() -> int:
    """The port Serve's proxies listen on (its controller's HTTP options)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    return int(ray.get(controller.get_http_config.remote(), timeout=30).port)


def _start_serve(http_options: dict[str, Any], attempts: int = 5) -> None:
    """``serve.start``, also when several processes start Serve on a new head at once.

    Serve 2.60 creates its controller from the caller, by name but without ``get_if_exists``:
    of processes that start it together, all but one get ``ActorAlreadyExistsError``. Those
    connect to the controller the first one created. ``RAY_DEPLOY_PROXY_LOCATION`` places Serve's
    proxies (``HeadOnly`` for simulated nodes, which share one address and so cannot each hold the port).
    """
    from ray import serve
    from ray.exceptions import ActorAlreadyExistsError

    location = os.environ.get("RAY_DEPLOY_PROXY_LOCATION") or None
    if location not in (None, *PROXY_LOCATIONS):
        raise ClusterError(f"RAY_DEPLOY_PROXY_LOCATION: expected one of {', '.join(PROXY_LOCATIONS)}, got {location!r}")
    for _ in range(attempts - 1):
        try:
            serve.start(http_options=http_options, proxy_location=location)
            return
        except ActorAlreadyExistsError:
            time.sleep(0.5)
    serve.start(http_options=http_options, proxy_location=location)


PROXY_LOCATIONS = ("EveryNode", "HeadOnly", "Disabled")


@contextlib.contextmanager
def _declared_code_only() -> Iterator[None]:
    """Keep the driver's directories off the cluster workers' import path during ``ray.init``.

    Ray otherwise adds the driver's script directory and current directory to every worker's
    ``sys.path``: replicas would import whatever happens to sit where the flow was started (in a
    checkout of this repo, a second copy of the Metaflow extension, which Metaflow refuses).
    Code a deployment needs travels explicitly, as its ``runtime_env.working_dir``.
    """
    script_directory = os.path.dirname(os.path.realpath(sys.argv[0])) if sys.argv and sys.argv[0] else None
    saved_path = list(sys.path)
    saved_cwd = os.getcwd()
    if script_directory:
        sys.path[:] = [entry for entry in sys.path if entry != script_directory]
    neutral = tempfile.mkdtemp(prefix="ray-deploy-driver-")
    os.chdir(neutral)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        sys.path[:] = saved_path
        shutil.rmtree(neutral, ignore_errors=True)


def _use_token_auth() -> None:
    """Present the token when one is available (a cluster started here always requires it).

    Ray reads RAY_AUTH_MODE into a cached config when it is imported, so the cache is refreshed
    when Ray was imported before the token existed (as Ray's own ``ray.init`` does).
    """
    if os.environ.get("RAY_AUTH_MODE") or not read_auth_token():
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray" in sys.modules:
        from ray._raylet import Config

        Config.initialize("")


def _is_local_head(target: str, settings: LocalClusterSettings) -> bool:
    """Whether ``target`` is the local head these settings describe (GCS or Ray client address)."""
    if target in (settings.address, "auto"):
        return True
    if "://" in target:
        parsed = urlparse(target)
        return (
            parsed.scheme == "ray"
            and parsed.hostname in (LOOPBACK, "localhost")
            and parsed.port == settings.client_port
        )
    host, _, port = target.rpartition(":")
    return host in (LOOPBACK, "localhost") and port == str(settings.gcs_port)


def _port_of(url: str) -> int:
    return urlparse(url).port or 80


def cluster_status(address: str | None = None) -> dict[str, Any]:
    """Nodes, resources and Serve apps of the cluster (without starting a local head)."""
    import ray

    from ray_deploy.control.apply import app_states

    with connect(address, start_local=False, require_front=False) as info:
        nodes = [
            {
                "node_id": node["NodeID"],
                "alive": node["Alive"],
                "address": node["NodeManagerAddress"],
                "resources": node.get("Resources", {}),
            }
            for node in ray.nodes()
        ]
        apps = {name: state.status for name, state in app_states().items()}
        front = front_status(info.http_url)
        return {
            **info.to_dict(),
            "data_path": "direct" if front else "proxy",
            "front": front,
            "front_problem": front_problem(front) if front else None,
            "nodes": nodes,
            "resources": ray.cluster_resources(),
            "available": ray.available_resources(),
            "applications": apps,
        }
