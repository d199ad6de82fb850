"""The rollout gate judge, one policy field at a time, on stats recorded the way replicas record them.

Replicas call ``VariantStats.record(latency_ms, status, predictions)`` for every request and push
their cumulative stats to the ``StatsCollector``; a gate judges the merged snapshot of the new
release (``canary``) against the old one (``baseline``). These tests do the same with plain
numbers: two replicas per release, merged by a collector, then ``judge``.
"""

from ray_deploy.control.rollout import judge
from ray_deploy.serving.metrics import StatsCollector, VariantStats
from ray_deploy.spec import RolloutSpec

FAST_MS = 3.0  # a quick model: the 5 ms latency bucket
SLOW_MS = 40.0  # a model that sleeps 40 ms: the 50 ms latency bucket


def served(*requests: tuple[int, float, int]) -> VariantStats:
    """One release's stats over two replicas, merged by a collector as the gates read them.

    ``requests``: (count, latency_ms, status) groups, alternated between the two replicas.
    """
    replicas = [VariantStats(), VariantStats()]
    sent = 0
    for count, latency_ms, status in requests:
        for _ in range(count):
            replicas[sent % 2].record(latency_ms, status, [0] if status < 400 else None)
            sent += 1
    collector = StatsCollector()
    for index, stats in enumerate(replicas):
        collector.report("app", f"replica-{index}", {"default@v2": stats.to_dict()})
    return VariantStats.from_dict(collector.snapshot("app")["default@v2"])


def policy(**fields) -> RolloutSpec:
    return RolloutSpec(strategy="canary", steps=[25, 100], interval_s=4, **fields)


BASELINE = served((200, FAST_MS, 200))


def test_a_healthy_canary_passes_and_the_result_carries_both_sides_numbers():
    canary = served((100, FAST_MS, 200))
    result = judge(policy(max_p99_ms=50, max_p99_ratio=2, min_requests=50), 25, canary, BASELINE)
    assert result.passed, result.reason
    assert result.percent == 25
    assert result.canary["requests"] == 100 and result.canary["errors"] == 0 and result.canary["p99_ms"] == 5
    assert result.baseline["requests"] == 200 and result.baseline["p99_ms"] == 5
    assert result.to_dict()["passed"] is True


# max_error_rate


def test_server_errors_beyond_max_error_rate_fail_the_gate_naming_the_option():
    canary = served((95, FAST_MS, 200), (5, FAST_MS, 500))  # 5% server errors, the old release none
    result = judge(policy(max_error_rate=0.01), 25, canary, BASELINE)
    assert not result.passed
    assert "error rate 0.050 (5/100)" in result.reason and "max_error_rate=0.01" in result.reason
    assert result.canary["errors"] == 5 and result.canary["error_rate"] == 0.05


def test_errors_within_max_error_rate_pass():
    canary = served((95, FAST_MS, 200), (5, FAST_MS, 500))
    assert judge(policy(max_error_rate=0.1), 25, canary, BASELINE).passed


def test_max_error_rate_is_measured_against_the_old_releases_own_error_rate():
    """The bound is on the excess over the old release: 5% against 4.5% is within 0.01."""
    baseline = served((191, FAST_MS, 200), (9, FAST_MS, 500))  # 4.5%
    canary = served((95, FAST_MS, 200), (5, FAST_MS, 500))  # 5%
    assert judge(policy(max_error_rate=0.01), 25, canary, baseline).passed
    assert not judge(policy(max_error_rate=0.01), 25, canary, BASELINE).passed


def test_client_errors_are_the_callers_not_the_releases():
    canary = served((50, FAST_MS, 200), (50, FAST_MS, 400), (10, FAST_MS, 413))
    result = judge(policy(max_error_rate=0.0), 25, canary, BASELINE)
    assert result.passed, result.reason
    assert result.canary["client_errors"] == 60 and result.canary["errors"] == 0


def test_a_canary_with_max_error_rate_zero_fails_on_a_single_server_error():
    canary = served((99, FAST_MS, 200), (1, FAST_MS, 503))
    assert not judge(policy(max_error_rate=0.0), 25, canary, BASELINE).passed


# max_p99_ms


def test_a_slow_canary_fails_max_p99_ms_naming_the_option_and_its_p99():
    canary = served((100, SLOW_MS, 200))
    result = judge(policy(max_p99_ms=20), 25, canary, BASELINE)
    assert not result.passed
    assert "p99" in result.reason and "max_p99_ms=20" in result.reason and "50" in result.reason
    assert result.canary["p99_ms"] == 50 and result.canary["errors"] == 0


def test_max_p99_ms_above_the_canarys_latency_passes():
    assert judge(policy(max_p99_ms=100), 25, served((100, SLOW_MS, 200)), BASELINE).passed


def test_max_p99_ms_sees_the_slowest_percent_not_the_median():
    """Three slow requests in a hundred put the p99 in the slow bucket; the median stays fast."""
    canary = served((97, FAST_MS, 200), (3, 400.0, 200))
    result = judge(policy(max_p99_ms=50), 25, canary, BASELINE)
    assert not result.passed and "max_p99_ms=50" in result.reason
    assert result.canary["p50_ms"] == 5 and result.canary["p99_ms"] == 500


def test_without_max_p99_ms_a_slow_canary_passes():
    assert judge(policy(), 25, served((100, 900.0, 200)), BASELINE).passed


def test_failed_requests_count_toward_the_p99():
    """A server error's latency is recorded too (a timing-out model is slow, not only failing)."""
    canary = served((97, FAST_MS, 200), (3, 400.0, 500))
    result = judge(policy(max_error_rate=0.5, max_p99_ms=50), 25, canary, BASELINE)
    assert not result.passed and "max_p99_ms=50" in result.reason


# max_p99_ratio


def test_a_canary_slower_than_max_p99_ratio_times_the_old_release_fails_naming_both_p99s():
    canary = served((100, SLOW_MS, 200))  # p99 50 ms against the old release's 5 ms: 10x
    result = judge(policy(max_p99_ratio=2), 25, canary, BASELINE)
    assert not result.passed
    assert "max_p99_ratio=2" in result.reason and "50" in result.reason and "5 ms" in result.reason
    assert result.baseline["p99_ms"] == 5 and result.canary["p99_ms"] == 50


def test_max_p99_ratio_compares_with_the_old_releases_p99_not_a_fixed_bound():
    canary = served((100, SLOW_MS, 200))
    assert judge(policy(max_p99_ratio=20), 25, canary, BASELINE).passed
    slow_baseline = served((200, SLOW_MS, 200))  # both at 50 ms: ratio 1
    assert judge(policy(max_p99_ratio=1.5), 25, canary, slow_baseline).passed
    assert not judge(policy(max_p99_ratio=1.5), 25, canary, BASELINE).passed


# min_requests


def test_too_few_requests_fail_a_final_gate_naming_min_requests():
    canary = served((5, FAST_MS, 200))
    result = judge(policy(min_requests=10), 25, canary, BASELINE)
    assert not result.passed
    assert "only 5 request(s)" in result.reason and "min_requests=10" in result.reason


def test_enough_requests_pass_min_requests():
    assert judge(policy(min_requests=10), 25, served((10, FAST_MS, 200)), BASELINE).passed


def test_min_requests_counts_client_errors_as_answered_requests():
    canary = served((6, FAST_MS, 200), (4, FAST_MS, 400))
    assert judge(policy(min_requests=10), 25, canary, BASELINE).passed


def test_no_traffic_at_all_fails_min_requests():
    result = judge(policy(min_requests=1), 25, VariantStats(), BASELINE)
    assert not result.passed and "only 0 request(s)" in result.reason


# final=False: a window still open


def test_an_open_window_does_not_fail_for_too_few_requests_yet():
    canary = served((5, FAST_MS, 200))
    assert judge(policy(min_requests=10), 25, canary, BASELINE, final=False).passed
    assert not judge(policy(min_requests=10), 25, canary, BASELINE, final=True).passed


def test_an_open_window_still_fails_on_errors_and_latency():
    """Errors and latency cannot get better by waiting: they fail an open window already."""
    burst = served((20, FAST_MS, 500))
    early = judge(policy(min_requests=100), 25, burst, BASELINE, final=False)
    assert not early.passed and "max_error_rate" in early.reason
    slow = served((20, SLOW_MS, 200))
    assert not judge(policy(max_p99_ms=20, min_requests=100), 25, slow, BASELINE, final=False).passed
    assert not judge(policy(max_p99_ratio=2, min_requests=100), 25, slow, BASELINE, final=False).passed


# one window of a cumulative snapshot, as the gates take it


def test_the_gate_judges_the_steps_window_not_what_came_before():
    """Replicas push cumulative stats; a step's window is the snapshot minus the one before it.
    Errors before the window do not fail the step, errors inside it do."""
    before = served((50, FAST_MS, 500))
    clean_window = before.merge(served((100, FAST_MS, 200))).minus(before)
    assert clean_window.requests == 100 and clean_window.errors == 0
    assert judge(policy(max_error_rate=0.01), 50, clean_window, BASELINE).passed
    bad_window = before.merge(served((50, FAST_MS, 200), (50, FAST_MS, 500))).minus(before)
    assert not judge(policy(max_error_rate=0.01), 50, bad_window, BASELINE).passed
