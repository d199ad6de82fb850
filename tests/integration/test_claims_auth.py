"""README: the local head starts with token authentication on. Every way into the cluster refuses
a client without the token, and says it is the token: the dashboard's REST API (which can also
submit jobs), the GCS (what `ray.init` and the `ray` CLI talk to) and the Ray client port
(`ray://`). Each refusal comes within a bounded time, and the same call with the token works."""

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest

pytestmark = pytest.mark.integration

REFUSED_S = 90  # Ray's own clients retry for about 20 s before giving up; the test allows more, not forever.


def test_the_dashboard_rest_api_answers_401_without_the_token(ray_head):
    from ray_deploy.cluster import auth_headers

    serve_api = f"{ray_head.dashboard_url}/api/serve/applications/"
    with httpx.Client(timeout=10) as http:
        bare = http.get(serve_api)
        assert bare.status_code == 401 and "authentication token" in bare.text.lower(), (bare.status_code, bare.text)
        wrong = http.get(serve_api, headers={"Authorization": "Bearer " + "0" * 32})
        assert wrong.status_code in (401, 403), (wrong.status_code, wrong.text)
        # Submitting a job runs code on the cluster: refused too.
        job = http.post(f"{ray_head.dashboard_url}/api/jobs/", json={"entrypoint": "echo owned"})
        assert job.status_code == 401, (job.status_code, job.text)
        assert http.get(serve_api, headers=auth_headers()).status_code == 200


def test_the_ray_client_port_refuses_a_call_without_the_token(ray_head):
    """The `ray://` port's gRPC service answers UNAUTHENTICATED at once, where Ray's own client
    would only report a connection timeout after half a minute of retries."""
    from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

    from ray_deploy.cluster import read_auth_token

    ping = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
    with grpc.insecure_channel(f"127.0.0.1:{os.environ['RAY_DEPLOY_CLIENT_PORT']}") as channel:
        driver = ray_client_pb2_grpc.RayletDriverStub(channel)
        for metadata in (None, [("authorization", "Bearer " + "0" * 32)]):
            with pytest.raises(grpc.RpcError) as refused:
                driver.ClusterInfo(ping, timeout=20, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value
            assert "token" in refused.value.details().lower(), refused.value.details()
        answer = driver.ClusterInfo(ping, timeout=20, metadata=[("authorization", f"Bearer {read_auth_token()}")])
        assert answer.json == "{}"


def test_ray_init_and_the_ray_cli_without_the_token_fail_with_an_authentication_error(ray_head, tmp_path):
    """A client that has never seen the token (no RAY_AUTH_TOKEN, no token file, auth mode unset,
    as on another machine) reaches the GCS and is turned away, naming the token."""
    script = tmp_path / "no_token.py"
    script.write_text(
        f"import ray\nray.init(address={ray_head.address!r})\nprint('CONNECTED', ray.cluster_resources())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token
    ray_cli = Path(sys.executable).with_name("ray")
    started = time.monotonic()
    attempts = {
        "ray.init": subprocess.Popen(
            [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        ),
        "ray status": subprocess.Popen(
            [str(ray_cli), "status", "--address", ray_head.address],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        ),
    }
    outputs = {}
    for name, process in attempts.items():
        try:
            outputs[name] = process.communicate(timeout=max(1.0, REFUSED_S - (time.monotonic() - started)))[0]
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            pytest.fail(f"{name} without the token neither connected nor failed within {REFUSED_S}s")
    for name, process in attempts.items():
        output = outputs[name]
        assert process.returncode != 0 and "CONNECTED" not in output, (name, output[-3000:])
        assert "AuthenticationError" in output and "Authentication token is missing or incorrect" in output, (
            name,
            output[-3000:],
        )
