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
