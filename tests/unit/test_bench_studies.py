"""The benchmark's studies of one head (many apps, scale-out under a load step): how their numbers
are read from what was measured, their settings, and their report. No Ray and no timing here; the
studies themselves run in ``python -m benchmarks.run`` against a real head."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# The harness lives in the checkout, not in the package (see test_bench_rounds.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.plan import Plan, settings_for  # noqa: E402
from benchmarks.report import studies_lines  # noqa: E402
from benchmarks.studies import STEP_FROM, STEP_TO, autoscaler_response, last_vs_first, recovery  # noqa: E402


def _slices(before: list[float], after: list[float]) -> list[dict]:
    levels = [STEP_FROM] * len(before) + [STEP_TO] * len(after)
    return [
        {"at_s": float(i), "concurrency": c, "p99_ms": p, "rps": 100.0, "failed": 0}
        for i, (c, p) in enumerate(zip(levels, before + after, strict=True))
    ]


def test_recovery_is_when_every_later_slice_stays_under_twice_the_steady_p99():
    # The step lands at t=3; p99 spikes while replicas start, dips under 2x once (t=5) but climbs
    # back (t=6), and holds from t=7. Steady: the median of the last 5 slices (20 ms).
    after = [400.0, 90.0, 30.0, 55.0, 35.0, 22.0, 20.0, 19.0, 21.0, 20.0]
    found = recovery(_slices([2.0, 2.5, 3.0], after))
    assert found["step_at_s"] == 3.0
    assert found["steady_p99_ms"] == 20.0
    assert found["p99_before_ms"] == 2.5 and found["p99_first_slice_ms"] == 400.0
    assert found["recovered_s"] == 4.0  # t=7, the first slice after which none went above 40 ms


def test_recovery_at_once_when_the_step_never_hurt_and_none_without_enough_slices():
    assert recovery(_slices([2.0], [10.0] * 6))["recovered_s"] == 0.0
    short = recovery(_slices([2.0], [10.0, 10.0]))
    assert short["recovered_s"] is None and "too few" in short["error_in_slices"]
    unanswered = _slices([2.0], [10.0] * 6)
    unanswered[-1]["p99_ms"] = None  # a slice that answered nothing
    assert recovery(unanswered)["recovered_s"] is None


def test_the_last_apps_cost_is_read_against_the_first_as_medians_of_three():
    apps = [{"apps": i, "first_answer_s": s} for i, s in enumerate([4.0, 2.0, 2.2, 2.1, 2.4, 9.0, 3.0, 3.2], 1)]
    cost = last_vs_first(apps)
    # First three: 4.0, 2.0, 2.2 -> 2.2; last three: 9.0, 3.0, 3.2 -> 3.2 (one slow deploy does not decide).
    assert (cost["first_s"], cost["last_s"], cost["apps"]) == (2.2, 3.2, 8)
    assert cost["ratio"] == pytest.approx(3.2 / 2.2, abs=1e-3)
    assert last_vs_first(apps[:5]) is None


def test_study_settings_are_checked_and_survive_the_plan_file(tmp_path):
    assert settings_for("quick").studies == ("apps", "scale_out")
    assert settings_for("smoke").studies == ()
    with pytest.raises(ValueError, match=r"studies \(--studies\): apps2 unknown; studies are apps, scale_out"):
        settings_for("quick", studies=("apps2",))
    with pytest.raises(ValueError, match=r"many_apps \(--apps\): expected app counts >= 1"):
        settings_for("quick", many_apps=(0, 10))
    settings = settings_for("full", many_apps=(5, 12))
    plan = Plan(settings=settings, workdir=str(tmp_path), onnx_path="m.onnx", request_row=[0.0])
    plan.write(tmp_path / "plan.json")
    again = Plan.read(tmp_path / "plan.json")
    assert again.settings == settings and again.settings.many_apps == (5, 12)
    assert json.loads((tmp_path / "plan.json").read_text())["settings"]["studies"] == ["apps", "scale_out"]


def test_bad_study_flags_name_themselves_before_anything_starts(capsys):
    from benchmarks.run import main

    for argv, message in (
        (["--quick", "--apps", "ten"], "--apps: expected comma-separated whole numbers"),
        (["--quick", "--apps", "0,10"], "many_apps (--apps): expected app counts >= 1"),
        (["--quick", "--studies", "apps,heads"], "studies (--studies): heads unknown"),
        (["--quick", "--concurrency", "8,x"], "--concurrency: expected comma-separated whole numbers"),
    ):
        assert main(argv) == 2
        assert message in capsys.readouterr().err


def test_the_report_shows_each_checkpoint_and_the_verdict_at_30_apps():
    apps = [{"apps": i, "deploy_s": 2.0, "first_answer_s": 2.5 if i < 28 else 4.5} for i in range(1, 31)]
    memory = [
        {"apps": n, "replicas": n, "replica_rss_mb": 310.0, "replica_uss_mb": 120.0, "replicas_uss_total_mb": 120.0 * n,
         "serve_controller_rss_mb": 200.0 + n, "serve_controller_idle_cpu": 0.02 * n, "front_rss_mb": 150.0}
        for n in (10, 30)
    ]  # fmt: skip
    studies = {"apps": {"num_cpus": 0.05, "apps": apps, "memory": memory, "cost_of_last": last_vs_first(apps)}}
    text = "\n".join(studies_lines(studies))
    assert "| 10 | 2.00 | 2.50 | 310 | 120 | 1,200 | 210 | 20% | 150 |" in text
    assert "| 30 | 2.00 | 4.50 |" in text and "| 1 | 2.00 | 2.50 |" in text
    assert "cost 1.80x the first" in text and "**missed**" in text
    studies["apps"]["apps"] = apps[:10]
    studies["apps"]["cost_of_last"] = last_vs_first(apps[:10])
    assert "**met** (this run stopped at 10 apps)" in "\n".join(studies_lines(studies))
    assert "Not measured" in studies_lines(None)[0]


def test_the_autoscalers_answer_is_read_from_the_replica_timeline_and_the_fronts_count():
    timeline = [
        {"at_s": 0.0, "starting": 0, "running": 1},
        {"at_s": 5.5, "starting": 3, "running": 1},  # 2.5 s after a step at 3.0
        {"at_s": 9.0, "starting": 0, "running": 4},
    ]
    front = [{"at_s": 1.0, "requests": 0.9}, {"at_s": 3.4, "requests": 12.0}, {"at_s": 4.0, "requests": 31.5}]
    assert autoscaler_response(3.0, timeline, front) == {"first_added_s": 2.5, "front_peak": 31.5}
    # No replica added, no count from a front (Serve's proxy): said as such, not as zeros.
    assert autoscaler_response(3.0, timeline[:1], []) == {"first_added_s": None, "front_peak": None}
    studies = {
        "scale_out": {
            "autoscaling": {"min_replicas": 1, "max_replicas": 4},
            "num_cpus": 0.5,
            "replicas": timeline,
            "replica_start_s": [3.5],
            "p99_before_ms": 2.0,
            "p99_first_slice_ms": 30.0,
            "steady_p99_ms": 20.0,
            "recovered_s": 6.0,
            **autoscaler_response(3.0, timeline, front),
        }
    }
    assert "| 2.00 | 30.00 | 20.00 | 6.0 | 32 | 2.5 | 4 | 3.5 |" in "\n".join(studies_lines(studies))
