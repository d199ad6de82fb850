"""The fast path past one machine: replicas answer the front only, wherever they run.

- On the suite's head: a replica's own port refuses a request without its app's secret (and one
  with a forged or another app's secret), keeps serving through the front, and the secret is
  nowhere on disk: not in Serve's config, the registry, the front's files or Ray's logs.
- The KubeRay export brought to life on this machine: a head (no CPUs for replicas, as in the
  manifest) and a worker node started with the manifest's environment, the manifest's
  serveConfigV2 deployed through the dashboard as KubeRay deploys it, then the head pod's front
  sidecar command. Requests reach the replica on the worker node through the front.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

pytestmark = pytest.mark.integration

BODY = {"instances": [[float(i) for i in range(30)]]}


def ray_deploy(*args: str, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("ray-deploy")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, env=env)


def front_of(env: dict | None = None, address: str | None = None) -> dict:
    args = ["cluster", "status", "--json"] + (["--address", address] if address else [])
    shown = ray_deploy(*args, env=env, timeout=120)
    assert shown.returncode == 0, shown.stderr[-3000:]
    return json.loads(shown.stdout)


def app_secret_on(app: str, env: dict | None = None, address: str | None = None) -> str:
    """The app's secret, read the way a replica reads it (from the cluster's GCS)."""
    code = (
        "import sys\n"
        "from ray_deploy.cluster import connect\n"
        "from ray_deploy.serving.access import app_secret, cluster_key\n"
        "with connect(sys.argv[2] or None, start_local=False):\n"
        "    print(app_secret(cluster_key(), sys.argv[1]).decode())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, app, address or ""], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def files_holding(text: str, *roots: Path, limit: int = 64 << 20) -> list[str]:
    found = []
    for root in roots:
        for path in root.rglob("*"):
            try:
                if path.is_file() and not path.is_socket() and path.stat().st_size < limit:
                    if text.encode() in path.read_bytes():
                        found.append(str(path))
            except OSError:
                continue
    return found


def test_a_replica_port_answers_the_front_only(cancer_url, ray_head):
    from ray_deploy.cluster import LocalClusterSettings, auth_headers

    status = front_of()
    replica = status["front"]["routes"]["/cancer"][0]
    direct = f"http://{replica}/cancer"
    refused = httpx.post(direct, json=BODY, timeout=30)
    assert refused.status_code == 401, refused.text
    assert "ray-deploy front" in refused.json()["error"]
    forged = httpx.post(direct, json=BODY, headers={"X-Ray-Deploy-Front": "0" * 64}, timeout=30)
    assert forged.status_code == 401
    secret = app_secret_on("cancer")
    other = app_secret_on("another-app")
    assert httpx.post(direct, json=BODY, headers={"X-Ray-Deploy-Front": other}, timeout=30).status_code == 401
    # The secret is what the replica checks: with it, the replica's own port answers.
    allowed = httpx.post(direct, json=BODY, headers={"X-Ray-Deploy-Front": secret}, timeout=30)
    assert allowed.status_code == 200 and "predictions" in allowed.json()
    through_front = httpx.post(cancer_url, json=BODY, timeout=30)
    assert through_front.status_code == 200 and "predictions" in through_front.json()

    settings = LocalClusterSettings.from_env()
    config = httpx.get(f"{settings.dashboard_url}/api/serve/applications/", headers=auth_headers(), timeout=30)
    assert config.status_code == 200 and "cancer" in config.text and secret not in config.text
    home = Path(os.environ["RAY_DEPLOY_HOME"])
    temp = Path(settings.temp_dir)
    assert (temp / "front" / "haproxy.cfg").is_file()
    assert files_holding(secret, home, temp) == [], "the secret must never be written down"


PORTS = {"gcs": 6899, "dashboard": 8898, "front": 8897, "proxy": 8896, "metrics": 8895, "client": 9095}
REPLICA_PORTS = {
    "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "34000",
    "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "34999",
    "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": "44000",
    "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": "44999",
}


@pytest.fixture()
def exported_cluster(train_run, ray_head, tmp_path):
    """The app's KubeRay manifest, and a two-node cluster started as its pods would start."""
    from ray_deploy.cluster import LocalClusterSettings, stop_local_cluster

    out = tmp_path / "rayservice.yaml"
    done = ray_deploy("export", "cancer", "--kuberay", "-o", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = yaml.safe_load(out.read_text())
    settings = LocalClusterSettings(
        gcs_port=PORTS["gcs"], dashboard_port=PORTS["dashboard"], http_port=PORTS["front"], client_port=PORTS["client"]
    )
    try:
        yield manifest, settings
    finally:
        stop_local_cluster(settings, grace_s=5)


def container_env(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def test_the_kuberay_export_runs_the_fast_path_across_nodes(exported_cluster, tmp_path):
    from ray_deploy.cluster import auth_headers

    manifest, settings = exported_cluster
    cluster = manifest["spec"]["rayClusterConfig"]
    head_pod = cluster["headGroupSpec"]["template"]["spec"]
    head, sidecar = head_pod["containers"]
    workers = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    worker = workers["cpu-workers"]["template"]["spec"]["containers"][0]
    # What the manifest carries: the direct data path on every node, Serve's proxy behind the front,
    # the front in the head pod, and no secret (the cluster makes its key when the front starts).
    for container in (head, sidecar, worker, workers["gpu-workers"]["template"]["spec"]["containers"][0]):
        env = container_env(container)
        assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1" and env["RAY_SERVE_DEFAULT_HTTP_HOST"] == "0.0.0.0"
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    proxy_port = serve_config["http_options"]["port"]
    assert serve_config["http_options"]["host"] == "0.0.0.0"
    assert {"containerPort": 8000, "name": "serve"} in head["ports"] and proxy_port != 8000
    command = sidecar["command"]
    assert command[:3] == ["ray-deploy", "cluster", "front"]
    assert command[command.index("--proxy-port") + 1] == str(proxy_port)
    assert "front_key" not in json.dumps(manifest).lower()

    # The pods, on this machine: every server on loopback, ports of this test's own. (Both nodes share
    # 127.0.0.1, where pods have an address each: Serve's HTTP host, which replicas bind, is one for
    # the cluster, so a second loopback address for the worker would leave its replicas unreachable.)
    def node_env(container: dict) -> dict[str, str]:
        env = {**os.environ, **container_env(container), **REPLICA_PORTS, "RAY_AUTH_MODE": "token"}
        env["RAY_SERVE_DEFAULT_HTTP_HOST"] = "127.0.0.1"
        return env

    ray = str(Path(sys.executable).with_name("ray"))
    # A pod's working directory is not this checkout: started here, the dashboard (which starts
    # Serve for the PUT below) would put the checkout on its workers' import path, beside the
    # installed package, and Metaflow refuses two copies of our extension.
    pod_dir = tmp_path / "pod"
    pod_dir.mkdir()
    common = [f"--temp-dir={settings.temp_dir}", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    head_params = cluster["headGroupSpec"]["rayStartParams"]
    started = subprocess.run(
        [ray, "start", "--head", f"--port={PORTS['gcs']}", f"--num-cpus={head_params['num-cpus']}"]
        + ["--dashboard-host=127.0.0.1", f"--dashboard-port={PORTS['dashboard']}"]
        + [f"--metrics-export-port={PORTS['metrics']}", f"--ray-client-server-port={PORTS['client']}", *common],
        env=node_env(head),
        capture_output=True,
        text=True,
        timeout=180,
        cwd=pod_dir,
    )
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    joined = subprocess.run(
        [ray, "start", f"--address=127.0.0.1:{PORTS['gcs']}", "--num-cpus=2", *common],
        env=node_env(worker),
        capture_output=True,
        text=True,
        timeout=180,
        cwd=pod_dir,
    )
    assert joined.returncode == 0, joined.stdout[-2000:] + joined.stderr[-2000:]

    # KubeRay deploys serveConfigV2 through the dashboard. Here the proxy moves to loopback, and runs
    # on the head only: both nodes share 127.0.0.1, where pods have an address each.
    serve_config["http_options"] = {"host": "127.0.0.1", "port": PORTS["proxy"]}
    serve_config["proxy_location"] = "HeadOnly"
    dashboard = f"http://127.0.0.1:{PORTS['dashboard']}"
    deadline = time.monotonic() + 120
    while True:  # the dashboard's Serve module answers a little after `ray start` returns
        try:
            put = httpx.put(
                f"{dashboard}/api/serve/applications/", json=serve_config, headers=auth_headers(), timeout=60
            )
            if put.status_code == 200:
                break
        except httpx.HTTPError:
            put = None
        assert time.monotonic() < deadline, f"the dashboard did not take the Serve config: {put and put.text}"
        time.sleep(2)

    # The head pod's sidecar, as the manifest runs it (without --watch, so that it returns).
    address = f"127.0.0.1:{PORTS['gcs']}"
    sidecar_args = command[3:]
    for flag, value in (("--address", address), ("--host", "127.0.0.1"), ("--port", str(PORTS["front"]))):
        sidecar_args[sidecar_args.index(flag) + 1] = value
    sidecar_args[sidecar_args.index("--proxy-port") + 1] = str(PORTS["proxy"])
    watch = sidecar_args.index("--watch")
    del sidecar_args[watch : watch + 2]
    front = ray_deploy("cluster", "front", *sidecar_args, "--json", env=node_env(sidecar))
    assert front.returncode == 0, front.stderr[-3000:]
    assert json.loads(front.stdout)["state"] == "serving"

    url = f"http://127.0.0.1:{PORTS['front']}/cancer"
    deadline = time.monotonic() + 240
    answer = None
    while time.monotonic() < deadline:
        try:
            answer = httpx.post(url, json=BODY, timeout=30)
            if answer.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    if answer is None or answer.status_code != 200:  # why, in Serve's words
        apps = httpx.get(f"{dashboard}/api/serve/applications/", headers=auth_headers(), timeout=30).json()
        statuses = {
            name: (
                app.get("status"),
                app.get("message"),
                {d: (v.get("status"), v.get("message")) for d, v in (app.get("deployments") or {}).items()},
            )
            for name, app in (apps.get("applications") or {}).items()
        }
        raise AssertionError(f"{answer and answer.status_code} {answer and answer.text}; Serve: {statuses}")
    assert "predictions" in answer.json()

    shown = front_of(env=node_env(head), address=address)
    nodes = {node["node_id"]: node for node in shown["nodes"] if node["alive"]}
    assert len(nodes) == 2
    (replica,) = shown["front"]["routes"]["/cancer"]
    described = httpx.get(url, timeout=30).json()
    replica_node = described["replica"]["node_id"]
    assert nodes[replica_node]["resources"].get("CPU", 0) == 2, "the replica runs on the worker node"
    refused = httpx.post(f"http://{replica}/cancer", json=BODY, timeout=30)
    assert refused.status_code == 401, refused.text
    assert httpx.post(url, json=BODY, timeout=30).status_code == 200
