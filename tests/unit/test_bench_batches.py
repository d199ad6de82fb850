"""Rows per request in the benchmark: 1, 64 and 1,024 rows in one request, reported as rows
scored per second beside FastAPI and in-process predict. No Ray and no timing here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# The harness lives in the checkout, not in the package (see test_bench_rounds.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.plan import MODES, ROWS_BY_ID, Plan, settings_for  # noqa: E402
from benchmarks.report import compute_ratios, render_markdown, rows_per_request_table  # noqa: E402

BATCH_ROWS = ("inprocess_rows1024", "fastapi_rows64", "fastapi_rows1024", "ours_rows64", "ours_rows1024")


def _plan(tmp_path: Path, rows: list[list[float]]) -> Plan:
    return Plan(
        settings=settings_for("quick"),
        workdir=str(tmp_path),
        onnx_path=str(tmp_path / "model.onnx"),
        request_row=[0.5] * 20,
        request_rows=rows,
    )


def test_each_batch_row_sends_its_rows_and_a_short_plan_is_refused(tmp_path):
    rows = [[float(i)] * 20 for i in range(1024)]
    plan = _plan(tmp_path, rows)
    assert json.loads(plan.body_for(ROWS_BY_ID["ours"])) == {"instances": [[0.5] * 20]}
    assert json.loads(plan.body_for(ROWS_BY_ID["ours_rows64"]))["instances"] == rows[:64]
    assert len(json.loads(plan.body_for(ROWS_BY_ID["fastapi_rows1024"]))["instances"]) == 1024
    with pytest.raises(ValueError, match="holds 64 rows; ours_rows1024 sends 1024"):
        _plan(tmp_path, rows[:64]).body_for(ROWS_BY_ID["ours_rows1024"])
    assert all(row in MODES["quick"].rows and row in MODES["full"].rows for row in BATCH_ROWS)
    assert not any(row in MODES["smoke"].rows for row in BATCH_ROWS)


def _row(row_id: str, *rps: float) -> dict:
    spec = ROWS_BY_ID[row_id]
    if not spec.http:
        points = [{"concurrency": None, "rps": rps[0]}]
    else:
        points = [{"concurrency": c, "rps": r} for c, r in zip((1, 8), rps)]
    return {"id": row_id, "title": spec.title, "group": spec.group, "points": points}


def test_rows_per_second_and_the_batch_target_against_fastapi(tmp_path):
    rows = [
        _row("inprocess", 9_000),
        _row("inprocess_rows1024", 1_000),
        _row("fastapi", 3_000, 5_000),
        _row("fastapi_rows1024", 100, 140),
        _row("ours", 2_000, 2_700),
        _row("ours_rows1024", 160, 200),
        _row("handwritten_proxy", 90, 180),
    ]
    table = rows_per_request_table(rows, (1, 8))
    assert table[0] == "| row | rows per request | c=1 rows/s | c=8 rows/s |"
    body = {line.split(" | ")[0].strip("| "): line for line in table[2:]}
    assert "hand-written Serve, proxy" not in body  # only batch rows and their one-row references
    assert body["in-process predict, 1,024 rows"].endswith("| 1,024 | 1,024,000 | – |")
    assert body["ours, 1,024 rows"].endswith("| 1,024 | 163,840 | 204,800 |")
    assert body["ours, 1 variant"].endswith("| 1 | 2,000 | 2,700 |")
    ratios = {r["name"]: r for r in compute_ratios(rows, (1, 8))}
    target = ratios["rows1024_vs_fastapi"]
    assert target["target_text"] == ">= 1.5x at c=8"
    assert [target["at"][c]["status"] for c in ("1", "8")] == [None, "missed"]  # 1.6x reported, then 1.43x
    assert target["verdict"] == "missed"
    assert ratios["rows1024_vs_inprocess"]["at"]["1"]["value"] == 0.16
    assert rows_per_request_table(rows[2:3], (1, 8)) == []  # no batch row: no table


def test_the_report_has_a_rows_per_request_section(tmp_path):
    rows = [_row("fastapi_rows64", 900, 1400), _row("ours_rows64", 1000, 1500)]
    results = {
        "mode": "quick",
        "started_at": "2026-12-03T10:00:00+00:00",
        "wall_s": 1.0,
        "settings": settings_for("quick").to_dict(),
        "rows": rows,
        "ratios": compute_ratios(rows, (1, 8)),
        "machine": {},
        "model": {},
        "heads": [],
    }
    text = render_markdown(results, None)
    assert "## Rows per request" in text and "| ours, 64 rows | 64 | 64,000 | 96,000 |" in text
