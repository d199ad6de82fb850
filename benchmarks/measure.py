"""Measuring one row: HTTP points through ``benchmarks.loadgen`` (its own process), or in-process calls.

Every loop here is bounded in time and in count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 60.0
LOADGEN_SLACK_S = 60.0
"""How long past its own window a load generator may run before it is stopped."""


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def measure_http(url: str, body: str, *, concurrency: tuple[int, ...], seconds: float, warmup_s: float) -> list[dict]:
    """A point per concurrency level, one after the other, from one ``benchmarks.loadgen`` process."""
    command = [sys.executable, "-m", "benchmarks.loadgen", url]
    command += ["--concurrency", ",".join(map(str, concurrency)), "--seconds", f"{seconds:g}"]
    command += ["--warmup", f"{warmup_s:g}", "--body", body]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=str(REPO),
        env=_subprocess_env(),
        timeout=len(concurrency) * (seconds + warmup_s) + LOADGEN_SLACK_S,
        check=False,
    )
    points = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or len(points) != len(concurrency):
        tail = (result.stderr or result.stdout).strip()[-1500:]
        raise RuntimeError(f"loadgen exited with {result.returncode} against {url}: {tail}")
    return points


def wait_until_answers(url: str, body: str, timeout_s: float = READY_TIMEOUT_S) -> float:
    """Seconds until ``url`` answers a scoring POST with 2xx; raises TimeoutError naming the last answer."""
    import httpx

    started = time.monotonic()
    last = "no answer"
    with httpx.Client(timeout=10) as client:
        while time.monotonic() - started < timeout_s:
            try:
                answer = client.post(url, content=body, headers={"Content-Type": "application/json"})
                if 200 <= answer.status_code < 300:
                    return time.monotonic() - started
                last = f"HTTP {answer.status_code}: {answer.text[:300]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer a scoring request with 2xx within {timeout_s:g}s (last: {last})")


def measure_inprocess(onnx_bytes: bytes, row: list[float], *, seconds: float, warmup_s: float, max_calls: int) -> dict:
    """``InferenceSession.run`` on one row in a loop; per-call rate and latency, like a loadgen point."""
    import numpy as np
    import onnxruntime

    from benchmarks.loadgen import percentile

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: np.asarray([row], dtype=np.float32)}
    outputs = [session.get_outputs()[0].name]
    clock = time.perf_counter
    warm_until = clock() + warmup_s
    for _ in range(max_calls):
        if clock() >= warm_until:
            break
        session.run(outputs, feeds)
    latencies: list[float] = []
    started = clock()
    until = started + seconds
    while len(latencies) < max_calls:
        before = clock()
        if before >= until:
            break
        session.run(outputs, feeds)
        latencies.append(clock() - before)
    window = max(1e-9, clock() - started)
    latencies.sort()
    return {
        "concurrency": None,
        "seconds": round(window, 3),
        "sent": len(latencies),
        "ok": len(latencies),
        "failed": 0,
        "errors": {},
        "rps": round(len(latencies) / window, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 4) if latencies else None,
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 4) if latencies else None,
    }
