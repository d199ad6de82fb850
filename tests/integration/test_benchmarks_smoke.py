"""The benchmark harness (issue #6) runs end to end in its smallest mode: every row answers, the
reports are written; with it, the two rows that switch one app's capture on and off in place
(issue #16), and the hand-written Serve deployment measured beside ``ours``, segment for segment
(issue #17). No timing is asserted: numbers on a shared machine say nothing here.

The harness starts and stops its own Ray head on the benchmark's ports (6389/8289/8089/8589/9089),
not the suite's session head, so the environment it gets names those ports explicitly (the suite's
conftest puts its own ports into this process's environment).
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ROWS = ("inprocess", "fastapi", "ours", "handwritten_direct", "ours_capture10_on", "ours_capture10_off")
BENCHMARK_PORTS = {
    "RAY_DEPLOY_GCS_PORT": "6389",
    "RAY_DEPLOY_DASHBOARD_PORT": "8289",
    "RAY_DEPLOY_HTTP_PORT": "8089",
    "RAY_DEPLOY_METRICS_PORT": "8589",
    "RAY_DEPLOY_CLIENT_PORT": "9089",
}


def test_smoke_run_measures_every_row_and_writes_reports(tmp_path):
    out, markdown, plot = tmp_path / "results.json", tmp_path / "bench.md", tmp_path / "bench.png"
    env = {**os.environ, **BENCHMARK_PORTS, "RAY_DEPLOY_NUM_CPUS": "4"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out), "--markdown", str(markdown)]
        + ["--workdir", str(tmp_path / "work"), "--rows", ",".join(ROWS)],
        cwd=str(REPO),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.is_file(), f"no results (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    results = json.loads(out.read_text())
    rows = {row["id"]: row for row in results["rows"]}
    assert set(rows) == set(ROWS)
    for row in rows.values():
        assert not row.get("error"), f"{row['id']}: {row.get('error')}\n{done.stderr[-4000:]}"
        assert row["points"], row["id"]
        for point in row["points"]:
            assert point["ok"] > 0 and point["failed"] == 0, (row["id"], point)
            if row["id"] != "inprocess":  # HTTP points say which generator measured them, and its CPU
                assert point["generator"] == ("wrk" if shutil.which("wrk") else "python"), point
                assert 0 < point["generator_cpu"] <= 1.5, point
    assert [point["concurrency"] for point in rows["ours"]["points"]] == [1]
    assert rows["ours"]["url"].startswith("http://127.0.0.1:8089/")
    assert rows["ours"]["answers"]["variants"] == {"default": rows["ours"]["answers"]["variants"]["default"]}
    assert done.returncode == 0, done.stderr[-4000:]

    (head,) = results["heads"]
    assert head["state"]["address"] == "127.0.0.1:6389"
    assert results["machine"]["cpu_count"] and results["machine"]["versions"]["ray"]
    assert {r["name"] for r in results["ratios"]} == {
        "ours_vs_fastapi",
        "capture10_in_place",
        "ours_vs_handwritten_direct",
    }

    # The hand-written app is deployed beside ours and measured in the same cycles: the ratio of the
    # two pairs their segments (not a 2 s point of one with the other's segments, minutes apart).
    handwritten = rows["handwritten_direct"]
    assert handwritten["url"] == "http://127.0.0.1:8089/handwritten"
    assert len(handwritten["answers"]["example"]["predictions"]) == 1  # it answered the one-row request
    segments = len(rows["ours"]["points"][0]["segments"])
    assert segments >= 1 and len(handwritten["points"][0]["segments"]) == segments
    (direct,) = [r for r in results["ratios"] if r["name"] == "ours_vs_handwritten_direct"]
    assert direct["at"]["1"]["value"] > 0 and direct["at"]["1"]["pairs"] == segments

    # One app, its capture switched on and off in place: one replica process answered both rows,
    # each row's segments pair with the other's, and about 10% of the capturing requests are on disk.
    on, off = rows["ours_capture10_on"], rows["ours_capture10_off"]
    assert on["app"] == off["app"] and on["toggles"] == off["toggles"]
    toggles = on["toggles"]
    assert len(toggles["replica_pids"]) == 1 and toggles["switches"] >= 2, toggles
    assert len(on["points"][0]["segments"]) == len(off["points"][0]["segments"]) >= 1
    capture = on["capture"]
    assert "capture" not in off and not capture.get("error"), capture
    expected = 0.1 * capture["requests"]
    assert abs(capture["rows_on_disk"] - expected) <= 4 * (expected * 0.9) ** 0.5 + 5, capture
    (in_place,) = [r for r in results["ratios"] if r["name"] == "capture10_in_place"]
    assert in_place["at"]["1"]["value"] > 0 and in_place["at"]["1"]["pairs"] == len(off["points"][0]["segments"])

    report = markdown.read_text()
    assert "| ours, 1 variant |" in report and "## Machine" in report
    assert "- load generator: " in report and "gen. CPU" in report
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.is_file() and plot.read_bytes().startswith(b"\x89PNG")
        assert "](bench.png)" in report
    else:
        assert "matplotlib" in results["plot"]["error"]
