"""The benchmark's load generator: wrk when installed (its summary read into the harness's points),
the Python generator otherwise or when asked, and an unknown choice refused."""

import json
import sys
from pathlib import Path

import pytest

# The harness lives in the checkout, not in the package (see test_bench_rounds.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.measure import WRK_GENERATOR_ENV, load_generator, wrk_point  # noqa: E402


def test_a_wrk_summary_becomes_a_point():
    summary = {"wrk": 1, "requests": 2000, "duration_us": 2_000_000, "status": 10, "connect": 0, "read": 3}
    summary.update({"write": 0, "timeout": 2, "p50_us": 1500, "p90_us": 2500, "p99_us": 4250, "max_us": 9100})
    point = wrk_point("Running 2s test\n" + json.dumps(summary) + "\n", concurrency=8)
    assert point == {
        "concurrency": 8,
        "seconds": 2.0,
        "sent": 2005,  # 2000 answered (10 of them non-2xx) and 5 lost to socket errors
        "ok": 1990,
        "failed": 15,
        "errors": {"HTTP non-2xx": 10, "read": 3, "timeout": 2},
        "rps": 995.0,
        "p50_ms": 1.5,
        "p99_ms": 4.25,
        "p90_ms": 2.5,
        "max_ms": 9.1,
    }
    with pytest.raises(RuntimeError, match="wrk printed no summary"):
        wrk_point("unable to connect to 127.0.0.1:1 Connection refused\n", concurrency=1)


def test_the_generator_is_wrk_when_installed_unless_told_otherwise(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/wrk" if name == "wrk" else None)
    monkeypatch.delenv(WRK_GENERATOR_ENV, raising=False)
    assert load_generator() == "wrk"
    monkeypatch.setenv(WRK_GENERATOR_ENV, "python")
    assert load_generator() == "python"
    monkeypatch.setenv(WRK_GENERATOR_ENV, "ab")
    with pytest.raises(ValueError, match="expected 'wrk' or 'python'"):
        load_generator()
    monkeypatch.delenv(WRK_GENERATOR_ENV)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert load_generator() == "python"
