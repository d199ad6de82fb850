"""The multi-node benchmark's logic (no timing): its cluster, its ratios, its page."""

from benchmarks.multinode import REPLICAS, WORKER_NODES, cluster_config, ratios, render_markdown


def point(level, rps, p99=2.0):
    return {"concurrency": level, "rps": rps, "p50_ms": 1.5, "p90_ms": 1.8, "p99_ms": p99, "max_ms": 3 * p99}


def test_the_cluster_leaves_the_head_no_cpu_so_replicas_run_on_other_nodes():
    config = cluster_config(6389)
    assert config["provider"]["gcs_address"] == "127.0.0.1:6389"
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0
    (node,) = [t for name, t in types.items() if name != config["head_node_type"]]
    assert node["min_workers"] == node["max_workers"] == WORKER_NODES >= REPLICAS


def test_ratios_are_taken_within_a_round_and_a_failed_path_gives_none():
    rounds = [
        {
            "front": {"points": [point(8, 3000)]},
            "serve_haproxy": {"points": [point(8, 2000)]},
            "serve_proxy": {"points": [point(8, 200)]},
        },
        {
            "front": {"points": [point(8, 2000)]},  # a slower round: the ratio holds
            "serve_haproxy": {"points": [point(8, 1000)]},
            "serve_proxy": {"error": "the head failed", "points": []},
        },
        {"front": {"points": [point(8, 2500)]}, "serve_haproxy": {"points": [point(8, 2500)]}},
    ]
    out = ratios(rounds, (8,))
    assert out["front_vs_serve_haproxy_c8"] == {"rounds": [1.5, 2.0, 1.0], "median": 1.5}
    assert out["front_vs_serve_proxy_c8"] == {"rounds": [15.0], "median": 15.0}
    assert ratios([{"front": {"points": []}}], (8,))["front_vs_serve_proxy_c8"]["median"] is None


def test_the_page_shows_medians_rounds_spread_and_failures():
    rounds = [
        {
            "front": {"points": [point(8, 3000, 4.0)], "replica_nodes": ["n1", "n2"]},
            "serve_haproxy": {"points": [point(8, 2000)], "replica_nodes": ["n1", "n2"]},
            "serve_proxy": {"error": "TimeoutError: no answer", "points": []},
        }
    ]
    results = {
        "command": "python -m benchmarks.multinode",
        "started": "2026-12-04T00:00:00",
        "seconds": 300,
        "machine": "a machine",
        "generator": "wrk",
        "settings": {"concurrency": [8]},
        "rounds": rounds,
        "ratios": ratios(rounds, (8,)),
    }
    page = render_markdown(results)
    assert (
        "| ray-deploy front (secret-checked replica ports) | 3,000 | 1.5 / 1.8 / 4.0 / 12.0 | 2 distinct worker nodes |"
        in page
    )
    assert "**1.50x** (1.50)" in page
    assert "Serve's proxy (defaults) | failed: TimeoutError: no answer" in page
