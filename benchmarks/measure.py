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


WRK_GENERATOR_ENV = "RAY_DEPLOY_BENCH_GENERATOR"
"""``wrk`` (the default when it is installed) or ``python`` (``benchmarks.loadgen``)."""

_WRK_SCRIPT = """
wrk.method = "POST"
local file = assert(io.open(BODY_PATH, "rb"))
wrk.body = file:read("*a")
file:close()
HEADERS
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"wrk": 1, "requests": %d, "duration_us": %d, "status": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def load_generator() -> str:
    """The generator the harness drives: ``wrk`` (a C load generator, on its own core) when it is
    installed, unless ``RAY_DEPLOY_BENCH_GENERATOR=python``; else the Python ``benchmarks.loadgen``."""
    import shutil

    wanted = os.environ.get(WRK_GENERATOR_ENV, "wrk")
    if wanted not in ("wrk", "python"):
        raise ValueError(f"{WRK_GENERATOR_ENV}={wanted!r}: expected 'wrk' or 'python'")
    return "wrk" if wanted == "wrk" and shutil.which("wrk") else "python"


JSON_HEADERS = {"Content-Type": "application/json"}


def measure_http(
    url: str,
    body: str | bytes,
    *,
    concurrency: tuple[int, ...],
    seconds: float,
    warmup_s: float,
    headers: dict[str, str] | None = None,
) -> list[dict]:
    """A point per concurrency level, one after the other; each says which generator measured it
    (``generator``) and the share of one core that generator used (``generator_cpu``). ``body``
    (text or bytes) is POSTed with ``headers`` (default: JSON's content type)."""
    import tempfile

    payload = body.encode() if isinstance(body, str) else body
    headers = JSON_HEADERS if headers is None else headers
    with tempfile.NamedTemporaryFile("wb", suffix=".body", delete=False) as file:
        file.write(payload)
    try:
        if load_generator() == "wrk":
            return [_measure_wrk(url, file.name, headers, level, seconds, warmup_s) for level in concurrency]
        command = [sys.executable, "-m", "benchmarks.loadgen", url]
        command += ["--concurrency", ",".join(map(str, concurrency)), "--seconds", f"{seconds:g}"]
        command += ["--warmup", f"{warmup_s:g}", "--body-file", file.name]
        for name, value in headers.items():
            command += ["--header", f"{name}: {value}"]
        result, cpu, wall = _run_timed(command, timeout=len(concurrency) * (seconds + warmup_s) + LOADGEN_SLACK_S)
    finally:
        os.unlink(file.name)
    points = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or len(points) != len(concurrency):
        tail = (result.stderr or result.stdout).strip()[-1500:]
        raise RuntimeError(f"loadgen exited with {result.returncode} against {url}: {tail}")
    return [{**point, "generator": "python", "generator_cpu": round(cpu / wall, 3)} for point in points]


def _run_timed(command: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``command``; its result, the CPU seconds it used (user + system) and its wall time."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=str(REPO), env=_subprocess_env(), timeout=timeout, check=False
    )
    wall = max(1e-9, time.monotonic() - started)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return result, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def _measure_wrk(
    url: str, body_path: str, headers: dict[str, str], concurrency: int, seconds: float, warmup_s: float
) -> dict:
    """One point from ``wrk`` (one thread: the generator takes at most one core), after a warm-up run."""
    import tempfile

    lines = "\n".join(f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}" for name, value in headers.items())
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT.replace("BODY_PATH", json.dumps(body_path)).replace("HEADERS", lines))
    try:
        base = ["wrk", "-t1", f"-c{concurrency}", "--timeout", "10s", "-s", script.name]
        if warmup_s > 0:
            _run_timed([*base, f"-d{max(1, round(warmup_s))}s", url], timeout=warmup_s + LOADGEN_SLACK_S)
        before = machine_cpu()
        result, cpu, wall = _run_timed([*base, f"-d{max(1, round(seconds))}s", url], timeout=seconds + LOADGEN_SLACK_S)
        after = machine_cpu()
    finally:
        os.unlink(script.name)
    if result.returncode != 0:
        raise RuntimeError(f"wrk exited with {result.returncode} against {url}: {result.stderr.strip()[-1500:]}")
    point = wrk_point(result.stdout, concurrency)
    return {
        **point,
        "generator": "wrk",
        "generator_cpu": round(cpu / wall, 3),
        **server_cpu(before, after, cpu, wall, point["ok"]),
    }


def machine_cpu() -> tuple[float, float] | None:
    """The whole machine's busy and stolen CPU seconds since boot (``/proc/stat``), or None where
    there is no ``/proc/stat``. Busy: user, nice, system, irq and softirq; stolen: time the
    hypervisor gave to other guests, which no process of ours is charged for."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    ticks = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / ticks, steal / ticks


def server_cpu(
    before: tuple[float, float] | None, after: tuple[float, float] | None, generator_s: float, wall: float, ok: int
) -> dict:
    """What serving a point's requests cost the machine: the busy CPU seconds of every process but
    the load generator, per answered request (``cpu_us_per_request``), and the share of the
    machine's CPUs the hypervisor took (``steal``). A rate on a shared VM moves with what other
    guests take; the CPU a request costs moves far less, so it ranks rows where rates cannot."""
    if before is None or after is None:
        return {}
    busy = max(0.0, after[0] - before[0] - generator_s)
    steal = max(0.0, after[1] - before[1]) / (wall * (os.cpu_count() or 1))
    return {
        "server_cpu_s": round(busy, 4),
        "cpu_us_per_request": round(busy / ok * 1e6, 2) if ok else None,
        "steal": round(steal, 3),
    }


def wrk_point(output: str, concurrency: int) -> dict:
    """A point, in ``benchmarks.loadgen``'s shape, from the summary line our wrk script prints."""
    line = next((text for text in output.splitlines() if text.startswith('{"wrk"')), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary: {output.strip()[-1500:]}")
    summary = json.loads(line)
    errors = {kind: summary[kind] for kind in ("status", "connect", "read", "write", "timeout") if summary[kind]}
    failed = sum(errors.values())
    window = max(1e-9, summary["duration_us"] / 1e6)
    ok = summary["requests"] - summary["status"]
    return {
        "concurrency": concurrency,
        "seconds": round(window, 3),
        "sent": summary["requests"] + failed - summary["status"],
        "ok": ok,
        "failed": failed,
        "errors": {("HTTP non-2xx" if kind == "status" else kind): count for kind, count in errors.items()},
        "rps": round(ok / window, 1),
        "p50_ms": round(summary["p50_us"] / 1000, 3) if ok else None,
        "p99_ms": round(summary["p99_us"] / 1000, 3) if ok else None,
        "p90_ms": round(summary["p90_us"] / 1000, 3) if ok else None,
        "max_ms": round(summary["max_us"] / 1000, 3) if ok else None,
    }


def wait_until_answers(
    url: str, body: str | bytes, timeout_s: float = READY_TIMEOUT_S, headers: dict[str, str] | None = None
) -> float:
    """Seconds until ``url`` answers a scoring POST with 2xx; raises TimeoutError naming the last answer."""
    import httpx

    started = time.monotonic()
    last = "no answer"
    with httpx.Client(timeout=10) as client:
        while time.monotonic() - started < timeout_s:
            try:
                answer = client.post(url, content=body, headers=JSON_HEADERS if headers is None else headers)
                if 200 <= answer.status_code < 300:
                    return time.monotonic() - started
                last = f"HTTP {answer.status_code}: {answer.text[:300]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer a scoring request with 2xx within {timeout_s:g}s (last: {last})")


def measure_inprocess(
    onnx_bytes: bytes, rows: list[list[float]], *, seconds: float, warmup_s: float, max_calls: int
) -> dict:
    """``InferenceSession.run`` on ``rows`` (one call: all of them) in a loop; per-call rate and
    latency, like a loadgen point."""
    import numpy as np
    import onnxruntime

    from benchmarks.loadgen import percentile

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: np.asarray(rows, dtype=np.float32)}
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
