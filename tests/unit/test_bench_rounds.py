"""``--repeat``: several rounds of the benchmark reduce to one row per id, point by point."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The harness lives in the checkout, not in the package; importing it takes the checkout's root
# off sys.path again when the package is installed normally (benchmarks/__init__.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.plan import settings_for  # noqa: E402
from benchmarks.report import compute_ratios  # noqa: E402
from benchmarks.run import median_rows  # noqa: E402


def _row(row_id: str, *rps: float, error: str | None = None) -> dict:
    points = [{"concurrency": c, "rps": r, "p50_ms": 1000 / r if r else None} for c, r in zip((1, 8), rps)]
    row = {"id": row_id, "title": row_id, "points": points}
    if error:
        row["error"] = error
    return row


def test_each_point_is_its_median_round_with_every_rounds_rate_kept():
    rounds = [
        [_row("ours", 100, 400), _row("hand", 90, 500)],
        [_row("ours", 300, 200), _row("hand", 95, 450)],
        [_row("ours", 200, 300), _row("hand", 80, 480)],
    ]
    merged = {row["id"]: row for row in median_rows(rounds)}
    ours = merged["ours"]["points"]
    assert [p["rps"] for p in ours] == [200, 300]
    assert ours[0]["p50_ms"] == 1000 / 200  # latencies come from the same (median) round
    assert ours[0]["rounds_rps"] == [100, 200, 300]
    assert [p["rps"] for p in merged["hand"]["points"]] == [90, 480]


def test_even_rounds_take_the_lower_middle_and_a_failed_round_is_reported():
    rounds = [[_row("ours", 100, 400)], [_row("ours", 300, 200)], [_row("ours", 0, 0, error="boom")]]
    assert median_rows(rounds)[0]["error"] == "boom"
    merged = median_rows(rounds[:2])[0]
    assert [p["rps"] for p in merged["points"]] == [100, 200]


def test_one_round_is_returned_as_measured():
    rows = [_row("ours", 100, 400)]
    assert median_rows([rows]) == rows


def test_repeat_must_be_a_positive_count():
    assert settings_for("quick", repeat=3).repeat == 3
    with pytest.raises(ValueError, match="repeat: expected a whole number of rounds >= 1, got 0"):
        settings_for("quick", repeat=0)


def test_ratios_pair_rounds_in_the_order_they_ran():
    # Round 2 was a slow spell for every row; in round 3 only the shadow row had one. The median
    # rounds (ours 300, shadow 150) would say the shadow doubles p50; round by round it costs
    # +2.6%, +2.0% and +100%: the median, +2.6%, is what the shadow costs when nothing else interferes.
    rounds = [
        [_row("ours", 400), _row("ours_among", 400), _row("handwritten_haproxy", 440), _row("ours_shadow", 390)],
        [_row("ours", 100), _row("ours_among", 100), _row("handwritten_haproxy", 110), _row("ours_shadow", 98)],
        [_row("ours", 300), _row("ours_among", 300), _row("handwritten_haproxy", 330), _row("ours_shadow", 150)],
    ]
    merged = median_rows(rounds)
    ours = next(row for row in merged if row["id"] == "ours")["points"][0]
    assert [r["rps"] for r in ours["rounds"]] == [400, 100, 300]  # in the order they ran
    ratios = {r["name"]: r["at"]["1"] for r in compute_ratios(merged, (1,))}
    shadow = ratios["shadow_p50_cost"]
    assert shadow["value"] == pytest.approx(400 / 390 - 1, abs=1e-4)
    # Three pairs, one of them an outlier: their range is the interval (75% confidence), and it
    # straddles the 10% budget, so the verdict waits for more pairs instead of trusting the median.
    assert (shadow["pairs"], shadow["low"], shadow["high"]) == (3, pytest.approx(100 / 98 - 1, abs=1e-4), 1.0)
    assert shadow["confidence"] == 0.75 and shadow["status"] == "close"
    haproxy = ratios["ours_vs_handwritten_haproxy"]
    assert haproxy["value"] == pytest.approx(300 / 330, abs=1e-4)
    assert haproxy["high"] == pytest.approx(400 / 440, abs=1e-4) and haproxy["status"] == "missed"
    # One round (points without rounds): the plain ratio of the two points.
    single = {r["name"]: r["at"]["1"]["value"] for r in compute_ratios(rounds[2], (1,))}
    assert single["shadow_p50_cost"] == pytest.approx(300 / 150 - 1, abs=1e-4)
