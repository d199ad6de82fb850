"""The capture rows of the benchmark: the ``ours`` app's settings plus ``capture``, measured with
``ours`` and the protocol rows with their points interleaved, and their ratios against ``ours``.
No Ray and no timing here: the plan, the interleaved order and the ratios (the measuring itself
runs in the benchmark and its smoke test)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The harness lives in the checkout, not in the package (see test_bench_rounds.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import groups  # noqa: E402
from benchmarks.plan import MODES, ROWS_BY_ID, Plan, settings_for  # noqa: E402
from benchmarks.report import capture_lines, compute_ratios, render_markdown  # noqa: E402

CAPTURE_ROWS = ("ours_capture10", "ours_capture100")


def _plan(tmp_path: Path, rows: tuple[str, ...] = ("ours", "ours_capture10"), **settings) -> Plan:
    ref = {"kind": "metaflow", "uri": "metaflow://BenchFlow/1/build/1/model_onnx"}
    return Plan(
        settings=settings_for("quick", rows=rows, **settings),
        workdir=str(tmp_path),
        onnx_path=str(tmp_path / "model.onnx"),
        request_row=[0.5] * 20,
        model_refs={"onnx": ref, "xgboost": {**ref, "uri": ref["uri"].replace("onnx", "xgboost")}},
    )


def test_quick_and_full_measure_both_capture_rows_and_smoke_stays_as_it_was():
    for mode in ("quick", "full"):
        rows = MODES[mode].rows
        assert set(CAPTURE_ROWS) <= set(rows), mode
        assert rows.index("ours") < rows.index("ours_capture10") < rows.index("ours_capture100")
    assert MODES["smoke"].rows == ("inprocess", "fastapi", "ours")
    for row_id in CAPTURE_ROWS:
        assert ROWS_BY_ID[row_id].group == ROWS_BY_ID["ours"].group == "default"  # the same head as ours
        assert "capture" in ROWS_BY_ID[row_id].description
        assert row_id in groups.INTERLEAVED_ROWS and groups.app_owner(row_id) == row_id  # an app of its own
    assert groups.app_owner("ours_mlflow") == groups.app_owner("ours_oip") == "ours_among"
    # Their reference is our plain app measured among them; ours itself is measured beside the
    # hand-written app only, as the rows of other heads are (issue #17): two sets, no row in both.
    assert "ours_among" in groups.INTERLEAVED_ROWS and groups.OUR_APPS["ours_among"] == groups.OUR_APPS["ours"]
    assert set(groups.PAIRED_ROWS) == {"ours", "handwritten_direct"}
    assert not set(groups.PAIRED_ROWS) & set(groups.INTERLEAVED_ROWS)
    for mode in ("quick", "full"):
        assert {"ours", "ours_among", "handwritten_direct"} <= set(MODES[mode].rows), mode


def test_a_capture_row_is_the_ours_app_plus_capture_into_the_work_dir(tmp_path):
    plan = _plan(tmp_path)
    ours = groups.our_spec_options(ROWS_BY_ID["ours"], plan)
    for row_id, sample in (("ours_capture10", 0.1), ("ours_capture100", 1.0)):
        options = groups.our_spec_options(ROWS_BY_ID[row_id], plan)
        capture = options.pop("capture")
        assert capture == {"sample": sample, "flush_s": 0.25, "path": str(tmp_path.resolve() / "captures")}
        assert options.pop("app") == "bench-" + row_id.replace("_", "-") != ours["app"]
        assert options == {k: v for k, v in ours.items() if k != "app"}
        assert groups.OUR_APPS[row_id][1] == groups.OUR_APPS["ours"][1]  # the same model
    assert "capture" not in ours


def test_capture_options_make_a_valid_deployment(tmp_path):
    from ray_deploy import DeploymentSpec

    spec = DeploymentSpec.from_options(groups.our_spec_options(ROWS_BY_ID["ours_capture10"], _plan(tmp_path)))
    assert spec.capture.sample == 0.1 and spec.capture.path == str(tmp_path.resolve() / "captures")


def test_the_interleaved_order_turns_by_one_row_each_level():
    schedule = groups.interleaved(["a", "b", "c"], [1, 8, 32, 64])
    assert schedule == [
        *[(1, "a"), (1, "b"), (1, "c")],
        *[(8, "b"), (8, "c"), (8, "a")],
        *[(32, "c"), (32, "a"), (32, "b")],
        *[(64, "a"), (64, "b"), (64, "c")],
    ]
    assert groups.interleaved([], [1, 8]) == []
    assert groups.interleaved(["a"], [1, 8]) == [(1, "a"), (8, "a")]


def _row(row_id: str, *rps: float, rounds: list[list[float]] | None = None) -> dict:
    points = []
    for index, (c, r) in enumerate(zip((1, 8, 32), rps)):
        point = {"concurrency": c, "rps": r, "p50_ms": 1000 / r}
        if rounds:
            point["rounds"] = [{"rps": each[index], "p50_ms": 1000 / each[index]} for each in rounds]
        points.append(point)
    return {"id": row_id, "title": ROWS_BY_ID[row_id].title, "group": "default", "points": points}


def test_capture_ratios_the_issue_target_applies_to_the_switched_app_at_c8_only():
    rows = [
        _row("ours_among", 1000, 2000, 2100),
        _row("ours_capture10", 900, 1920, 1500),
        _row("ours_capture100", 800, 1000, 900),
        _row("ours_capture10_on", 900, 1920, 1500),
        _row("ours_capture10_off", 1000, 2000, 2100),
    ]
    ratios = {r["name"]: r for r in compute_ratios(rows, (1, 8, 32))}
    ten = ratios["capture10_in_place"]
    assert (ten["numerator"], ten["denominator"], ten["target"], ten["target_text"]) == (
        "ours_capture10_on",
        "ours_capture10_off",
        0.95,
        ">= 0.95x at c=8",
    )
    assert [ten["at"][c]["value"] for c in ("1", "8", "32")] == [0.9, 0.96, pytest.approx(1500 / 2100, abs=1e-4)]
    assert [ten["at"][c]["status"] for c in ("1", "8", "32")] == [None, "met", None]  # c=1 and c=32 reported only
    assert ten["verdict"] == "met"
    for name in ("capture10_vs_plain", "capture100_vs_plain"):  # two apps: reported, no target
        assert ratios[name]["target"] is None and ratios[name]["target_text"] == "reported", name
        assert ratios[name]["verdict"] is None
    assert ratios["capture10_vs_plain"]["at"]["8"] == {"value": 0.96, "pairs": 1, "status": None}
    assert ratios["capture100_vs_plain"]["at"]["8"] == {"value": 0.5, "pairs": 1, "status": None}

    rows[3] = _row("ours_capture10_on", 900, 1880, 1500)
    missed = next(r for r in compute_ratios(rows, (1, 8, 32)) if r["name"] == "capture10_in_place")
    assert missed["at"]["8"] == {"value": 0.94, "pairs": 1, "status": "missed"} and missed["verdict"] == "missed"
    gone = {r["name"] for r in compute_ratios(rows[:3], (8,))}
    assert "capture10_in_place" not in gone and "capture10_vs_plain" in gone


def test_capture_ratio_pairs_rounds_in_the_order_they_ran():
    # Round 2 was a slow spell for both rows: round by round capture costs 2%, 4% and 3%.
    off = _row("ours_capture10_off", 1000, 2000, rounds=[[1000, 2000], [500, 1000], [1000, 2000]])
    ten = _row("ours_capture10_on", 980, 1940, rounds=[[980, 1960], [490, 960], [980, 1940]])
    (ratio,) = [r for r in compute_ratios([ten, off], (1, 8)) if r["name"] == "capture10_in_place"]
    assert ratio["at"]["8"]["value"] == pytest.approx(0.97) and ratio["at"]["8"]["status"] == "met"


def test_the_report_shows_the_capture_ratios_and_what_was_captured(tmp_path):
    rows = [
        _row("ours_among", 1000, 2000, 2100),
        _row("ours_capture10", 900, 1920, 1500),
        _row("ours_capture100", 800, 1000, 900),
    ]
    counts = {"root": str(tmp_path / "captures"), "sample": 0.1, "flush_s": 5.0}
    rows[1]["capture"] = {**counts, "requests": 10_000, "captured": 1_003, "capture_dropped": 0, "rows_on_disk": 1_003}
    rows[2]["capture"] = {**counts, "sample": 1.0, "error": "CaptureError: cannot list"}
    lines = capture_lines(rows)
    assert lines[4] == f"| ours, capture 10% | 0.1 | 10,000 | 1,003 | 0 | 1,003 | `{tmp_path / 'captures'}` |"
    assert lines[5].startswith("| ours, capture 100% | 1 | – | – | – | – |") and "CaptureError" in lines[5]
    assert capture_lines(rows[:1]) == []
    settings = settings_for("quick", rows=("ours", *CAPTURE_ROWS)).to_dict()
    results = {"mode": "quick", "started_at": "2026-01-01T00:00:00+00:00", "wall_s": 1.0, "settings": settings}
    results.update(rows=rows, ratios=compute_ratios(rows, (1, 8, 32)))
    report = render_markdown(results, None)
    assert "| capture 10% / ours without capture (two apps) | reported | 0.90x | 0.96x | 0.71x |" in report
    assert "| capture 100% / ours without capture | reported |" in report
    assert "| ours, capture 10% | 0.1 | 10,000 |" in report


def test_each_round_turns_the_order_so_no_row_keeps_its_place():
    rows, levels = ["a", "b", "c"], [1, 8]
    places = {}
    for round_index in range(3):
        schedule = groups.interleaved(rows, levels, start=round_index)
        first_level = [row for level, row in schedule if level == 1]
        places[round_index] = first_level.index("a")
    assert sorted(places.values()) == [0, 1, 2]


# -- one app, capture switched in place -----------------------------------------------------------

TOGGLED = ("ours_capture10_on", "ours_capture10_off")


def test_the_switched_rows_are_one_app_whose_options_differ_in_capture_only(tmp_path):
    from ray_deploy import DeploymentSpec

    plan = _plan(tmp_path, rows=TOGGLED)
    on, off = groups.toggled_options(plan, True), groups.toggled_options(plan, False)
    assert on.pop("capture") == {"sample": 0.1, "flush_s": 1.0, "path": str(tmp_path.resolve() / "captures")}
    assert on == off and "capture" not in off
    ours = groups.our_spec_options(ROWS_BY_ID["ours"], plan)
    assert {k: v for k, v in off.items() if k != "app"} == {k: v for k, v in ours.items() if k != "app"}
    assert off["app"] == groups.TOGGLED_APP != ours["app"]
    with_capture = DeploymentSpec.from_options(groups.toggled_options(plan, True))
    without = DeploymentSpec.from_options(off)
    assert with_capture.capture.sample == 0.1 and without.capture is None
    assert with_capture.app == without.app
    assert groups.TOGGLED_ROWS == {"ours_capture10_on": True, "ours_capture10_off": False}
    for mode in ("quick", "full"):
        assert set(TOGGLED) <= set(MODES[mode].rows), mode
    for row_id in TOGGLED:
        assert ROWS_BY_ID[row_id].group == "default" and row_id not in groups.INTERLEAVED_ROWS


def test_two_rows_in_turn_switch_once_per_cycle_and_pair_across_each_switch():
    # measure_in_cycles turns the order by one row per cycle: on, off | off, on | on, off | ...
    order = [row for cycle in range(6) for _, row in groups.interleaved(list(TOGGLED), (8,), cycle)]
    switches = sum(1 for before, after in zip(order, order[1:]) if before != after)
    assert switches == 6  # one inside each of the 6 cycles, none between cycles
    cycles = [order[i : i + 2] for i in range(0, len(order), 2)]
    assert all(sorted(cycle) == sorted(TOGGLED) for cycle in cycles)  # each cycle: one segment of each
    firsts = [cycle[0] for cycle in cycles[:2]]  # who goes first alternates
    assert firsts == ["ours_capture10_on", "ours_capture10_off"]


def test_the_report_says_whether_one_replica_process_answered_the_switched_rows(tmp_path):
    on, off = _row("ours_capture10_on", 900, 1920, 1500), _row("ours_capture10_off", 1000, 2000, 2100)
    toggles = {"switches": 3, "switch_s": [0.6, 0.7, 0.9], "replica_pids": [4242], "requests_capturing": 5000}
    on.update(toggles=toggles, capture={"root": str(tmp_path), "sample": 0.1, "flush_s": 1.0, "requests": 5000,
                                        "rows_on_disk": 498})  # fmt: skip
    off["toggles"] = toggles
    lines = capture_lines([on, off])
    assert lines[4] == f"| ours, capture 10%, one app switched | 0.1 | 5,000 | – | – | 498 | `{tmp_path}` |"
    said = [line for line in lines if "switched 3 times in place" in line]
    assert said == [
        "ours, capture 10%, one app switched: one app whose capture was switched 3 times in place "
        "(median switch 0.70 s); one replica process answered throughout."
    ]
    toggles["replica_pids"] = [4242, 4343]
    (said,) = [line for line in capture_lines([on, off]) if "switched 3 times" in line]
    assert "**2 replica processes answered**" in said
    settings = settings_for("quick", rows=TOGGLED).to_dict()
    results = {"mode": "quick", "started_at": "2026-01-01T00:00:00+00:00", "wall_s": 1.0, "settings": settings}
    results.update(rows=[on, off], ratios=compute_ratios([on, off], (1, 8, 32)))
    report = render_markdown(results, None)
    assert "switched in place are measured the same way on their own, in segments of at least 2 s" in report
    assert "| capture 10% / the same app with capture switched off | >= 0.95x at c=8 |" in report
