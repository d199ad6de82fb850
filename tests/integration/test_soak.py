"""A bounded soak: steady load on the example app; nothing fails and memory stays flat.

    pytest tests/integration/test_soak.py -s                               # CI: 30 s of load
    RAY_DEPLOY_SOAK_SECONDS=600 pytest tests/integration/test_soak.py -s   # the long soak
    RAY_DEPLOY_SOAK_SECONDS=600 pytest -m soak tests/integration -s        # the same, by marker

The example flow's app (``cancer``, XGBoost) gets a steady request load from a separate process
(``loadgen.py``, one request in flight, ``RATE`` per second) for ``RAY_DEPLOY_SOAK_SECONDS``
(default 30). Every ``SAMPLE_EVERY_S`` the test reads the resident memory (``VmRSS`` in
``/proc/<pid>/status``) of every replica of the app and of the Serve controller, found among
this head's own processes (other Ray heads on the machine are left out), and prints the samples
as a table (``-s`` shows it). Data-path processes (Serve's proxy, the ray-deploy front and its
HAProxy) are sampled and shown too, but not judged.

Asserted after the run: every request was answered 200 (sent == answered), the replicas were
never restarted (a restart resets memory and would hide a leak), and each judged process grew
by at most ``max(30 MiB, 15 %)`` from the first sample after the warm-up to the last one.

Why that bound: a Python process's RSS moves by a few MiB with no leak at all (allocator arenas,
garbage-collection timing, Ray's metric buffers flushed every few seconds), and the first
minutes of load still fill caches (the XGBoost booster's buffers, HTTP connection state), which
the warm-up absorbs. 30 MiB (or 15 % of a larger process) is well above that noise; a leak of
2 KiB per request crosses it in about 5 minutes at this rate, so the long soak catches leaks
the size that matters in production, and the CI run catches the gross ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.soak]

SOAK_SECONDS = float(os.environ.get("RAY_DEPLOY_SOAK_SECONDS") or 30)
WARMUP_S = min(20.0, SOAK_SECONDS / 3)
SAMPLE_EVERY_S = 2.0
RATE = 50.0
MIN_GROWTH_BOUND_MIB = 30.0
GROWTH_BOUND_FRACTION = 0.15
APP = "cancer"
JUDGED = ("replica", "controller")


@dataclass
class Tracked:
    """One process of this head and its RSS samples, in MiB by seconds since the load started."""

    role: str
    pid: int
    samples: dict[float, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.role} {self.pid}"


def head_processes() -> dict[int, str]:
    """Pid -> command line of every process of the local head these tests use (and only it)."""
    from ray_deploy.cluster import LocalClusterSettings, _processes_using

    found = {}
    for pid in _processes_using(LocalClusterSettings.from_env()):
        try:
            found[pid] = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
    return found


def role_of(cmdline: str) -> str | None:
    if cmdline.startswith(f"ray::ServeReplica:{APP}:"):
        return "replica"
    if cmdline.startswith("ray::ServeController"):
        return "controller"
    # The data path, shown but not judged: Serve's proxy, the ray-deploy front and its HAProxy.
    if cmdline.startswith("ray::ProxyActor"):
        return "proxy"
    if cmdline.startswith("ray::Front"):
        return "front"
    if Path(cmdline.split(" ", 1)[0]).name == "haproxy":
        return "haproxy"
    return None


def rss_mib(pid: int) -> float | None:
    try:
        status = (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0  # reported in kB
    return None


def growth_bound_mib(baseline: float) -> float:
    return max(MIN_GROWTH_BOUND_MIB, GROWTH_BOUND_FRACTION * baseline)


def print_table(tracked: list[Tracked], requests: dict[float, int]) -> None:
    """The samples, at most about 40 rows; '*' marks the first sample after the warm-up."""
    times = sorted(requests)
    first_after_warmup = next((t for t in times if t >= WARMUP_S), None)
    shown = set(times[:: max(1, len(times) // 40)]) | {times[-1], first_after_warmup} - {None}
    header = ["t (s)", "requests"] + [p.name for p in tracked]
    widths = [max(8, len(h)) for h in header]
    print()
    print(f"RSS in MiB, {SOAK_SECONDS:g} s of load at {RATE:g}/s on {APP!r}, warm-up {WARMUP_S:g} s:")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for at in sorted(shown):
        cells = [f"{at:.0f}{'*' if at == first_after_warmup else ' '}", str(requests[at])]
        cells += [f"{p.samples[at]:.1f}" if at in p.samples else "-" for p in tracked]
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths)))


@pytest.mark.timeout(SOAK_SECONDS + 600)  # the soak itself, plus training and deploying the example flow
def test_steady_load_drops_nothing_and_memory_stays_flat(ray_head, train_run, cancer_url, http, tmp_path):
    rows = train_run["deploy"].task.data.dataset["X_test"][:4].tolist()
    before = http.post(cancer_url, json={"instances": rows})
    assert before.status_code == 200, before.text
    served_by = http.get(cancer_url).json()["replica"]["pid"]

    tracked = [Tracked(role, pid) for pid, cmd in sorted(head_processes().items()) if (role := role_of(cmd))]
    replicas = {p.pid for p in tracked if p.role == "replica"}
    assert served_by in replicas, f"the app's replica {served_by} is not among this head's processes {tracked}"
    assert [p.role for p in tracked].count("controller") == 1, tracked

    out, stop = tmp_path / "load.jsonl", tmp_path / "stop"
    load = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("loadgen.py")), cancer_url, str(out), str(stop)]
        + ["--rate", str(RATE), "--max-seconds", str(SOAK_SECONDS + 60)]
        + ["--max-requests", str(int(RATE * (SOAK_SECONDS + 60))), "--body", json.dumps({"instances": rows})]
    )
    requests: dict[float, int] = {}
    started = time.monotonic()
    try:
        while (at := round(time.monotonic() - started, 1)) <= SOAK_SECONDS and load.poll() is None:
            requests[at] = sum(1 for _ in out.open()) if out.exists() else 0
            for process in tracked:
                value = rss_mib(process.pid)
                if value is not None:
                    process.samples[at] = value
            time.sleep(max(0.0, SAMPLE_EVERY_S - (time.monotonic() - started - at)))
    finally:
        stop.touch()
        try:
            load.wait(timeout=60)
        except subprocess.TimeoutExpired:
            load.kill()
            load.wait(timeout=10)
    print_table(tracked, requests)

    answers = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    failed = [a for a in answers if a["status"] != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed (sent != answered), e.g. {failed[:3]}"
    assert len(answers) >= 5 * SOAK_SECONDS, f"only {len(answers)} requests in {SOAK_SECONDS:g} s: no real load"
    now = {pid for pid, cmd in head_processes().items() if role_of(cmd) == "replica"}
    assert now == replicas, f"replicas restarted during the soak: {sorted(replicas)} -> {sorted(now)}"

    print("growth from the first sample after the warm-up to the last:")
    too_much = []
    for process in tracked:
        after_warmup = [at for at in sorted(process.samples) if at >= WARMUP_S]
        assert len(after_warmup) >= 2, f"{process.name}: too few samples after the warm-up: {process.samples}"
        baseline, end = process.samples[after_warmup[0]], process.samples[after_warmup[-1]]
        bound = growth_bound_mib(baseline)
        judged = process.role in JUDGED
        print(
            f"  {process.name}: {baseline:.1f} -> {end:.1f} MiB ({end - baseline:+.1f}; "
            + (f"bound {bound:.1f})" if judged else "not judged)")
        )
        if judged and end - baseline > bound:
            too_much.append(f"{process.name} grew {end - baseline:.1f} MiB ({baseline:.1f} -> {end:.1f})")
    assert not too_much, f"memory grew beyond max({MIN_GROWTH_BOUND_MIB:g} MiB, 15%): {too_much}"
