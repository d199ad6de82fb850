"""The Ray heads the benchmark starts: its own ports, and one Serve data path per head.

The harness never touches a developer's head (6379/8265/8000) or the test suite's (6399/...):
its heads listen on benchmark-only ports, overridable with the package's own variables:

    RAY_DEPLOY_GCS_PORT 6389, RAY_DEPLOY_DASHBOARD_PORT 8289, RAY_DEPLOY_HTTP_PORT 8089,
    RAY_DEPLOY_METRICS_PORT 8589, RAY_DEPLOY_CLIENT_PORT 9089, RAY_DEPLOY_NUM_CPUS 4 (logical)

A head's data path is chosen when it starts, by ``RAY_DEPLOY_DATA_PATH`` (read by
``ray_deploy.start_local_cluster``): ``proxy`` (Serve's defaults), ``haproxy`` (Serve's own
HAProxy mode) or, unset, the package's default. Serve's HAProxy mode keeps its files under
``/tmp/haproxy-serve`` and listens on fixed ports (stats 8404, metrics 9101, fallback proxy
8500) shared by every head on the machine; ``head_environment`` moves all of them to places of
the benchmark's own (``HAPROXY_ISOLATION``), and the direct-ingress replica ports to a range no
other head uses by default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

BENCHMARK_PORTS = {
    "RAY_DEPLOY_GCS_PORT": "6389",
    "RAY_DEPLOY_DASHBOARD_PORT": "8289",
    "RAY_DEPLOY_HTTP_PORT": "8089",
    "RAY_DEPLOY_METRICS_PORT": "8589",
    "RAY_DEPLOY_CLIENT_PORT": "9089",
}
BENCHMARK_NUM_CPUS = "4"
"""Logical CPUs of a benchmark head: replicas reserve 0.5 each, so everything fits on 2 cores."""

DATA_PATHS = ("proxy", "haproxy", "default")
"""``default`` leaves ``RAY_DEPLOY_DATA_PATH`` unset: whatever the package does out of the box."""

HAPROXY_ISOLATION = {
    "RAY_SERVE_HAPROXY_STATS_PORT": "8389",
    "RAY_SERVE_HAPROXY_METRICS_PORT": "9189",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": "8489",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": "9489",
    "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "33000",
    "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "33999",
    "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": "43000",
    "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": "43999",
}
"""Serve settings with machine-wide defaults, moved out of other heads' way."""

_SERVE_DATA_PATH_VARIABLES = (
    "RAY_SERVE_ENABLE_HA_PROXY",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS",
)
_NOT_FORWARDED = ("RAY_ADDRESS", "METAFLOW_RAY_SERVE_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def benchmark_environment(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` with the benchmark's ports and CPUs filled in where unset, and no remote cluster."""
    env = {k: v for k, v in base.items() if k not in _NOT_FORWARDED and k != "RAY_DEPLOY_DATA_PATH"}
    for name, value in BENCHMARK_PORTS.items():
        env[name] = base.get(name) or value
    env["RAY_DEPLOY_NUM_CPUS"] = base.get("RAY_DEPLOY_NUM_CPUS") or BENCHMARK_NUM_CPUS
    env.setdefault("USERNAME", "ci")
    return env


def haproxy_directory(env: Mapping[str, str]) -> str:
    """Where Serve's HAProxy mode keeps its files for this head.

    Short on purpose: HAProxy refuses Unix socket paths over 97 bytes, and Serve adds a 56
    character directory of its own below it.
    """
    return f"/tmp/rdb-hap-{env['RAY_DEPLOY_GCS_PORT']}"


def head_environment(env: Mapping[str, str], data_path: str) -> dict[str, str]:
    """The environment a head of ``data_path`` starts with (``env`` from ``benchmark_environment``)."""
    if data_path not in DATA_PATHS:
        raise ValueError(f"data path {data_path!r} is not one of {', '.join(DATA_PATHS)}")
    head = {k: v for k, v in env.items() if k not in _SERVE_DATA_PATH_VARIABLES}
    for name, value in HAPROXY_ISOLATION.items():
        head.setdefault(name, value)
    files = haproxy_directory(env)
    head.update(
        RAY_SERVE_HAPROXY_CONFIG_FILE_LOC=f"{files}/haproxy.cfg",
        RAY_SERVE_HAPROXY_SOCKET_PATH=f"{files}/admin.sock",
        RAY_SERVE_HAPROXY_SERVER_STATE_BASE=files,
        RAY_SERVE_HAPROXY_SERVER_STATE_FILE=f"{files}/server-state",
        RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH=f"{files}/metrics.sock",
    )
    if data_path == "default":
        head.pop("RAY_DEPLOY_DATA_PATH", None)
    else:
        head["RAY_DEPLOY_DATA_PATH"] = data_path
    if data_path == "haproxy":
        # What the package sets for this path too; set here so the row means the same before it does.
        head.update(RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_THROUGHPUT_OPTIMIZED="1")
    return head


def ports_in_use(env: Mapping[str, str]) -> list[str]:
    """The benchmark ports something already listens on, as ``NAME=port`` (empty when all are free)."""
    from ray_deploy.cluster import LOOPBACK, is_listening

    return [f"{name}={env[name]}" for name in BENCHMARK_PORTS if is_listening(LOOPBACK, int(env[name]), timeout_s=0.5)]


def prepare_haproxy_directory(env: Mapping[str, str]) -> None:
    os.makedirs(haproxy_directory(env), exist_ok=True)
