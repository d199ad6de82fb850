import pytest

from ray_deploy.serving.metrics import StatsCollector, VariantStats


def test_percentiles_errors_and_prediction_mean():
    stats = VariantStats()
    for latency in [0.8] * 90 + [30.0] * 9 + [700.0]:
        stats.record(latency, 200, [1, 0])
    stats.record(3.0, 400)
    stats.record(3.0, 500)
    summary = stats.summary()
    assert summary["requests"] == 102 and summary["errors"] == 1 and summary["client_errors"] == 1
    assert summary["p50_ms"] == 1 and summary["p99_ms"] == 50
    assert summary["prediction_mean"] == 0.5
    assert abs(summary["error_rate"] - 1 / 102) < 1e-6


def test_collector_merges_replicas_and_deltas_subtract():
    first, second = VariantStats(), VariantStats()
    first.record(1.0, 200, [1])
    second.record(2.0, 500)
    collector = StatsCollector()
    collector.report("app", "r1", {"a": first.to_dict()})
    collector.report("app", "r2", {"a": second.to_dict(), "b": first.to_dict()})
    merged = {k: VariantStats.from_dict(v) for k, v in collector.snapshot("app").items()}
    assert merged["a"].requests == 2 and merged["a"].errors == 1 and merged["b"].requests == 1
    later = merged["a"].merge(first)
    assert later.minus(merged["a"]).requests == 1
    assert collector.snapshot("other") == {}


def test_a_batch_is_recorded_as_its_requests_one_by_one():
    statuses = [200, 200, 422, 500, 200]
    answers = [[1], [0.5, 0.25], None, None, [[3.0, 1.0]]]
    one_by_one, batched = VariantStats(), VariantStats()
    for status, answer in zip(statuses, answers):
        one_by_one.record(1.5, status, answer)
    batched.record_batch(1.5, statuses, answers)
    assert batched == one_by_one
    assert (batched.requests, batched.errors, batched.client_errors) == (5, 1, 1)
    assert batched.prediction_count == 4


def test_a_batch_answers_predictions_counted_as_one_by_one():
    """Long answers are summed as an array; the statistics are those of adding them one by one."""
    answers = [list(range(40)), [0.25 * i for i in range(33)], [True] * 20, [[0.5, 0.5]] * 20, [1, "a"] * 10]
    for answer in answers:
        stats = VariantStats()
        stats.record(1.0, 200, answer)
        firsts = [v[0] if isinstance(v, list) else v for v in answer]
        numbers = [float(v) for v in firsts if type(v) in (int, float)]
        assert stats.prediction_count == len(numbers)
        assert stats.prediction_sum == pytest.approx(sum(numbers))
        assert stats.prediction_sq_sum == pytest.approx(sum(n * n for n in numbers))
